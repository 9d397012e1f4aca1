"""The one-node butterfly layer (methods/fused.py) against the same maths as three nodes and as plain autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_peft import BOFTConfig, HybridConfig, LoRAConfig, attach
from hybrid_peft.methods import fused
from hybrid_peft.methods.butterfly import (
    butterfly_permutations,
    butterfly_rotate_plain,
    cayley,
    gather_plan,
    group_factors,
    scaled_linear_plain,
    skew_symmetric,
)


def _inputs(m: int, with_bias: bool, with_low_rank: bool, tiny_scale: bool, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    tokens, features, outputs, rank, b = 40, 32, 24, 4, 4
    skew = 0.3 * randn(m, features // b, b * (b - 1) // 2)
    scale = 1 + 0.3 * randn(outputs)
    if tiny_scale:
        scale[1] = 1e-5  # the product is kept instead of recovered from the output
    return {
        "x": randn(tokens, features),
        "skew": skew,
        "weight": randn(outputs, features),
        "scale": scale,
        "bias": randn(outputs) if with_bias else None,
        "lora_a": randn(rank, features) if with_low_rank else None,
        "lora_b": randn(outputs, rank) if with_low_rank else None,
        "plan": gather_plan(butterfly_permutations(features, b, m)),
        "upstream": randn(tokens, outputs),
        "b": b,
    }


def _run(kind: str, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and every trainable input's gradient (x, the skew parameters, s, b, A, B) by ``kind``."""
    trained = {
        name: data[name].clone().requires_grad_()
        for name in ("x", "skew", "scale", "bias", "lora_a", "lora_b")
        if data[name] is not None
    }
    rotations = cayley(skew_symmetric(trained["skew"], data["b"]))
    x, scale, bias = trained["x"], trained["scale"], trained.get("bias")
    lora_a, lora_b, coefficient = trained.get("lora_a"), trained.get("lora_b"), 0.7
    if kind == "plain":  # plain autograd: every intermediate saved
        rotated = butterfly_rotate_plain(x, rotations, data["plan"])
        low_rank_input = None if lora_a is None else F.linear(x, lora_a)
        out = scaled_linear_plain(rotated, data["weight"], scale, bias, low_rank_input, lora_b, coefficient)
    else:
        function = fused.butterfly_linear if kind == "fused" else fused.butterfly_linear_composed
        grouped = group_factors(rotations)
        out = function(x, grouped, data["plan"], data["weight"], scale, bias, lora_a, lora_b, coefficient)
    (out * data["upstream"]).sum().backward()
    return out, {name: tensor.grad for name, tensor in trained.items()}


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_low_rank", [False, True])
@pytest.mark.parametrize("tiny_scale", [False, True])
def test_fused_butterfly_linear_matches_composed_and_plain_autograd(
    m: int, with_bias: bool, with_low_rank: bool, tiny_scale: bool
) -> None:
    """Values and the gradients of x, the skew parameters, the scale, the bias and both low-rank factors agree with
    the three-node composition and with plain autograd (float64: to rounding)."""
    data = _inputs(m, with_bias, with_low_rank, tiny_scale, torch.float64)
    fused_out, fused_grads = _run("fused", data)
    for kind in ("composed", "plain"):
        out, grads = _run(kind, data)
        torch.testing.assert_close(fused_out, out)
        assert grads.keys() == fused_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(fused_grads[name], grad, msg=lambda text, name=name: f"{name}: {text}")


def test_fused_butterfly_linear_in_float32_is_close_to_float64() -> None:
    data64 = _inputs(2, True, True, False, torch.float64)
    data32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in data64.items()}
    out64, grads64 = _run("plain", data64)
    out32, grads32 = _run("fused", data32)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    for name, grad in grads64.items():
        torch.testing.assert_close(grads32[name].double(), grad, rtol=1e-4, atol=1e-4)


def test_fused_path_without_gradients_runs_the_forward_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``no_grad`` the forward maths run without the autograd function (nothing saved, no host read) and give
    its output to the bit."""
    data = _inputs(1, True, True, False, torch.float32)
    grouped = group_factors(cayley(skew_symmetric(data["skew"], data["b"])))
    args = (data["x"], grouped, data["plan"], data["weight"], data["scale"], data["bias"], data["lora_a"])
    with torch.no_grad():
        expected = fused.ButterflyLinear.apply(*args[:2], *args[3:], data["lora_b"], 0.7, None, *data["plan"])

    def refuse(*_: object) -> None:
        raise AssertionError("the autograd function ran without a gradient to compute")

    monkeypatch.setattr(fused.ButterflyLinear, "apply", refuse)
    with torch.no_grad():
        assert torch.equal(fused.butterfly_linear(*args, data["lora_b"], 0.7), expected)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("config", [HybridConfig(), BOFTConfig()], ids=["hybrid", "boft"])
def test_butterfly_layers_train_through_one_autograd_node(config: object) -> None:
    """A training forward pass of the hybrid's or BOFT's layer is one node (rotation, scaled base product and the
    low-rank branch together); with dropout on the hybrid's low-rank input it is the three-node composition, and
    both give the layer's gradients."""
    torch.manual_seed(0)
    model = attach(_Tiny(), config).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = model(x)
    names = []
    node = out.grad_fn
    while node is not None and node.name() not in ("ButterflyLinearBackward", "ScaledLinearBackward"):
        names.append(node.name())
        node = node.next_functions[0][0]
    assert node is not None and node.name() == "ButterflyLinearBackward", names
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    if isinstance(config, HybridConfig):
        dropped = attach(_Tiny(), HybridConfig(low_rank=LoRAConfig(dropout=0.1))).train()
        found = set()
        stack = [dropped(x).grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node.name() not in found:
                found.add(node.name())
                stack.extend(next_node for next_node, _ in node.next_functions)
        assert "ScaledLinearBackward" in found and "ButterflyLinearBackward" not in found
