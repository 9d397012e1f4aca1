"""The batched build of every butterfly layer's rotations (methods/rotations.py) against each layer's own build:
same values and gradients, rebuilt whenever its inputs change, safe under accumulation, recomputation and copies."""

from __future__ import annotations

import copy

import pytest
import torch

from hybrid_peft import BOFTConfig, HybridConfig, LoRAConfig, ShareRule, attach
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.methods.butterfly import cayley, group_factors, skew_symmetric
from hybrid_peft.methods.rotations import BatchedCayley, ButterflyBranch, RotationBank

from conftest import MODEL_FACTORIES


def butterfly_layers(model: torch.nn.Module) -> list[ButterflyBranch]:
    return [m for m in model.modules() if isinstance(m, ButterflyBranch)]


def trained_pair(config_of: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of a tiny Llama with the same adapters and random (non-zero) rotations: the first uses the bank,
    the second builds each layer's rotation itself."""
    model = MODEL_FACTORIES["llama"]()
    for config in config_of.values():
        attach(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in butterfly_layers(model):
            layer.boft_skew.copy_(0.3 * torch.randn(layer.boft_skew.shape, generator=generator))
    reference = copy.deepcopy(model)
    for layer in butterfly_layers(reference):
        layer.rotation_bank = None
    return model.train(), reference.train()


CONFIGS = {
    "boft-m2": {"boft": BOFTConfig(block_size=4, butterfly_factors=2)},
    "hybrid": {"hybrid": HybridConfig(low_rank=LoRAConfig(rank=2))},
    "hybrid-share": {"hybrid": HybridConfig(low_rank=LoRAConfig(rank=2), rule=ShareRule(mix_init=0.3))},
    "boft+hybrid": {  # two block sizes in one model: one batched call per kind
        "boft": BOFTConfig(block_size=8, targets=["q_proj", "v_proj"]),
        "hybrid": HybridConfig(low_rank=LoRAConfig(rank=2), targets=["gate_proj", "up_proj", "down_proj"]),
    },
}


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = gradients(model), gradients(reference)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_batched_build_matches_each_layers_own_values_and_gradients(case: str, input_ids: torch.Tensor) -> None:
    model, reference = trained_pair(CONFIGS[case])
    ours, theirs = loss_of(model, input_ids), loss_of(reference, input_ids)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    ours.backward()
    theirs.backward()
    assert_same_gradients(model, reference)
    parts = butterfly_layers(model)[0].rotation_bank._parts
    assert len(parts) == len(butterfly_layers(model))  # every layer was served by the bank


def test_batched_cayley_gradient_is_exact_in_double_precision() -> None:
    generator = torch.Generator().manual_seed(0)
    skews = [
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
        for shape in [(1, 8, 6), (2, 4, 6), (1, 12, 6)]
    ]
    torch.autograd.gradcheck(
        lambda *s: BatchedCayley.apply(4, 4, (None, None, torch.tensor(0.7, dtype=torch.float64)), *s), skews
    )
    built = BatchedCayley.apply(4, 4, (None, None, None), *skews)
    for skew, grouped in zip(skews, built, strict=True):
        torch.testing.assert_close(grouped, group_factors(cayley(skew_symmetric(skew, 4))), atol=1e-12, rtol=0)


def test_an_optimiser_step_makes_the_next_forward_rebuild(input_ids: torch.Tensor) -> None:
    model, reference = trained_pair(CONFIGS["hybrid"])
    for m in (model, reference):
        optimiser = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        loss_of(m, input_ids).backward()
        optimiser.step()
        optimiser.zero_grad()
        loss_of(m, input_ids).backward()
    assert_same_gradients(model, reference)  # the second pass saw the stepped rotations


def test_loading_weights_or_moving_the_model_makes_the_bank_rebuild(input_ids: torch.Tensor) -> None:
    model, reference = trained_pair(CONFIGS["boft-m2"])
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        model.load_state_dict(
            reference.state_dict() | {k: v + 0.1 for k, v in reference.state_dict().items() if "skew" in k}
        )
        for layer in butterfly_layers(reference):
            layer.boft_skew.add_(0.1)
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)
        assert not torch.allclose(before, reference(input_ids=input_ids).logits)
        model.double()
        reference.double()
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_a_build_without_gradients_is_not_used_when_gradients_are_wanted(input_ids: torch.Tensor) -> None:
    model, reference = trained_pair(CONFIGS["hybrid"])
    with torch.no_grad():
        model(input_ids=input_ids)  # builds the bank without a graph
    loss_of(model, input_ids).backward()
    loss_of(reference, input_ids).backward()
    assert_same_gradients(model, reference)
    assert all(layer.boft_skew.grad is not None for layer in butterfly_layers(model))


def test_two_forward_passes_backpropagated_separately_share_one_build(input_ids: torch.Tensor) -> None:
    model, reference = trained_pair(CONFIGS["boft-m2"])
    for m in (model, reference):
        first, second = loss_of(m, input_ids), loss_of(m, input_ids.flip(0))
        first.backward()
        second.backward()  # the bank's build is backpropagated a second time
    assert_same_gradients(model, reference)


def test_activation_checkpointing_recomputes_with_the_same_build(input_ids: torch.Tensor) -> None:
    model, reference = trained_pair(CONFIGS["hybrid"])
    for m in (model, reference):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_of(m, input_ids).backward()
    assert_same_gradients(model, reference)


def test_rotation_dropout_while_training_builds_per_layer(input_ids: torch.Tensor) -> None:
    model, _ = trained_pair({"boft": BOFTConfig(block_size=4, dropout=0.5)})
    loss_of(model, input_ids).backward()
    assert butterfly_layers(model)[0].rotation_bank._parts == {}  # each layer drew its own dropout
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    assert butterfly_layers(model)[0].rotation_bank._parts  # no dropout in evaluation: the bank serves


def test_a_model_with_built_rotations_deep_copies_and_keeps_one_bank(input_ids: torch.Tensor) -> None:
    model, _ = trained_pair(CONFIGS["hybrid"])
    loss_of(model, input_ids)  # the bank now holds tensors with a graph
    twin = copy.deepcopy(model)
    banks = {id(layer.rotation_bank) for layer in butterfly_layers(twin)}
    assert len(banks) == 1 and isinstance(butterfly_layers(twin)[0].rotation_bank, RotationBank)
    assert butterfly_layers(twin)[0].rotation_bank is not butterfly_layers(model)[0].rotation_bank
    torch.testing.assert_close(loss_of(twin, input_ids), loss_of(model, input_ids))


def test_every_butterfly_layer_of_a_model_shares_one_bank() -> None:
    model, _ = trained_pair(CONFIGS["boft+hybrid"])
    layers = butterfly_layers(model)
    assert len({id(layer.rotation_bank) for layer in layers}) == 1
    assert len(layers[0].rotation_bank.layers) == len(layers) == len(adapter_layers(model))


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_optimiser_step_which_leaves_version_counters_alone_still_rebuilds(
    fused: bool, input_ids: torch.Tensor
) -> None:
    model, reference = trained_pair(CONFIGS["boft-m2"])
    for m in (model, reference):
        optimiser = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, fused=fused)
        loss_of(m, input_ids).backward()
        optimiser.step()
        optimiser.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_a_change_through_data_needs_a_refresh(input_ids: torch.Tensor) -> None:
    from hybrid_peft.methods.rotations import refresh_rotations

    model, reference = trained_pair(CONFIGS["boft-m2"])
    with torch.no_grad():
        model(input_ids=input_ids)
        for m in (model, reference):
            for layer in butterfly_layers(m):
                layer.boft_skew.data.mul_(2.0)
        refresh_rotations(model)
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_a_tiny_scale_is_seen_by_the_batched_build_as_by_the_layer(input_ids: torch.Tensor) -> None:
    """Where some |s| is below SMALL_SCALE the scaled linear keeps its product: the bank reads that for all layers at
    once, and the gradients stay the reference's."""
    model, reference = trained_pair(CONFIGS["hybrid"])
    for m in (model, reference):
        with torch.no_grad():
            butterfly_layers(m)[3].boft_scale[5] = 1e-5
        loss_of(m, input_ids).backward()
    assert_same_gradients(model, reference)
    parts = butterfly_layers(model)[0].rotation_bank._parts
    assert [part[3] for part in parts.values()].count(True) == 1
