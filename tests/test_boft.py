"""BOFT: the maths against PEFT 0.21's own functions, the fast path against the plain one, shape errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_peft import BOFTConfig, attach
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.errors import ConfigError
from hybrid_peft.methods.butterfly import (
    ButterflyRotate,
    butterfly_dense,
    butterfly_permutations,
    butterfly_rotate_plain,
    cayley,
    gather_plan,
    group_blocks,
    group_factors,
    group_size,
    resolve_blocks,
    skew_symmetric,
    ungroup_blocks,
)

from conftest import MODEL_FACTORIES, model_output

peft = pytest.importorskip("peft")
from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer  # noqa: E402

# (20, 4, 1) and (24, 4, 1) have block counts 5 and 6, which groups of four do not divide (groups of 1 and 3)
SHAPES = [(16, 4, 1), (16, 4, 2), (32, 4, 3), (24, 2, 2), (64, 8, 2), (48, 4, 2), (20, 4, 1), (24, 4, 1)]


def random_rotations(m: int, n: int, b: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return cayley(skew_symmetric(torch.randn(m, n, b * (b - 1) // 2, generator=generator, dtype=dtype), b))


def peft_reference_rotation(features: int, b: int, m: int, skew: torch.Tensor) -> torch.Tensor:
    """The dense rotation exactly as PEFT's GPU path builds it, from PEFT's own permutation and Cayley functions
    (PEFT's CPU path silently drops to m = 1, so it cannot be called directly for m > 1)."""
    helper = PeftBOFTLayer.__new__(PeftBOFTLayer)
    n = features // b
    P = torch.stack(
        [helper.perm2mat(helper.block_butterfly_perm(features, n // 2**i, b // 2, m - 1)) for i in range(m)]
    )
    Q = helper.cayley_batch(skew.reshape(m * n, b, b)).view(m, n, b, b)
    blocks = torch.stack([torch.block_diag(*Q[i]) for i in range(m)])
    batch = torch.bmm(P, torch.bmm(blocks, P.permute(0, 2, 1)))
    rotation = batch[0]
    for i in range(1, m):
        rotation = batch[i] @ rotation
    return rotation


@pytest.mark.parametrize(("features", "b", "m"), SHAPES)
def test_permutations_match_peft(features: int, b: int, m: int) -> None:
    helper = PeftBOFTLayer.__new__(PeftBOFTLayer)
    for i, perm in enumerate(butterfly_permutations(features, b, m)):
        assert torch.equal(perm, helper.block_butterfly_perm(features, features // b // 2**i, b // 2, m - 1))


@pytest.mark.parametrize(("features", "b", "m"), SHAPES)
def test_dense_rotation_matches_peft(features: int, b: int, m: int) -> None:
    generator = torch.Generator().manual_seed(1)
    skew = skew_symmetric(torch.randn(m, features // b, b * (b - 1) // 2, generator=generator), b)
    ours = butterfly_dense(cayley(skew), butterfly_permutations(features, b, m))
    torch.testing.assert_close(ours, peft_reference_rotation(features, b, m, skew), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.T @ ours, torch.eye(features), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("features", "b", "m"), SHAPES)
def test_fast_rotation_matches_dense_values_and_gradients(features: int, b: int, m: int) -> None:
    rotations = random_rotations(m, features // b, b)
    perms = butterfly_permutations(features, b, m)
    x = torch.randn(7, features, generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(7, features, generator=torch.Generator().manual_seed(3))

    x_fast, q_fast = x.clone().requires_grad_(), rotations.clone().requires_grad_()
    fast = ButterflyRotate.apply(x_fast, group_factors(q_fast), *gather_plan(perms))
    (fast * upstream).sum().backward()

    x_ref, q_ref = x.clone().requires_grad_(), rotations.clone().requires_grad_()
    reference = x_ref @ butterfly_dense(q_ref, perms)
    (reference * upstream).sum().backward()

    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(q_fast.grad, q_ref.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("blocks", "b", "expected"), [(96, 4, 4), (5, 4, 1), (6, 4, 3), (12, 2, 6), (8, 8, 2), (4, 16, 1), (3, 32, 1)]
)
def test_group_size_is_the_largest_divisor_within_the_width(blocks: int, b: int, expected: int) -> None:
    assert group_size(blocks, b) == expected


@pytest.mark.parametrize(("blocks", "b", "group"), [(8, 4, 4), (6, 4, 3), (12, 2, 6), (5, 3, 1)])
def test_grouped_blocks_are_the_block_diagonal_and_give_the_blocks_back(blocks: int, b: int, group: int) -> None:
    rotations = torch.randn(blocks, b, b, generator=torch.Generator().manual_seed(4))
    grouped = group_blocks(rotations, group)
    assert grouped.shape == (blocks // group, group * b, group * b)
    torch.testing.assert_close(torch.block_diag(*grouped), torch.block_diag(*rotations), atol=0, rtol=0)
    torch.testing.assert_close(ungroup_blocks(grouped, group), rotations, atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(b=st.sampled_from([2, 4, 8]), m=st.integers(1, 3), multiple=st.integers(1, 4), tokens=st.integers(1, 9))
def test_rotation_is_orthogonal_for_any_valid_shape(b: int, m: int, multiple: int, tokens: int) -> None:
    features = b * 2 ** (m - 1) * multiple * (2 if m > 1 else 1)
    resolve_blocks(features, b, 0, m)
    rotations = random_rotations(m, features // b, b, seed=b * m, dtype=torch.float64)
    x = torch.randn(tokens, features, dtype=torch.float64)
    rotated = butterfly_rotate_plain(x, rotations, gather_plan(butterfly_permutations(features, b, m)))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("m", [1, 2])
def test_layer_matches_peft_boft(m: int, input_ids: torch.Tensor) -> None:
    """Our BOFT with PEFT's trained tensors gives PEFT's outputs. For m = 1 this is PEFT's own forward on CPU; for
    m = 2 PEFT's layer cannot run on CPU, so we compare the merged weight with PEFT's dense construction."""
    targets = ["q_proj", "down_proj"]
    ours = attach(MODEL_FACTORIES["llama"](), BOFTConfig(block_size=4, butterfly_factors=m, targets=targets)).eval()
    reference = peft.get_peft_model(
        MODEL_FACTORIES["llama"](),
        peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=m, target_modules=targets, init_weights=False),
    ).eval()
    reference_modules = dict(reference.base_model.model.named_modules())
    for name, layer in adapter_layers(ours).items():
        peft_layer = reference_modules[name]
        boft_R, boft_s = peft_layer.boft_R["default"], peft_layer.boft_s["default"]
        if m > 1:  # PEFT's CPU path made these for m = 1; give it the full m-factor tensors
            generator = torch.Generator().manual_seed(len(name))
            boft_R = torch.randn(m, *boft_R.shape[1:], generator=generator) * 0.1
        layer.load_peft_state(boft_R.detach(), boft_s.detach())
        torch.testing.assert_close(layer.to_peft_state()["boft_R"], 0.5 * (boft_R - boft_R.transpose(-1, -2)))
        if m > 1:
            rotation = peft_reference_rotation(layer.in_features, 4, m, 0.5 * (boft_R - boft_R.transpose(-1, -2)))
            expected = boft_s.detach() * (layer.base_weight @ rotation.T)
            torch.testing.assert_close(layer.merged_weight(), expected, atol=1e-6, rtol=0)
    if m == 1:
        torch.testing.assert_close(model_output(ours, input_ids), model_output(reference, input_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("apply_to", ["input", "weight"])
def test_input_and_weight_side_agree(apply_to: str, input_ids: torch.Tensor) -> None:
    from method_cases import perturb_adapters

    model = attach(MODEL_FACTORIES["llama"](), BOFTConfig(block_size=4, butterfly_factors=2, apply_to=apply_to))
    perturb_adapters(model.eval(), seed=4)
    reference = attach(MODEL_FACTORIES["llama"](), BOFTConfig(block_size=4, butterfly_factors=2, apply_to="input"))
    perturb_adapters(reference.eval(), seed=4)
    torch.testing.assert_close(model_output(model, input_ids), model_output(reference, input_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 5}, r"block_size: 5 does not divide the input width 32; block sizes that work: \[1, 2, 4, 8"),
        ({"block_size": 0, "block_num": 3}, "block_num: 3 does not divide the input width 32"),
        ({"block_size": 16, "butterfly_factors": 3}, r"b·2\^\(m−1\)=64 must divide 32"),
    ],
)
def test_shape_errors_name_the_module_and_the_fix(kwargs: dict, message: str) -> None:
    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(ConfigError, match=message) as info:
        attach(model, BOFTConfig(targets=["q_proj"], **kwargs))
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
    assert not adapter_layers(model), "a rejected attach must leave the model untouched"


def test_config_needs_exactly_one_block_setting() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        BOFTConfig(block_size=4, block_num=8)
    with pytest.raises(ConfigError, match="exactly one"):
        BOFTConfig(block_size=0, block_num=0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_low_rank", [False, True])
@pytest.mark.parametrize("tiny_scale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_linear_matches_plain_autograd(
    with_bias: bool, with_low_rank: bool, tiny_scale: bool, dtype: torch.dtype
) -> None:
    """The output-saving fast path gives the reference's values and gradients (x, s, h, B), including when some
    scale is tiny (then it keeps x W0ᵀ instead of recovering it from the output). In float32 the scale's gradient,
    recovered from column sums, stays within 1e-4 of the reference's even with a low-rank term as large as the
    base product."""
    from hybrid_peft.methods.butterfly import ScaledLinear, scaled_linear_plain

    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    tokens, features, outputs, rank = 64, 48, 40, 6
    weight, bias = randn(outputs, features), randn(outputs) if with_bias else None
    x, scale = randn(tokens, features), 1 + 0.3 * randn(outputs)
    h, b = randn(tokens, rank) * features**0.5 / rank**0.5, randn(outputs, rank)  # h Bᵀ about as large as x W0ᵀ
    if tiny_scale:
        scale[2] = 1e-5
    coefficient = torch.tensor(0.7, dtype=dtype)
    upstream = randn(tokens, outputs)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    results = []
    for function in (lambda *args: ScaledLinear.apply(*args, None), scaled_linear_plain):
        inputs = [t.clone().requires_grad_() for t in (x, scale, h, b)]
        low_rank = (inputs[2], inputs[3], coefficient) if with_low_rank else (None, None, coefficient)
        out = function(inputs[0], weight, inputs[1], bias, *low_rank)
        (out * upstream).sum().backward()
        grads = [t.grad for t in inputs[: 4 if with_low_rank else 2]]
        results.append((out, grads))
    (fast, fast_grads), (reference, reference_grads) = results
    torch.testing.assert_close(fast, reference, **tolerance)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(fast_grad, reference_grad, **tolerance)


def test_scaled_linear_without_gradients_runs_the_fast_forward_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``no_grad`` (evaluation, generation) the fast path gives the autograd function's output to the bit
    without entering it: nothing is saved and the scale is never read back to the host (a GPU sync per layer)."""
    from hybrid_peft.methods import butterfly as boft_module

    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(40, 48, generator=generator), torch.randn(40, generator=generator)
    x, h = torch.randn(64, 48, generator=generator), torch.randn(64, 6, generator=generator)
    scale = torch.nn.Parameter(1 + 0.3 * torch.randn(40, generator=generator))
    b = torch.nn.Parameter(torch.randn(40, 6, generator=generator))
    coefficient = torch.tensor(0.7)
    with torch.no_grad():
        expected = boft_module.ScaledLinear.apply(x, weight, scale, bias, h, b, coefficient, None)

    def refuse(*args: object) -> None:
        raise AssertionError("the autograd function ran without a gradient to compute")

    monkeypatch.setattr(boft_module.ScaledLinear, "apply", refuse)
    with torch.no_grad():
        got = boft_module.scaled_linear(x, weight, scale, bias, h, b, coefficient)
    assert torch.equal(got, expected)
    with pytest.raises(AssertionError, match="without a gradient"):
        boft_module.scaled_linear(x, weight, scale, bias, h, b, coefficient)  # grad mode on, the scale trains


def test_fast_rotation_without_an_input_gradient_still_trains_the_rotations() -> None:
    features, b, m = 48, 4, 2
    rotations = random_rotations(m, features // b, b)
    plan = gather_plan(butterfly_permutations(features, b, m))
    x = torch.randn(5, features, generator=torch.Generator().manual_seed(6))
    upstream = torch.randn(5, features, generator=torch.Generator().manual_seed(7))
    fast, reference = rotations.clone().requires_grad_(), rotations.clone().requires_grad_()
    (ButterflyRotate.apply(x, group_factors(fast), *plan) * upstream).sum().backward()
    (butterfly_rotate_plain(x, reference, plan) * upstream).sum().backward()
    torch.testing.assert_close(fast.grad, reference.grad, atol=1e-5, rtol=0)
