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
        lr_scale: multiplies the run's learning rate for this adapter's parameters (alone, this adapter chose 1–3×
            LoRA's rate on the tasks of BENCHMARKS.md).
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
    reflection is one projection onto its vector plus one fused multiply-add over the activations:
    ``R1 D1 z = D1 z − c1 (v1* D1 z) v1`` and ``D3 R2 y = D3 y − c2 (v2* y) (D3 v2)``. Under autograd use
    :class:`UnitaryApply` (the layer does), whose backward is written out."""
    diagonals, vectors, coefficients, _ = _factors(phases, reflection_vectors, reflection_angles)
    return _chain(z, diagonals, vectors, coefficients)[-1]


def rotate_real(x: torch.Tensor, phases: torch.Tensor, reflections: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``ρ(U) x`` for real ``x (..., 2n)`` in the parameters' dtype, ``reflections (2, n, 2)`` as real and imaginary
    parts: :func:`unitary_apply` on the paired features, without autograd bookkeeping of its own."""
    z = to_complex(x.to(phases.dtype))
    return to_real(unitary_apply(z, phases, torch.view_as_complex(reflections), angles))


def _factors(
    phases: torch.Tensor, reflection_vectors: torch.Tensor, reflection_angles: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e^{iθ} (3, n), v (2, n), c (2,), ‖v‖² (2,))``: the diagonals and the reflections' coefficients
    ``c = (1 − e^{iφ})/‖v‖²``, each computed for all factors at once."""
    diagonals = torch.polar(torch.ones_like(phases), phases)
    squares = reflection_vectors.abs().square().sum(-1)
    coefficients = (1 - torch.polar(torch.ones_like(reflection_angles), reflection_angles)) / squares
    return diagonals, reflection_vectors, coefficients, squares


def _chain(
    z: torch.Tensor, diagonals: torch.Tensor, vectors: torch.Tensor, coefficients: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``U z`` for ``z (..., n)`` and the intermediates backward needs: ``(D1 z, its projection on v1, D2 F R1 D1 z,
    F⁻¹ of that, its projection on v2, U z)``. Projections are multiply-and-sum: a complex matrix-vector product
    is several times slower on the CPU at these sizes."""
    (d1, d2, d3), (v1, v2), (c1, c2) = diagonals, vectors, coefficients
    a = z * d1
    p = (z * (v1.conj() * d1)).sum(-1)  # v1* D1 z
    f2 = torch.fft.fft(torch.addcmul(a, p.unsqueeze(-1), -c1 * v1), norm="ortho") * d2
    z2 = torch.fft.ifft(f2, norm="ortho")
    s = (z2 * v2.conj()).sum(-1)  # v2* z2
    y = torch.addcmul(z2 * d3, s.unsqueeze(-1), -c2 * (v2 * d3))
    return a, p, f2, z2, s, y


class UnitaryApply(torch.autograd.Function):
    """``ρ(U) x`` for real ``x (..., 2n)`` (any float dtype; computed in the parameters' dtype) with its backward
    written out: it saves only ``x`` and the parameters (``phases (3, n)``, ``reflections (2, n, 2)``: real and
    imaginary parts, ``angles (2,)``), recomputes the intermediates without autograd (:func:`_chain`) and runs the
    adjoint chain ``U^H``, with the parameters' gradients as sums over tokens. Autograd through the complex chain,
    recomputed under checkpointing, ran about three times as many passes over the activations, many of them
    conjugate copies; the tests hold this to autograd through the factor-by-factor reference.

    Gradients follow PyTorch's convention (for a real loss L and complex w, ``G_w = ∂L/∂Re w + i ∂L/∂Im w``). For
    ``w = d ⊙ u`` with ``d = e^{iθ}``: ``G_u = conj(d) ⊙ G_w`` and ``∂L/∂θ = −Im Σ_t w ⊙ conj(G_w)``. For a
    reflection ``w = u − c (u·v̄) v`` with ``c = (1 − e^{iφ})/‖v‖²``, ``r = G_w·v̄`` and ``S = Σ_t conj(r_t)(u_t·v̄)``:
    ``G_u = G_w − c̄ r vᵀ``, ``G_v = −c uᵀ r̄ − c̄ G_wᵀ conj(u·v̄) + 2 Re(c S) v/‖v‖²`` and
    ``∂L/∂φ = Re(i e^{iφ} S)/‖v‖²``. The unitary DFT's adjoint is its inverse."""

    @staticmethod
    def forward(ctx, x, phases, reflections, angles):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, phases, reflections, angles)
        return rotate_real(x, phases, reflections, angles)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, phases, reflections, angles = ctx.saved_tensors
        vectors = torch.view_as_complex(reflections)
        diagonals, _, coefficients, squares = _factors(phases, vectors, angles)
        (d1, d2, d3), (v1, v2), (c1, c2) = diagonals, vectors, coefficients
        n = phases.shape[-1]
        z, grad = to_complex(x.to(phases.dtype)).reshape(-1, n), to_complex(grad.to(phases.dtype)).reshape(-1, n)
        a, p, f2, z2, s, y = _chain(z, diagonals, vectors, coefficients)
        # D3 R2
        grad_w = grad * d3.conj()
        r2 = (grad_w * v2.conj()).sum(-1)
        grad_z2 = torch.addcmul(grad_w, r2.unsqueeze(-1), -c2.conj() * v2)
        # F⁻¹ D2 F
        grad_f2 = torch.fft.fft(grad_z2, norm="ortho")
        grad_z1 = torch.fft.ifft(grad_f2 * d2.conj(), norm="ortho")
        # R1 D1
        r1 = (grad_z1 * v1.conj()).sum(-1)
        grad_a = torch.addcmul(grad_z1, r1.unsqueeze(-1), -c1.conj() * v1)
        grad_x = to_real(grad_a * d1.conj()).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:]):
            return grad_x, None, None, None
        grad_phases = torch.stack([_phase_grad(a, grad_a), _phase_grad(f2, grad_f2), _phase_grad(y, grad)])
        # R2 acts on z2 (D3 folded in: its output's gradient is grad_w), R1 on a = D1 z.
        grad_v2, grad_phi2 = _reflection_grads(z2, s, grad_w, r2, v2, c2, squares[1], angles[1])
        grad_v1, grad_phi1 = _reflection_grads(a, p, grad_z1, r1, v1, c1, squares[0], angles[0])
        grad_reflections = torch.view_as_real(torch.stack([grad_v1, grad_v2]))
        return grad_x, grad_phases, grad_reflections, torch.stack([grad_phi1, grad_phi2])


