"""``benchmarks/scale.py`` in its reduced mode: the script the GPU run and the 1B–8B measurements use, run end to end
on a tiny Llama shape (random checkpoint written shard by shard, one process per run, the table in the bench's
format, each measurement beside ``hybrid-peft estimate``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_scale_script_measures_each_method_beside_the_estimate_in_its_reduced_mode(tmp_path: Path) -> None:
    output = tmp_path / "scale.md"
    command = [
        sys.executable, str(SCRIPT), "--shapes", "tiny", "--methods", "full,hybrid", "--modes", "plain,savings",
        "--steps", "2", "--seq-len", "16", "--threads", "1", "--cache-dir", str(tmp_path / "models"),
        "--output", str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    checkpoint = tmp_path / "models" / "llama-tiny"
    assert (checkpoint / ".complete").exists() and (checkpoint / "model.safetensors.index.json").exists()
    rows = json.loads(output.with_suffix(".json").read_text())
    assert [(r["mode"], r["method"]) for r in rows] == [
        ("plain", "full"), ("plain", "hybrid"), ("savings", "full"), ("savings", "hybrid")
    ]  # fmt: skip
    for row in rows:
        assert row["measured_mb"] > 0 and row["step_s"] > 0, row
        assert 0.5 < (row["estimate_mb"] + row["fixed_mb"]) / row["measured_mb"] < 2.0, row
    assert rows[1]["trainable"] < rows[0]["trainable"]  # the adapter trains a fraction of the model
    lines = output.read_text().splitlines()
    assert lines[2].startswith("| shape | mode | method | trainable | estimate GB")
    assert len([line for line in lines if line.startswith("| tiny |")]) == 4


def test_scale_script_refuses_an_unknown_shape() -> None:
    completed = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "13b"], capture_output=True, text=True)
    assert completed.returncode == 2 and "unknown shape(s) or mode(s) ['13b']" in completed.stderr
