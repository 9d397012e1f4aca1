"""The hybrid adapter of "Hybrid and Unitary PEFT for Resource-Efficient LLMs" (arXiv 2507.18076): per layer, a
low-rank branch and a BOFT orthogonal branch over one frozen weight and one base matmul::

    W_eff = diag(s) · W0 · R(g_orth K)ᵀ  +  g_lr · s_lora · (B A − B0 A0)          y = x W_effᵀ + b

    B A, s_lora   the low-rank part: a LoRAConfig (B = 0 at the start, B0 A0 = 0) or a LoRAGAConfig (the paper's
                  gradient-aligned start: A = A0, B = B0 from LoRA-GA's gradient estimate; see methods/lora_ga.py)
    R(K), s       the orthogonal part: a BOFTConfig (butterfly rotation of the input, per-output scale)
    g_lr, g_orth  the gates of the layer's mix λ, set by a rule from gradient norms (methods/mixing.py, each rule
                  with its hypothesis). The default, ``protect`` with max gates: λ from the relative gradient
                  pressure ‖∇W‖/‖W0‖, the layers the task pulls hardest leaning on the rotation, both gates over
                  max(λ, 1 − λ) so the favoured branch runs at full strength. Also the paper's ``share`` and
                  ``sigmoid``, ``pressure`` (protect's opposite) and ``spectrum`` (the gradient estimate's top-r
                  energy share, set at the LoRA-GA start). Without a rule (``rule=None``, the fixed hybrid) both
                  gates are 1 and there is no per-step work.

W_eff = W0 at the start either way, so the model is unchanged at step 0, and merging is exact (the merged weight is
W_eff). With a LoRA-GA start the learnt update B A − B0 A0 is one rank-2r product x [A; A0]ᵀ [B, −B0]ᵀ on the
unmodified base, so the base is never offset (a quantised base works as it is).

Each part's parameters train at the run's rate times the part's ``lr_scale``: 1 for the low-rank part (LoRA's rate),
0.3 for the rotation by default (:func:`hybrid_peft.parameter_groups` applies it; the recipe does). With a rule, λ is a
buffer, never a parameter: the rule sets every layer's λ once per optimiser step, after the backward pass (the layer's
``after_backward`` hook in the recipe; in any other loop a hook on the optimiser's step, installed when the hybrid is
attached), and λ is saved with the adapter. Adapter files of earlier formats are converted on load
(``methods/hybrid_formats.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import ConfigError
from hybrid_peft.layer import AdapterLayer, adapter_dtype_for, compute_copy
from hybrid_peft.methods.boft import BOFTConfig
from hybrid_peft.methods.butterfly import ButterflyRotate, scaled_linear
from hybrid_peft.methods.fused import butterfly_linear
from hybrid_peft.methods.hybrid_formats import upgrade_hybrid
from hybrid_peft.methods.lora import LoRAConfig, LowRankBranch
from hybrid_peft.methods.lora_ga import GradientAlignedStart, LoRAGAConfig
from hybrid_peft.methods.mixing import (
    DEFAULT_RULE,
    MixingRule,
    SpectrumRule,
    join_step_hooks,
    mixing_rule,
    mixing_step,
    note_training_forward,
)
from hybrid_peft.methods.rotations import ButterflyBranch
from hybrid_peft.registry import get_method, register_method

PARTS = {"low_rank": LoRAConfig, "orthogonal": BOFTConfig}


@dataclass(frozen=True)
class HybridConfig(AdapterConfig):
    """A low-rank part, an orthogonal part and an optional mixing rule.

    Args:
        low_rank: a :class:`LoRAConfig` (default rank 8, alpha 16) or a :class:`LoRAGAConfig` (the paper's start).
        orthogonal: a :class:`BOFTConfig`; the hybrid's default trains the rotation at 0.3× the run's rate
            (``BOFTConfig(lr_scale=0.3)``; a part you pass keeps its own ``lr_scale``, 1 unless you set it).
        rule: the mixing rule; default ``ProtectRule(gates="max")`` (:data:`~hybrid_peft.methods.mixing.DEFAULT_RULE`:
            λ from the relative gradient pressure ‖∇W‖/‖W0‖, the strongest through the rotation). None is the fixed
            hybrid (both branches at full strength, no per-step work). Also :class:`ShareRule` /
            :class:`SigmoidRule` (the paper's gradient-norm mix), :class:`PressureRule` (protect's opposite) or
            :class:`SpectrumRule` (λ from the gradient's top-r energy share, with a ``LoRAGAConfig`` part);
            methods/mixing.py has each hypothesis.

    From a dict (``from_dict``, the CLI's ``--set``, bench profiles) each part is a mapping or a method name
    (``low_rank: lora-ga``), ``rule`` a name or ``{name: share, ema: 0.8}``; dotted keys reach inside
    (``low_rank.rank: 16``, ``rule.ema: 0.8``), and a part's field that only one part has may be given bare
    (``rank: 16``, ``block_size: 8``).
    """

    method = "hybrid"

    low_rank: LoRAConfig = LoRAConfig()
    orthogonal: BOFTConfig = BOFTConfig(lr_scale=0.3)
    rule: MixingRule | None = DEFAULT_RULE

    keeps_output = True  # one scaled linear for both branches, as BOFT's
    default_learning_rate = 1e-3  # the low-rank branch trains at LoRA's rate

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", mixing_rule(self.rule))
        for name in PARTS:
            part = getattr(self, name)
            if isinstance(part, (str, dict)):
                object.__setattr__(self, name, _part(name, part, strict=True))
        super().__post_init__()

    def validate(self) -> None:
        for name, kind in PARTS.items():
            part = getattr(self, name)
            if not isinstance(part, kind):
                raise ConfigError(f"{name}: expected a {kind.__name__}, got {type(part).__name__}")
            if (part.targets, part.exclude) != (AdapterConfig.targets, AdapterConfig.exclude):
                raise ConfigError(f"{name}: targets and exclude belong to the HybridConfig, not to its parts")
        if self.orthogonal.apply_to != "auto":
            raise ConfigError("orthogonal.apply_to: the hybrid always rotates the input; leave it at 'auto'")
        if isinstance(self.rule, SpectrumRule) and not self.gradient_aligned:
            raise ConfigError(
                "rule 'spectrum' sets λ from LoRA-GA's gradient estimate: give the hybrid a gradient-aligned "
                "low-rank part (low_rank=LoRAGAConfig(...), or low_rank: lora-ga)"
            )

    @property
    def gradient_aligned(self) -> bool:
        return isinstance(self.low_rank, LoRAGAConfig)

    @property
    def low_rank_width(self) -> int:
        """The projection's width: ``[A; A0]`` (2r) with a LoRA-GA start, else ``A`` (r)."""
        return 2 * self.low_rank.rank if self.gradient_aligned else self.low_rank.rank

    # --- costs, from the parts ---------------------------------------------------------------------------------

    def parameter_count(self, in_features: int, out_features: int) -> int:
        parts = (self.low_rank, self.orthogonal)
        return sum(part.parameter_count(in_features, out_features) for part in parts)

    def frozen_count(self, in_features: int, out_features: int) -> int:
        return self.low_rank.frozen_count(in_features, out_features)

    def saved_per_token(self, in_features: int, out_features: int) -> int:
        return self.low_rank_width

    def flops_per_token(self, in_features: int, out_features: int) -> int:
        low_rank = self.low_rank_width * (in_features + out_features)
        return low_rank + self.orthogonal.flops_per_token(in_features, out_features)

    def fixed_activations(self, in_features: int, out_features: int) -> int:
        rotations = self.orthogonal.fixed_activations(in_features, out_features)
        concatenated = self.low_rank_width * (in_features + out_features) if self.gradient_aligned else 0
        return rotations + concatenated  # with a LoRA-GA start, [A; A0] and [B, −B0] are kept too

    # --- serialisation -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in PARTS:
            part = getattr(self, name).to_dict()
            data[name] = {k: v for k, v in part.items() if k not in ("targets", "exclude")}
        data["rule"] = None if self.rule is None else self.rule.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> HybridConfig:
        data = dict(data)
        method = {"method": data.pop("method")} if "method" in data else {}
        data = method | _nested(data)
        if isinstance(data.get("rule"), dict) and "name" not in data["rule"]:  # settings of the default rule
            data["rule"] = DEFAULT_RULE.to_dict() | data["rule"]
        for name in PARTS:
            if name in data:
                data[name] = _part(name, data[name], strict=strict)
        return super().from_dict(data, strict=strict)

    @classmethod
    def upgrade_saved(
        cls, data: dict[str, Any], version: int, tensors: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, Any]:
        return upgrade_hybrid(data, version, tensors)  # the flat configs of formats 1–4: methods/hybrid_formats.py

    @classmethod
    def option_names(cls) -> set[str]:
        return super().option_names() | set(_bare_fields())


def _bare_fields() -> dict[str, str]:
    """``{field: part}`` for the part fields only one part has (``rank`` → ``low_rank``, ``block_size`` →
    ``orthogonal``), which a dict may give without the part's prefix."""
    owners: dict[str, list[str]] = {}
    for name in PARTS:
        for field in dataclasses.fields(LoRAGAConfig if name == "low_rank" else BOFTConfig):
            if field.name not in ("targets", "exclude"):
                owners.setdefault(field.name, []).append(name)
    return {field: parts[0] for field, parts in owners.items() if len(parts) == 1}


def _nested(data: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (``low_rank.rank``) and bare part fields (``rank``) moved into their part's mapping."""
    bare, parts = _bare_fields(), (*PARTS, "rule")
    nested: dict[str, Any] = {}
    for key, value in data.items():
        head, _, tail = key.partition(".")
        if not tail and key in bare:
            head, tail = bare[key], key
        if not tail:
            nested[key] = _as_mapping(key, value) | nested[key] if key in parts and key in nested else value
        elif head in parts:
            nested[head] = _as_mapping(head, nested.get(head)) | {tail: value}
        else:
            raise ConfigError(f"{key}: the hybrid has no part {head!r}; its parts are low_rank, orthogonal and rule")
    for key in ("dropout", "lr_scale"):
        if key in nested:
            raise ConfigError(f"{key}: both parts have it; write low_rank.{key} or orthogonal.{key}")
    return nested


def _as_mapping(name: str, value: Any) -> dict[str, Any]:
    """A part or rule given any way, as the mapping ``from_dict`` reads."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"name" if name == "rule" else "method": value}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, MixingRule):
        return value.to_dict()
    if isinstance(value, AdapterConfig):
        return {k: v for k, v in value.to_dict().items() if k not in ("targets", "exclude")}
    raise ConfigError(f"{name}: expected a mapping, got {value!r}")


def _part(name: str, value: Any, *, strict: bool) -> AdapterConfig:
    """A part from a mapping or a method name, on top of the hybrid's default part (so ``orthogonal: {block_size: 8}``
    keeps the default rotation rate); a default's fields the chosen method lacks are dropped."""
    if isinstance(value, AdapterConfig):
        return value
    given = _as_mapping(name, value)
    default = HybridConfig.__dataclass_fields__[name].default
    part_class = get_method(given.pop("method", default.method)).config_class
    if not issubclass(part_class, PARTS[name]):
        raise ConfigError(
            f"{name}: a {part_class.method!r} config cannot be the {name} part (a {PARTS[name].method!r} one)"
        )
    allowed = {f.name for f in dataclasses.fields(part_class)}
    base = {k: v for k, v in _as_mapping(name, default).items() if k in allowed}
    try:
        return part_class.from_dict(base | given, strict=strict)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


@register_method(HybridConfig)
class HybridLayer(GradientAlignedStart, LowRankBranch, ButterflyBranch, AdapterLayer):
    """Both branches over one frozen weight; see the module docstring."""

    config: HybridConfig

    def __init__(self, base_layer: nn.Module, config: HybridConfig) -> None:
        super().__init__(base_layer, config)
        weight = self.base_weight
        factory = {"device": weight.device, "dtype": adapter_dtype_for(weight.dtype)}
        low_rank, orthogonal = config.low_rank, config.orthogonal
        self._init_low_rank(low_rank.rank)
        self.lora_dropout = nn.Dropout(low_rank.dropout) if low_rank.dropout > 0 else nn.Identity()
        self.lora_scaling = low_rank.scaling
        self.needs_gradient_init = config.gradient_aligned
        self.offset_applied = False
        if self.needs_gradient_init:
            self._register_start_buffers()
        self._init_butterfly(orthogonal, factory)
        self.rotation_dropout = orthogonal.dropout
        if config.rule is not None:  # λ: a buffer, saved, never optimised
            self.register_buffer("mix", torch.tensor(config.rule.mix_init, **factory))
            self.mixed_since_step = False  # set by mixing_step, cleared after each optimiser step
            self.mixing_group: Any = None  # the model's layers with a per-step rule (set when attached)
            self.forwards_since_mix = 0  # training forward passes since the rule last ran

    @property
    def initialised(self) -> bool:
        return self.needs_gradient_init and GradientAlignedStart.initialised.fget(self)  # type: ignore[attr-defined]

    @property
    def start_config(self) -> LoRAGAConfig:
        return self.config.low_rank  # type: ignore[return-value]

    # --- branches -------------------------------------------------------------------------------------------

    def low_rank_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def orthogonal_parameters(self) -> list[nn.Parameter]:
        return [self.boft_skew]

    def learning_rate_scales(self) -> dict[str, float]:
        orthogonal = self.config.orthogonal.lr_scale
        scales = self.config.low_rank.low_rank_rate_scales  # lr_scale, and LoRA+'s ratio on B
        return scales | ({name: orthogonal for name in ("boft_skew", "boft_scale")} if orthogonal != 1.0 else {})

    def gates(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The factors on each branch in the forward pass: 1 and 1 without a rule, else the rule's gates of λ."""
        rule = self.config.rule
        return (1.0, 1.0) if rule is None else rule.shares(self.mix)

    def rotation_factor(self) -> torch.Tensor | None:
        return None if self.config.rule is None else self.gates()[1]

    def rotation_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.boft_skew, self.boft_scale) + (() if self.config.rule is None else (self.mix,))

    @property
    def rule_runs_each_step(self) -> bool:
        """Whether the layer's rule sets λ after every backward pass (not the fixed hybrid, not ``spectrum``)."""
        return self.config.rule is not None and self.config.rule.per_step

    @classmethod
    def after_attach(cls, model: nn.Module) -> None:
        """Link the rotations (BOFT's), and let a per-step rule run by itself at each optimiser step."""
        super().after_attach(model)
        per_step = {name: layer for name, layer in hybrid_layers(model).items() if layer.rule_runs_each_step}
        if per_step:
            join_step_hooks(per_step)

    @classmethod
    def after_backward(cls, layers: dict[str, HybridLayer], *, sharded: bool = False) -> Callable[[], dict] | None:
        """The mixing rule after each backward pass (:func:`mixing_step`); None when no layer has a per-step rule."""
        if not any(layer.rule_runs_each_step for layer in layers.values()):
            return None
        return lambda: mixing_step(layers, sharded=sharded)

    @torch.no_grad()
    def after_start(self, estimate: Any) -> None:
        """After the LoRA-GA start: a :class:`SpectrumRule` sets λ from the layer's gradient estimate (rank 0's
        value on every process, so λ is identical under DDP/FSDP)."""
        rule = self.config.rule
        if isinstance(rule, SpectrumRule):
            self.mix.fill_(rule.start_mix(estimate, self.config.low_rank.rank, self.config.low_rank.svd))
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(self.mix, src=0)

    # --- maths ------------------------------------------------------------------------------------------------

    def base_offset(self) -> None:
        return None  # a LoRA-GA start's B0 A0 is subtracted in the branch, never from the base

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the gated low-rank term: ``[A; A0]``, ``[B, −B0]`` with a LoRA-GA start (their product is
        the learnt update ``B A − B0 A0``), else ``A``, ``B``."""
        return self.update_factors() if self.needs_gradient_init else (self.lora_A, self.lora_B)

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

    @property
    def _dropout_active(self) -> bool:
        return self.training and self.config.low_rank.dropout > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.training and self.lora_B.requires_grad and not torch.compiler.is_compiling():
            note_training_forward(self)  # the rule's optimiser-step hook finds this layer (methods/mixing.py)
        x2d = x.reshape(-1, self.in_features)  # computed in x's dtype; the adapter's weights are cast to it
        grouped, small_scale = self.grouped_rotations()
        grouped = compute_copy(grouped, x2d)
        lora_a, lora_b = (compute_copy(factor, x2d) for factor in self.low_rank_factors())
        coefficient = self.gates()[0] * self.lora_scaling
        scale, bias = compute_copy(self.boft_scale, x2d), self.base_layer.bias
        if self.quantised or self._dropout_active:  # the rotation, then the base layer's kernel or dropout
            rotated = ButterflyRotate.apply(x2d, grouped, *self.plan)
            low_rank_input = F.linear(self.lora_dropout(x2d), lora_a)  # (T, r), or (T, 2r) with a LoRA-GA start
            if self.quantised:
                out = self.scaled_base_output(rotated) + coefficient * F.linear(low_rank_input, lora_b)
            else:
                out = scaled_linear(
                    rotated, self.base_weight, scale, bias, low_rank_input, lora_b, coefficient, small_scale
                )
        else:  # both branches and the one base matmul in one autograd node (methods/fused.py)
            out = butterfly_linear(
                x2d, grouped, self.plan, self.base_weight, scale, bias, lora_a, lora_b, coefficient, small_scale
            )
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rule = "none" if self.config.rule is None else f"{self.config.rule.name}, mix={float(self.mix):.3f}"
        return (
            f"{super().extra_repr()}, low_rank={self.config.low_rank.method} r={self.config.low_rank.rank}, "
            f"block_size={self.block_size}, butterfly_factors={self.butterfly_factors}, rule={rule}"
        )


# --- the model-level entry points ------------------------------------------------------------------------------


def hybrid_layers(model: nn.Module) -> dict[str, HybridLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HybridLayer)}


@torch.no_grad()
def update_mixing(model: nn.Module, *, sharded: bool = False) -> dict[str, dict[str, float]]:
    """Set every hybrid layer's λ by its rule from the current gradients, after ``backward()`` and before the optimiser
    step (the recipe and :class:`hybrid_peft.HybridPeftCallback` call it; in other loops a ``torch.optim`` optimiser's
    step runs it, except under FSDP2: methods/mixing.py). Returns ``{layer: {"lambda",
    "grad_low_rank", "grad_orthogonal"}}`` for telemetry. With ``sharded=True`` (FSDP) the squared gradient norms
    are summed across ranks before the rule runs."""
    return mixing_step(hybrid_layers(model), sharded=sharded)
