"""The main job's comparison: every method of the profile in its own process, one side-by-side table with ratios to
full fine-tuning, and each adapter reloaded onto a fresh base and merged into plain transformers with the same
held-out loss. Run on a tiny BERT and the SST-2 fixture; the real profile is checked for shape."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hybrid_peft.bench import load_plan
from hybrid_peft.demo import DEMO_PROFILE, MERGE_TOLERANCE, RELOAD_TOLERANCE, run_comparison
from hybrid_peft.errors import HybridPeftError


def test_the_demo_profile_compares_full_fine_tuning_lora_and_the_hybrid_on_one_task() -> None:
    plan = load_plan(DEMO_PROFILE)
    assert list(plan.seeds) == [0] and len(plan.tasks) == 1
    runs = plan.runs()
    assert {r.config.method for r in runs} >= {"full", "lora", "hybrid"}
    assert all(r.config.merge or r.config.method == "full" for r in runs)  # every adapter is checked merged


def test_comparison_table_and_reload_merge_checks(tiny_bert: str, tmp_path: Path) -> None:
    profile = tmp_path / "demo.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "seeds": [0],
                "defaults": {"threads": 1, "generate": False, "warmup_steps": 1, "merge": True, "eval_examples": 32},
                "tasks": {"sst2-tiny": {"task": "sst2", "model": tiny_bert, "steps": 3, "batch_size": 4}},
                "methods": {
                    "full": {"method": "full", "learning_rate": 1e-3},
                    "lora": {"method": "lora", "adapter": {"rank": 2}, "learning_rate": 1e-2},
                    "hybrid": {"method": "hybrid", "adapter": {"rank": 2, "block_size": 4}, "learning_rate": 1e-2},
                },
            },
            sort_keys=False,
        )
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


def test_the_demo_names_the_data_folder_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRID_PEFT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HybridPeftError, match=r"--data-dir"):
        run_comparison(output_dir=str(tmp_path / "out"), echo=lambda _: None)
