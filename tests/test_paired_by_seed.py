"""``benchmarks/paired_by_seed.py``: pairing runs across bench results files by (task, seed), for runs that predate
run records."""

from __future__ import annotations

import csv
import importlib.util
import math
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_by_seed.py"
FIELDS = ["task", "method", "seed", "status", "held_out_loss", "forgetting"]


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("paired_by_seed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[tuple], fields: list[str] = FIELDS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows(rows)
    return path


def test_pairs_methods_from_two_files_with_the_reference_on_common_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _write(
        tmp_path / "old.csv",
        [
            ("gsm8k", "hybrid", 0, "ok", 0.80, 0.05),
            ("gsm8k", "hybrid", 1, "ok", 0.81, 0.06),
            ("gsm8k", "hybrid", 2, "ok", 0.79, 0.04),
            ("gsm8k", "lora", 0, "ok", 0.90, 0.00),
        ],
    )
    new = _write(
        tmp_path / "new.csv",
        [
            ("gsm8k", "rule", 0, "ok", 0.78, 0.05),
            ("gsm8k", "rule", 1, "ok", 0.80, 0.07),
            ("gsm8k", "rule", 2, "ok", 0.77, 0.02),
            ("gsm8k", "rule", 3, "ok", 0.10, 0.10),  # no reference on seed 3: left out
            ("gsm8k", "failed", 0, "failed", 0.0, 0.0),  # not finished: left out
            ("gsm8k", "lora", 0, "ok", 0.80, 0.03),  # replaces the old file's seed-0 LoRA run
        ],
    )
    assert _script().main([str(old), str(new), "--reference", "hybrid"]) == 0
    out, err = capsys.readouterr()

    differences = [-0.02, -0.01, -0.02]
    half = 4.302652729911275 * statistics.stdev(differences) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    mean = statistics.fmean(differences)
    rule = next(line for line in out.splitlines() if "| rule |" in line)
    assert "| 0,1,2 |" in rule
    assert f"**{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]**" in rule  # excludes 0: bold
    assert "| lora | 0 | +0.0000 (1 seed) | -0.0200 (1 seed) |" in out  # the later file's LoRA run
    assert "failed" not in out
    assert "lora on gsm8k, seed 0" in err and "a rerun that did not reproduce" in err  # no rate column: same run

    assert _script().main([str(old), str(new), "--reference", "hybrid", "--methods", "hybrid,lora"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gsm8k")]
    assert [row.split(" | ")[1] for row in rows] == ["lora"]  # the reference is not paired with itself


def test_a_file_without_the_measures_or_a_missing_reference_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    bad = tmp_path / "bad.csv"
    bad.write_text("task,method,seed,status\ngsm8k,lora,0,ok\n")
    with pytest.raises(SystemExit, match="not a bench results.csv.*held_out_loss"):
        script.main([str(bad)])
    good = _write(tmp_path / "good.csv", [("gsm8k", "lora", 0, "ok", 0.8, 0.0)])
    with pytest.raises(SystemExit):
        script.main([str(good), "--reference", "hybrid"])
    assert "no finished run of the reference 'hybrid'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "missing.csv")])
    assert "no results file at" in capsys.readouterr().err


def test_a_later_run_at_another_rate_is_named_as_such_and_a_rerun_that_differs_as_a_failed_reproduction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = [*FIELDS, "learning_rate"]

    def write(name: str, rows: list[tuple]) -> Path:
        return _write(tmp_path / name, rows, fields)

    old = write(
        "old.csv", [("gsm8k", "full", 0, "ok", 0.79, 0.01, "0.00018"), ("gsm8k", "lora", 0, "ok", 0.80, 0.0, "0.001")]
    )
    new = write("new.csv", [("gsm8k", "lora", 0, "ok", 0.79, 0.02, "0.0025")])
    assert _script().main([str(old), str(new), "--reference", "full"]) == 0
    err = capsys.readouterr().err
    assert "lora on gsm8k, seed 0" in err and "at rate 0.0025 replaces an earlier file's at 0.001" in err
    assert "did not reproduce" not in err

    same = write("same.csv", [("gsm8k", "lora", 0, "ok", 0.81, 0.0, "1e-3")])  # the same rate, other values
    assert _script().main([str(old), str(same), "--reference", "full"]) == 0
    assert "a rerun that did not reproduce" in capsys.readouterr().err
    exact = write("exact.csv", [("gsm8k", "lora", 0, "ok", 0.80, 0.0, "0.001")])  # reproduced: nothing to say
    assert _script().main([str(old), str(exact), "--reference", "full"]) == 0
    assert capsys.readouterr().err == ""
