"""Attach adapters to any model in place, by module name, and take them off again.

>>> model = AutoModelForCausalLM.from_pretrained(...)
>>> attach(model, LoRAConfig(rank=8, targets=["q_proj", "v_proj"]))   # model keeps its class
>>> ... train ...
>>> merge(model); unmerge(model); detach(model)                        # back to the original modules

``attach`` may be called several times with different configs on disjoint modules (for example unitary adapters
on the attention projections and the hybrid on the MLP layers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import ConfigError, TargetError
from hybrid_peft.layer import AdapterLayer, linear_weight
from hybrid_peft.registry import get_method
from hybrid_peft.targeting import linear_candidates, select_targets

STATE_ATTRIBUTE = "_hybrid_peft_state"


@dataclass
class AttachState:
    """Bookkeeping kept on the root model while adapters are attached (removed by :func:`detach`)."""

    # Every parameter's requires_grad before the first attach, by name, so detach restores it exactly (names, not
    # the tensors: holding them would keep weights alive that FSDP replaces with shards).
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    # Identity of the base weights the adapters were attached to, taken before any adapter changed them.
    base_fingerprint: dict[str, dict] = field(default_factory=dict)


def fingerprint_weight(weight: torch.Tensor, samples: int = 16) -> dict:
    """Shape plus a few evenly spaced values of an ``(out, in)`` weight: enough to tell two base models apart."""
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, steps=min(samples, flat.numel())).round().long()
    # linspace runs in float32: past 2**24 elements its last point rounds up to numel (a 3072 × 8192 weight). Clamping
    # keeps every other index as saved files recorded them.
    index = index.clamp_(max=flat.numel() - 1)
    return {"shape": list(weight.shape), "sample": [float(v) for v in flat[index.to(flat.device)].float().cpu()]}


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def attach_state(model: nn.Module) -> AttachState | None:
    return getattr(model, STATE_ATTRIBUTE, None)


def wrap_modules(model: nn.Module, names: list[str], config: AdapterConfig, *, freeze_base: bool = True) -> None:
    """Wrap exactly ``names`` with ``config``'s adapter. The building block of :func:`attach` and loading."""
    layer_class = get_method(config.method).layer_class
    candidates = linear_candidates(model)
    missing = [n for n in names if n not in candidates]
    if missing:
        raise TargetError(f"module(s) {missing[:5]} are not free linear layers of {type(model).__name__}")
    # Build every layer before installing any, so a layer that rejects its shape leaves the model untouched.
    layers = {}
    for name in names:
        try:
            layers[name] = layer_class(candidates[name], config)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    state = attach_state(model)
    if state is None:
        state = AttachState(original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        setattr(model, STATE_ATTRIBUTE, state)
    for name, layer in layers.items():
        module = candidates[name]
        state.base_fingerprint[name] = fingerprint_weight(linear_weight(module))
        layer.train(module.training)  # a model in eval mode stays in eval mode (dropout off)
        parent, child = _parent_and_child(model, name)
        setattr(parent, child, layer)
    layer_class.after_attach(model)
    if freeze_base:
        adapter_params = {id(p) for p in adapter_parameters(model).values()}
        for p in model.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)


def attach(model: nn.Module, config: AdapterConfig, *, freeze_base: bool = True) -> nn.Module:
    """Attach ``config``'s adapter to every module it targets, in place; returns ``model`` for chaining.

    With ``freeze_base`` (default) every parameter except the adapters' stops requiring grad.
    """
    wrap_modules(model, select_targets(model, config), config, freeze_base=freeze_base)
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable tensors of every adapter, by full name (found by structure, not by a substring of the name)."""
    return {
        f"{layer_name}.{name}": p
        for layer_name, layer in adapter_layers(model).items()
        for name, p in layer.adapter_named_parameters()
    }


def learning_rate_scales(model: nn.Module) -> dict[nn.Parameter, float]:
    """The parameters whose adapter asks for a multiple of the run's learning rate (the hybrid's
    ``orthogonal.lr_scale``, any config's ``lr_scale``), with the multiple; every other trainable
    parameter trains at the run's rate."""
    scales = {}
    for layer in adapter_layers(model).values():
        for name, scale in layer.learning_rate_scales().items():
            parameter = getattr(layer, name)
            if parameter.requires_grad and scale != 1.0:
                scales[parameter] = scale
    return scales


