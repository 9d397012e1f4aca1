"""What a new user meets on an unseen task: default learning rates, spec files, method lists, warnings, the log
and the plot, and every command's --help."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hybrid_peft.cli import build_parser, main
from hybrid_peft.errors import ConfigError, TaskDataError
from hybrid_peft.run import TrainConfig, run_training, training_methods
from hybrid_peft.tasks import get_task

from conftest import DATA


def test_each_method_has_its_own_default_learning_rate() -> None:
    methods = ("lora", "lora-ga", "boft", "unitary", "hybrid")
    rates = {m: TrainConfig(method=m, model="minilm-l6").learning_rate for m in methods}
    assert rates == {"lora": 1e-3, "lora-ga": 3e-4, "boft": 3e-3, "unitary": 1e-2, "hybrid": 1e-3}
    assert TrainConfig(method="full", model="minilm-l6").learning_rate == 1e-4  # 22.7M parameters
    assert TrainConfig(method="full", model="smollm2-135m").learning_rate == 1e-4  # 135M parameters
    assert TrainConfig(method="full", model="an/unreadable-hub-id").learning_rate == 3e-5  # size unknown: larger
    assert TrainConfig(method="peft-boft", model="minilm-l6").learning_rate == 1e-2
    given = TrainConfig(method="boft", learning_rate=5e-3)
    assert given.learning_rate == 5e-3 and not given.learning_rate_is_default
    assert TrainConfig(method="boft").learning_rate_is_default
    train_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions  # noqa: SLF001
                      if "--learning-rate" in a.option_strings).help  # fmt: skip
    assert "boft" in train_help and "0.003" in train_help


def test_the_rate_used_is_printed(tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    arguments = ["train", "--model", tiny_bert, "--task", "sst2", "--method", "boft", "--steps", "1", "--batch-size",
                 "4", "--max-length", "32", "--eval-examples", "4", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "boft: learning rate 0.003 (the method's default; --learning-rate to change)" in out
    assert "new classification head" not in out  # this checkpoint has a head already


def test_spec_files_list_valid_keys_and_hint_at_labels(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("text\tsentiment\ngood\tpositive\nbad\tnegative\n")
    (folder / "dev.tsv").write_text("text\tsentiment\nfine\tpositive\n")
    spec = {"name": "toy", "folder": "toy", "text_columns": ["text"], "label_column": "sentiment"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec | {"label_colum": "x"}))
    with pytest.raises(TaskDataError, match=r"unknown key\(s\) \['label_colum'\].*did you mean 'label_column'.*valid"):
        get_task(f"glue-spec:{path}", data_dir=tmp_path / "data")
    path.write_text(json.dumps(spec))
    task = get_task(f"glue-spec:{path}", data_dir=tmp_path / "data")
    with pytest.raises(TaskDataError, match=r"label 'positive' is not in .*gives no 'labels'.*\"labels\""):
        task.train_rows()
    path.write_text(json.dumps(spec | {"labels": ["negative", "positive"]}))
    assert [r["label"] for r in get_task(f"glue-spec:{path}", data_dir=tmp_path / "data").train_rows()] == [1, 0]


def test_help_spec_documents_every_key(capsys: pytest.CaptureFixture) -> None:
    import dataclasses

    from hybrid_peft.tasks.glue import GlueSpec

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-spec"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(GlueSpec):
        assert f"\n{field.name} " in out, field.name


def test_one_method_list_everywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(method="lroa")
    for method in ("lora", "hybrid", "full", "peft-lora", "peft-boft", "peft-lora+oft"):
        assert method in str(info.value)
    assert set(training_methods()) >= {"full", "peft-lora", "lora", "hybrid"}


@pytest.mark.slow
def test_warnings_in_our_words_once(tiny_bert: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from hybrid_peft import load_model

    with pytest.warns(UserWarning, match=r"classifier.bias, classifier.weight are not in minilm-l6.*new task head"):
        load_model("minilm-l6", task="sequence-classification", num_labels=2)

    def cli(*arguments: str) -> str:
        command = [sys.executable, "-m", "hybrid_peft.cli", *arguments]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=os.environ | {"TQDM_DISABLE": "1"}
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    err = cli("train", "--model", "minilm-l6", "--task", "sst2", "--steps", "1", "--batch-size", "2",
              "--max-length", "5", "--eval-examples", "2", "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert "LOAD REPORT" not in err and "MISSING" not in err
    assert err.count("longer than max_length=5") == 1, err  # once, on one line, without a source line
    assert "warning: some sequences are longer than max_length=5" in err and "warn_if_truncated(" not in err
    err = cli("eval", "--model", "minilm-l6", "--task", "sst2", "--adapter", str(tmp_path / "run" / "adapter"),
              "--eval-examples", "4", "--max-length", "32")  # fmt: skip
    assert "classifier" not in err, "the adapter restores the head: nothing to say"


def test_evaluations_are_in_the_log_with_the_plots_numbering(tiny_lm: str, tmp_path: Path) -> None:
    config = TrainConfig(model=tiny_lm, task="humaneval", steps=4, batch_size=2, max_length=48, eval_examples=2,
                         generate=False, eval_every=2, output_dir=str(tmp_path / "run"))  # fmt: skip
    summary = run_training(config, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evaluations = [(r["step"], r["eval"]) for r in log if "eval" in r]
    assert [step for step, _ in evaluations] == [0, 2, 4]
    assert evaluations[0][1] == summary.before and evaluations[-1][1] == summary.after
    assert [r["step"] for r in log if "loss" in r] == [0, 1, 2, 3]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_periodic_evaluations_skip_generation_and_the_last_one_runs_it(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hybrid_peft.tasks.humaneval import HumanEvalTask

    asked: list[bool] = []

    def evaluate(self, model, tokenizer, rows, *, generate: bool = True, **options):  # noqa: ANN001, ANN202
        asked.append(generate)
        return {"loss": 1.0} | ({"pass@1": 0.0} if generate else {})

    monkeypatch.setattr(HumanEvalTask, "evaluate", evaluate)
    config = TrainConfig(model=tiny_lm, task="humaneval", steps=4, batch_size=2, max_length=48, eval_examples=2,
                         generate=True, eval_every=1, output_dir=str(tmp_path / "run"))  # fmt: skip
    summary = run_training(config, progress=False)
    assert asked == [True, False, False, False, True]  # before, steps 1-3 (loss only), after
    assert "pass@1" in summary.after and "pass@1" in summary.before
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [sorted(r["eval"]) for r in log if "eval" in r and 0 < r["step"] < 4] == [["loss"]] * 3


def test_every_option_of_every_command_is_explained() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, command in commands.items():
        for action in command._actions:  # noqa: SLF001
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"


def test_an_adapter_for_another_model_names_the_model_flag(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", "--model", tiny_bert, "--task", "sst2", "--steps", "1", "--batch-size", "2",
                 "--max-length", "16", "--eval-examples", "2", "--output-dir", str(tmp_path / "run")]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--model", "minilm-l6", "--task", "sst2", "--adapter", str(tmp_path / "run" / "adapter"),
                 "--eval-examples", "2"]) == 2  # fmt: skip
    assert "--model is minilm-l6" in capsys.readouterr().err


def test_dataset_accepts_a_dev_split(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    (tmp_path / "train.jsonl").write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n')
    (tmp_path / "dev.jsonl").write_text('{"sentence": "fine", "label": 1}\n')
    task = get_task("sst2", dataset=str(tmp_path))
    assert len(task.train_rows()) == 2 and len(task.eval_rows()) == 1
    assert DATA.is_dir()


def test_progress_lines_come_every_few_seconds_with_the_time_left() -> None:
    from hybrid_peft.run.progress import ProgressLines, format_duration

    now = [0.0]
    shown: list[str] = []
    lines = ProgressLines("lora", total=10, every_s=5.0, echo=shown.append, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 2.0  # a step every 2 s
        lines.update(step, loss=1.0 / step, step_seconds=2.0)
    # the first step, then at most one line per 5 s, and the last step
    assert [line.split(" · ")[0] for line in shown] == ["lora: step 1/10", "lora: step 4/10", "lora: step 7/10",
                                                         "lora: step 10/10"]  # fmt: skip
    assert shown[1] == "lora: step 4/10 · loss 0.2500 · 2.00 s/step · 12 s left"
    assert shown[-1].endswith("0 s left")
    assert [format_duration(s) for s in (42, 185, 3720)] == ["42 s", "3 min 05 s", "1 h 02 min"]


def test_a_run_without_a_terminal_prints_progress_lines(tiny_lm: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    config = TrainConfig(model=tiny_lm, task="humaneval", steps=3, batch_size=2, max_length=48, eval_examples=2,
                         generate=False, threads=1, output_dir=str(tmp_path / "run"))  # fmt: skip
    run_training(config)
    out = capsys.readouterr().out  # captured: not a terminal, so no bar is drawn
    assert "lora: training 3 steps" in out and "lora: evaluating (before) on 2 rows" in out
    assert "lora: step 1/3 · loss " in out and "lora: step 3/3 · loss " in out and " s left" in out
