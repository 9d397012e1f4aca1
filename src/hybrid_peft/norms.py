"""Gradient norms of many tensors summed per group, read to the host once: the hybrid's λ rules (per layer and
branch) and the telemetry's per-block norms (every step of every run) both need them."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grouped_squared_norms(
    tensors: Sequence[torch.Tensor], groups: Sequence[int], count: int, device: torch.device
) -> torch.Tensor:
    """``Σ ‖t‖²`` over the tensors of each group ``0..count−1`` (``groups[i]`` is tensor i's), in float64 on
    ``device``. One batched norm over every tensor (``torch._foreach_norm``, the kernel ``clip_grad_norm_`` uses) and
    one ``index_add_``: a few dispatches in all, no float64 copy of any tensor and no host read, where a loop of
    ``float(t.double().pow(2).sum())`` copies each tensor and reads it back (a GPU sync per tensor)."""
    squares = torch.zeros(count, dtype=torch.float64, device=device)
    if tensors:
        norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float64)
        if any(n.device != device for n in norms):  # a model spread over devices: one place to sum
            norms = [n.to(device) for n in norms]
        stacked = torch.stack(norms)
        squares.index_add_(0, torch.tensor(list(groups), device=device), stacked.square())
    return squares
