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
import math
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
        "before_cache",
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


def _optimizer_state(tensors: dict[str, torch.Tensor], document: Any, where: Path) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer" + SEPARATOR):
            parts = key.split(SEPARATOR)
            if len(parts) != 3:
                raise _damaged(where, f"optimiser tensor {key!r} is not named optimizer::PARAMETER::FIELD")
            state.setdefault(parts[1], {})[parts[2]] = tensor
    if not isinstance(document, dict) or not isinstance(document.get("param_groups"), list):
        raise _damaged(where, "its optimiser state has no list of parameter groups")
    scalars = document.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise _damaged(where, "its optimiser scalars are not a mapping of parameter names to values")
    for name, values in scalars.items():
        state.setdefault(name, {}).update(values)
    groups = []
    for group in document["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise _damaged(where, "an optimiser parameter group is not a mapping with a list of parameters")
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # each shaped and typed like its parameter


def validate_optimizer_state(
    state: dict[str, Any], parameters: dict[str, torch.Tensor], step: int, where: Path | str
) -> None:
    """Check a checkpoint's name-keyed AdamW state against the parameters it will be loaded for, before anything is
    built from it: every moment has its parameter's shape and dtype and is finite (the second moments ≥ 0), every
    ``step`` is a whole number in [0, ``step``] (the updates the checkpoint's run made), every group's settings are
    finite, and the groups name each trained parameter once. A damaged or crafted state fails here with one line,
    instead of as NaN weights or an out-of-bounds write in the fused optimiser step."""
    for name, values in state["state"].items():
        parameter = parameters.get(name)
        if parameter is None:
            raise _damaged(where, f"its optimiser state names {name!r}, a parameter this model does not train")
        if not isinstance(values, dict):
            raise _damaged(where, f"the optimiser state of {name} is not a mapping")
        for field, value in values.items():
            if field in ADAMW_MOMENTS:
                if not isinstance(value, torch.Tensor):
                    raise _damaged(where, f"{name}.{field} is not a tensor")
                if tuple(value.shape) != tuple(parameter.shape) or value.dtype != parameter.dtype:
                    raise _damaged(
                        where,
                        f"{name}.{field} is {value.dtype} of shape {tuple(value.shape)}, its parameter "
                        f"{parameter.dtype} of shape {tuple(parameter.shape)}",
                    )
                if not bool(torch.isfinite(value).all()) or (field != "exp_avg" and bool((value < 0).any())):
                    raise _damaged(where, f"{name}.{field} holds non-finite or (for a second moment) negative values")
            elif field == "step":
                number = value
                if isinstance(value, torch.Tensor):
                    if value.numel() != 1 or (not value.is_floating_point() and value.dtype != torch.int64):
                        raise _damaged(where, f"{name}.step is not a single number")
                    number = value.item()
                if isinstance(number, bool) or not isinstance(number, int | float):
                    raise _damaged(where, f"{name}.step is not a number")
                if not math.isfinite(number) or number != int(number) or not 0 <= number <= step:
                    raise _damaged(where, f"{name}.step is {number}, not a whole number of updates in 0..{step}")
            else:
                raise _damaged(where, f"the optimiser state of {name} has an unknown field {field!r}")
    named = [n for group in state["param_groups"] for n in group["params"]]
    if len(named) != len(set(named)) or set(named) != set(parameters):
        raise _damaged(where, "its optimiser groups do not name each trained parameter of this model once")
    for group in state["param_groups"]:
        for key in ("lr", "eps", "weight_decay", "initial_lr", "lr_scale"):
            value = group.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise _damaged(where, f"its optimiser group setting {key} is {value!r}")
        betas = group.get("betas", (0.9, 0.999))
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
        ):
            raise _damaged(where, f"its optimiser group setting betas is {betas!r}")


def _damaged(where: Path | str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {where} is damaged: {problem}; delete that folder to resume from an earlier checkpoint, or start "
        "again without --resume"
    )


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
    _check_document(document, folder)
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
    _check_document(document, folder)
    rng = tensors.get("rng.torch")
    expected = torch.get_rng_state()
    if rng is None or rng.dtype != expected.dtype or rng.shape != expected.shape:
        raise _damaged(folder, f"its torch random state is not a {expected.dtype} tensor of {expected.numel()} bytes")
    optimizer_state = _optimizer_state(tensors, document.get("optimizer"), folder)
    try:
        schedule.load_state_dict(document["schedule"])
        torch.set_rng_state(rng)
        version, internal, gauss = document["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise _damaged(folder, f"its schedule or random state does not load ({exc})") from None
    return optimizer_state


def _check_document(document: Any, folder: Path) -> None:
    """The types of ``trainer_state.json``'s fields, so that a damaged file is one line, not a traceback later."""
    if not isinstance(document, dict):
        raise _damaged(folder, f"{STATE_FILE} is not a JSON object")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    checks = {
        "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "history": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
        "config": lambda v: isinstance(v, dict),
        "before": lambda v: v is None or isinstance(v, dict),
        "processes": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "start_seconds": lambda v: v is None or (number(v) and v >= 0),
        "schedule": lambda v: v is None or isinstance(v, dict),
        "python_rng": lambda v: (
            v is None
            or (
                isinstance(v, list)
                and len(v) == 3
                and isinstance(v[0], int)
                and isinstance(v[1], list)
                and len(v[1]) == 625
                and all(isinstance(x, int) and 0 <= x < 2**32 for x in v[1])
                and (v[2] is None or number(v[2]))
            )
        ),
    }
    required = ("step", "history", "config")
    for key, check in checks.items():
        if key in required and key not in document:
            raise _damaged(folder, f"{STATE_FILE} has no {key!r}")
        if not check(document.get(key)):
            raise _damaged(folder, f"{STATE_FILE} field {key!r} is {str(document.get(key))[:60]!r}")


def _read_document(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); the checkpoint is damaged") from exc
