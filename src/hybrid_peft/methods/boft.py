"""BOFT: Butterfly Orthogonal Fine-Tuning (Liu et al. 2023, https://arxiv.org/abs/2311.06243).

The frozen weight is rotated on its input side by a product of ``m`` sparse orthogonal butterfly factors and each
output row is rescaled::

    y = s ⊙ ((x M) W0ᵀ) + b,     M = M_{m-1} ··· M_1 M_0,     M_i = P_i · blockdiag(Q_{i,1..N}) · P_iᵀ
    Q = Cayley(K) = (I + K)⁻¹ (I − K),  K skew-symmetric b×b;   W_eff = diag(s) · W0 · Mᵀ

``b`` is the block size, ``N = in/b`` the number of blocks, ``P_i`` PEFT's block-butterfly permutations (``P_0 = I``),
``s`` a learned per-output scale. ``m = 1`` is OFT. K = 0 and s = 1 at init, so the model starts unchanged. This is
the same function as PEFT 0.21's ``BOFTConfig`` given the same parameters (PEFT stores full b×b matrices and uses their
skew part; we store only the b(b−1)/2 free numbers per block).

The maths (permutations, Cayley blocks, the grouped products and their memory-lean autograd functions) is in
``methods/butterfly.py``; the branch this layer shares with the hybrid, and the batched build of every layer's
blocks in one call per step, in ``methods/rotations.py``. Without gradients and with more tokens than output features
it is cheaper to rotate the weight instead of the input (``apply_to="auto"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_peft.config import AdapterConfig, require_choice, require_float, require_int
from hybrid_peft.errors import ConfigError, HybridPeftError
from hybrid_peft.layer import AdapterLayer, adapter_dtype_for, compute_copy, is_transposed
from hybrid_peft.methods.butterfly import (
    ButterflyRotate,
    boft_parameter_count,
    butterfly_rotate_plain,
    group_size,
    reverse_plan,
    skew_symmetric,
)
from hybrid_peft.methods.fused import butterfly_linear
from hybrid_peft.methods.rotations import ButterflyBranch
from hybrid_peft.peft_format import one_config, peft_adapter_config
from hybrid_peft.registry import register_method


@dataclass(frozen=True)
class BOFTConfig(AdapterConfig):
    """BOFT settings (PEFT's names in brackets).

    Args:
        block_size: b, the side of each orthogonal block [boft_block_size]; 0 to derive it from ``block_num``.
        block_num: N, the number of blocks [boft_block_num]; 0 to derive it from ``block_size``. Give exactly one.
        butterfly_factors: m, the number of butterfly factors [boft_n_butterfly_factor]; 1 is OFT.
        dropout: multiplicative dropout: during training this fraction of one random factor's blocks is replaced by
            the identity [boft_dropout].
        apply_to: ``"input"`` rotates the activations, ``"weight"`` rotates W0, ``"auto"`` picks the cheaper: the
            input while training, the weight when no gradient is needed and tokens outnumber output features.
        lr_scale: multiplies the run's learning rate for this adapter's parameters (as every method's config).
    """

    method = "boft"

    block_size: int = 4
    block_num: int = 0
    butterfly_factors: int = 1
    dropout: float = 0.0
    apply_to: str = "auto"
    lr_scale: float = 1.0

    keeps_output = True  # the scaled linear keeps y to recover x W0ᵀ for the scale's gradient
    # Orthogonal methods barely move at LoRA's 1e-3: a rotation's parameters want a few times LoRA's rate.
    default_learning_rate = 3e-3

    def validate(self) -> None:
        validate_butterfly_fields(self)
        require_float("dropout", self.dropout, minimum=0.0, maximum=1.0, max_inclusive=False)
        require_choice("apply_to", self.apply_to, ("auto", "input", "weight"))
        require_float("lr_scale", self.lr_scale, minimum=0.0, min_inclusive=False)

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return boft_parameter_count(in_features, out_features, _block_side(self, in_features), self.butterfly_factors)

    def flops_per_token(self, in_features: int, out_features: int) -> int:
        return in_features * _block_side(self, in_features) * self.butterfly_factors  # m block-diagonal products

    def fixed_activations(self, in_features: int, out_features: int) -> int:
        block = _block_side(self, in_features)
        width = group_size(in_features // block, block) * block  # the dense groups ButterflyRotate keeps
        return self.butterfly_factors * in_features * (block + width)  # and the b×b blocks Q themselves


def _block_side(config: AdapterConfig, in_features: int) -> int:
    return config.block_size or in_features // config.block_num


def validate_butterfly_fields(config: AdapterConfig) -> None:
    """``block_size``/``block_num``/``butterfly_factors`` checks shared by every config with a butterfly rotation."""
    require_int("block_size", config.block_size, minimum=0)
    require_int("block_num", config.block_num, minimum=0)
    if (config.block_size == 0) == (config.block_num == 0):
        raise ConfigError(
            f"block_size/block_num: give exactly one of them (the other 0), got block_size={config.block_size}, "
            f"block_num={config.block_num}"
        )
    require_int("butterfly_factors", config.butterfly_factors, minimum=1)


@register_method(BOFTConfig)
class BOFTLayer(ButterflyBranch, AdapterLayer):
    """``y = s ⊙ ((x M) W0ᵀ) + b``; see the module docstring."""

    config: BOFTConfig

    def __init__(self, base_layer: nn.Module, config: BOFTConfig) -> None:
        super().__init__(base_layer, config)
        weight = self.base_weight
        self._init_butterfly(config, {"device": weight.device, "dtype": adapter_dtype_for(weight.dtype)})
        self.rotation_dropout = config.dropout

    def merged_weight(self) -> torch.Tensor:
        return self.orthogonal_weight().to(self.base_weight.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        base = self.base_weight
        rotation = self.rotation_matrix()
        return ((base.to(rotation.dtype) / self.boft_scale[:, None]) @ rotation).to(base.dtype)

    def _use_weight_side(self, tokens: int) -> bool:
        if self.config.apply_to != "auto":
            return self.config.apply_to == "weight"
        return not torch.is_grad_enabled() and tokens > self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x2d = x.reshape(-1, self.in_features)  # computed in x's dtype; the blocks and scale are cast to it
        if not self.quantised and self._use_weight_side(x2d.shape[0]):
            # W0 Mᵀ: each row of W0 is rotated by Mᵀ = M⁻¹, i.e. the transposed blocks applied in reverse order.
            rotations = self.rotations()
            rotated_weight = butterfly_rotate_plain(
                self.base_weight.to(rotations.dtype), rotations.transpose(-1, -2).flip(0), reverse_plan(self.plan)
            )
            out = F.linear(x2d.to(rotated_weight.dtype), rotated_weight)
            bias = self.base_layer.bias
            out = out * self.boft_scale if bias is None else torch.addcmul(bias.to(out.dtype), out, self.boft_scale)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        grouped, small_scale = self.grouped_rotations()
        grouped = compute_copy(grouped, x2d)
        if self.quantised:  # the base layer's own kernel on the rotated input
            out = self.scaled_base_output(ButterflyRotate.apply(x2d, grouped, *self.plan))
        else:  # one autograd node: rotation and scaled base product (methods/fused.py)
            scale = compute_copy(self.boft_scale, x2d)
            bias = self.base_layer.bias
            out = butterfly_linear(x2d, grouped, self.plan, self.base_weight, scale, bias, small_scale=small_scale)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block_size={self.block_size}, block_num={self.block_num}, "
            f"butterfly_factors={self.config.butterfly_factors}"
        )

    # --- PEFT interchange ----------------------------------------------------------------------------------

    def to_peft_state(self) -> dict[str, torch.Tensor]:
        """``boft_R (m, N, b, b)`` and ``boft_s (out, 1)`` as PEFT stores them."""
        return {
            "boft_R": skew_symmetric(self.boft_skew.detach(), self.block_size),
            "boft_s": self.boft_scale.detach()[:, None],
        }

    @classmethod
    def peft_export(
        cls, model: nn.Module, layers: dict[str, BOFTLayer]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return peft_boft_export(model, layers)

    @torch.no_grad()
    def load_peft_state(self, boft_R: torch.Tensor, boft_s: torch.Tensor) -> None:
        """Take PEFT's tensors: only the skew part of ``boft_R`` matters (PEFT uses ``0.5 (R − Rᵀ)``)."""
        skew = 0.5 * (boft_R - boft_R.transpose(-1, -2))
        rows, cols = torch.triu_indices(self.block_size, self.block_size, offset=1)
        self.boft_skew.copy_(skew[..., rows, cols])
        self.boft_scale.copy_(boft_s.reshape(-1))


def peft_boft_export(model: nn.Module, layers: dict[str, BOFTLayer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` contents of PEFT's BOFT format: the same function (PEFT stores each
    block's full b×b matrix and uses its skew part, we store the b(b−1)/2 free entries). PEFT 0.21 runs more than one
    butterfly factor only with its CUDA extension (on CPU it builds every layer with one factor and cannot load such
    a file)."""
    config = one_config(layers, "BOFT")
    transposed = sorted(name for name, layer in layers.items() if is_transposed(layer.base_layer))
    if transposed:
        raise HybridPeftError(
            f"PEFT's BOFT adapts nn.Linear layers only, not GPT-2's Conv1D ({transposed[0]} ...); export the merged "
            "checkpoint instead: save_merged(model, folder)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, value in layer.to_peft_state().items():
            tensors[f"base_model.model.{name}.{key}"] = value.detach().cpu().contiguous()
    fields = {
        "boft_block_size": config.block_size,
        "boft_block_num": config.block_num,
        "boft_n_butterfly_factor": config.butterfly_factors,
        "boft_dropout": config.dropout,
        "init_weights": True,
    }
    return tensors, peft_adapter_config(model, layers, "BOFT", **fields)
