"""Checkpoints that resume exactly and that loading cannot turn into code execution.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` written under a temporary name and renamed into place::

    adapter/ or model.safetensors   the trained weights (the trainee decides, see trainees.py)
    training_state.safetensors      the optimiser's tensors (AdamW's moments and step counts), torch's RNG state
    trainer_state.json              step, loss history, the first evaluation, the run's config, the optimiser's
                                    hyper-parameters, the schedule's state and Python's RNG state

Only safetensors and JSON are read back: no pickle, so a tampered checkpoint can carry wrong numbers but never code.
The JSON file is written last; a folder without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybrid_peft.errors import HybridPeftError
from hybrid_peft.fileio import atomic_write_text

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.safetensors"
PICKLED_FILE = "training.pt"  # written by hybrid-peft 0.1.0 before checkpoints stopped using pickle


class CheckpointError(HybridPeftError, OSError):
    """A checkpoint is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class TrainerState:
    """What a checkpoint records besides tensors."""

    step: int
    history: list[dict[str, Any]]
    before: dict[str, float]
    config: dict[str, Any]
    processes: int = 1  # the world size that wrote it (the data order depends on it)
    start_seconds: float = 0.0  # the method's start before step 1 (LoRA-GA's gradient estimate), in training time


# Options a resumed run may change: they extend or observe the run, they do not change what was trained so far.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",  # to extend a run (the cosine schedule follows the new total)
        "learning_rate",  # e.g. lower after a non-finite loss; the optimiser and schedule take the new rate
        "save_every",
        "eval_every",
        "eval_examples",
        "eval_batch_size",
        "generate",
        "merge",
        "threads",
        "fsdp",  # checkpoints hold full state: they load with or without sharding
        "data_dir",
        "output_dir",
        "unsafe_unsandboxed",
        "report_to",
    }
)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The options that define the run (all but :data:`RESUMABLE_CHANGES`) on which ``saved`` and ``current``
    differ, as ``key: saved -> current``."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with their state file), oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    complete = [p for p in folder.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(complete, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    folders = checkpoint_folders(output_dir)
    return folders[-1] if folders else None


SEPARATOR = "::"  # parameter names contain dots


def _optimizer_parts(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A name-keyed optimiser state dict split into tensors (for safetensors) and everything else (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer{SEPARATOR}{name}{SEPARATOR}{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer" + SEPARATOR):
            _, name, field = key.split(SEPARATOR)
            state.setdefault(name, {})[field] = tensor
    for name, values in document.get("scalars", {}).items():
        state.setdefault(name, {}).update(values)
    groups = []
    for group in document["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    output_dir: Path,
    state: TrainerState,
    save_weights: Any,
    optimizer_state: dict[str, Any],
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """Write checkpoint ``state.step``: ``save_weights(folder)`` writes the trained weights into the staging folder,
    then the optimiser's state (keyed by parameter name), the schedule and the RNG state; renamed into place when
    complete."""
    final = output_dir / "checkpoints" / f"step-{state.step:06d}"
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_weights(staging)
    tensors, optimizer_document = _optimizer_parts(optimizer_state)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(staging / TENSORS_FILE))
    version, internal, gauss = random.getstate()
    document = {
        "step": state.step,
        "history": state.history,
        "before": state.before,
        "config": state.config,
        "processes": state.processes,
        "start_seconds": state.start_seconds,
        "optimizer": optimizer_document,
        "schedule": schedule.state_dict(),
        "python_rng": [version, list(internal), gauss],
    }
    atomic_write_text(staging / STATE_FILE, json.dumps(document, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def read_trainer_state(folder: Path) -> TrainerState:
    document = _read_document(folder)
    return TrainerState(
        document["step"],
        document["history"],
        document.get("before", {}),
        document["config"],
        document.get("processes", 1),
        document.get("start_seconds", 0.0),  # checkpoints written before it was recorded: none counted
    )


def restore_training_state(folder: Path, schedule: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore the schedule and RNG state of checkpoint ``folder`` and return its optimiser state (name-keyed, for
    the run's parallelism to load). Reading it runs no code."""
    document = _read_document(folder)
    if not (folder / TENSORS_FILE).is_file():
        if (folder / PICKLED_FILE).is_file():
            raise CheckpointError(
                f"{folder} was written by an older hybrid-peft that stored the optimiser as a pickle, which this "
                "version does not load (loading a pickle can run code); start the run again without --resume"
            )
        raise CheckpointError(f"{folder} has no {TENSORS_FILE}; the checkpoint is incomplete")
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise CheckpointError(f"{folder / TENSORS_FILE} could not be read ({exc})") from exc
    schedule.load_state_dict(document["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = document["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return _optimizer_state(tensors, document["optimizer"])


def _read_document(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); the checkpoint is damaged") from exc
