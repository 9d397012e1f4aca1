"""Unitary adapter: unitary-RNN factors (Arjovsky, Shah & Bengio 2016, https://arxiv.org/abs/1511.06464) applied
to the input of a frozen linear layer, the "unitary constraint in selected sub-layers" of the hybrid paper.

Adjacent input features are paired into complex numbers, ``z_k = x_{2k} + i·x_{2k+1}`` (``n = in/2``), and rotated::

    U = D3 · R2 · F⁻¹ · D2 · F · R1 · D1          y = base(ρ(U) x)

    D = diag(e^{iθ})                              three learned phase vectors θ ∈ Rⁿ
    F = unitary DFT (torch.fft, norm="ortho")
    R(v, φ) = I − (1 − e^{iφ}) v v* / ‖v‖²        two generalised reflections, v ∈ Cⁿ, angle φ ∈ R
                                                  (φ = π is the Householder reflection)

Every factor is unitary, so the real form ρ(U) is orthogonal on R^{2n}: the adapter preserves norms exactly, costs
O(T·in·log in) and has 7n + 2 real parameters (3n phases, 2n complex reflection entries = 4n reals, 2 angles).
All θ, φ = 0 gives U = I, so the model starts unchanged; the reflection vectors start random (they only matter once
φ ≠ 0). Merging builds the dense ρ(U) once: ``W_eff = W0 · ρ(U)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid_peft.config import AdapterConfig, require_float
from hybrid_peft.errors import ConfigError
from hybrid_peft.layer import AdapterLayer, adapter_dtype_for
from hybrid_peft.registry import register_method

ATTENTION_PROJECTIONS = r".*\.(q_proj|k_proj|v_proj|o_proj|query|key|value|c_attn|out_proj)"


@dataclass(frozen=True)
class UnitaryConfig(AdapterConfig):
    """Unitary adapter settings. By default it targets the attention projections of common architectures
    (``q_proj/k_proj/v_proj/o_proj``, BERT's ``query/key/value``, GPT-2's ``c_attn``); any pattern works.

    Args:
        lr_scale: multiplies the run's learning rate for this adapter's parameters (the ``hybrid-unitary``
            composition trains it at 10× the hybrid's rate).
    """

    method = "unitary"

    targets: str | tuple[str, ...] = ATTENTION_PROJECTIONS
    lr_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        require_float("lr_scale", self.lr_scale, minimum=0.0, min_inclusive=False)

    default_learning_rate = 1e-2  # orthogonal methods need more than LoRA's rate ; not swept

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return 7 * (in_features // 2) + 2  # three phase vectors, two complex reflection vectors, two angles

    def flops_per_token(self, in_features: int, out_features: int) -> int:
        return 14 * in_features  # two FFTs, three diagonals, two reflections on in/2 complex features


# --- the maths, as free functions ------------------------------------------------------------------------------


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """``(..., 2n)`` real -> ``(..., n)`` complex, pairing features ``(2k, 2k+1)``."""
    return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())


def to_real(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z).reshape(*z.shape[:-1], -1)


def diagonal(z: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    return z * torch.polar(torch.ones_like(phases), phases)


def reflection(z: torch.Tensor, vector: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``R(v, φ) z = z − (1 − e^{iφ}) v (v* z) / ‖v‖²`` for ``z (..., n)``, ``v (n,)`` complex."""
    coefficient = (1 - torch.polar(torch.ones_like(angle), angle)) / vector.abs().pow(2).sum()
    projection = (z * vector.conj()).sum(-1, keepdim=True)  # v* z, (..., 1)
    return z - coefficient * projection * vector


def unitary_apply_reference(
    z: torch.Tensor,
    phases: torch.Tensor,
    reflection_vectors: torch.Tensor,
    reflection_angles: torch.Tensor,
) -> torch.Tensor:
    """``U z`` with ``U = D3 R2 F⁻¹ D2 F R1 D1``, one factor at a time; ``phases (3, n)``, ``reflection_vectors
    (2, n)`` complex, ``reflection_angles (2,)``. The plain reference for :func:`unitary_apply`."""
    z = diagonal(z, phases[0])
    z = reflection(z, reflection_vectors[0], reflection_angles[0])
    z = torch.fft.fft(z, norm="ortho")
    z = diagonal(z, phases[1])
    z = torch.fft.ifft(z, norm="ortho")
    z = reflection(z, reflection_vectors[1], reflection_angles[1])
    return diagonal(z, phases[2])


def unitary_apply(
    z: torch.Tensor,
    phases: torch.Tensor,
    reflection_vectors: torch.Tensor,
    reflection_angles: torch.Tensor,
) -> torch.Tensor:
    """:func:`unitary_apply_reference` with each diagonal folded into its neighbouring reflection, so every
    reflection is one matrix-vector product plus one fused multiply-add over the activations:
    ``R1 D1 z = D1 z − c1 (v1* D1 z) v1`` and ``D3 R2 y = D3 y − c2 (v2* y) (D3 v2)``."""
    d1, d2, d3 = (torch.polar(torch.ones_like(p), p) for p in phases)
    v1, v2 = reflection_vectors[0], reflection_vectors[1]
    c1, c2 = (
        (1 - torch.polar(torch.ones_like(a), a)) / v.abs().pow(2).sum()
        for a, v in zip(reflection_angles, (v1, v2), strict=True)
    )
    z = torch.addcmul(z * d1, (z @ (v1.conj() * d1)).unsqueeze(-1), -c1 * v1)  # R1 D1
    z = torch.fft.ifft(torch.fft.fft(z, norm="ortho") * d2, norm="ortho")  # F⁻¹ D2 F
    return torch.addcmul(z * d3, (z @ v2.conj()).unsqueeze(-1), -c2 * (v2 * d3))  # D3 R2


# --- the layer ---------------------------------------------------------------------------------------------------


@register_method(UnitaryConfig)
class UnitaryLayer(AdapterLayer):
    """``y = base(ρ(U) x)``; see the module docstring."""

    config: UnitaryConfig

    def __init__(self, base_layer: nn.Module, config: UnitaryConfig) -> None:
        super().__init__(base_layer, config)
        if self.in_features % 2:
            raise ConfigError(
                f"unitary: input width {self.in_features} is odd; the adapter pairs features into complex numbers. "
                "Exclude this module (exclude=[...]) or target layers with an even input width"
            )
        weight = self.base_weight
        dtype = adapter_dtype_for(weight.dtype)
        n = self.in_features // 2
        self.unitary_phases = nn.Parameter(torch.zeros(3, n, device=weight.device, dtype=dtype))
        vectors = torch.randn(2, n, 2, device=weight.device, dtype=dtype) / (2 * n) ** 0.5
        self.unitary_reflections = nn.Parameter(vectors)  # (2, n, 2): real and imaginary parts
        self.unitary_angles = nn.Parameter(torch.zeros(2, device=weight.device, dtype=dtype))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``ρ(U) x`` for real ``x (..., in)``, computed in the adapter's dtype (fp32 at least)."""
        z = to_complex(x.to(self.unitary_phases.dtype))
        vectors = torch.view_as_complex(self.unitary_reflections)
        return to_real(unitary_apply(z, self.unitary_phases, vectors, self.unitary_angles))

    def rotation_matrix(self) -> torch.Tensor:
        """Dense ``ρ(U)`` (``in × in``): row j of ``rotate(I)`` is ``(ρ(U) e_j)ᵀ``, so ``ρ(U) = rotate(I)ᵀ``."""
        eye = torch.eye(self.in_features, device=self.unitary_phases.device, dtype=self.unitary_phases.dtype)
        return self.rotate(eye).T

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """‖ρ(U)ᵀρ(U) − I‖_F of the real form of the unitary map."""
        rotation = self.rotation_matrix()
        eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
        return float(torch.linalg.matrix_norm(rotation.T @ rotation - eye))

    def merged_weight(self) -> torch.Tensor:
        base = self.base_weight
        rotation = self.rotation_matrix()
        return (base.to(rotation.dtype) @ rotation).to(base.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        base = self.base_weight
        rotation = self.rotation_matrix()
        return (base.to(rotation.dtype) @ rotation.T).to(base.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.unitary_phases.requires_grad):
            # The complex chain would keep ~8 activations of the input's size; recompute them in backward instead.
            rotated = checkpoint(self.rotate, x, use_reentrant=False)
        else:
            rotated = self.rotate(x)
        return self.base_layer(rotated.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, complex_width={self.in_features // 2}"


def unitary_parameter_count(in_features: int) -> int:
    return 7 * (in_features // 2) + 2


__all__ = ["UnitaryConfig", "UnitaryLayer", "unitary_apply", "unitary_parameter_count"]
