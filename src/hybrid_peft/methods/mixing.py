"""The hybrid's mixing rules: λ per layer from gradient norms, set after each backward pass and before the optimiser
step (:func:`mixing_step`, the hybrid layer's ``after_backward`` hook), clamped to [λmin, 1 − λmin]. A rule is a small
frozen dataclass with its own settings. The hybrid's default is :data:`DEFAULT_RULE`, ``protect`` with max gates (the
one rule that moved the learn–forget frontier in BENCHMARKS.md); ``HybridConfig(rule=None)`` is the fixed hybrid, with
no λ and no per-step work.

In any training loop the rule runs by itself once per optimiser step: attaching a hybrid with a per-step rule installs
one process-wide hook on ``torch.optim`` optimisers (:func:`join_step_hooks`) that, before an optimiser holding the
hybrid's parameters steps, runs the rule unless :func:`mixing_step` already ran since that model's last step (the
recipe and the Trainer callback call it explicitly, for its telemetry). Each layer makes its parameters known to the
hook in its training forward, so a copied model (``copy.deepcopy``) is found too. FSDP2 swaps its sharded parameters
out of the modules around each forward, so there call ``update_mixing(model)`` after the backward pass yourself (the
recipe does); sharded gradients (DTensors) are detected and their squared norms all-reduced.

:class:`ShareRule` (``"share"``)
    Hypothesis: a branch whose gradient is large has more to learn, so it should get more of the layer.
    g_lr = ‖∇_{A,B}‖/λ, g_orth = ‖∇_K‖/(1 − λ) (dividing out the gate so a small gate cannot starve its own branch),
    each RMS-normalised by its parameter count; λ ← EMA_β(g_lr / (g_lr + g_orth)).
:class:`SigmoidRule` (``"sigmoid"``)
    Hypothesis: layers the task pulls on hard should learn through the fast low-rank branch, calm layers through the
    stable orthogonal one. λℓ ← EMA_β(σ((log‖gℓ‖ − mean_ℓ log‖gℓ‖)/τ)). Without the moving average (β = 0) λ follows
    each batch's gradient noise.
:class:`PressureRule` (``"pressure"``)
    Hypothesis: the sigmoid's, on a scale-free measure. Raw gradient norms differ across layers by their shapes and
    weight scales, so the sigmoid mostly ranks layer types; the *relative* pressure pℓ = ‖∇Wℓ‖/‖W0ℓ‖ compares how
    hard the task pulls on each layer for its size. Layers under high relative pressure learn through the low-rank
    branch, quiet ones stay orthogonal: λℓ ← EMA_β(σ((log pℓ − mean_ℓ log pℓ)/τ)). ‖∇W‖ is never formed: the
    low-rank branch's gradient ∇B = g·s·∇W Aᵀ is a sketch of it through A's r rows, and for A's random start
    (rows i.i.d., variance ‖A‖²/(r·in)) E‖∇W Aᵀ‖² = ‖A‖²/in · ‖∇W‖², so ‖∇W‖ ≈ ‖∇B‖·√in / (g·s·‖A‖) at no extra
    cost (with a LoRA-GA start A holds the gradient's top directions, so this measures the gradient there).
:class:`ProtectRule` (``"protect"``)
    Hypothesis: the opposite allocation. Forgetting comes from the layers the task pulls hardest, so send that
    pressure through the norm-preserving rotation and let the quiet layers learn low-rank:
    λℓ ← EMA_β(σ(−(log pℓ − mean_ℓ log pℓ)/τ)).
:class:`SpectrumRule` (``"spectrum"``)
    Hypothesis: low-rank where the gradient is low-rank. A layer whose gradient has most of its energy in r
    directions is served by a rank-r update; one whose energy is spread is better turned than patched. λℓ is the
    share of the layer's gradient-estimate energy in its top r singular directions, Σ_{i≤r} σi² / ‖G‖²_F, set once at
    the start from LoRA-GA's estimate (so it needs ``low_rank=LoRAGAConfig(...)``) and held: no per-step work.

λ becomes the two branches' gates by ``gates``: ``"sum"`` (λ and 1 − λ; the published runs) or ``"max"`` (both
divided by max(λ, 1 − λ), so the favoured branch runs at full strength and λ only allocates). Under DDP gradients
are already averaged, so λ is identical on every rank; with sharded gradients (FSDP) the squared norms are
all-reduced first.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from hybrid_peft.config import require_choice, require_float
from hybrid_peft.errors import ConfigError, HybridPeftError
from hybrid_peft.norms import grouped_squared_norms

if TYPE_CHECKING:
    from hybrid_peft.methods.hybrid import HybridLayer

GATES = ("sum", "max")


@dataclass(frozen=True)
class BranchNorms:
    """RMS gradient norms of one layer's branches (‖∇‖ / √numel)."""

    low_rank: float
    orthogonal: float
    pressure: float = math.nan  # ‖∇W‖/‖W0‖ (PressureRule), only where a rule asks for it


