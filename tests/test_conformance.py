"""Conformance matrix: every method, on every tiny model layout, keeps the library's invariants.

``pytest -k lora`` runs one method's rows.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hybrid_peft import attach, detach, load_adapter, merge, save_adapter, unmerge
from hybrid_peft.adapters import adapter_layers, adapter_parameters

from conftest import MODEL_FACTORIES, model_output
from method_cases import METHOD_CASES, offsets_base, perturb_adapters, prepare

CASES = sorted(METHOD_CASES)


@pytest.fixture(params=CASES)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def attached(model_kind: str, method: str, seed: int = 0) -> torch.nn.Module:
    model = MODEL_FACTORIES[model_kind](seed)
    attach(model, METHOD_CASES[method])
    return prepare(method, model)


def test_identity_at_init(model_kind: str, method: str, input_ids: torch.Tensor) -> None:
    base = MODEL_FACTORIES[model_kind]()
    expected = model_output(base, input_ids)
    model = prepare(method, attach(base, METHOD_CASES[method]))
    assert adapter_layers(model), "attach wrapped nothing"
    torch.testing.assert_close(model_output(model.eval(), input_ids), expected, atol=1e-5, rtol=0)


def test_merge_equals_unmerged_forward(model_kind: str, method: str, input_ids: torch.Tensor) -> None:
    model = attached(model_kind, method).eval()
    perturb_adapters(model)
    unmerged = model_output(model, input_ids)
    base = model_output(MODEL_FACTORIES[model_kind](), input_ids)
    assert (unmerged - base).abs().max() > 1e-2 * base.abs().max(), "perturbed adapters should change the output"
    merge(model)
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(model_output(model, input_ids), unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(model_output(model, input_ids), unmerged, atol=1e-5, rtol=0)


def test_merge_twice_changes_nothing(model_kind: str, method: str) -> None:
    model = attached(model_kind, method)
    perturb_adapters(model)
    merge(model)
    weights = copy.deepcopy(model.state_dict())
    merge(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_save_load_on_fresh_base(model_kind: str, method: str, input_ids: torch.Tensor, tmp_path) -> None:  # noqa: ANN001
    model = attached(model_kind, method).eval()
    perturb_adapters(model)
    expected = model_output(model, input_ids)
    save_adapter(model, tmp_path / "adapter")
    fresh = MODEL_FACTORIES[model_kind]().eval()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(model_output(fresh, input_ids), expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded for inference: nothing requires grad"
    trainable = MODEL_FACTORIES[model_kind]().eval()
    load_adapter(trainable, tmp_path / "adapter", trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(adapter_parameters(trainable))


def test_only_adapter_parameters_require_grad(model_kind: str, method: str, input_ids: torch.Tensor) -> None:
    model = attached(model_kind, method).train()
    adapter_names = set(adapter_parameters(model))
    assert adapter_names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names
    # Gradients reach the adapters and only them.
    model_output_with_grad = model(input_ids=input_ids).logits
    model_output_with_grad.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name in adapter_names:
            assert p.grad is not None, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_detach_restores_original_model(model_kind: str, method: str, input_ids: torch.Tensor) -> None:
    original = MODEL_FACTORIES[model_kind]()
    reference_state = copy.deepcopy(original.state_dict())
    reference_flags = {n: p.requires_grad for n, p in original.named_parameters()}
    reference_types = {n: type(m) for n, m in original.named_modules()}
    expected = model_output(original, input_ids)

    model = attached(model_kind, method)
    perturb_adapters(model)
    merge(model)  # detach must undo a merge too
    detach(model)
    assert {n: type(m) for n, m in model.named_modules()} == reference_types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == reference_flags
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference_state[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(model_output(model.eval(), input_ids), expected, atol=1e-5, rtol=0)


def test_detach_unmerged_restores_the_base(model_kind: str, method: str) -> None:
    """Bitwise, except where the adapter offset the base weight in place (LoRA-GA): there to rounding."""
    reference = MODEL_FACTORIES[model_kind]().state_dict()
    model = attached(model_kind, method)
    exact = not offsets_base(model)
    perturb_adapters(model)
    detach(model)
    for name, tensor in model.state_dict().items():
        if exact:
            assert torch.equal(tensor, reference[name]), name
        else:
            torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0, msg=name)


def test_detach_with_merge_keeps_the_adapted_function(model_kind: str, method: str, input_ids: torch.Tensor) -> None:
    model = attached(model_kind, method).eval()
    perturb_adapters(model)
    expected = model_output(model, input_ids)
    detach(model, merge=True)
    assert not adapter_layers(model)
    torch.testing.assert_close(model_output(model, input_ids), expected, atol=1e-5, rtol=0)


def test_bf16_base_trains_fp32_adapter(method: str, input_ids: torch.Tensor) -> None:
    model = MODEL_FACTORIES["llama"]().to(torch.bfloat16)
    prepare(method, attach(model, METHOD_CASES[method]))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
    logits = model(input_ids=input_ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().mean().backward()
    assert all(p.grad is not None for p in adapter_parameters(model).values())