def _phase_grad(output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``∂L/∂θ = −Im Σ_t w ⊙ conj(G_w)`` of a diagonal ``w = e^{iθ} ⊙ u``, from its output and its gradient."""
    return -(output * grad.conj()).sum(0).imag


def _reflection_grads(
    u: torch.Tensor,
    projection: torch.Tensor,
    grad: torch.Tensor,
    r: torch.Tensor,
    vector: torch.Tensor,
    coefficient: torch.Tensor,
    square: torch.Tensor,
    angle: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_v, ∂L/∂φ)`` of one reflection ``w = u − c (u·v̄) v`` (:class:`UnitaryApply`'s docstring), from its input
    ``u``, ``u·v̄`` (``projection``), its output's gradient ``G_w`` and ``r = G_w·v̄``."""
    total = torch.vdot(r, projection)  # S = Σ_t conj(r_t) (u_t·v̄)
    grad_vector = (
        -coefficient * (r.conj() @ u)
        - coefficient.conj() * (projection.conj() @ grad)
        + (2 * (coefficient * total).real / square) * vector
    )
    grad_angle = (1j * torch.polar(torch.ones_like(angle), angle) * total).real / square
    return grad_vector, grad_angle


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
        """``ρ(U) x`` for real ``x (..., in)``, computed in the adapter's dtype (fp32 at least). Under autograd it
        keeps only ``x`` for backward (:class:`UnitaryApply`)."""
        inputs = (x, self.unitary_phases, self.unitary_reflections, self.unitary_angles)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return UnitaryApply.apply(*inputs)
        return rotate_real(*inputs)

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
        return self.base_layer(self.rotate(x).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, complex_width={self.in_features // 2}"


def unitary_parameter_count(in_features: int) -> int:
    return 7 * (in_features // 2) + 2


__all__ = ["UnitaryApply", "UnitaryConfig", "UnitaryLayer", "unitary_apply", "unitary_parameter_count"]