@dataclass(frozen=True)
class MixingRule:
    """What every rule shares.

    Args:
        mix_init: λ0, the low-rank branch's share at the start.
        mix_min: λmin; λ is clamped to [λmin, 1 − λmin], 0 < λmin < 0.5.
        ema: β of the moving average of λ (0 = none).
        gates: how λ becomes the gates: ``"sum"`` (λ, 1 − λ) or ``"max"`` (both over max(λ, 1 − λ)).
    """

    name: ClassVar[str] = ""
    needs_pressure: ClassVar[bool] = False  # update() reads BranchNorms.pressure
    per_step: ClassVar[bool] = True  # False: λ is set once at the start and held (no after-backward hook)

    mix_init: float = 0.5
    mix_min: float = 0.05
    ema: float = 0.9
    gates: str = "sum"

    def __post_init__(self) -> None:
        require_float("rule.mix_min", self.mix_min, minimum=0.0, maximum=0.5, min_inclusive=False, max_inclusive=False)
        require_float("rule.mix_init", self.mix_init, minimum=self.mix_min, maximum=1 - self.mix_min)
        require_float("rule.ema", self.ema, minimum=0.0, maximum=1.0, max_inclusive=False)
        require_choice("rule.gates", self.gates, GATES)

    def update(self, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
        """The next λ of each layer (before clamping) from the current ones and the layers' gradient norms."""
        raise NotImplementedError

    def shares(self, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low-rank gate, orthogonal gate)`` of λ."""
        low_rank, orthogonal = mix, 1 - mix
        if self.gates == "max":
            larger = torch.maximum(low_rank, orthogonal)
            return low_rank / larger, orthogonal / larger
        return low_rank, orthogonal

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name} | dataclasses.asdict(self)


@dataclass(frozen=True)
class ShareRule(MixingRule):
    """λ ← EMA_β(g_lr / (g_lr + g_orth)) with each branch's RMS gradient over its gate (module docstring)."""

    name = "share"

    def update(self, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
        updated = []
        for mix, norm in zip(mixes, norms, strict=True):
            low_rank, orthogonal = norm.low_rank / mix, norm.orthogonal / (1 - mix)
            target = low_rank / (low_rank + orthogonal) if low_rank + orthogonal > 0 else mix
            updated.append(self.ema * mix + (1 - self.ema) * target)
        return updated


@dataclass(frozen=True)
class SigmoidRule(MixingRule):
    """λℓ ← EMA_β(σ((log‖gℓ‖ − mean log‖g‖)/τ)) across the layers of one config (module docstring).

    Args:
        temperature: τ > 0; smaller spreads λ further from 0.5.
    """

    name = "sigmoid"

    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_float("rule.temperature", self.temperature, minimum=0.0, min_inclusive=False)

    def update(self, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
        logs = [0.5 * math.log(n.low_rank**2 + n.orthogonal**2 + 1e-30) for n in norms]
        mean = sum(logs) / len(logs)
        return [
            self.ema * mix + (1 - self.ema) * sigmoid((value - mean) / self.temperature)
            for mix, value in zip(mixes, logs, strict=True)
        ]


@dataclass(frozen=True)
class PressureRule(MixingRule):
    """λℓ ← EMA_β(σ((log pℓ − mean log p)/τ)) with pℓ the relative gradient pressure ‖∇Wℓ‖/‖W0ℓ‖ (module docstring).

    Args:
        temperature: τ > 0; smaller spreads λ further from 0.5.
    """

    name = "pressure"
    needs_pressure = True
    direction: ClassVar[float] = 1.0

    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_float("rule.temperature", self.temperature, minimum=0.0, min_inclusive=False)

    def update(self, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
        logs = [math.log(max(n.pressure, 1e-30)) for n in norms]
        mean = sum(logs) / len(logs)
        return [
            self.ema * mix + (1 - self.ema) * sigmoid(self.direction * (value - mean) / self.temperature)
            for mix, value in zip(mixes, logs, strict=True)
        ]


@dataclass(frozen=True)
class ProtectRule(PressureRule):
    """λℓ ← EMA_β(σ(−(log pℓ − mean log p)/τ)): the strongest pressure through the rotation (module docstring)."""

    name = "protect"
    direction = -1.0


@dataclass(frozen=True)
class SpectrumRule(MixingRule):
    """λℓ = the top-r energy share of the layer's gradient estimate, set at the LoRA-GA start and held (module
    docstring). ``ema`` is unused."""

    name = "spectrum"
    per_step = False

    def update(self, mixes: list[float], norms: list[BranchNorms]) -> list[float]:
        return mixes

    def start_mix(self, estimate: Any, rank: int, svd: str = "exact") -> float:
        """λ of one layer from its gradient estimate (a ``GradientEstimate``): Σ_{i≤r} σi² / ‖G‖²_F, clamped."""
        total = float(estimate.dense().double().pow(2).sum())
        top = float(estimate.top_singular(rank, svd)[1].double().pow(2).sum())
        share = top / total if total > 0 else self.mix_init
        return min(max(share, self.mix_min), 1 - self.mix_min)


RULES: dict[str, type[MixingRule]] = {
    rule.name: rule for rule in (ShareRule, SigmoidRule, PressureRule, ProtectRule, SpectrumRule)
}
DEFAULT_RULE = ProtectRule(gates="max")  # the hybrid's default: λ only allocates, the favoured branch at full strength


def mixing_rule(value: MixingRule | str | dict[str, Any] | None) -> MixingRule | None:
    """A rule from its config form: None (or ``"none"``), a rule's name, ``{"name": ..., settings}`` or a rule."""
    if value is None or isinstance(value, MixingRule):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"rule: expected None, a rule name or a mapping, got {value!r}")
    settings = dict(value)
    name = settings.pop("name", None)
    if name in (None, "none"):
        if settings:
            rules = ", ".join(RULES)
            raise ConfigError(f"rule: settings {sorted(settings)} without a rule; drop them, or name a rule ({rules})")
        return None
    if name not in RULES:
        raise ConfigError(f"rule: {name!r} is not one of {['none', *RULES]}")
    rule = RULES[name]
    known = {f.name for f in dataclasses.fields(rule)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"rule {name!r}: unknown setting(s) {unknown}; valid settings are {sorted(known)}")
    return rule(**settings)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))  # no overflow for large |z|


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a sharded (FSDP2) DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _gradient_norms(
    layers: list[HybridLayer], mixes: torch.Tensor, *, sharded: bool, pressure: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per layer, ``[‖∇_{A,B}‖/√n, ‖∇_K‖/√n]`` (flattened, ``2L``) and, with ``pressure``, the relative pressure
    ``pℓ = ‖∇Wℓ‖/‖W0ℓ‖`` (``L``), with ``‖∇W‖ ≈ ‖∇B‖·√in / (g·s·‖A‖)`` (module docstring); float64 on ``mixes``'s
    device (``mixes``: every layer's λ, stacked). Every norm comes from one batched pass (:func:`grouped_squared_norms`)
    over the gradients and, for the pressure, ``A`` itself; ‖W0‖ is computed once per layer (the base is frozen). With
    ``sharded`` (FSDP2) each process holds a shard of every tensor: the squared norms are all-reduced first."""
    device = mixes.device
    tensors, groups, counts = [], [], []
    for i, layer in enumerate(layers):  # groups per layer: ∇ of the other low-rank parameters, ∇B, ∇K, A
        for p in layer.low_rank_parameters():
            if p.grad is not None:
                tensors.append(_local(p.grad))
                groups.append(4 * i + (1 if p is layer.lora_B else 0))
        for p in layer.orthogonal_parameters():
            if p.grad is not None:
                tensors.append(_local(p.grad))
                groups.append(4 * i + 2)
        if pressure:
            tensors.append(_local(layer.lora_A))
            groups.append(4 * i + 3)
        counts += [
            sum(p.numel() for p in params) for params in (layer.low_rank_parameters(), layer.orthogonal_parameters())
        ]
    squares = grouped_squared_norms(tensors, groups, 4 * len(layers), device)
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    other, b_square, k_square, a_square = squares.view(-1, 4).unbind(1)
    branches = torch.stack([other + b_square, k_square], dim=1).reshape(-1)
    rms = (branches / torch.tensor(counts, dtype=torch.float64, device=device)).sqrt()
    if not pressure:
        return rms, None
    base = torch.tensor([_base_norm(layer, sharded=sharded) for layer in layers], dtype=torch.float64, device=device)
    scale = torch.tensor([math.sqrt(layer.in_features) / layer.lora_scaling for layer in layers], dtype=torch.float64)
    gates = _low_rank_gates(layers, mixes).to(torch.float64)
    return rms, b_square.sqrt() * scale.to(device) / (gates * a_square.sqrt() * base).clamp_min(1e-30)


def _low_rank_gates(layers: list[HybridLayer], mixes: torch.Tensor) -> torch.Tensor:
    """Every layer's current low-rank gate, as ``layer.gates()[0]`` gives it, computed once per rule for all its
    layers from the stacked λ (the gates are elementwise in λ, so the values are the same)."""
    gates = torch.empty_like(mixes)
    by_rule: dict[MixingRule, list[int]] = {}
    for i, layer in enumerate(layers):
        by_rule.setdefault(layer.config.rule, []).append(i)
    for rule, indices in by_rule.items():
        index = torch.tensor(indices, device=mixes.device)
        gates[index] = rule.shares(mixes[index])[0]
    return gates


def _base_norm(layer: HybridLayer, *, sharded: bool) -> float:
    """‖W0‖_F of the layer's frozen base weight, computed once and kept on the layer."""
    norm = getattr(layer, "_base_norm", None)
    if norm is None:
        square = _local(layer.base_weight).detach().double().pow(2).sum()
        if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(square)
        norm = float(square.sqrt())
        layer._base_norm = norm
    return norm


@torch.no_grad()
def mixing_step(layers: dict[str, HybridLayer], *, sharded: bool = False) -> dict[str, dict[str, float]]:
    """Set every given layer's λ by its rule from the current gradients (call after ``backward()``, before the
    optimiser step). Returns ``{layer: {"lambda", "grad_low_rank", "grad_orthogonal"}}`` for telemetry."""
    layers = {name: layer for name, layer in layers.items() if layer.config.rule is not None}
    if not layers:
        return {}
    for layer in layers.values():
        layer.mixed_since_step = True  # the optimiser-step hook (join_step_hooks) leaves this step alone
        layer.forwards_since_mix = 0
    sharded = sharded or any(hasattr(layer.lora_B.grad, "to_local") for layer in layers.values())  # FSDP2's DTensors
    needs_pressure = any(layer.config.rule.needs_pressure for layer in layers.values())
    layers_device = next(iter(layers.values())).mix.device
    mix_tensor = torch.stack([layer.mix.to(layers_device) for layer in layers.values()])  # every λ, in its own dtype
    rms_tensor, pressure_tensor = _gradient_norms(
        list(layers.values()), mix_tensor, sharded=sharded, pressure=needs_pressure
    )
    parts = [rms_tensor, mix_tensor.to(rms_tensor)] + ([] if pressure_tensor is None else [pressure_tensor])
    values = torch.cat(parts).tolist()  # the norms, every λ and the pressures in one read to the host
    count = len(layers)
    rms = values[: 2 * count]
    current = dict(zip(layers, values[2 * count : 3 * count], strict=True))
    if not any(rms):
        raise HybridPeftError("no hybrid layer has a gradient: call update_mixing after loss.backward()")
    pressure = values[3 * count :] if needs_pressure else [math.nan] * count
    norms = {name: BranchNorms(rms[2 * i], rms[2 * i + 1], pressure[i]) for i, name in enumerate(layers)}
    by_config: dict[Any, list[str]] = {}  # a rule compares the layers of one config (the sigmoid's mean)
    for name, layer in layers.items():
        by_config.setdefault(layer.config, []).append(name)
    records = {}
    for config, names in by_config.items():
        rule = config.rule
        updated = rule.update([current[n] for n in names], [norms[n] for n in names])
        for name, value in zip(names, updated, strict=True):
            value = min(max(value, rule.mix_min), 1 - rule.mix_min)
            layers[name].mix.fill_(value)
            records[name] = {
                "lambda": value,
                "grad_low_rank": norms[name].low_rank,
                "grad_orthogonal": norms[name].orthogonal,
            }
            if rule.needs_pressure:
                records[name]["pressure"] = norms[name].pressure
    return records


# --- the rule in any training loop: optimiser-step hooks ------------------------------------------------------------


class MixingGroup:
    """The per-step-rule layers of one model (a rule compares the layers of one config: the sigmoid's mean), shared
    by those layers as ``layer.mixing_group``; a copied model (``copy.deepcopy``) gets its own copy of the group."""

    def __init__(self, layers: dict[str, HybridLayer]) -> None:
        self.layers = layers
        self.warned = False  # note_training_forward's warning, once per group


# each hybrid B parameter → a weak reference to its layers' group. Keyed by identity (a Tensor's == is elementwise),
# weak both ways so models and optimisers are freed as usual, and nothing is set on the parameter (it still pickles).
_GROUP_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()
_hooks_installed = False


def join_step_hooks(model_layers: dict[str, HybridLayer]) -> None:
    """Give ``model_layers`` (one model's layers with a per-step rule) one group and, once per process, register the
    global optimiser-step hooks that run the group's rule before each step of an optimiser holding its parameters
    (module docstring)."""
    global _hooks_installed
    group = MixingGroup(model_layers)
    for layer in model_layers.values():
        layer.mixing_group = group
        layer.mixed_since_step = False
        _GROUP_OF[layer.lora_B] = weakref.ref(group)
    if not _hooks_installed:
        register_optimizer_step_pre_hook(_mix_before_step)
        register_optimizer_step_post_hook(_after_step)
        _hooks_installed = True


UNMIXED_FORWARDS = 64  # training forward passes without the rule before the warning (more than any accumulation)


def note_training_forward(layer: HybridLayer) -> None:
    """Called by the layer's forward in training: map its B parameter to its group if it is not yet (so a copied
    model's new parameters are found too; one dictionary lookup), and warn once when the rule has not run for
    :data:`UNMIXED_FORWARDS` forward passes (a loop the optimiser-step hook cannot see, such as FSDP2's)."""
    group = getattr(layer, "mixing_group", None)
    if group is None:
        return
    known = _GROUP_OF.get(layer.lora_B)
    if known is None or known() is not group:
        _GROUP_OF[layer.lora_B] = weakref.ref(group)
    layer.forwards_since_mix += 1
    if layer.forwards_since_mix == UNMIXED_FORWARDS and not group.warned:
        group.warned = True
        warnings.warn(
            f"the hybrid's mixing rule ({layer.config.rule.name}) has not run in {UNMIXED_FORWARDS} training forward "
            "passes, so λ stays where it was: call hybrid_peft.update_mixing(model) after each backward pass (under "
            "FSDP2 the optimiser-step hook cannot run it), or use rule=None for the fixed hybrid",
            stacklevel=3,
        )


def _groups_of(optimizer: torch.optim.Optimizer) -> list[MixingGroup]:
    """The groups whose parameters ``optimizer`` holds (none for most optimisers: one lookup a parameter)."""
    if not _GROUP_OF:
        return []
    groups: dict[int, MixingGroup] = {}
    for param_group in optimizer.param_groups:
        for p in param_group["params"]:
            reference = _GROUP_OF.get(p)
            group = reference() if reference is not None else None
            if group is not None:
                groups[id(group)] = group
    return list(groups.values())


@torch.no_grad()
def _mix_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in _groups_of(optimizer):
        layers = {name: layer for name, layer in group.layers.items() if not layer.merged}
        pending = [layer for layer in layers.values() if not layer.mixed_since_step]
        if pending and any(layer.lora_B.grad is not None for layer in pending):  # no gradient: nothing to mix on
            mixing_step(layers)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in _groups_of(optimizer):
        for layer in group.layers.values():
            layer.mixed_since_step = False
