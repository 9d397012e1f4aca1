"""The main job's comparison: every method of the profile in its own process, one side-by-side table with ratios to
full fine-tuning, and each adapter reloaded onto a fresh base and merged into plain transformers with the same
held-out loss. Run on tiny models (a BERT on the SST-2 fixture, a Llama on HumanEval); the real profiles are checked
for shape. With no data folder anywhere, the demo runs the code task, whose data the install brings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hybrid_peft.bench import load_plan
from hybrid_peft.demo import DEMO_PROFILES, MERGE_TOLERANCE, RELOAD_TOLERANCE, choose_task, run_comparison
from hybrid_peft.errors import ConfigError, HybridPeftError


def tiny_profile(path: Path, task: dict, **defaults: object) -> Path:
    """A demo profile of one tiny task: full fine-tuning, LoRA and the hybrid, a few steps each."""
    path.write_text(
        yaml.safe_dump(
            {
                "seeds": [0],
                "defaults": {"threads": 1, "generate": False, "warmup_steps": 1, "merge": True, **defaults},
                "tasks": {"tiny": task},
                "methods": {
                    "full": {"method": "full", "learning_rate": 1e-3},
                    "lora": {"method": "lora", "adapter": {"rank": 2}, "learning_rate": 1e-2},
                    "hybrid": {"method": "hybrid", "adapter": {"rank": 2, "block_size": 4}, "learning_rate": 1e-2},
                },
            },
            sort_keys=False,
        )
    )
    return path


@pytest.mark.parametrize("task", sorted(DEMO_PROFILES))
def test_each_demo_profile_compares_full_fine_tuning_lora_and_the_hybrid_on_one_task(task: str) -> None:
    plan = load_plan(DEMO_PROFILES[task])
    assert list(plan.seeds) == [0] and len(plan.tasks) == 1
    runs = plan.runs()
    assert {r.config.method for r in runs} >= {"full", "lora", "hybrid"}
    assert all(r.config.merge or r.config.method == "full" for r in runs)  # every adapter is checked merged
    assert len({r.config.learning_rate for r in runs}) > 1  # each method at its own tuned rate


@pytest.mark.slow
def test_comparison_table_and_reload_merge_checks(tiny_bert: str, tmp_path: Path) -> None:
    profile = tiny_profile(
        tmp_path / "demo.yaml",
        {"task": "sst2", "model": tiny_bert, "steps": 3, "batch_size": 4},
        eval_examples=32,
    )
    from transformers.utils import logging as transformers_logging

    lines: list[str] = []
    shown = transformers_logging.is_progress_bar_enabled()
    rows = run_comparison(output_dir=str(tmp_path / "out"), threads=1, echo=lines.append, profile=str(profile))
    assert transformers_logging.is_progress_bar_enabled() == shown, "the check must leave the setting as it was"
    assert [r.method for r in rows] == ["full", "lora", "hybrid"]
    checked = [row for row in rows if row.loss_reloaded is not None]
    assert len(checked) == 1 and checked[0].method in ("lora", "hybrid")  # the best adapter's files
    best = max(rows[1:], key=lambda r: (r.summary.after["accuracy"], -r.summary.after["loss"]))
    assert checked[0].method == best.method
    assert abs(checked[0].loss_reloaded - checked[0].summary.after["loss"]) <= RELOAD_TOLERANCE
    assert abs(checked[0].loss_merged - checked[0].summary.after["loss"]) <= MERGE_TOLERANCE
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| method | rate | accuracy before → after |") and len(table) == 4
    full_row, lora_row = table[1], table[2]
    assert full_row.count("(1.00×)") == 4  # step, training time, memory, parameters: full against itself
    ratios = [float(x) for x in re.findall(r"\(([0-9.]+)×\)", lora_row)]
    assert len(ratios) == 4 and ratios[3] < 0.5  # LoRA trains a fraction of the parameters
    assert (tmp_path / "out" / "report.html").is_file()
    assert any("Report:" in line and "report.html" in line for line in lines)


def _no_data_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's machine: no $HYBRID_PEFT_DATA, and no shared/data folder above the working directory."""
    monkeypatch.delenv("HYBRID_PEFT_DATA", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    assert not any((parent / "shared" / "data").is_dir() for parent in [home, *home.parents])
    return home


def test_auto_runs_the_code_task_without_a_data_folder_and_sst2_where_its_files_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _no_data_anywhere(tmp_path, monkeypatch)
    assert choose_task("auto") == "code"
    (home / "shared" / "data" / "glue" / "SST-2").mkdir(parents=True)
    assert choose_task("auto") == "sst2"
    assert choose_task("auto", data_dir="elsewhere") == "sst2"  # asked for data: a wrong folder is an error later
    assert choose_task("code", data_dir="elsewhere") == "code"
    with pytest.raises(ConfigError, match="choose one of auto, code, sst2"):
        choose_task("mnli")


@pytest.mark.slow
def test_the_demo_runs_with_no_data_folder_anywhere(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (``auto``) on a machine with nothing beside the install: the code task, end to end, with the
    table, the reload/merge check, the report, and a pointer to the other task."""
    home = _no_data_anywhere(tmp_path, monkeypatch)
    real = load_plan(DEMO_PROFILES["code"])
    ((real_task,),) = [tuple(real.tasks.values())]
    profile = tiny_profile(
        home / "demo-code.yaml",
        {"task": real_task["task"], "model": tiny_lm, "steps": 3, "batch_size": 2, "max_length": 48},
        eval_batch_size=8,
    )
    lines: list[str] = []
    rows = run_comparison(output_dir=str(home / "out"), threads=1, echo=lines.append, profile=str(profile))
    assert [r.method for r in rows] == ["full", "lora", "hybrid"]
    assert lines[0].startswith("Task: code") and "--task sst2 --data-dir" in lines[0]
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| method | rate | token_accuracy before → after |") and len(table) == 4
    checked = [row for row in rows if row.loss_reloaded is not None]
    assert len(checked) == 1
    assert abs(checked[0].loss_reloaded - checked[0].summary.after["loss"]) <= RELOAD_TOLERANCE
    assert abs(checked[0].loss_merged - checked[0].summary.after["loss"]) <= MERGE_TOLERANCE
    assert (home / "out" / "report.html").is_file()
    # the runs' progress reached the demo's output as it came, not only their log files
    assert any(line.strip().startswith("lora: step 3/3 · loss ") and " left" in line for line in lines)


def test_sst2_names_the_data_folder_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_data_anywhere(tmp_path, monkeypatch)
    with pytest.raises(HybridPeftError, match=r"--data-dir"):
        run_comparison(output_dir=str(tmp_path / "out"), echo=lambda _: None, task="sst2")


@pytest.mark.slow
def test_a_demo_run_that_fails_fails_the_demo_after_the_table_of_the_others(tiny_bert: str, tmp_path: Path) -> None:
    """``make demo`` must not report success when a run failed: the runs that finished are still tabulated, then the
    demo raises (the command line prints it and exits 2) naming the run and its log."""
    from hybrid_peft.demo import DemoRunFailed

    profile = tiny_profile(tmp_path / "demo.yaml", {"task": "sst2", "model": tiny_bert, "steps": 2, "batch_size": 4})
    document = yaml.safe_load(profile.read_text())
    document["methods"]["lora"]["adapter"]["rank"] = 4096  # larger than any layer: refused when attached
    profile.write_text(yaml.safe_dump(document, sort_keys=False))
    lines: list[str] = []
    with pytest.raises(DemoRunFailed, match=r"1 of 2 demo runs did not finish \(lora: .*lora.*run\.log\)"):
        run_comparison(
            output_dir=str(tmp_path / "out"), methods=["full", "lora"], threads=1, echo=lines.append,
            profile=str(profile),
        )  # fmt: skip
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 2 and table[1].startswith("| full |")  # the header and the one run that finished
    assert issubclass(DemoRunFailed, HybridPeftError)  # the command line's "error: ..." and exit status 2
