"""The hybrid's mixing rules: λ per layer from gradient norms, set after each backward pass and before the optimiser
step (:func:`mixing_step`, the hybrid layer's ``after_backward`` hook), clamped to [λmin, 1 − λmin]:

``share``    g_lr = ‖∇_{A,B}‖/λ, g_orth = ‖∇_K‖/(1 − λ) (dividing out the gate so a small gate cannot starve its
             own branch), each RMS-normalised by its parameter count; λ ← EMA_β(g_lr / (g_lr + g_orth)).
``sigmoid``  λℓ ← EMA_β(σ((log‖gℓ‖ − mean_ℓ log‖gℓ‖)/τ)): layers whose gradient is above the model's average lean
             to the fast low-rank branch, calm layers to the stable orthogonal branch. Without the moving average
             (β = 0) λ follows each batch's gradient noise.
``fixed``    λ stays at its initial value (the default; the layer then has no per-step hook at all).

With ``gate="step"`` λ splits the optimiser's step instead of gating the output (:func:`split_layer_steps`). Under
DDP gradients are already averaged, so λ is identical on every rank; with sharded gradients (FSDP) the squared
norms are all-reduced first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hybrid_peft.errors import HybridPeftError
from hybrid_peft.norms import grouped_squared_norms

if TYPE_CHECKING:
    from hybrid_peft.methods.hybrid import HybridConfig, HybridLayer


@dataclass(frozen=True)
class BranchNorms:
    """RMS gradient norms of one layer's branches (‖∇‖ / √numel)."""

    low_rank: float
    orthogonal: float


def _share_rule(config: HybridConfig, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
    updated = []
    for mix, norm in zip(mixes, norms, strict=True):
        if config.gate == "step":  # λ is not in the forward pass: the gradients are not gated
            low_rank, orthogonal = norm.low_rank, norm.orthogonal
        else:
            low_rank, orthogonal = norm.low_rank / mix, norm.orthogonal / (1 - mix)
        target = low_rank / (low_rank + orthogonal) if low_rank + orthogonal > 0 else mix
        updated.append(config.ema * mix + (1 - config.ema) * target)
    return updated


def _sigmoid_rule(config: HybridConfig, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
    logs = [0.5 * math.log(n.low_rank**2 + n.orthogonal**2 + 1e-30) for n in norms]
    mean = sum(logs) / len(logs)
    return [
        config.ema * mix + (1 - config.ema) * sigmoid((value - mean) / config.temperature)
        for mix, value in zip(mixes, logs, strict=True)
    ]


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))  # no overflow for large |z|


def _fixed_rule(config: HybridConfig, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
    return list(mixes)  # λ stays at its start: mix_init, or the per-layer λ0 of mix_init_from='gradient'


MixingRule = Callable[["HybridConfig", list[float], list[BranchNorms]], list[float]]
MIXING_RULES: dict[str, MixingRule] = {"share": _share_rule, "sigmoid": _sigmoid_rule, "fixed": _fixed_rule}


def split_layer_steps(optimizer: torch.optim.Optimizer, layers: list[HybridLayer]) -> list[Any]:
    """For the ``gate='step'`` hybrid layers of ``model``: make every ``optimizer.step()`` move each layer's
    low-rank parameters (A, B) by its low-rank share λ and its skew parameters by 1 − λ (the shares of
    :meth:`HybridLayer.shares`) of the step the optimiser computed, i.e. ``p ← p_before + share · (p_after −
    p_before)``: for AdamW, the learning rate times the share. λ is read after the step (set by
    :func:`update_mixing` before it). Returns the hooks' handles (empty when no layer has ``gate='step'``); a second
    call for the same optimiser returns the first call's (the split must apply once).
    :func:`hybrid_peft.run.loop.make_optimiser` calls this for you (through the layer's ``prepare_optimiser``)."""
    if not layers:
        return []
    if hasattr(optimizer, "_hybrid_peft_split_steps"):
        return optimizer._hybrid_peft_split_steps
    before: list[list[torch.Tensor]] = []

    def groups() -> list[list[nn.Parameter]]:  # looked up at each step: sharding or .to() may replace parameters
        return [params for layer in layers for params in (layer.low_rank_parameters(), layer.orthogonal_parameters())]

    def keep(*_: Any) -> None:
        before[:] = [[p.detach().clone() for p in params] for params in groups()]

    @torch.no_grad()
    def split(*_: Any) -> None:
        device = layers[0].mix.device
        shares = torch.stack([s.to(device) for layer in layers for s in layer.shares()]).tolist()  # one host read
        for params, olds, share in zip(groups(), before, shares, strict=True):
            if share != 1.0:
                for p, old in zip(params, olds, strict=True):
                    p.lerp_(old, 1.0 - share)  # p ← p + (1 − share)(old − p) = old + share (p − old)
        before.clear()

    handles = [optimizer.register_step_pre_hook(keep), optimizer.register_step_post_hook(split)]
    optimizer._hybrid_peft_split_steps = handles  # type: ignore[attr-defined]
    return handles


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a sharded (FSDP2) DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _branch_rms(layers: list[HybridLayer], *, sharded: bool) -> torch.Tensor:
    """``[‖∇_{A,B}‖/√n, ‖∇_K‖/√n]`` per layer, flattened, in float64 on the first layer's device: every gradient's
    norm in one batched (foreach) pass, summed per branch. With ``sharded`` (FSDP2) each process holds a shard of
    every gradient: the squared norms of the shards are all-reduced first."""
    grads, owners, counts = [], [], []
    for layer in layers:
        for params in (layer.low_rank_parameters(), layer.orthogonal_parameters()):
            for p in params:
                if p.grad is not None:
                    grads.append(_local(p.grad).detach())
                    owners.append(len(counts))
            counts.append(sum(p.numel() for p in params))
    device = layers[0].mix.device
    squares = grouped_squared_norms(grads, owners, len(counts), device)
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    return (squares / torch.tensor(counts, dtype=torch.float64, device=device)).sqrt()


@torch.no_grad()
def mixing_step(layers: dict[str, HybridLayer], *, sharded: bool = False) -> dict[str, dict[str, float]]:
    """:func:`update_mixing` for the given layers (the layer class's ``after_backward`` hook)."""
    if not layers:
        return {}
    rms_tensor = _branch_rms(list(layers.values()), sharded=sharded)
    mix_tensor = torch.stack([layer.mix.to(rms_tensor) for layer in layers.values()])
    values = torch.cat([rms_tensor, mix_tensor]).tolist()  # the norms and every λ in one read to the host
    rms, current = values[: len(rms_tensor)], dict(zip(layers, values[len(rms_tensor) :], strict=True))
    if not any(rms):
        raise HybridPeftError("no hybrid layer has a gradient: call update_mixing after loss.backward()")
    norms = {name: BranchNorms(rms[2 * i], rms[2 * i + 1]) for i, name in enumerate(layers)}
    by_config: dict[HybridConfig, list[str]] = {}
    for name, layer in layers.items():
        by_config.setdefault(layer.config, []).append(name)
    records = {}
    for config, names in by_config.items():
        mixes = [current[n] for n in names]
        updated = MIXING_RULES[config.rule](config, mixes, [norms[n] for n in names])
        for name, value in zip(names, updated, strict=True):
            value = min(max(value, config.mix_min), 1 - config.mix_min)
            layers[name].mix.fill_(value)
            records[name] = {
                "lambda": value,
                "grad_low_rank": norms[name].low_rank,
                "grad_orthogonal": norms[name].orthogonal,
            }
    return records
