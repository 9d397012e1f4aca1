"""The causal-LM loss without the whole logits: the language-model head and the cross-entropy run over the target
positions in chunks of tokens, each chunk's logits recomputed in backward instead of kept, so the
``(tokens × vocabulary)`` logits and their gradient are never whole in memory. Positions without a target (prompt
and padding, label -100) never reach the head. Same value and gradients as the model's own loss (the mean
cross-entropy over the target tokens); ``tests/test_resources.py`` checks it.

For models whose logits are ``lm_head(hidden)`` (Llama, Mistral, Qwen, GPT-2, ...): models that scale or cap their
logits (Gemma's soft-capping) need their own loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput


def chunked_causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (``input_ids``, ``attention_mask``, ``labels``), computed
    ``chunk_tokens`` target positions at a time."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]  # (B, T, H)
    targets = batch["labels"][:, 1:].to(hidden.device)  # position t predicts token t + 1
    keep = targets != -100
    states, labels = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,): target positions only
    head = model.get_output_embeddings()

    def chunk_loss(states_chunk: torch.Tensor, labels_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(states_chunk).float(), labels_chunk, reduction="sum")  # (chunk, V) logits, freed

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_loss, states[part], labels[part], use_reentrant=False)
    return total / max(labels.numel(), 1)


class ChunkedLossModel(nn.Module):
    """Wraps a causal LM so that its forward returns only the chunked loss: what the training loop (and DDP) call.
    The wrapped model stays reachable as ``.model``."""

    def __init__(self, model: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, **batch: Any) -> CausalLMOutput:
        return CausalLMOutput(loss=chunked_causal_lm_loss(self.model, batch, self.chunk_tokens))
