"""LoRA-GA: LoRA with a gradient-aligned initialisation (Wang et al. 2024, https://arxiv.org/abs/2407.05000).

Training is plain LoRA; only the start differs. From the mean gradient ``G ≈ U S Vᵀ`` (top 2r) of each frozen
weight over a few batches::

    direction "ArB2r":  A0 = V[:, :r]ᵀ,  B0 = U[:, r:2r]
    scale "stable":     A0 ← ζ A0,  B0 ← ζ B0,   ζ = out^{1/4} / √γ            (the paper's code)
    scale "peft":       B0 ← ζ · B0 · diag(S[r:2r]), A0 unchanged               (PEFT 0.21's variant)
    base offset:        W0' = W0 − s · B0 A0,  so the model's output is unchanged at step 0

The explicit steps, which a training recipe and a plain script call alike::

    attach(model, LoRAGAConfig(rank=8))
    estimates = estimate_gradients(model, batches, estimator="sketch")    # hybrid_peft.gradient_estimation
    apply_lora_ga_factors(model, lora_ga_factors_for(model, estimates))      # or: lora_ga_initialise(model, batches)

The adapter stores ``A0`` and ``B0`` beside ``A`` and ``B``, so a saved LoRA-GA adapter loads onto the *unmodified*
base (loading re-applies the offset) and exports to PEFT as the rank-2r LoRA ``[A; A0]``, ``[B, −B0]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybrid_peft.adapters import adapter_layers
from hybrid_peft.config import require_choice, require_float, require_int
from hybrid_peft.errors import HybridPeftError
from hybrid_peft.gradient_estimation import (
    ESTIMATORS,
    GradientEstimate,
    estimate_gradients,
    load_estimates,
    save_estimates,
)
from hybrid_peft.methods.lora import LoRAConfig, LoRALayer
from hybrid_peft.registry import register_method

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "peft", "unit")


@dataclass(frozen=True)
class LoRAGAConfig(LoRAConfig):
    """LoRA settings plus the initialisation's.

    Args:
        direction: which singular vectors go to A and B (``ArB2r``: A the top r right vectors, B the next r left).
        scale: ``stable`` (the paper's: both factors times ζ), ``peft`` (PEFT 0.21: B times ζ·S), ``unit``.
        gamma: γ of the stable scale ζ = out^{1/4}/√γ.
        estimator: ``exact`` (full gradient per layer) or ``sketch`` (streaming randomized sketch).
        oversampling: the sketch keeps k = oversampling · 2r columns and l = 2k + 1 co-range rows; more columns
            recover the top-2r subspace more closely (``benchmarks/sketch_quality.py`` measures how closely).
        svd: ``exact`` or ``lowrank`` (PEFT's randomized ``torch.svd_lowrank``) for the exact estimator's SVD.
        seed: seeds the sketch's test matrices.
    """

    method = "lora-ga"
    # The gradient-aligned start takes a larger first step than LoRA's B = 0, so it wants a lower rate than LoRA's.
    default_learning_rate = 3e-4

    direction: str = "ArB2r"
    scale: str = "stable"
    gamma: float = 16.0
    estimator: str = "exact"
    oversampling: int = 16
    svd: str = "exact"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        require_choice("direction", self.direction, DIRECTIONS)
        require_choice("scale", self.scale, SCALES)
        require_float("gamma", self.gamma, minimum=0.0, min_inclusive=False)
        require_choice("estimator", self.estimator, ESTIMATORS)
        require_int("oversampling", self.oversampling, minimum=1)
        require_choice("svd", self.svd, ("exact", "lowrank"))
        require_int("seed", self.seed, minimum=0)

    def frozen_count(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features)  # A0, B0: the adapter loads onto the unmodified base


def lora_ga_factors(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0 (r, in), B0 (out, r))`` from the top-2r singular triplets ``u (out, 2r)``, ``s (2r,)``, ``vh (2r, in)``."""
    if u.shape[1] < 2 * rank:
        raise HybridPeftError(
            f"rank {rank} needs 2r = {2 * rank} singular vectors but the gradient has only {u.shape[1]} "
            f"(layer {u.shape[0]}×{vh.shape[1]}); use a smaller rank"
        )
    if direction == "ArB2r":
        a_index, b_index = torch.arange(rank), torch.arange(rank, 2 * rank)
    elif direction == "A2rBr":
        a_index, b_index = torch.arange(rank, 2 * rank), torch.arange(rank)
    elif direction == "ArBr":
        a_index, b_index = torch.arange(1, 2 * rank, 2), torch.arange(0, 2 * rank, 2)
    else:
        raise HybridPeftError(f"unknown direction {direction!r}; choose one of {list(DIRECTIONS)}")
    a0, b0 = vh[a_index].clone(), u[:, b_index].clone()
    zeta = u.shape[0] ** 0.25 / gamma**0.5
    if scale == "stable":
        a0, b0 = zeta * a0, zeta * b0
    elif scale == "peft":
        b0 = zeta * (b0 * s[b_index])
    elif scale != "unit":
        raise HybridPeftError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
    return a0.contiguous(), b0.contiguous()


class GradientAlignedStart:
    """Mixin for adapters whose low-rank branch starts at LoRA-GA's ``A0``, ``B0`` with the base weight offset so the
    output is unchanged: keeps ``A0``/``B0`` as persistent buffers (saved with the adapter), applies the offset on
    :meth:`initialise` and on loading (adapters are saved against the *unmodified* base), removes it on release.

    The host class provides ``lora_A``, ``lora_B`` parameters and :meth:`base_offset` (the ``(out, in)`` amount
    subtracted from the base weight, or ``None`` when the host subtracts ``B0 A0`` in its own branch instead)."""

    needs_gradient_init = True
    offset_applied: bool

    @classmethod
    def initialise_from_data(
        cls,
        model: nn.Module,
        batches: Callable[[], Iterable[Any]],
        *,
        loss_fn: Callable | None = None,
        progress: bool = False,
    ) -> None:
        """LoRA-GA's start for every layer of ``model`` that wants one (:func:`lora_ga_initialise`)."""
        if any(layer.needs_gradient_init for layer in adapter_layers(model).values()):
            lora_ga_initialise(model, batches(), loss_fn=loss_fn, progress=progress)

    @property
    def start_config(self) -> LoRAGAConfig:
        """The LoRA-GA settings of this layer's start (the layer's config, or the hybrid's low-rank part)."""
        return self.config  # type: ignore[attr-defined]

    def _register_start_buffers(self) -> None:
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        self.offset_applied = False

    @property
    def initialised(self) -> bool:
        return bool(self.lora_B0.any() or self.lora_A0.any())

    def base_offset(self) -> torch.Tensor | None:
        raise NotImplementedError

    def after_start(self, estimate: Any) -> None:
        """Called with the layer's gradient estimate once the start is applied (the hybrid's ``spectrum`` rule sets
        λ from it); nothing by default."""

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-2r factors ``[A; A0]``, ``[B, −B0]`` whose product is the learnt update ``B A − B0 A0``."""
        return (
            torch.cat([self.lora_A, self.lora_A0.to(self.lora_A.dtype)]),
            torch.cat([self.lora_B, -self.lora_B0.to(self.lora_B.dtype)], dim=1),
        )

    @torch.no_grad()
    def _shift_base(self, sign: float) -> None:
        offset = self.base_offset()
        if offset is None:
            return
        base = self.base_weight
        self._write_base_weight((base.float() + sign * offset.float()).to(base.dtype))

    @torch.no_grad()
    def initialise(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Start training from ``A = A0``, ``B = B0`` and offset the base so the output is unchanged."""
        if self.merged:
            raise HybridPeftError("unmerge the adapter before initialising it")
        if self.offset_applied:
            self._shift_base(+1.0)
        self.lora_A0.copy_(a0)
        self.lora_B0.copy_(b0)
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)
        self._shift_base(-1.0)
        self.offset_applied = True

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        # Loaded onto an unmodified base: re-apply the offset recorded by A0, B0.
        if self.offset_applied:
            self._shift_base(+1.0)
            self.offset_applied = False
        super().load_adapter_state(state)
        if self.initialised:
            self._shift_base(-1.0)
            self.offset_applied = True

    def release(self) -> nn.Module:
        base = super().release()
        if self.offset_applied:
            self._shift_base(+1.0)
            self.offset_applied = False
        return base


@register_method(LoRAGAConfig)
class LoRAGALayer(GradientAlignedStart, LoRALayer):
    """LoRA whose ``A``, ``B`` start at ``A0``, ``B0`` with the base weight offset by ``−s·B0A0``. On a quantised
    base, which cannot be written, the offset stays in the adapter instead: ``y = base(x) + s·x(BA − B0A0)ᵀ``,
    computed as the rank-2r pair ``[A; A0]``, ``[B, −B0]`` (the same function)."""

    config: LoRAGAConfig

    def __init__(self, base_layer: nn.Module, config: LoRAGAConfig) -> None:
        super().__init__(base_layer, config)
        self._register_start_buffers()

    @property
    def offset_in_adapter(self) -> bool:
        return self.quantised is not None

    def base_offset(self) -> torch.Tensor | None:
        if self.offset_in_adapter:
            return None
        return self.scaling * (self.lora_B0.float() @ self.lora_A0.float())

    def trained_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.update_factors() if self.offset_in_adapter else (self.lora_A, self.lora_B)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-2r factors on the unmodified base: ``W0 + s[B, −B0][A; A0] = W0' + s·B·A``."""
        return self.update_factors()


def lora_ga_factors_for(
    model: nn.Module, estimates: dict[str, GradientEstimate]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (A0, B0)}`` for every LoRA-GA layer of ``model``, from its gradient estimate and its config."""
    layers = {n: layer for n, layer in adapter_layers(model).items() if layer.needs_gradient_init}
    missing = sorted(set(layers) - set(estimates))
    if missing:
        raise HybridPeftError(f"no gradient estimate for LoRA-GA layer(s) {missing[:3]}; estimate them first")
    factors = {}
    for name, layer in layers.items():
        c = layer.start_config
        u, s, vh = estimates[name].top_singular(2 * c.rank, c.svd)
        factors[name] = lora_ga_factors(u, s, vh, c.rank, direction=c.direction, scale=c.scale, gamma=c.gamma)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank holds the same estimate, but LAPACK need not give bit-identical factors on every process:
        # take rank 0's, so the starts (and the base offsets) are identical everywhere.
        for a0, b0 in factors.values():
            torch.distributed.broadcast(a0, src=0)
            torch.distributed.broadcast(b0, src=0)
    return factors


def apply_lora_ga_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Apply ``{name: (A0, B0)}`` (see :func:`lora_ga_factors_for`) to the model's LoRA-GA layers."""
    layers = adapter_layers(model)
    for name, (a0, b0) in factors.items():
        layer = layers.get(name)
        if layer is None or not layer.needs_gradient_init:
            raise HybridPeftError(f"{name} is not a LoRA-GA (or hybrid) layer of this model")
        layer.initialise(a0, b0)


def lora_ga_initialise(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    cache_file: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Estimate, factor and apply in one call, using the attached LoRA-GA layers' configs. With ``cache_file`` the
    gradient estimates are read from it if it exists, else computed and written there. Returns the factors."""
    configs = {layer.start_config for layer in adapter_layers(model).values() if layer.needs_gradient_init}
    if not configs:
        raise HybridPeftError("the model has no LoRA-GA layers; attach(model, LoRAGAConfig(...)) first")
    if len(configs) > 1:
        raise HybridPeftError("lora_ga_initialise handles one LoRA-GA config; call estimate_gradients per config")
    config = configs.pop()
    if cache_file is not None and os.path.exists(cache_file):
        estimates = load_estimates(cache_file, device=next(model.parameters()).device)
    else:
        estimates = estimate_gradients(
            model,
            batches,
            loss_fn=loss_fn,
            estimator=config.estimator,
            rank=config.rank,
            oversampling=config.oversampling,
            seed=config.seed,
            progress=progress,
        )
        if cache_file is not None:
            save_estimates(estimates, cache_file)
    factors = lora_ga_factors_for(model, estimates)
    apply_lora_ga_factors(model, factors)
    layers = adapter_layers(model)
    for name in factors:
        layers[name].after_start(estimates[name])
    return factors
