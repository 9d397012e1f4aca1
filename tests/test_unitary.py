"""Unitary (uRNN) adapter: exact orthogonality, norm preservation, parameter count, default targets, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybrid_peft import UnitaryConfig, attach
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.errors import ConfigError
from hybrid_peft.methods.unitary import UnitaryLayer, reflection, unitary_parameter_count

from conftest import MODEL_FACTORIES


def unitary_layer(features: int, seed: int = 0) -> UnitaryLayer:
    torch.manual_seed(seed)
    return UnitaryLayer(nn.Linear(features, 8), UnitaryConfig())


def test_orthogonal_after_200_optimiser_steps() -> None:
    layer = unitary_layer(64)
    optimizer = torch.optim.Adam([p for _, p in layer.adapter_named_parameters()], lr=0.05)
    target = torch.randn(16, 8)
    x = torch.randn(16, 64)
    for _ in range(200):
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.unitary_phases.abs().max() > 0.1, "the optimiser should have moved the phases"
    assert layer.unitary_angles.abs().max() > 0.01
    rotation = layer.rotation_matrix()
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(64), atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 40), tokens=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_norm_preserved_for_any_width(half: int, tokens: int, seed: int) -> None:
    layer = unitary_layer(2 * half, seed=seed).double()
    with torch.no_grad():
        for p in (layer.unitary_phases, layer.unitary_angles):
            p.uniform_(-3.14, 3.14)
    x = torch.randn(tokens, 2 * half, dtype=torch.float64)
    torch.testing.assert_close(layer.rotate(x).norm(dim=-1), x.norm(dim=-1))


def test_identity_at_init_and_rotation_matches_dense() -> None:
    layer = unitary_layer(16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer.rotate(x), x, atol=1e-6, rtol=0)
    with torch.no_grad():
        layer.unitary_phases.normal_()
        layer.unitary_angles.normal_()
    torch.testing.assert_close(layer.rotate(x), x @ layer.rotation_matrix().T, atol=1e-5, rtol=0)


def test_reflection_with_pi_is_householder() -> None:
    v = torch.randn(6, dtype=torch.complex128)
    z = torch.randn(3, 6, dtype=torch.complex128)
    householder = torch.eye(6, dtype=torch.complex128) - 2 * torch.outer(v, v.conj()) / v.abs().pow(2).sum()
    torch.testing.assert_close(reflection(z, v, torch.tensor(torch.pi, dtype=torch.float64)), z @ householder.T)


@pytest.mark.parametrize("features", [2, 64, 576])
def test_parameter_count(features: int) -> None:
    layer = unitary_layer(features)
    count = sum(p.numel() for _, p in layer.adapter_named_parameters())
    assert count == unitary_parameter_count(features) == 7 * (features // 2) + 2


def test_default_targets_are_attention_projections() -> None:
    model = attach(MODEL_FACTORIES["llama"](), UnitaryConfig())
    suffixes = {name.rsplit(".", 1)[-1] for name in adapter_layers(model)}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj"}
    bert = attach(MODEL_FACTORIES["bert"](), UnitaryConfig())
    assert {name.rsplit(".", 1)[-1] for name in adapter_layers(bert)} == {"query", "key", "value"}


def test_odd_width_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="input width 7 is odd.*exclude"):
        UnitaryLayer(nn.Linear(7, 4), UnitaryConfig())


def test_fused_factors_match_the_factor_by_factor_reference() -> None:
    from hybrid_peft.methods.unitary import unitary_apply, unitary_apply_reference

    generator = torch.Generator().manual_seed(3)
    n = 12
    z = torch.randn(5, n, dtype=torch.complex128, generator=generator)
    phases = torch.randn(3, n, dtype=torch.float64, generator=generator)
    vectors = torch.randn(2, n, dtype=torch.complex128, generator=generator)
    angles = torch.randn(2, dtype=torch.float64, generator=generator)
    inputs = [t.clone().requires_grad_() for t in (z, phases, vectors, angles)]
    fused = unitary_apply(*inputs)
    fused.abs().pow(2).mul(torch.arange(n)).sum().backward()
    reference_inputs = [t.clone().requires_grad_() for t in (z, phases, vectors, angles)]
    reference = unitary_apply_reference(*reference_inputs)
    reference.abs().pow(2).mul(torch.arange(n)).sum().backward()
    torch.testing.assert_close(fused, reference)
    for a, b in zip(inputs, reference_inputs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def _unitary_inputs(n: int, leading: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """``(x (..., 2n), phases (3, n), reflections (2, n, 2), angles (2,))`` in float64."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(*leading, 2 * n), (3, n), (2, n, 2), (2,)]
    return [torch.randn(*shape, dtype=torch.float64, generator=generator) for shape in shapes]


