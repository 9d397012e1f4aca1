"""The hybrid adapter of "Hybrid and Unitary PEFT for Resource-Efficient LLMs" (arXiv 2507.18076): per layer, a
low-rank branch and a BOFT orthogonal branch over one frozen weight and one base matmul, each scaled by a gate
from the mix λ, which a rule may set from gradient norms::

    W_eff = diag(s) · W0 · R(g_orth K)ᵀ  +  g_lr · s_lora · (B A − B0 A0)          y = x W_effᵀ + b

    g_lr, g_orth  λ and 1 − λ divided by max(λ, 1 − λ) (``gate_norm="max"``, the default), or λ and 1 − λ ("sum")
    R(·)    BOFT's butterfly rotation with its skew parameters scaled by g_orth   (see methods/boft.py)
    B A     ``start="lora"`` (the default): PEFT's LoRA start, B = 0, and B0 A0 = 0 (no gradient estimate);
            ``start="lora-ga"`` (the paper's): A = A0, B = B0 from LoRA-GA's gradient estimate (methods/lora_ga.py)
            Either way W_eff = W0 at step 0.

**The default** is both branches at full strength: ``rule="fixed"`` keeps λ at ``mix_init`` = 0.5, where the
max-normalised gates are 1 and 1, so W_eff = diag(s)·W0·R(K)ᵀ + s_lora·B A, LoRA's update beside BOFT's rotation,
and the rotation's parameters train at 0.3× the run's rate (``orthogonal_lr_scale=0.3``; the optimiser must apply
it: :func:`hybrid_peft.parameter_groups`, which the recipe uses). The paper's gradient-norm mix is ``rule="share"``
or ``rule="sigmoid"`` (below); ``start="lora-ga"`` is the paper's gradient-aligned start. Adapter files written by
earlier versions, whose defaults differed, load with the options they were trained with (``legacy_defaults``).

This is ``gate="update"`` (the default): the gate g_lr scales what the low-rank branch has learnt, B A − B0 A0,
computed (with a LoRA-GA start) as one rank-2r product x [A; A0]ᵀ [B, −B0]ᵀ on the unmodified base.
``gate="branch"`` is DESIGN.md's formula, which gates the whole branch over an offset base::

    W_eff = diag(s) · W0' · R(g_orth K)ᵀ  +  g_lr · s_lora · B A,      W0' = W0 − g_lr(λ0) · s_lora · B0 A0

There B A starts at B0 A0 ≠ 0, so every move of λ away from λ0 shifts the output by (λ − λ0)·s_lora·B0A0, a change
no optimiser step asked for; the update gate has no such shift.

``gate="step"`` keeps λ out of the forward pass altogether (both branches at full strength, λ = 1 and 1 − λ = 1
above) and applies it as a split of the optimiser's step instead: each step moves a layer's low-rank parameters by
λ and its skew parameters by 1 − λ times what the optimiser computed (:func:`split_steps`, which
:func:`hybrid_peft.run.loop.make_optimiser` registers; for AdamW that is the learning rate times λ, weight decay
included). Under Adam an output gate does nearly the same to first order (Adam's step ignores the gradient's scale,
so a gated branch's output moves at the gate times its own speed), except that a move of λ rescales everything the
branch has learnt at once; the step split never changes the output between steps.

λ is a buffer, never a parameter: no optimiser touches it. With a rule (``share``, ``sigmoid``: the paper's
gradient-norm mix, in ``methods/mixing.py``) the layer's ``after_backward`` hook sets every layer's λ after each
backward pass; with ``rule="fixed"`` (the default) λ stays at ``mix_init`` (or λ0 per layer with
``mix_init_from='gradient'``) and there is no per-step hook. λ, λ0, A0, B0 and the rule's state are buffers, saved
with the adapter. Merging is exact: the merged weight is W_eff.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_peft.config import require_choice, require_float
from hybrid_peft.errors import ConfigError
from hybrid_peft.layer import AdapterLayer, adapter_dtype_for
from hybrid_peft.methods.boft import BOFTConfig, validate_butterfly_fields
from hybrid_peft.methods.butterfly import ButterflyRotate, scaled_linear
from hybrid_peft.methods.lora import LowRankBranch
from hybrid_peft.methods.lora_ga import GradientAlignedStart, LoRAGAConfig
from hybrid_peft.methods.mixing import MIXING_RULES, mixing_step, sigmoid, split_layer_steps
from hybrid_peft.methods.rotations import ButterflyBranch
from hybrid_peft.registry import register_method

GATES = ("branch", "update", "step")
STARTS = ("lora-ga", "lora")
GATE_NORMS = ("sum", "max")
MIX_STARTS = ("constant", "gradient")  # where λ0 comes from


@dataclass(frozen=True)
class HybridConfig(LoRAGAConfig):
    """LoRA-GA settings (rank, alpha, direction, scale, estimator, ...), BOFT settings and the mixing rule.

    Args:
        block_size, block_num, butterfly_factors, boft_dropout: the orthogonal branch (as in :class:`BOFTConfig`).
        rule: ``fixed`` (default: λ stays at ``mix_init``), ``share`` or ``sigmoid`` (λ from gradient norms).
        mix_init: λ0, the low-rank branch's initial share.
        mix_min: λmin; λ is clamped to [λmin, 1 − λmin], 0 < λmin < 0.5.
        ema: β of the moving average of the ``share`` and ``sigmoid`` rules (0 = no smoothing).
        temperature: τ of the ``sigmoid`` rule, > 0.
        gate: what λ gates: ``update`` (default: only the learnt λ·s·(B A − B0A0); the base is never offset),
            ``branch`` (all of λ·s·B A, with the base offset by λ0·s·B0A0; DESIGN.md's formula) or ``step`` (not
            the output but each optimiser step: the low-rank parameters move by λ, the skew ones by 1 − λ of it;
            needs the optimiser from ``make_optimiser`` or :func:`split_steps`). See the module docstring.
        start: the low-rank branch's start: ``lora`` (default: PEFT's LoRA start, B = 0, so no gradient estimate and
            a rank-r branch) or ``lora-ga`` (A0, B0 from the gradient estimate, the paper's).
        gate_norm: ``max`` (default): the gates λ and 1 − λ divided by max(λ, 1 − λ), so the favoured branch runs at
            full strength and λ only allocates (at λ = 0.5 both run at full strength); ``sum``: the gates are λ and
            1 − λ (they shrink both branches, by half at λ = 0.5).
        mix_init_from: ``constant`` (λ0 = ``mix_init`` everywhere) or ``gradient``: λ0 per layer from the gradient
            estimate LoRA-GA computes anyway, σ((log‖Gℓ‖ − mean log‖G‖)/τ) (the ``sigmoid`` rule's formula, once,
            with no extra pass); needs ``start='lora-ga'``.
        low_rank_lr_scale, orthogonal_lr_scale: multiply the run's learning rate for each branch's parameters
            (the optimiser gets one parameter group per scale). Defaults 1.0 and 0.3: with both branches at full
            strength the low-rank one learns at LoRA's rate and the rotation at about a third of it.
    """

    method = "hybrid"

    block_size: int = 4
    block_num: int = 0
    butterfly_factors: int = 1
    boft_dropout: float = 0.0
    rule: str = "fixed"
    mix_init: float = 0.5
    mix_min: float = 0.05
    ema: float = 0.9
    temperature: float = 1.0
    gate: str = "update"
    start: str = "lora"
    gate_norm: str = "max"
    mix_init_from: str = "constant"
    low_rank_lr_scale: float = 1.0
    orthogonal_lr_scale: float = 0.3

    # Adapter files of format version 1 predate the gate option and were trained with the whole branch gated; files
    # before version 3 predate the start option and started from LoRA-GA; files before version 4 were written when
    # the default was the `share` rule with λ and 1 − λ gates and one rate for both branches.
    legacy_defaults: ClassVar[dict[int, dict[str, Any]]] = {
        2: {"gate": "branch"},
        3: {"start": "lora-ga"},
        4: {"rule": "share", "gate_norm": "sum", "orthogonal_lr_scale": 1.0},
    }

    def validate(self) -> None:
        super().validate()
        validate_butterfly_fields(self)
        require_float("boft_dropout", self.boft_dropout, minimum=0.0, maximum=1.0, max_inclusive=False)
        require_choice("rule", self.rule, tuple(MIXING_RULES))
        require_float("mix_min", self.mix_min, minimum=0.0, maximum=0.5, min_inclusive=False, max_inclusive=False)
        require_float("mix_init", self.mix_init, minimum=self.mix_min, maximum=1 - self.mix_min)
        require_float("ema", self.ema, minimum=0.0, maximum=1.0, max_inclusive=False)
        require_float("temperature", self.temperature, minimum=0.0, min_inclusive=False)
        require_choice("gate", self.gate, GATES)
        require_choice("start", self.start, STARTS)
        require_choice("gate_norm", self.gate_norm, GATE_NORMS)
        require_choice("mix_init_from", self.mix_init_from, MIX_STARTS)
        if self.mix_init_from == "gradient" and self.start != "lora-ga":
            raise ConfigError("mix_init_from='gradient' reads LoRA-GA's gradient estimate: it needs start='lora-ga'")
        for name in ("low_rank_lr_scale", "orthogonal_lr_scale"):
            require_float(name, getattr(self, name), minimum=0.0, min_inclusive=False)

    keeps_output = True  # one scaled linear for both branches, as BOFT's
    default_learning_rate = 1e-3  # the low-rank branch trains at LoRA's rate

    @property
    def low_rank_width(self) -> int:
        """A LoRA-GA start under the update or step gate projects onto ``[A; A0]`` (rank 2r), else onto ``A``."""
        return 2 * self.rank if self.gate != "branch" and self.start == "lora-ga" else self.rank

    def frozen_count(self, in_features: int, out_features: int) -> int:
        return super().frozen_count(in_features, out_features) if self.start == "lora-ga" else 0

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return super().parameter_count(in_features, out_features) + BOFTConfig.parameter_count(
            self, in_features, out_features
        )

    def saved_per_token(self, in_features: int, out_features: int) -> int:
        return self.low_rank_width

    def flops_per_token(self, in_features: int, out_features: int) -> int:
        low_rank = self.low_rank_width * (in_features + out_features)
        return low_rank + BOFTConfig.flops_per_token(self, in_features, out_features)

    def fixed_activations(self, in_features: int, out_features: int) -> int:
        rotations = BOFTConfig.fixed_activations(self, in_features, out_features)
        concatenated = self.low_rank_width * (in_features + out_features) if self.low_rank_width > self.rank else 0
        return rotations + concatenated  # with the update gate, [A; A0] and [B, −B0] are kept too


@register_method(HybridConfig)
class HybridLayer(GradientAlignedStart, LowRankBranch, ButterflyBranch, AdapterLayer):
    """Both branches over one frozen weight; see the module docstring."""

    config: HybridConfig

    def __init__(self, base_layer: nn.Module, config: HybridConfig) -> None:
        super().__init__(base_layer, config)
        if self.quantised and config.gate == "branch":
            raise ConfigError(
                f"gate='branch' offsets the base weight, which a quantised ({self.quantised}) base cannot take; use "
                "gate='update' (the default)"
            )
        weight = self.base_weight
        factory = {"device": weight.device, "dtype": adapter_dtype_for(weight.dtype)}
        # Low-rank branch: A, B, and (LoRA-GA start) the start A0, B0.
        self._init_low_rank(config.rank)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_scaling = config.scaling
        self.needs_gradient_init = config.start == "lora-ga"
        self.offset_applied = False
        if self.needs_gradient_init:
            self._register_start_buffers()
        # Orthogonal branch (BOFT), its skew parameters scaled by 1 − λ (rotation_skew).
        self._init_butterfly(config, factory)
        self.rotation_dropout = config.boft_dropout
        # The gate and the rule's state: buffers (saved, never optimised).
        self.register_buffer("mix", torch.tensor(config.mix_init, **factory))
        self.register_buffer("mix_start", torch.tensor(config.mix_init, **factory))  # λ0 of the base offset
        self.full_strength = full_strength(config)

    # --- branches -------------------------------------------------------------------------------------------

    def low_rank_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def orthogonal_parameters(self) -> list[nn.Parameter]:
        return [self.boft_skew]

    def learning_rate_scales(self) -> dict[str, float]:
        scales = {"lora_A": self.config.low_rank_lr_scale, "lora_B": self.config.low_rank_lr_scale}
        return scales | {name: self.config.orthogonal_lr_scale for name in ("boft_skew", "boft_scale")}

    def shares(self, mix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low-rank share, orthogonal share)`` of λ (``mix``, default the layer's): ``(λ, 1 − λ)``, or both over
        max(λ, 1 − λ) (``gate_norm='max'``)."""
        mix = self.mix if mix is None else mix
        low_rank, orthogonal = mix, 1 - mix
        if self.config.gate_norm == "max":
            larger = torch.maximum(low_rank, orthogonal)
            return low_rank / larger, orthogonal / larger
        return low_rank, orthogonal

    def gates(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The factors on each branch in the forward pass: the shares, or 1 and 1 at :attr:`full_strength`."""
        if self.full_strength:
            return 1.0, 1.0
        return self.shares()

    def rotation_factor(self) -> torch.Tensor | None:
        return None if self.full_strength else self.gates()[1]

    def rotation_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.boft_skew, self.boft_scale) + (() if self.full_strength else (self.mix,))

    # --- method hooks -----------------------------------------------------------------------------------------

    @classmethod
    def after_backward(cls, layers: dict[str, HybridLayer], *, sharded: bool = False) -> Callable[[], dict] | None:
        """The mixing rule after each backward pass (:func:`update_mixing`); None when every layer holds λ fixed."""
        if all(layer.config.rule == "fixed" for layer in layers.values()):
            return None
        return lambda: mixing_step(layers, sharded=sharded)

    @classmethod
    def prepare_optimiser(cls, optimizer: torch.optim.Optimizer, layers: dict[str, HybridLayer]) -> None:
        """Split the optimiser's steps for ``gate='step'`` layers (:func:`split_steps`)."""
        split_layer_steps(optimizer, [layer for layer in layers.values() if layer.config.gate == "step"])

    # --- GradientAlignedStart ---------------------------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        return self.needs_gradient_init and GradientAlignedStart.initialised.fget(self)  # type: ignore[attr-defined]

    def base_offset(self) -> torch.Tensor | None:
        if self.config.gate != "branch":  # B0A0 is subtracted in the branch, never from the base
            return None
        start_gate = self.shares(self.mix_start)[0]  # the low-rank gate at λ0, which the forward pass applies
        return start_gate * self.lora_scaling * (self.lora_B0.float() @ self.lora_A0.float())

    @torch.no_grad()
    def initialise(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        if self.offset_applied:  # undo the previous offset with the λ0 it was made with
            self._shift_base(+1.0)
            self.offset_applied = False
        self.mix_start.copy_(self.mix)
        super().initialise(a0, b0)

    @classmethod
    @torch.no_grad()
    def after_gradient_estimate(cls, layers: dict[str, HybridLayer], estimates: dict[str, Any]) -> None:
        """λ0 per layer (``mix_init_from='gradient'``) from LoRA-GA's gradient estimate: the RMS of its top-2r
        singular values, through the ``sigmoid`` rule's formula across the layers of one config. Call before the
        LoRA-GA start is applied (the branch gate's base offset uses λ0)."""
        by_config: dict[HybridConfig, list[str]] = {}
        for name, layer in layers.items():
            if layer.config.mix_init_from == "gradient":
                by_config.setdefault(layer.config, []).append(name)
        for config, names in by_config.items():
            logs = []
            for name in names:
                layer = layers[name]
                _, singular, _ = estimates[name].top_singular(2 * config.rank, config.svd)
                rms = float(singular.double().pow(2).sum().sqrt()) / math.sqrt(layer.in_features * layer.out_features)
                logs.append(math.log(rms + 1e-30))
            mean = sum(logs) / len(logs)
            for name, value in zip(names, logs, strict=True):
                mix = min(max(sigmoid((value - mean) / config.temperature), config.mix_min), 1 - config.mix_min)
                layers[name].mix.fill_(mix)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.broadcast(layers[name].mix, src=0)  # SVDs may differ in the last bits

    # --- maths ------------------------------------------------------------------------------------------------

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the gated low-rank term: ``A``, ``B`` (``branch``) or ``[A; A0]``, ``[B, −B0]`` (``update``,
        so that ``B A`` of the pair is the learnt update ``B A − B0 A0``)."""
        if self.config.gate == "branch" or not self.needs_gradient_init:  # a LoRA start has B0 A0 = 0
            return self.lora_A, self.lora_B
        return self.update_factors()

    def low_rank_weight(self) -> torch.Tensor:
        a, b = self.low_rank_factors()
        return self.gates()[0] * self.lora_scaling * (b @ a)

    def merged_weight(self) -> torch.Tensor:
        return (self.orthogonal_weight() + self.low_rank_weight()).to(self.base_weight.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        merged = self.base_weight
        rotation = self.rotation_matrix()
        low_rank = self.low_rank_weight()
        return (((merged.to(rotation.dtype) - low_rank) / self.boft_scale[:, None]) @ rotation).to(merged.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dtype = self.boft_skew.dtype
        x2d = x.reshape(-1, self.in_features).to(dtype)
        grouped, small_scale = self.grouped_rotations()
        rotated = ButterflyRotate.apply(x2d, grouped, *self.plan)
        lora_a, lora_b = self.low_rank_factors()
        low_rank_input = F.linear(self.lora_dropout(x2d), lora_a)  # (T, r), or (T, 2r) with the update gate
        if self.quantised:  # the base layer's own kernel on the rotated input, plus the low-rank branch
            gate = self.gates()[0] * self.lora_scaling
            out = self.scaled_base_output(rotated) + gate * F.linear(low_rank_input, lora_b)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        base = self.base_weight
        # The one base matmul, scaled, plus the low-rank branch; saves the output instead of x W0ᵀ.
        out = scaled_linear(
            rotated,
            base,
            self.boft_scale,
            self.base_layer.bias,
            low_rank_input,
            lora_b,
            self.gates()[0] * self.lora_scaling,
            small_scale,
        )
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.config.rank}, block_size={self.block_size}, "
            f"butterfly_factors={self.config.butterfly_factors}, rule={self.config.rule}, gate={self.config.gate}, "
            f"start={self.config.start}, gate_norm={self.config.gate_norm}, mix={float(self.mix):.3f}"
        )


def full_strength(config: HybridConfig) -> bool:
    """Both branches always run at full strength: ``gate='step'`` (λ splits the optimiser's step instead), or the
    fixed rule at λ = 0.5 under max normalisation (the default). No gate is computed then."""
    if config.gate == "step":
        return True
    constant = config.rule == "fixed" and config.mix_init_from == "constant"
    return constant and config.gate_norm == "max" and config.mix_init == 0.5


# --- the model-level entry points ------------------------------------------------------------------------------


def hybrid_layers(model: nn.Module) -> dict[str, HybridLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HybridLayer)}


def split_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[Any]:
    """:func:`split_layer_steps` for the ``gate='step'`` hybrid layers of ``model``."""
    layers = [layer for layer in hybrid_layers(model).values() if layer.config.gate == "step"]
    return split_layer_steps(optimizer, layers)


@torch.no_grad()
def update_mixing(model: nn.Module, *, sharded: bool = False) -> dict[str, dict[str, float]]:
    """Set every hybrid layer's λ from the current gradients; call after ``backward()``, before the optimiser step.

    Returns ``{layer: {"lambda", "grad_low_rank", "grad_orthogonal"}}`` for telemetry. With ``sharded=True`` (FSDP)
    the squared gradient norms are summed across ranks before the rule runs.
    """
    return mixing_step(hybrid_layers(model), sharded=sharded)
