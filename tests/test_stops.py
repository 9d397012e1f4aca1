"""How a run ends when it must stop early: a signal saves a checkpoint and prints the command that continues; a last
update that makes the weights non-finite is never saved as the result; an adapter holding inf does not load; a link
planted under a log's name is not written through."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_peft.errors import AdapterFileError, NonFiniteLossError
from hybrid_peft.run import run_training
from test_resume import config_for


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_prints_the_command_that_continues(
    signum: int, tiny_lm: str, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    command = [sys.executable, "-m", "hybrid_peft.cli", "train", "--model", tiny_lm, "--task", "humaneval",
               "--steps", "400", "--batch-size", "2", "--max-length", "48", "--eval-examples", "2", "--no-generate",
               "--threads", "1", "--output-dir", str(output)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert process.stdout is not None
    for line in process.stdout:  # not a terminal: plain progress lines
        if re.search(r"step [1-9]\d*/400", line):
            break
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"{signal.Signals(signum).name} at step ") and "saved " in message, stderr[-2000:]
    resume = message.split("Continue with: ", 1)[1].split()
    assert resume[:2] == ["hybrid-peft", "train"] and resume[-1] == "--resume"
    assert list((output / "checkpoints").glob("step-*")), "no checkpoint was saved"
    stopped_at = int(message.split("at step ")[1].split()[0])
    continued = subprocess.run(  # the printed command, extended only two steps past the stop: a quick finish
        [sys.executable, "-m", "hybrid_peft.cli", *resume[1:], "--steps", str(stopped_at + 2)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert (output / "summary.json").is_file()


def test_a_last_step_that_makes_the_weights_non_finite_is_not_saved_as_the_result(tiny_lm: str, tmp_path: Path) -> None:
    config = config_for(tiny_lm, tmp_path / "run", steps=1, learning_rate=1e39, save_every=0, max_grad_norm=0.0)
    with pytest.raises(NonFiniteLossError, match="no result was saved") as caught:
        run_training(config, progress=False)
    assert "--learning-rate" in str(caught.value)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_an_adapter_holding_inf_does_not_load(tiny_lm: str, tmp_path: Path) -> None:
    from hybrid_peft import LoRAConfig, attach, load_adapter, load_model, save_adapter

    model = attach(load_model(tiny_lm), LoRAConfig(rank=2, targets="all-linear"))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterFileError, match="non-finite values"):
        load_adapter(load_model(tiny_lm), tmp_path / "adapter")


def test_a_link_planted_under_a_log_name_is_not_written_through(tiny_lm: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    output.mkdir()
    outside = tmp_path / "outside.jsonl"
    for name in ("adapter_telemetry.jsonl", "train_log.jsonl", "mixing.jsonl"):
        os.symlink(outside, output / name)  # dangling: the folder still looks empty of runs
    run_training(config_for(tiny_lm, output, steps=2, save_every=0), progress=False)
    assert not outside.exists(), "a log was written outside the run's folder"
    assert not (output / "adapter_telemetry.jsonl").is_symlink()


def test_overwrite_removes_a_linked_folder_without_following_it(tiny_lm: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    output.mkdir()
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    os.symlink(elsewhere, output / "adapter", target_is_directory=True)
    run_training(config_for(tiny_lm, output, steps=1, save_every=0), overwrite=True, progress=False)
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert (output / "adapter").is_dir() and not (output / "adapter").is_symlink()
