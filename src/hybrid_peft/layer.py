"""The adapter-layer protocol shared by every method, and helpers for the linear layers it wraps.

An adapter wraps one frozen linear layer in place::

    parent.q_proj = Linear(...)          ->   parent.q_proj = LoRALayer(base_layer=Linear(...), config)

The wrapper says which tensors are its own (:meth:`AdapterLayer.adapter_state`), how it changes the base weight
(:meth:`AdapterLayer.merged_weight`), and how to fold itself into the base weight and back (``merge`` /
``unmerge``). Two kinds of base layer are supported: ``torch.nn.Linear`` (weight ``(out, in)``) and GPT-2 style
``transformers.pytorch_utils.Conv1D`` (weight ``(in, out)``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from hybrid_peft.errors import HybridPeftError

if TYPE_CHECKING:
    from hybrid_peft.config import AdapterConfig

try:  # transformers is a dependency, but keep the maths importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

SUPPORTED_BASE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_BASE_TYPES)


def is_transposed(module: nn.Module) -> bool:
    """True when the layer stores its weight as ``(in, out)`` (GPT-2 ``Conv1D``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def quantisation_of(module: nn.Module) -> str | None:
    """``"nf4"``/``"fp4"`` for a bitsandbytes ``Linear4bit``, ``"int8"`` for ``Linear8bitLt``, else None."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return getattr(weight, "quant_type", None) or "nf4"
    if kind == "Int8Params":
        return "int8"
    return None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a supported linear layer (quantised ones pack their weight)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if is_transposed(module) else (weight.shape[0], weight.shape[1])


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(out, in)`` tensor: a view for plain layers (a transpose view for ``Conv1D``; no
    copy), a dequantised copy for quantised ones (made on each call)."""
    if quantisation_of(module) is not None:
        return dequantised_weight(module)
    return module.weight.T if is_transposed(module) else module.weight


def dequantised_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a bitsandbytes 4-bit or 8-bit layer, dequantised (fp32)."""
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for the CPU kernel on a first forward
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bnb_functional.dequantize_4bit(data, state).float()
    # LLM.int8: each row scaled to [-127, 127] by its absolute maximum (SCB), which moves to the layer's state
    # after its first forward pass
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return weight.data.float() * (scales.float()[:, None] / 127.0)


def adapter_dtype_for(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters keep their parameters in at least fp32: a bf16/fp16 base gets fp32 adapter weights. They compute in
    the input's dtype, as autocast does (:func:`compute_copy`): on a bf16 base the products run in bf16 and save bf16
    activations (the same ``x`` the base layer saves), while the optimiser updates the fp32 masters."""
    return torch.promote_types(base_dtype, torch.float32) if base_dtype.is_floating_point else torch.float32


def compute_copy(parameter: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``parameter`` in ``x``'s dtype for this forward pass (differentiable: the gradient reaches the fp32 master).
    Casting the small adapter weights down, rather than the ``(tokens, width)`` input up, keeps a bf16 run's
    activations bf16: an fp32 copy of every adapted layer's input made LoRA's peak exceed full fine-tuning's on a
    GPU (``benchmarks/scale.py --device cuda``)."""
    return parameter if parameter.dtype == x.dtype else parameter.to(x.dtype)


class AdapterLayer(nn.Module):
    """Base class of every adapter. Subclasses implement ``forward`` and ``merged_weight``.

    Subclasses register their own tensors as parameters/buffers directly on themselves or on child modules other
    than ``base_layer``; :meth:`adapter_state` finds them by that structure, never by name.
    """

    config_class: ClassVar[type[AdapterConfig]]
    # True for adapters whose start depends on data (LoRA-GA): gradient estimation targets them by default. A class
    # default: an instance may set its own from its config (the hybrid with a plain LoRA start does).
    needs_gradient_init: bool = False

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.out_features, self.in_features = linear_shape(base_layer)
        self.quantised = quantisation_of(base_layer)  # a frozen 4-/8-bit base: read dequantised, never written
        self.merged = False

    # --- method hooks: what a method adds to attaching, starting, each step, the optimiser and export. Called per
    # layer class with the model's layers of that class (``adapters.py``, ``export.py``); the training loop, the
    # trainees and the Trainer callback call these and name no method. -----------------------------------------

    @classmethod
    def after_attach(cls, model: nn.Module) -> None:
        """Called once its layers are installed in ``model`` (by ``attach`` and by loading): a method that shares
        work across its layers links them here (BOFT and the hybrid build every layer's rotation in one call)."""

    @classmethod
    def initialise_from_data(
        cls, model: nn.Module, batches: Any, *, loss_fn: Callable | None = None, progress: bool = False
    ) -> None:
        """A data-dependent start, run once before training (LoRA-GA's gradient-aligned start); a no-op here."""

    @classmethod
    def after_backward(cls, layers: dict[str, AdapterLayer], *, sharded: bool = False) -> Callable[[], dict] | None:
        """A step to run after each backward pass, before the optimiser step (the hybrid's mixing rule), returning
        per-layer records for telemetry; None when the method has none (the loop then does nothing extra)."""
        return None

    @classmethod
    def prepare_optimiser(cls, optimizer: torch.optim.Optimizer, layers: dict[str, AdapterLayer]) -> None:
        """Adjust an optimiser built over these layers' parameters (the hybrid's ``gate='step'`` splits its steps)."""

    @classmethod
    def peft_export(
        cls, model: nn.Module, layers: dict[str, AdapterLayer]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """PEFT's tensors and ``adapter_config.json`` for these layers; None where PEFT has no such format."""
        return None

    # --- what belongs to the adapter ----------------------------------------------------------------------

    def adapter_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        own = [(name, p) for name, p in self._parameters.items() if p is not None]
        for child_name, child in self.named_children():
            if child is self.base_layer:
                continue
            own += [(f"{child_name}.{name}", p) for name, p in child.named_parameters()]
        return own

    def orthogonality_error(self) -> float | None:
        """‖RᵀR − I‖_F of this adapter's rotation (the largest over its blocks), or None when it has none."""
        return None

    def learning_rate_scales(self) -> dict[str, float]:
        """Multipliers of the run's learning rate for some of this layer's parameters, by local name (``{}``: all
        train at the run's rate): the config's ``lr_scale`` for all of them, where it has one. The training loop's
        optimiser makes one parameter group per multiplier."""
        scale = getattr(self.config, "lr_scale", 1.0)
        return {} if scale == 1.0 else {name: scale for name, _ in self.adapter_named_parameters()}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every tensor that defines this adapter (trainable parameters and persistent buffers), by local name."""
        state = {name: p for name, p in self.adapter_named_parameters()}
        state.update(
            {
                name: b
                for name, b in self._buffers.items()
                if b is not None and name not in self._non_persistent_buffers_set
            }
        )
        for child_name, child in self.named_children():
            if child is not self.base_layer:
                state.update({f"{child_name}.{name}": b for name, b in child.named_buffers()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"adapter state mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, tensor in own.items():
                if tensor.shape != state[name].shape:
                    raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != {tuple(tensor.shape)}")
                tensor.copy_(state[name])

    # --- the maths ---------------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(out, in)``."""
        return linear_weight(self.base_layer)

    def merged_weight(self) -> torch.Tensor:
        """The effective ``(out, in)`` weight this adapter computes with, in the base weight's dtype."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; ``forward`` then runs only the base layer. Idempotent."""
        if self.merged:
            return
        if self.quantised:
            raise HybridPeftError(
                f"cannot merge into a {self.quantised} base layer: its weights are quantised. save_merged writes a "
                "merged model with the base dequantised"
            )
        self._write_base_weight(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to floating-point rounding). Idempotent."""
        if not self.merged:
            return
        self._write_base_weight(self.unmerged_weight())
        self.merged = False

    def release(self) -> nn.Module:
        """Undo every change this adapter made to its base layer and return it (used by ``detach``)."""
        self.unmerge()
        return self.base_layer

    def unmerged_weight(self) -> torch.Tensor:
        """The original base weight, recovered from the merged one. Subclasses with additive updates subtract."""
        raise NotImplementedError

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        if self.quantised:
            raise HybridPeftError(f"the base layer is quantised ({self.quantised}): its weights cannot be written")
        target = self.base_layer.weight
        target.data.copy_(weight.T if is_transposed(self.base_layer) else weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"


class AdditiveAdapterLayer(AdapterLayer):
    """An adapter whose effect is ``W_eff = W0 + delta_weight()`` (LoRA and its variants)."""

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` update, in the adapter's dtype."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        base, delta = self.base_weight, self.delta_weight()
        return (base.to(delta.dtype) + delta).to(base.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        base, delta = self.base_weight, self.delta_weight()
        return (base.to(delta.dtype) - delta).to(base.dtype)
