"""The orthogonal branch BOFT and the hybrid share, and the batched build of its rotations.

A butterfly branch turns its free skew parameters into Cayley blocks ``Q = (I + K)⁻¹ (I − K)`` before every forward
pass. Built layer by layer that is a handful of tiny operations per layer (a scatter into ``K``, a batched solve of
b×b systems, a copy into the dense groups) and as many again in backward: on a 30-block model with every linear
layer adapted, 210 solves per step whose cost is the call, not the arithmetic. :class:`RotationBank` builds every
linked layer's blocks in one call instead (:class:`BatchedCayley`: one scatter, one solve, one grouping for the
whole model, forward and backward) the first time a layer asks after its parameters changed, and hands each layer
its part. The layer-by-layer build (:meth:`ButterflyBranch.own_grouped_rotations`) stays the reference, used
whenever the bank cannot be (rotation dropout while training, sharded parameters, a layer never linked); the tests
hold the two to the same values and gradients.

A layer's part stays valid while the tensors it was built from are unchanged, and, if it was built without
gradients, while none are needed. "Unchanged" is read from three counters, no values: the number of optimiser steps
taken in this process (a global ``torch.optim`` step hook: fused AdamW updates parameters without touching their
version counters), the tensors' version counters (``load_state_dict``, ``copy_``, any in-place change) and their
storage (``.to()``). A change made through ``.data`` is invisible to all three: after one, call
:func:`refresh_rotations`. :class:`BatchedCayley` keeps what its backward needs on its own context rather than in
autograd's saved tensors, so two forward passes between optimiser steps (gradient accumulation, activation
checkpointing's recomputation) may share one build and be backpropagated separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from hybrid_peft.config import AdapterConfig
from hybrid_peft.layer import compute_copy
from hybrid_peft.methods.butterfly import (
    SMALL_SCALE,
    butterfly_dense,
    butterfly_permutations,
    cayley,
    group_blocks,
    group_factors,
    group_size,
    multiplicative_dropout,
    register_gather_plan,
    resolve_blocks,
    skew_symmetric,
    ungroup_blocks,
)

_optimiser_steps = 0


def _count_optimiser_step(*_: Any) -> None:
    global _optimiser_steps
    _optimiser_steps += 1


register_optimizer_step_post_hook(_count_optimiser_step)


def refresh_rotations(model: nn.Module) -> None:
    """Drop every built rotation of ``model``'s banks: the next forward pass builds them afresh. Needed only after
    changing skew parameters in a way no counter sees (writing to ``.data``)."""
    for module in model.modules():
        if isinstance(module, ButterflyBranch) and module.rotation_bank is not None:
            module.rotation_bank.clear()


class BatchedCayley(torch.autograd.Function):
    """Many layers' free skew parameters ``(m_l, N_l, b(b−1)/2)`` (one block size ``b`` and group width ``G``),
    each times its constant factor (a tensor without gradient, or None for 1: the hybrid's orthogonal gate) -> each
    layer's grouped Cayley blocks ``(m_l, N_l/G, G·b, G·b)``, in one scatter, one batched solve and one grouping for
    all of them. Nothing goes to autograd's saved tensors, so activation checkpointing's recomputation, which finds
    the build already made, saves exactly what the first forward pass saved.

    Backward: with ``S = I + K``, ``Q = S⁻¹(I − K) = 2 S⁻¹ − I``, so ``dQ = −2 S⁻¹ dK S⁻¹`` and
    ``∂L/∂K = −2 S⁻ᵀ (∂L/∂Q) S⁻ᵀ`` with ``S⁻¹ = (Q + I)/2``: only ``Q`` is kept (on the context, not in autograd's
    saved tensors, so the node may be backpropagated more than once), and the skew parts of ``∂L/∂K`` are the
    gradients of the free parameters."""

    @staticmethod
    def forward(ctx, block_size: int, group: int, factors: tuple, *skews: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        shapes = [s.shape for s in skews]
        flat = torch.cat([_scaled(s.reshape(-1, s.shape[-1]), f) for s, f in zip(skews, factors, strict=True)])
        # (Σ m·N, b(b−1)/2), each layer's scaled by its factor
        blocks = cayley(skew_symmetric(flat, block_size))  # (Σ m·N, b, b)
        ctx.blocks, ctx.shapes, ctx.factors, ctx.block_size, ctx.group = blocks, shapes, factors, block_size, group
        grouped = group_blocks(blocks, group)  # (Σ m·N/G, G·b, G·b)
        counts = [math.prod(shape[:-1]) // group for shape in shapes]
        width = group * block_size
        return tuple(
            part.view(shape[0], shape[1] // group, width, width)
            for part, shape in zip(grouped.split(counts), shapes, strict=True)
        )

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # noqa: ANN001, ANN205
        blocks, shapes, b, group = ctx.blocks, ctx.shapes, ctx.block_size, ctx.group
        parts = []
        for grad, shape in zip(grads, shapes, strict=True):
            count = math.prod(shape[:-1])
            if grad is None:
                parts.append(blocks.new_zeros(count, b, b))
            else:
                parts.append(ungroup_blocks(grad.reshape(count // group, group * b, group * b), group))
        grad_blocks = torch.cat(parts)  # (Σ m·N, b, b)
        inverse_t = (blocks + torch.eye(b, dtype=blocks.dtype, device=blocks.device)).transpose(-1, -2) * 0.5
        grad_skew = -2.0 * (inverse_t @ grad_blocks @ inverse_t)
        rows, cols = torch.triu_indices(b, b, offset=1, device=blocks.device)
        grad_free = (grad_skew - grad_skew.transpose(-1, -2))[:, rows, cols]  # K = U − Uᵀ, U's free entries
        sizes = [math.prod(shape[:-1]) for shape in shapes]
        grads_out = [
            _scaled(part.reshape(shape), factor)
            for part, shape, factor in zip(grad_free.split(sizes), shapes, ctx.factors, strict=True)
        ]
        return (None, None, None, *grads_out)


def _scaled(tensor: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return tensor if factor is None else tensor * factor


class RotationBank:
    """Every butterfly layer of one model, whose rotations it builds in one :class:`BatchedCayley` call per block
    size and group width (:func:`link_rotation_banks` makes one at attach and load time)."""

    def __init__(self, layers: Sequence[ButterflyBranch]) -> None:
        self.layers = list(layers)
        self.disabled = False
        # id(layer) -> (grouped blocks, token, built with gradients, any |scale| below SMALL_SCALE)
        self._parts: dict[int, tuple[torch.Tensor, tuple, bool, bool]] = {}

    def __getstate__(self) -> dict[str, Any]:  # built rotations carry a graph: never copied or pickled
        return {"layers": self.layers, "disabled": self.disabled, "_parts": {}}

    def clear(self) -> None:
        self._parts.clear()

    def grouped_rotations(self, layer: ButterflyBranch) -> tuple[torch.Tensor, bool] | None:
        """``layer``'s grouped blocks and whether any of its scales is below ``SMALL_SCALE``, from the bank, built
        for every layer if ``layer``'s are stale; None where the bank cannot serve (the caller builds its own)."""
        if self.disabled:
            return None
        part = self._parts.get(id(layer))
        if part is None or not self._valid(layer, part):
            if not self._build():
                return None
            part = self._parts.get(id(layer))
            if part is None:
                return None
        return part[0], part[3]

    @staticmethod
    def _valid(layer: ButterflyBranch, part: tuple[torch.Tensor, tuple, bool, bool]) -> bool:
        _, token, with_grad, _ = part
        if token != layer.rotation_token():
            return False
        return with_grad or not (torch.is_grad_enabled() and layer.boft_skew.requires_grad)

    def _build(self) -> bool:
        layers = [layer for layer in self.layers if layer.bank_may_serve()]
        if any(hasattr(layer.boft_skew, "to_local") for layer in layers):  # sharded (FSDP): layer by layer
            self.disabled = True
            return False
        by_kind: dict[tuple, list[ButterflyBranch]] = {}
        for layer in layers:
            skew = layer.boft_skew
            key = (layer.block_size, group_size(layer.block_num, layer.block_size), skew.dtype, skew.device)
            by_kind.setdefault(key, []).append(layer)
        self._parts.clear()
        with_grad = torch.is_grad_enabled()
        for (block_size, group, _, device), members in by_kind.items():
            tokens = [layer.rotation_token() for layer in members]
            factors = tuple(layer.rotation_factor() for layer in members)
            built = BatchedCayley.apply(block_size, group, factors, *(layer.boft_skew for layer in members))
            small = _any_small_scale([layer.boft_scale for layer in members], device)
            for layer, grouped, token, tiny in zip(members, built, tokens, small, strict=True):
                self._parts[id(layer)] = (grouped, token, with_grad and grouped.requires_grad, tiny)
        return True


def _any_small_scale(scales: list[torch.Tensor], device: torch.device) -> list[bool]:
    """Per scale vector, whether any entry's magnitude is below ``SMALL_SCALE`` (the scaled linear then keeps its
    product for backward): one host read for all of them instead of one per layer and forward pass."""
    with torch.no_grad():
        small = torch.cat([s.reshape(-1) for s in scales]).abs() < SMALL_SCALE
        sizes = torch.tensor([s.numel() for s in scales], device=device)
        owners = torch.repeat_interleave(torch.arange(len(scales), device=device), sizes)
        counts = torch.zeros(len(scales), device=device).index_add_(0, owners, small.to(torch.float32))
        return (counts > 0).tolist()


def link_rotation_banks(model: nn.Module) -> None:
    """Give every butterfly layer of ``model`` one shared :class:`RotationBank` (called by ``attach`` and
    ``load_adapter`` after they install layers; a second call replaces the bank)."""
    layers = [m for m in model.modules() if isinstance(m, ButterflyBranch)]
    bank = RotationBank(layers) if layers else None
    for layer in layers:
        layer.rotation_bank = bank


class ButterflyBranch:
    """The orthogonal branch, shared by BOFT's layer and the hybrid's: ``m × N`` Cayley blocks stored as their
    skew parts (``boft_skew``), a per-output scale (``boft_scale``) and the gather plan. The host is an
    :class:`~hybrid_peft.layer.AdapterLayer`; it may scale the skew parameters by a constant (:meth:`rotation_factor`,
    naming the tensors that constant is computed from in :meth:`rotation_inputs`) and names its dropout rate."""

    boft_skew: nn.Parameter
    boft_scale: nn.Parameter
    rotation_dropout: float = 0.0
    rotation_bank: RotationBank | None = None

    def _init_butterfly(self, config: AdapterConfig, factory: dict) -> None:
        self.butterfly_factors = m = config.butterfly_factors
        self.block_size, self.block_num = resolve_blocks(self.in_features, config.block_size, config.block_num, m)
        free = self.block_size * (self.block_size - 1) // 2
        self.boft_skew = nn.Parameter(torch.zeros(m, self.block_num, free, **factory))
        self.boft_scale = nn.Parameter(torch.ones(self.out_features, **factory))
        self._perms = register_gather_plan(self, butterfly_permutations(self.in_features, self.block_size, m))

    @classmethod
    def after_attach(cls, model: nn.Module) -> None:
        """Link every butterfly layer of ``model`` to one bank (:func:`link_rotation_banks`)."""
        link_rotation_banks(model)

    @property
    def plan(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"_gather_{k}") for k in range(self.butterfly_factors + 1)]

    def rotation_factor(self) -> torch.Tensor | None:
        """A constant (no gradient) the skew parameters are multiplied by before the Cayley map; None for 1."""
        return None

    def rotation_skew(self) -> torch.Tensor:
        """The free skew-symmetric entries the rotation is built from, ``(m, N, b(b−1)/2)``."""
        factor = self.rotation_factor()
        return self.boft_skew if factor is None else factor * self.boft_skew

    def rotation_inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors a built rotation (and its scale's flag) depends on: a change to any of them makes it stale."""
        return (self.boft_skew, self.boft_scale)

    def rotation_token(self) -> tuple:
        """What a built rotation of this layer is valid for (see the module docstring)."""
        return (_optimiser_steps, *((t._version, t.data_ptr()) for t in self.rotation_inputs()))

    def bank_may_serve(self) -> bool:
        """Whether the shared batched build may stand in for this layer's own (not with dropout while training)."""
        return not (self.training and self.rotation_dropout > 0)

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks ``Q`` as ``(m, N, b, b)``, with dropout applied in training."""
        rotations = cayley(skew_symmetric(self.rotation_skew(), self.block_size))
        if self.training and self.rotation_dropout > 0:
            rotations = multiplicative_dropout(rotations, self.rotation_dropout)
        return rotations

    def own_grouped_rotations(self) -> torch.Tensor:
        """This layer's grouped blocks ``(m, N/G, G·b, G·b)``, built by itself: the reference for the bank's."""
        return group_factors(self.rotations())

    def grouped_rotations(self) -> tuple[torch.Tensor, bool | None]:
        """The grouped blocks :class:`~hybrid_peft.methods.butterfly.ButterflyRotate` multiplies by, and whether any
        ``|s|`` is below ``SMALL_SCALE`` (for ``scaled_linear``): the bank's batched build where it may serve, else
        this layer's own blocks and None (``scaled_linear`` then reads the scale itself)."""
        bank = self.rotation_bank
        if bank is not None and self.bank_may_serve():
            served = bank.grouped_rotations(self)
            if served is not None:
                return served
        return self.own_grouped_rotations(), None

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """The largest ‖QᵀQ − I‖_F over the butterfly blocks (Cayley blocks are orthogonal up to rounding)."""
        blocks = cayley(skew_symmetric(self.rotation_skew().float(), self.block_size))
        eye = torch.eye(self.block_size, dtype=blocks.dtype, device=blocks.device)
        return float(torch.linalg.matrix_norm(blocks.transpose(-1, -2) @ blocks - eye).max())

    def rotation_matrix(self) -> torch.Tensor:
        """Dense ``M`` (``in × in``)."""
        return butterfly_dense(cayley(skew_symmetric(self.rotation_skew(), self.block_size)), self._perms)

    def orthogonal_weight(self) -> torch.Tensor:
        """``diag(s) · W0 · Mᵀ`` in the adapter's dtype."""
        rotation = self.rotation_matrix()
        return self.boft_scale[:, None] * (self.base_weight.to(rotation.dtype) @ rotation.T)

    def scaled_base_output(self, rotated: torch.Tensor) -> torch.Tensor:
        """``s ⊙ ((x M) W0ᵀ) + b`` computed by the base layer itself on the rotated input: the path for a quantised
        base, whose weight is only ever read by its own kernel (same maths as ``scaled_linear``)."""
        out = self.base_layer(rotated)
        scale = compute_copy(self.boft_scale, out)
        bias = self.base_layer.bias
        if bias is None:
            return out * scale
        bias = bias.to(out.dtype)
        return torch.addcmul(bias, out - bias, scale)