def _reference_rotate(x, phases, reflections, angles):  # noqa: ANN001, ANN202
    from hybrid_peft.methods.unitary import to_complex, to_real, unitary_apply_reference

    vectors = torch.view_as_complex(reflections)
    return to_real(unitary_apply_reference(to_complex(x), phases, vectors, angles))


@pytest.mark.parametrize(("n", "leading"), [(12, (5,)), (7, (2, 3)), (1, (4,))])
@pytest.mark.parametrize("wanted", ["all", "input", "parameters"])
def test_written_out_backward_matches_autograd_through_the_reference(n: int, leading: tuple, wanted: str) -> None:
    """UnitaryApply's hand-written gradients (input, phases, reflection vectors, angles) against autograd through
    the factor-by-factor chain, for any leading shape and with only some inputs requiring a gradient."""
    from hybrid_peft.methods.unitary import UnitaryApply

    values = _unitary_inputs(n, leading, seed=n)
    weights = torch.randn(*leading, 2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trains = {"all": (0, 1, 2, 3), "input": (0,), "parameters": (1, 2, 3)}[wanted]

    def gradients(function) -> tuple[torch.Tensor, list]:  # noqa: ANN001
        inputs = [t.clone().requires_grad_(i in trains) for i, t in enumerate(values)]
        out = function(*inputs)
        ((out * weights).sum() + out.pow(2).mul(torch.arange(2 * n)).sum()).backward()
        return out, [t.grad for t in inputs]

    out, grads = gradients(UnitaryApply.apply)
    expected_out, expected_grads = gradients(_reference_rotate)
    torch.testing.assert_close(out, expected_out)
    for i, (grad, expected) in enumerate(zip(grads, expected_grads, strict=True)):
        if i in trains:
            torch.testing.assert_close(grad, expected)
        else:
            assert grad is None and expected is None


def test_written_out_backward_passes_gradcheck() -> None:
    from hybrid_peft.methods.unitary import UnitaryApply

    inputs = [t.requires_grad_() for t in _unitary_inputs(6, (3,), seed=5)]
    assert torch.autograd.gradcheck(UnitaryApply.apply, inputs)


def test_written_out_backward_keeps_a_bfloat16_input_and_returns_its_gradient_in_bfloat16() -> None:
    """A bf16 input is rotated in the parameters' float32 and saved as it came (not as a float32 copy)."""
    from hybrid_peft.methods.unitary import UnitaryApply

    x, *parameters = (t.float() for t in _unitary_inputs(8, (4,), seed=3))
    parameters = [p.requires_grad_() for p in parameters]
    x = x.bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = UnitaryApply.apply(x, *parameters)
    assert out.dtype == torch.float32 and any(t is x for t in saved)
    assert not any(t.shape == x.shape and t.dtype == torch.float32 for t in saved)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    expected = x.detach().float().requires_grad_()
    _reference_rotate(expected, *(p.detach() for p in parameters)).sum().backward()
    torch.testing.assert_close(x.grad.float(), expected.grad, atol=1e-2, rtol=1e-2)


def test_layer_trains_through_the_written_out_backward_as_through_the_reference() -> None:
    """The layer's gradients (x and every adapter parameter, float32) equal autograd through the reference chain,
    and only x is kept for backward besides the parameters (no intermediate of the complex chain)."""
    from hybrid_peft.methods.unitary import to_complex, to_real, unitary_apply_reference

    layer = unitary_layer(24, seed=2)
    layer.base_layer.requires_grad_(False)  # frozen, as attach() leaves it
    with torch.no_grad():
        layer.unitary_phases.normal_()
        layer.unitary_angles.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)
    target = torch.randn(2, 5, 8)
    parameters = [layer.unitary_phases, layer.unitary_reflections, layer.unitary_angles]

    def reference_forward(x: torch.Tensor) -> torch.Tensor:
        vectors = torch.view_as_complex(layer.unitary_reflections)
        rotated = to_real(unitary_apply_reference(to_complex(x), layer.unitary_phases, vectors, layer.unitary_angles))
        return layer.base_layer(rotated)

    grads = []
    for forward in (layer, reference_forward):
        out = forward(x)
        torch.autograd.backward((out - target).pow(2).sum())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in parameters])
        x.grad = None
        for p in parameters:
            p.grad = None
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.shape[:-1] in ((2, 5), (10,))]  # one row per token
    assert len(activations) == 1 and activations[0] is x, [tuple(t.shape) for t in saved]
