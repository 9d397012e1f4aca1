"""Run by test_lora_ga under torchrun: LoRA-GA init with each rank on its own batches."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_peft import LoRAGAConfig, attach, lora_ga_initialise
from hybrid_peft.adapters import adapter_layers

from conftest import tiny_llama  # noqa: E402
from method_cases import random_batches  # noqa: E402


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in adapter_layers(model).items():
        out[f"{name}.A0"] = layer.lora_A0.clone()
        out[f"{name}.B0"] = layer.lora_B0.clone()
        out[f"{name}.base"] = layer.base_weight.detach().clone()
    return out


def main() -> None:
    output = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batches = random_batches(4, seed=7)
    for estimator in ("exact", "sketch"):
        config = LoRAGAConfig(rank=2, estimator=estimator, targets=["q_proj", "down_proj"])
        model = attach(tiny_llama(), config)
        lora_ga_initialise(model, batches[rank::world])
        torch.save(state(model), output / f"{estimator}-rank{rank}.pt")
    dist.barrier()  # let every rank finish its last collective before tearing the group down
    dist.destroy_process_group()
    if rank == 0:  # the single-process reference on all batches
        for estimator in ("exact", "sketch"):
            config = LoRAGAConfig(rank=2, estimator=estimator, targets=["q_proj", "down_proj"])
            model = attach(tiny_llama(), config)
            lora_ga_initialise(model, batches)
            torch.save(state(model), output / f"{estimator}-single.pt")


if __name__ == "__main__":
    main()
