"""Adapters on a bf16 base keep fp32 parameters and compute in bf16, as autocast does: the activations they save for
backward are bf16, so an adapter's activation memory stays at full fine-tuning's (before, every adapted layer saved
an fp32 copy of its input, and on a GPU LoRA's peak exceeded full fine-tuning's: ``benchmarks/scale.py --device
cuda``). Counted exactly, through the saved-tensor hooks, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from hybrid_peft import attach
from hybrid_peft.estimate import method_config

from conftest import tiny_llama

TOKENS = (4, 32)


def saved_activations(model: torch.nn.Module) -> dict[int, tuple[int, torch.dtype]]:
    """Storage -> (bytes, dtype) of every tensor the forward pass saves for backward, the model's own weights left
    out (they are saved by reference, not copied)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own and storage.nbytes() > 0:
            saved[storage.data_ptr()] = (storage.nbytes(), tensor.dtype)
        return tensor

    ids = torch.randint(0, model.config.vocab_size, TOKENS, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return saved


def large_fp32(saved: dict[int, tuple[int, torch.dtype]], width: int) -> int:
    """How many saved fp32 tensors hold at least one value per token and feature (an activation, not a weight)."""
    threshold = TOKENS[0] * TOKENS[1] * width * 4
    return sum(1 for nbytes, dtype in saved.values() if dtype == torch.float32 and nbytes >= threshold)


@pytest.mark.parametrize(("method", "limit"), [("lora", 1.0), ("boft", 1.1), ("hybrid", 1.2)])
def test_an_adapter_on_a_bf16_base_saves_bf16_activations_and_trains_fp32_weights(method: str, limit: float) -> None:
    full = tiny_llama().to(torch.bfloat16)
    width = full.config.hidden_size
    full_saved = saved_activations(full)
    model = attach(tiny_llama().to(torch.bfloat16), method_config(method))
    adapter_saved = saved_activations(model)
    # Only what full fine-tuning saves in fp32 too (the norms' and the loss's upcasts), no fp32 copy of an input.
    assert large_fp32(adapter_saved, width) <= large_fp32(full_saved, width)
    full_bytes, adapter_bytes = (sum(n for n, _ in s.values()) for s in (full_saved, adapter_saved))
    assert adapter_bytes <= limit * full_bytes, (adapter_bytes, full_bytes)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # fp32 masters
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
