"""Run by test_integrations under ``accelerate launch`` (2 CPU processes over gloo): the README's plain training loop
with an adapter, each rank on its own batches; every rank saves its adapter so the test can compare them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from hybrid_peft import (
    HybridConfig,
    LoRAGAConfig,
    ShareRule,
    attach,
    lora_ga_initialise,
    parameter_groups,
    save_adapter,
    update_mixing,
)


def batches(seed: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 1000, (2, 12), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "labels": i} for i in ids]


def main() -> None:
    folder, output = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    # --- the README's "accelerate" example, from here ---
    accelerator = Accelerator()
    model = AutoModelForCausalLM.from_pretrained(folder)
    attach(model, HybridConfig(targets="all-linear", low_rank=LoRAGAConfig(rank=2), rule=ShareRule()))
    data = batches(seed=accelerator.process_index)  # each process its own shard
    lora_ga_initialise(model, data[:2])  # the data-dependent start: gradients summed across processes
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2))
    model, optimizer = accelerator.prepare(model, optimizer)
    for batch in data:
        accelerator.backward(model(**batch).loss)
        update_mixing(accelerator.unwrap_model(model))  # the hybrid's rule, when it has one
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), output / "adapter")
    # --- to here ---
    save_adapter(accelerator.unwrap_model(model), output / f"adapter-rank{accelerator.process_index}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