def parameter_groups(model: nn.Module, learning_rate: float) -> list[dict]:
    """Optimiser parameter groups for every parameter of ``model`` that requires grad: one group per learning-rate
    multiple the adapters ask for, each with ``lr`` = ``learning_rate`` × multiple and the multiple as ``lr_scale``
    (the run's own rate first). Pass them to any ``torch.optim`` optimiser, e.g.
    ``torch.optim.AdamW(parameter_groups(model, 1e-3))``: a plain ``AdamW(model.parameters())`` trains every
    parameter at one rate, which is not the method the config describes when it sets a multiple."""
    scales = learning_rate_scales(model)
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(p, 1.0), []).append(p)
    return [
        {"params": params, "lr": learning_rate * scale, "lr_scale": scale} for scale, params in groups.items() if params
    ]


def rate_scales_not_applied(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[float, float]:
    """The learning-rate multiples ``model``'s adapters ask for that ``optimizer`` does not apply, as ``{asked:
    applied}``: a parameter's group rate over the rate of the groups holding parameters at the run's rate (``{}``
    when every multiple is applied, when nothing asks for one, or when no parameter trains at the run's rate)."""
    scales = learning_rate_scales(model)
    if not scales:
        return {}
    # a scheduler's warm-up may have set every group's rate to 0 already: compare the rates it started from
    rate_of = {id(p): group.get("initial_lr", group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    plain = {rate_of[id(p)] for p in model.parameters() if p.requires_grad and p not in scales and id(p) in rate_of}
    if len(plain) != 1:  # no reference, or the caller set its own rates per group: nothing to compare with
        return {}
    (base,) = plain
    wrong = {}
    for p, asked in scales.items():
        applied = rate_of.get(id(p), base) / base if base else 1.0
        if abs(applied - asked) > 1e-6 * asked:
            wrong[asked] = applied
    return wrong


# --- the methods' hooks (AdapterLayer's class methods), called per layer class -------------------------------------


def layers_by_class(model: nn.Module) -> dict[type[AdapterLayer], dict[str, AdapterLayer]]:
    """``model``'s adapter layers grouped by their class, in the order the classes first appear."""
    groups: dict[type[AdapterLayer], dict[str, AdapterLayer]] = {}
    for name, layer in adapter_layers(model).items():
        groups.setdefault(type(layer), {})[name] = layer
    return groups


def initialise_adapters(
    model: nn.Module,
    batches: Callable[[], Iterable[Any]],
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Run every data-dependent start the attached methods declare (LoRA-GA's, the hybrid's with a LoRA-GA start),
    each once; ``batches()`` gives a fresh iterable of training batches for each. A no-op for methods without one."""
    done = set()
    for layer_class in layers_by_class(model):
        hook = layer_class.initialise_from_data
        if hook.__func__ not in done:  # classes sharing one start (a mixin's) run it once
            done.add(hook.__func__)
            hook(model, batches, loss_fn=loss_fn, progress=progress)
    return model


def after_backward_hooks(model: nn.Module, *, sharded: bool = False) -> list[Callable[[], dict]]:
    """The per-step hooks of the attached methods (run each after ``backward()``, before the optimiser step; each
    returns per-layer records). Empty when no method has one, e.g. the hybrid without a mixing rule."""
    hooks = [cls.after_backward(layers, sharded=sharded) for cls, layers in layers_by_class(model).items()]
    return [hook for hook in hooks if hook is not None]


def prepare_optimiser(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Let each attached method adjust ``optimizer`` (built over ``model``'s parameters); returns it."""
    for cls, layers in layers_by_class(model).items():
        cls.prepare_optimiser(optimizer, layers)
    return optimizer


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs what the base model costs)."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def detach(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Put the original modules back. ``merge=True`` keeps the adapters' effect in the weights (merge and unload);
    otherwise the base weights are restored and every parameter's ``requires_grad`` is as before :func:`attach`."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
            base = layer.base_layer
        else:
            base = layer.release()
        parent, child = _parent_and_child(model, name)
        setattr(parent, child, base)
    state = attach_state(model)
    if state is not None:
        parameters = dict(model.named_parameters())
        for name, requires_grad in state.original_requires_grad.items():
            if name in parameters:
                parameters[name].requires_grad_(requires_grad)
        delattr(model, STATE_ATTRIBUTE)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
