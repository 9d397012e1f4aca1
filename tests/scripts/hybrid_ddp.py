"""Run by test_hybrid under torchrun: DDP training of the hybrid, each rank on its own batches; saves λ per step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_peft import HybridConfig, LoRAGAConfig, ShareRule, attach, lora_ga_initialise, update_mixing  # noqa: E402
from hybrid_peft.methods.hybrid import hybrid_layers  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from method_cases import random_batches  # noqa: E402


def main() -> None:
    output = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = attach(
        tiny_llama(),
        HybridConfig(targets=["q_proj", "down_proj"], low_rank=LoRAGAConfig(rank=2), rule=ShareRule()),
    )
    lora_ga_initialise(model, random_batches(4, seed=5)[rank::world])  # sketches/gradients all-reduced inside
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for batch in random_batches(10, seed=100 + rank)[:5]:  # different data on each rank
        ddp(**batch).loss.backward()  # DDP averages the gradients
        update_mixing(model)
        optimizer.step()
        optimizer.zero_grad()
        history.append(torch.stack([layer.mix.detach().clone() for layer in hybrid_layers(model).values()]))
    torch.save(torch.stack(history), output / f"mix-rank{rank}.pt")
    dist.barrier()  # let every rank finish its last collective before tearing the group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
