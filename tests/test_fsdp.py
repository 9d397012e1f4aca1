"""Sharded data parallel (FSDP2) on CPU over gloo: two processes, a tiny Llama, a few steps. FSDP's loss curve equals
DDP's on the same global batches; λ and LoRA-GA's start are identical on every rank; the saved adapter loads onto
a fresh unsharded model with the same outputs; a resumed FSDP run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybrid_peft.errors import ConfigError
from hybrid_peft.run import RunSummary, TrainConfig, run_training

from conftest import run_torchrun

pytestmark = pytest.mark.slow  # two processes over gloo for every check

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_recipe.py"


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_lm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fsdp")
    run_torchrun([str(SCRIPT), tiny_lm, str(output)])
    assert (output / "done.json").is_file()
    return output


@pytest.mark.parametrize("method", ["lora", "boft", "hybrid", "hybrid-default", "full"])
def test_fsdp_trains_like_ddp(runs: Path, method: str) -> None:
    ddp, fsdp = RunSummary.read(runs / f"{method}-ddp"), RunSummary.read(runs / f"{method}-fsdp")
    assert (ddp.distributed_type, fsdp.distributed_type) == ("MULTI_CPU", "FSDP2")
    assert ddp.processes == fsdp.processes == 2 and fsdp.ranks_in_sync
    assert losses(runs / f"{method}-fsdp") == pytest.approx(losses(runs / f"{method}-ddp"), abs=1e-5)
    assert len(losses(runs / f"{method}-fsdp")) == 4
    assert fsdp.after["loss"] == pytest.approx(ddp.after["loss"], abs=1e-5)
    assert fsdp.trainable_parameters == ddp.trainable_parameters


def test_lambda_and_the_lora_ga_start_are_identical_on_every_rank(runs: Path) -> None:
    rank0, rank1 = torch.load(runs / "hybrid-fsdp-rank0.pt"), torch.load(runs / "hybrid-fsdp-rank1.pt")
    assert torch.equal(rank0["mix"], rank1["mix"]) and torch.equal(rank0["a0"], rank1["a0"])
    assert (rank0["mix"] - 0.5).abs().max() > 1e-4, "λ should have moved"
    ddp = torch.load(runs / "hybrid-ddp-rank0.pt")
    torch.testing.assert_close(rank0["mix"], ddp["mix"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "boft", "hybrid"])
def test_the_saved_adapter_loads_onto_an_unsharded_model(runs: Path, tiny_lm: str, method: str) -> None:
    from hybrid_peft import load_adapter, load_model, load_tokenizer
    from hybrid_peft.tasks import get_task
    from hybrid_peft.tasks.base import held_out_loss

    summary = RunSummary.read(runs / f"{method}-fsdp")
    task = get_task("humaneval")
    model = load_adapter(load_model(tiny_lm), runs / f"{method}-fsdp" / "adapter")
    loss = held_out_loss(task, model, load_tokenizer(tiny_lm), task.eval_rows()[:2], 8, 48)
    assert loss == pytest.approx(summary.after["loss"], abs=1e-5)


def test_full_fine_tuning_under_fsdp_saves_a_plain_checkpoint(runs: Path, tiny_lm: str) -> None:
    import transformers

    from hybrid_peft.tasks import get_task
    from hybrid_peft.tasks.base import held_out_loss

    summary = RunSummary.read(runs / "full-fsdp")
    model = transformers.AutoModelForCausalLM.from_pretrained(runs / "full-fsdp" / "model")
    task = get_task("humaneval")
    tokenizer = transformers.AutoTokenizer.from_pretrained(runs / "full-fsdp" / "model")
    loss = held_out_loss(task, model, tokenizer, task.eval_rows()[:2], 8, 48)
    assert loss == pytest.approx(summary.after["loss"], abs=1e-5)


def test_a_resumed_fsdp_run_equals_an_uninterrupted_one(runs: Path) -> None:
    assert RunSummary.read(runs / "resumed").resumed_from_step == 2
    assert losses(runs / "resumed") == pytest.approx(losses(runs / "hybrid-fsdp"), abs=1e-6)


def test_fsdp_without_a_process_group_says_how_to_launch(tiny_lm: str, tmp_path: Path) -> None:
    config = TrainConfig(model=tiny_lm, task="humaneval", fsdp=True, output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"--fsdp .* torchrun --nproc_per_node N -m hybrid_peft.cli train --fsdp"):
        run_training(config, progress=False)


def test_an_fsdp_checkpoint_resumes_in_one_unsharded_process(
    runs: Path, tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    folder = tmp_path / "resharded"
    shutil.copytree(runs / "resumed", folder)
    shutil.rmtree(folder / "adapter")
    (folder / "summary.json").unlink()
    (folder / ".lock").unlink(missing_ok=True)
    saved = json.loads((folder / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    config = TrainConfig.from_dict(saved["config"] | {"fsdp": False, "output_dir": str(folder)})
    summary = run_training(config, resume=True, progress=False)
    assert summary.resumed_from_step == 2 and summary.processes == 1
    assert "resuming a run of 2 process(es) on 1" in capsys.readouterr().out
    assert len(losses(folder)) == 4 and all(torch.isfinite(torch.tensor(losses(folder))))
