"""A crafted or damaged checkpoint is refused with one line before anything is built from it: optimiser moments of
the wrong shape or dtype (which the fused AdamW step would write out of bounds with), non-finite moments, an
impossible step count, damaged trainer-state fields, a torch random state of the wrong size."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybrid_peft.run import TrainConfig, run_training
from hybrid_peft.run.checkpoint import STATE_FILE, TENSORS_FILE, CheckpointError
from test_resume import config_for


@pytest.fixture(scope="module")
def trained(tiny_lm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("hostile") / "run"
    run_training(config_for(tiny_lm, output), progress=False)
    return output


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(checkpoint: Path) -> None:
        tensors = load_file(str(checkpoint / TENSORS_FILE))
        edit(tensors)
        save_file(tensors, str(checkpoint / TENSORS_FILE))

    return apply


def _edit_document(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(checkpoint: Path) -> None:
        document = json.loads((checkpoint / STATE_FILE).read_text())
        edit(document)
        (checkpoint / STATE_FILE).write_text(json.dumps(document))

    return apply


def _first(tensors: dict[str, torch.Tensor], field: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith("optimizer::") and k.endswith("::" + field))


def _set(field: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        key = _first(tensors, field)
        tensors[key] = make(tensors[key])

    return _edit_tensors(edit)


CASES = {
    "moment of another shape": (_set("exp_avg", lambda t: torch.zeros(3, 3)), "shape"),
    "int64 moment": (_set("exp_avg", lambda t: torch.zeros(t.shape, dtype=torch.int64)), "int64"),
    "NaN moment": (_set("exp_avg", lambda t: torch.full(t.shape, float("nan"))), "non-finite"),
    "negative second moment": (_set("exp_avg_sq", lambda t: -torch.ones(t.shape)), "negative"),
    "negative step": (_set("step", lambda t: torch.tensor(-5.0)), "not a whole number"),
    "huge step": (_set("step", lambda t: torch.tensor(1e30)), "not a whole number"),
    "unknown field": (_edit_tensors(lambda ts: ts.update({"optimizer::x::evil": torch.zeros(1)})), "does not train"),
    "5-byte torch random state": (
        _edit_tensors(lambda ts: ts.update({"rng.torch": torch.zeros(5, dtype=torch.uint8)})),
        "random state",
    ),  # fmt: skip
    "step is text": (_edit_document(lambda d: d.update(step="abc")), "'step'"),
    "history is a mapping": (_edit_document(lambda d: d.update(history={"a": 1})), "'history'"),
    "config is a list": (_edit_document(lambda d: d.update(config=[1, 2])), "'config'"),
    "python random state": (_edit_document(lambda d: d.update(python_rng=[3, [1, 2], None])), "'python_rng'"),
    "groups are not a list": (_edit_document(lambda d: d["optimizer"].update(param_groups={})), "parameter groups"),
    "negative learning rate": (_edit_document(lambda d: d["optimizer"]["param_groups"][0].update(lr=-1.0)), "lr"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_checkpoint_is_refused_in_one_line(case: str, trained: Path, tiny_lm: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    damage, words = CASES[case]
    damage(output / "checkpoints" / "step-000002")
    config: TrainConfig = config_for(tiny_lm, output)
    with pytest.raises(CheckpointError, match="is damaged") as caught:
        run_training(config, resume=True, progress=False)
    message = str(caught.value)
    assert "\n" not in message and words in message and "step-000002" in message, message
    assert "delete that folder" in message


def test_an_untouched_copy_resumes(trained: Path, tiny_lm: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    assert run_training(config_for(tiny_lm, output), resume=True, progress=False).final_loss is not None
