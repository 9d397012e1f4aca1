"""Run by test_fsdp under torchrun (2 processes, gloo): the training recipe with and without FSDP2 on the same
global batches, for several methods, plus an interrupted-and-resumed FSDP run. Each process records what it holds
(λ, LoRA-GA's A0/B0) so the test can compare the ranks. Usage: fsdp_recipe.py MODEL OUTPUT_DIR"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from hybrid_peft.methods.hybrid import hybrid_layers
from hybrid_peft.run import Recipe, TrainConfig

RUNS = {  # run name: (method, adapter options)
    "lora": ("lora", {"rank": 2}),
    "boft": ("boft", {"block_size": 4}),
    # the share rule, so that λ moves (all-reduced norms under FSDP); the rotation at 0.3× the rate, a second group
    "hybrid": ("hybrid", {"rank": 2, "block_size": 4, "low_rank": "lora-ga", "rule": "share"}),
    "hybrid-default": ("hybrid", {"rank": 2, "block_size": 4}),  # both branches at full strength, no λ
    "full": ("full", {}),
}


def config(model: str, output: Path, name: str, **options) -> TrainConfig:  # noqa: ANN003
    method, adapter = RUNS[name]
    base = {
        "model": model,
        "task": "humaneval",
        "method": method,
        "adapter": adapter,
        "steps": 4,
        "batch_size": 2,
        "max_length": 48,
        "learning_rate": 1e-2 if method != "full" else 1e-3,
        "warmup_steps": 1,
        "eval_examples": 2,
        "generate": False,
        "threads": 1,
        "output_dir": str(output),
    }
    return TrainConfig.from_dict(base | options)


def record(recipe: Recipe, path: Path) -> None:
    """What this process holds of the hybrid: λ and the LoRA-GA start of every layer (buffers, never sharded)."""
    layers = hybrid_layers(recipe.inner)
    torch.save(
        {
            "mix": torch.stack([layer.mix.detach().cpu() for layer in layers.values()]),
            "a0": torch.cat([layer.lora_A0.detach().cpu().reshape(-1) for layer in layers.values()]),
        },
        path,
    )


def main() -> None:
    model, output = sys.argv[1], Path(sys.argv[2])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    for method in RUNS:
        for sharded in (False, True):
            recipe = Recipe(config(model, output / f"{method}-{'fsdp' if sharded else 'ddp'}", method, fsdp=sharded))
            recipe.run()
            rank = recipe.rank
            if method == "hybrid":
                record(recipe, output / f"hybrid-{'fsdp' if sharded else 'ddp'}-rank{rank}.pt")
    # An FSDP run interrupted after its checkpoint at step 2, then resumed.
    interrupted = config(model, output / "resumed", "hybrid", fsdp=True, save_every=2)
    Recipe(interrupted).run()
    if rank == 0:
        for name in ("adapter", "summary.json"):
            target = output / "resumed" / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    torch.distributed.barrier()
    Recipe(interrupted, resume=True).run()
    if rank == 0:
        (output / "done.json").write_text(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()
