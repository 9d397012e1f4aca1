"""LoRA: Low-Rank Adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

::

    x ──► W0 (frozen) ─────────────────────┐
    │                                       (+) ──► y = x W0ᵀ + b + s · x Aᵀ Bᵀ
    └──► dropout ──► A (r×in) ──► B (out×r) ─┘ × s

``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). ``A`` starts Kaiming-uniform and ``B`` at
zero, so the model is unchanged at step 0. The parameterisation is PEFT's, so an adapter converts 1:1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_peft.config import AdapterConfig, require_bool, require_float, require_int
from hybrid_peft.errors import ConfigError
from hybrid_peft.layer import AdditiveAdapterLayer, adapter_dtype_for, compute_copy
from hybrid_peft.peft_format import one_config, peft_adapter_config
from hybrid_peft.registry import register_method


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA settings.

    Args:
        rank: r, the inner dimension of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
        dropout: dropout probability applied to the adapter's input only.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
        lr_scale: multiplies the run's learning rate for this adapter's parameters (the optimiser gets a parameter
            group per multiple: :func:`hybrid_peft.parameter_groups`); every method's config names it so.
        loraplus_lr_ratio: LoRA+ (Hayou, Ghosh & Yu 2024, https://arxiv.org/abs/2402.12354): ``B`` trains at this
            multiple of ``A``'s rate (PEFT's ``create_loraplus_optimizer`` calls it so; the paper suggests 16 with
            Adam). 1 is plain LoRA. An optimiser setting: the adapter file and its outputs do not depend on it.
    """

    method = "lora"

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    lr_scale: float = 1.0
    loraplus_lr_ratio: float = 1.0

    def validate(self) -> None:
        require_int("rank", self.rank, minimum=1)
        require_float("alpha", self.alpha, minimum=0.0, min_inclusive=False)
        require_float("dropout", self.dropout, minimum=0.0, maximum=1.0, max_inclusive=False)
        require_bool("use_rslora", self.use_rslora)
        require_float("lr_scale", self.lr_scale, minimum=0.0, min_inclusive=False)
        require_float("loraplus_lr_ratio", self.loraplus_lr_ratio, minimum=0.0, min_inclusive=False)

    @property
    def low_rank_rate_scales(self) -> dict[str, float]:
        """The learning-rate multiples of ``lora_A`` and ``lora_B`` (``lr_scale``, and LoRA+'s ratio on ``B``),
        leaving out those equal to 1."""
        scales = {"lora_A": self.lr_scale, "lora_B": self.lr_scale * self.loraplus_lr_ratio}
        return {name: scale for name, scale in scales.items() if scale != 1.0}

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features)

    def saved_per_token(self, in_features: int, out_features: int) -> int:
        return self.rank

    def flops_per_token(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features)


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s · B A``: the ``(out, in)`` weight update of a LoRA pair ``A (r, in)``, ``B (out, r)``."""
    return scaling * (lora_B @ lora_A)


def lora_forward_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s · x Aᵀ Bᵀ`` for ``x (..., in)``, without forming the ``(out, in)`` product."""
    return scaling * F.linear(F.linear(x, lora_A), lora_B)  # (..., r) -> (..., out)


class LowRankBranch:
    """The low-rank pair ``A (r, in)`` (Kaiming-uniform, PEFT's default) and ``B (out, r)`` (zeros), shared by
    :class:`LoRALayer` and the hybrid. The host is an :class:`AdapterLayer`."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def _init_low_rank(self, rank: int) -> None:
        if rank > min(self.in_features, self.out_features):
            raise ConfigError(
                f"rank {rank} is larger than the layer ({self.out_features}×{self.in_features}): above "
                f"min(in, out) = {min(self.in_features, self.out_features)} a low-rank update only adds parameters; "
                "use a smaller rank, or exclude this layer"
            )
        weight = self.base_weight
        factory = {"device": weight.device, "dtype": adapter_dtype_for(weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


@register_method(LoRAConfig)
class LoRALayer(LowRankBranch, AdditiveAdapterLayer):
    """``y = base(x) + s · dropout(x) Aᵀ Bᵀ``; see the module docstring."""

    config: LoRAConfig

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        self._init_low_rank(config.rank)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    def learning_rate_scales(self) -> dict[str, float]:
        return self.config.low_rank_rate_scales

    def trained_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(A, B)`` pair the forward pass uses (LoRA-GA on a quantised base uses a rank-2r pair)."""
        return self.lora_A, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        return lora_delta_weight(*self.trained_factors(), self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lora_a, lora_b = self.trained_factors()
        delta = lora_forward_delta(self.dropout(x), compute_copy(lora_a, x), compute_copy(lora_b, x), self.scaling)
        return result + delta.to(result.dtype)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` such that PEFT's LoRA on the unmodified base weight computes this adapter."""
        return self.lora_A, self.lora_B

    @classmethod
    def peft_export(
        cls, model: nn.Module, layers: dict[str, LoRALayer]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return peft_lora_export(model, layers)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.config.rank}, scaling={self.scaling:g}"


def peft_lora_export(model: nn.Module, layers: dict[str, LoRALayer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` contents of PEFT's LoRA format for LoRA and LoRA-GA layers."""
    config = one_config(layers, "LoRA")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        lora_A, lora_B = layer.peft_factors()  # LoRA-GA: rank 2r, valid on the unmodified base
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.detach().cpu().contiguous()
    rank = lora_A.shape[0]
    # PEFT scales by alpha/r (alpha/sqrt(r) with rsLoRA) of the exported rank; keep our scaling s exactly.
    alpha = config.scaling * (rank**0.5 if config.use_rslora else rank)
    fields = {"r": rank, "lora_alpha": alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora}
    return tensors, peft_adapter_config(model, layers, "LORA", init_lora_weights=True, **fields)
