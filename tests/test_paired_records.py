"""``benchmarks/paired_records.py``: pairing recorded runs named by method and rate, by seed and by evaluation row."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from hybrid_peft.run.config import TrainConfig
from hybrid_peft.run.summary import RunSummary

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_records.py"


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("paired_records", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(
    records: Path,
    method: str,
    rate: float,
    seed: int,
    losses: list[float],
    retention: list[float],
    accuracy: list[float] | None = None,
) -> None:
    """One finished run's record: its summary and each evaluation row's loss (every row 10 tokens); with
    ``accuracy``, an SST-2 run that also scored each row's correctness."""
    task = "gsm8k" if accuracy is None else "sst2"
    folder = records / task / method / f"lr-{rate:g}" / f"seed-{seed}"
    folder.mkdir(parents=True)
    config = TrainConfig.from_dict(
        {"task": task, "model": "tiny", "method": "lora", "learning_rate": rate, "seed": seed,
         "output_dir": f"runs/bench/runs/gsm8k/{method}/lr-{rate:g}/seed-{seed}"}
    )  # fmt: skip
    mean = sum(losses) / len(losses)
    after = {"loss": mean, "retention_loss": sum(retention) / len(retention)}
    if accuracy is not None:
        after["accuracy"] = sum(accuracy) / len(accuracy)
    RunSummary(
        config=config, task=task, processes=1, distributed_type="NO", ranks_in_sync=True,
        trainable_parameters=1, total_parameters=2, before={"loss": 1.0, "retention_loss": 4.0},
        after=after, final_loss=None,
        median_step_s=None, wall_s=1.0, peak_rss_mb=1.0, resumed_from_step=0,
    ).write(folder)  # fmt: skip
    scores = {"loss": losses, "loss_tokens": [10] * len(losses), "retention_loss": retention,
              "retention_tokens": [10] * len(retention)}  # fmt: skip
    if accuracy is not None:
        scores["accuracy"] = accuracy
    examples = {"evaluation": "after", "rows": len(losses), "scores": scores}
    (folder / "eval_examples.json").write_text(json.dumps(examples))


def test_pairs_runs_at_any_rate_by_seed_and_by_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A method at a rate its sweep did not choose is paired with the reference run on the seeds both finished: the
    means are the runs' own, the differences are per seed (t-interval) and per row (bootstrap), and a seed only one
    side finished is left out of the pairing."""
    records = tmp_path / "records"
    rows = 40
    for seed in range(3):
        base = [0.8 + 0.01 * ((i * 7 + seed) % 5) for i in range(rows)]
        _record(records, "lora", 4.5e-3, seed, base, [4.0 + 0.02 * seed] * 20)
        # 0.01 lower on every row, with a seed-dependent wobble; forgetting level (the same passages' losses)
        _record(records, "lora", 2.5e-3, seed, [v - 0.01 - 0.001 * seed for v in base], [4.0 + 0.02 * seed] * 20)
    _record(records, "lora", 2.5e-3, 7, [0.5] * rows, [4.0] * 20)  # no reference run on seed 7
    script = _script()
    runs = "lora@2.5e-3,boft@5e-3"
    assert script.main([str(records), "--reference", "lora@4.5e-3", "--runs", runs, "--plots", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if line.startswith("| lora@0.0025 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "0,1,2,7"  # its own mean is over every seed it finished
    assert re.fullmatch(r"\*\*-0\.0110 \[-0\.01\d+, -0\.00\d+\]\*\*", cells[3])  # by seed: 0,1,2 only
    assert cells[4].startswith("**-0.0110 [")  # by row, the same mean
    assert cells[6].startswith("+0.0000 [") and cells[7].startswith("+0.0000 [")  # forgetting level
    assert "no finished run of boft@0.005" in captured.err
    assert next(line for line in captured.out.splitlines() if line.startswith("| lora@0.0045 ")).count("–") == 4
    assert (tmp_path / "learn_forget.png").stat().st_size > 0 and "wrote " in captured.out


def test_names_the_mistake_in_a_run_name_or_a_missing_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    records = tmp_path / "records"
    _record(records, "lora", 1e-3, 0, [0.8], [4.0])
    for bad in ("lora", "lora@fast", "@1e-3", "lora@-1"):
        with pytest.raises(SystemExit):
            script.main([str(records), "--reference", bad, "--runs", "lora@1e-3"])
        assert "name a run as METHOD@RATE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(records), "--reference", "lora@3e-3", "--runs", "lora@1e-3"])
    assert "no finished run of lora@0.003" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nowhere"), "--reference", "lora@1e-3", "--runs", "lora@1e-3"])
    assert "no records folder" in capsys.readouterr().err


def test_a_task_with_a_metric_is_paired_in_it_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs that scored the task's metric (accuracy on SST-2) get its mean and paired differences beside the losses;
    the math profile's loss-only runs (above) get none."""
    records = tmp_path / "records"
    rows = 20
    for seed in range(3):
        right = [1.0 if (i + seed) % 4 else 0.0 for i in range(rows)]  # 0.75 correct
        _record(records, "lora", 1e-3, seed, [0.4] * rows, [4.2] * 10, accuracy=right)
        more = [1.0] * 5 + right[5:]  # the first five rows right: +0.10 on seed 0, +0.05 on seeds 1, 2
        _record(records, "lora", 5.5e-4, seed, [0.41] * rows, [4.1] * 10, accuracy=more)
    assert _script().main([str(records), "--reference", "lora@1e-3", "--runs", "lora@5.5e-4"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| run "))
    assert "| accuracy | Δ accuracy (seeds) | Δ accuracy (rows) | held-out loss |" in header
    cells = [
        c.strip() for c in next(x for x in out.splitlines() if x.startswith("| lora@0.00055 ")).strip("|").split("|")
    ]
    assert cells[2].startswith("0.8167 ± ")  # (0.85 + 0.80 + 0.80) / 3
    assert cells[3].startswith("+0.0667 [") and cells[4].startswith("**+0.0667 [")
    assert cells[6].startswith("**+0.0100 [") and cells[9].startswith("**-0.1000 [")  # loss and forgetting, every seed


def test_the_reference_named_among_the_runs_is_read_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One ``--runs`` list can serve several references (``--reference`` each of its runs in turn): the reference's
    own seeds are counted once, so its mean and spread are its runs', and a run named twice is one row."""
    records = tmp_path / "records"
    for seed in range(3):
        _record(records, "lora", 1e-3, seed, [0.4 + 0.1 * seed] * 5, [4.0] * 5)
        _record(records, "hybrid", 1e-3, seed, [0.3 + 0.1 * seed] * 5, [4.0] * 5)
    runs = "lora@1e-3,hybrid@1e-3,hybrid@0.001"
    assert _script().main([str(records), "--reference", "lora@1e-3", "--runs", runs]) == 0
    lines = capsys.readouterr().out.splitlines()
    reference = [line for line in lines if line.startswith("| lora@0.001 ")]
    assert len(reference) == 1 and reference[0].split("|")[2].strip() == "0,1,2"
    assert reference[0].split("|")[3].strip() == "0.5000 ± 0.1000"  # held-out loss over seeds 0, 1, 2 once each
    assert len([line for line in lines if line.startswith("| hybrid@0.001 ")]) == 1
