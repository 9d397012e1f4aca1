"""Checkpoints and resume under hostile or unlucky conditions: a pickle payload, changed options, a reused folder,
half-written files, a failing final evaluation, non-finite weights, two runs in one folder."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import transformers
from safetensors.torch import load_file

from hybrid_peft.errors import HybridPeftError, NonFiniteLossError
from hybrid_peft.run import Recipe, TrainConfig, run_training
from hybrid_peft.run.checkpoint import PICKLED_FILE, STATE_FILE, TENSORS_FILE, CheckpointError
from hybrid_peft.run.folder import RunFolderLock


def config_for(model: str, output: Path, **options) -> TrainConfig:  # noqa: ANN003
    base = {
        "model": model,
        "task": "humaneval",
        "steps": 4,
        "batch_size": 2,
        "max_length": 48,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "eval_examples": 2,
        "generate": False,
        "save_every": 2,
        "output_dir": str(output),
        "threads": 2,
        "adapter": {"rank": 2},
    }
    return TrainConfig.from_dict(base | options)


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


class Payload:
    """Unpickling this writes a file: what a tampered checkpoint would use to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture
def finished_run(tiny_lm: str, tmp_path: Path) -> TrainConfig:
    config = config_for(tiny_lm, tmp_path / "run")
    run_training(config, progress=False)
    return config


def test_checkpoints_hold_no_pickle_and_resume_never_unpickles(finished_run: TrainConfig, tmp_path: Path) -> None:
    checkpoint = Path(finished_run.output_dir) / "checkpoints" / "step-000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter", STATE_FILE, TENSORS_FILE]
    assert any(name.startswith("optimizer::") for name in load_file(str(checkpoint / TENSORS_FILE)))
    marker = tmp_path / "payload-ran"
    (checkpoint / PICKLED_FILE).write_bytes(pickle.dumps({"optimizer": Payload(marker)}))
    run_training(finished_run, resume=True, progress=False)  # a pickle beside the real state is ignored
    assert not marker.exists()
    (checkpoint / TENSORS_FILE).unlink()  # an old-style checkpoint: only the pickle
    with pytest.raises(CheckpointError, match="pickle"):
        run_training(finished_run, resume=True, progress=False)
    assert not marker.exists(), "resume ran code from the checkpoint"


def test_resume_refuses_changed_options_and_accepts_the_ones_that_may_change(
    finished_run: TrainConfig, tiny_lm: str, tmp_path: Path
) -> None:
    output = Path(finished_run.output_dir)
    for changed in ({"method": "hybrid"}, {"adapter": {"rank": 4}}, {"batch_size": 4, "seed": 3}):
        config = config_for(tiny_lm, output, **changed)
        with pytest.raises(HybridPeftError, match="other options") as info:
            run_training(config, resume=True, progress=False)
        for key in changed:
            assert f"{key}:" in str(info.value)
    extended = run_training(config_for(tiny_lm, output, steps=6), resume=True, progress=False)
    assert extended.resumed_from_step == 2 and len(losses(output)) == 6


def test_a_fresh_run_into_a_used_folder_needs_overwrite(finished_run: TrainConfig) -> None:
    with pytest.raises(HybridPeftError, match="already holds a run.*--resume.*--overwrite"):
        run_training(finished_run, progress=False)
    summary = run_training(finished_run, overwrite=True, progress=False)
    assert summary.resumed_from_step == 0
    with pytest.raises(HybridPeftError, match="choose one"):
        run_training(finished_run, resume=True, overwrite=True, progress=False)


def test_staging_folders_and_a_torn_log_line_are_ignored(finished_run: TrainConfig, tiny_lm: str) -> None:
    output = Path(finished_run.output_dir)
    straight = losses(output)
    complete = output / "checkpoints" / "step-000002"
    shutil.copytree(complete, output / "checkpoints" / "step-000003.partial")  # complete but never renamed
    with open(output / "train_log.jsonl", "a", encoding="utf-8") as log:
        log.write('{"step": 3, "loss": 1.2')  # a crash mid-write
    summary = run_training(finished_run, resume=True, progress=False)
    assert summary.resumed_from_step == 2
    assert losses(output) == straight


def test_the_result_is_saved_before_the_final_evaluation(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate = Recipe.evaluate

    def failing_after(self: Recipe, label: str, rows: list | None = None, **options: Any) -> dict[str, float]:
        if label == "after":
            raise KeyboardInterrupt
        return evaluate(self, label, rows, **options)

    monkeypatch.setattr(Recipe, "evaluate", failing_after)
    config = config_for(tiny_lm, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_training(config, progress=False)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file(), "the training was lost"


def test_after_a_non_finite_loss_resume_continues_from_a_good_checkpoint_at_a_new_rate(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    forward = transformers.LlamaForCausalLM.forward
    calls = {"training": 0}

    def nan_at_step_three(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        output = forward(self, *args, **kwargs)
        if self.training:
            calls["training"] += 1
            if calls["training"] == 4:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", nan_at_step_three)
    config = config_for(tiny_lm, tmp_path / "run", save_every=1, steps=6)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the training loss is nan.*step-000002.*--resume --learning"):
        run_training(config, progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step-000003.nonfinite").is_dir(), "the checkpoint that led to NaN is set aside, not lost"
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", forward)
    summary = run_training(
        config_for(tiny_lm, tmp_path / "run", save_every=1, steps=6, learning_rate=5e-3), resume=True, progress=False
    )
    assert summary.resumed_from_step == 2 and summary.config.learning_rate == 5e-3
    assert "with learning rate 0.005 (the checkpoint's run used 0.01)" in capsys.readouterr().out
    from hybrid_peft.run.loop import warmup_cosine

    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    training = [r for r in log if "loss" in r]
    assert [r["step"] for r in training] == [0, 1, 2, 3, 4, 5]
    for record in training[2:]:  # the resumed steps run at the new rate, on the same schedule
        assert record["lr"] == pytest.approx(5e-3 * warmup_cosine(record["step"], 6, 1), rel=1e-9)
    assert training[1]["lr"] == pytest.approx(1e-2 * warmup_cosine(1, 6, 1), rel=1e-9)


def test_two_runs_cannot_share_a_folder(tiny_lm: str, tmp_path: Path) -> None:
    with RunFolderLock(tmp_path / "run"), pytest.raises(HybridPeftError, match="in use by another run"):
        run_training(config_for(tiny_lm, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "train_log.jsonl").exists()
