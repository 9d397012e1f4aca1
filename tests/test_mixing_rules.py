"""The hybrid's rules with a reason (methods/mixing.py): relative pressure, its mirror (protect), and the gradient
spectrum. Each is checked against its formula by hand; the conformance rows (tests/method_cases.py) check the exact
start, save/load and merge for each."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from hybrid_peft import (
    HybridConfig,
    LoRAConfig,
    LoRAGAConfig,
    PressureRule,
    ProtectRule,
    SpectrumRule,
    attach,
    lora_ga_initialise,
    parameter_groups,
    update_mixing,
)
from hybrid_peft.adapters import after_backward_hooks
from hybrid_peft.errors import ConfigError
from hybrid_peft.methods import mixing
from hybrid_peft.methods.hybrid import hybrid_layers
from hybrid_peft.methods.mixing import BranchNorms, mixing_rule

from conftest import MODEL_FACTORIES
from method_cases import random_batches


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def test_pressure_sends_high_relative_pressure_to_the_low_rank_branch_and_protect_to_the_rotation() -> None:
    norms = [BranchNorms(1.0, 1.0, pressure=4e-3), BranchNorms(9.0, 9.0, pressure=1e-3)]  # raw norms do not matter
    pressed, quiet = PressureRule(temperature=0.5, ema=0.0).update([0.5, 0.5], norms)
    # log-pressures differ by log 4, mean in between: λ = σ(±log 2 / 0.5) = σ(±log 4) = 4/5 and 1/5.
    assert pressed == pytest.approx(0.8) and quiet == pytest.approx(0.2)
    protected, free = ProtectRule(temperature=0.5, ema=0.0).update([0.5, 0.5], norms)
    assert protected == pytest.approx(0.2) and free == pytest.approx(0.8)  # the mirror image
    smoothed = PressureRule(temperature=0.5, ema=0.9).update([0.5, 0.5], norms)
    assert smoothed[0] == pytest.approx(0.9 * 0.5 + 0.1 * 0.8)
    assert mixing_rule({"name": "protect", "temperature": 2.0}) == ProtectRule(temperature=2.0)
    with pytest.raises(ConfigError, match="temperature"):
        PressureRule(temperature=0.0)


def test_relative_pressure_is_the_formula_of_the_low_rank_gradient_by_hand() -> None:
    model = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2), rule=PressureRule(ema=0.5)))
    model(**random_batches(1)[0]).loss.backward()
    layers = hybrid_layers(model)
    gates = {name: float(layer.mix) for name, layer in layers.items()}
    records = update_mixing(model)
    for name, layer in layers.items():
        gradient = float(layer.lora_B.grad.double().norm())
        expected = (
            gradient
            * math.sqrt(layer.in_features)
            / (gates[name] * layer.lora_scaling * float(layer.lora_A.detach().double().norm()))
            / float(layer.base_weight.double().norm())
        )
        assert records[name]["pressure"] == pytest.approx(expected, rel=1e-9)
    logs = {name: math.log(r["pressure"]) for name, r in records.items()}
    mean = sum(logs.values()) / len(logs)
    for name, record in records.items():  # λ ← 0.5 λ0 + 0.5 σ(log p − mean log p)
        assert record["lambda"] == pytest.approx(0.25 + 0.5 / (1 + math.exp(-(logs[name] - mean))), rel=1e-9)


def test_relative_pressure_estimates_the_weight_gradient_through_the_random_start_of_a() -> None:
    """‖∇B‖·√in / (g·s·‖A‖) ≈ ‖∇W‖ at the start (B = 0, A random): against the weight's own gradient."""
    torch.manual_seed(0)
    base = nn.Linear(128, 96)
    reference = nn.Linear(128, 96)
    reference.load_state_dict(base.state_dict())
    wrapper = nn.Sequential(base)
    attach(wrapper, HybridConfig(targets=["0"], low_rank=LoRAConfig(rank=32, alpha=32), rule=PressureRule()))
    x, target = torch.randn(512, 128), torch.randn(512, 96)
    nn.functional.mse_loss(wrapper(x), target).backward()
    nn.functional.mse_loss(reference(x), target).backward()
    (record,) = update_mixing(wrapper).values()
    layer = hybrid_layers(wrapper)["0"]
    estimated = record["pressure"] * float(layer.base_weight.norm())
    assert estimated == pytest.approx(float(reference.weight.grad.norm()), rel=0.25)


def spectrum_model() -> nn.Module:
    model = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAGAConfig(rank=2), rule=SpectrumRule()))
    lora_ga_initialise(model, random_batches())
    return model


def test_spectrum_sets_lambda_at_the_start_to_the_top_r_energy_share_of_the_gradient_and_holds_it() -> None:
    model = spectrum_model()
    plain = MODEL_FACTORIES["llama"]()  # the same weights: the gradient LoRA-GA's exact estimate sums
    for batch in random_batches():
        plain(**batch).loss.backward()
    shares = []
    for name, layer in hybrid_layers(model).items():
        gradient = plain.get_submodule(name).weight.grad.double()
        singular = torch.linalg.svdvals(gradient)
        share = float(singular[:2].pow(2).sum() / singular.pow(2).sum())
        shares.append(share)
        assert float(layer.mix) == pytest.approx(min(max(share, 0.05), 0.95), abs=1e-4)
    assert max(shares) - min(shares) > 0.05, "the layers' gradients differ in how low-rank they are"
    assert after_backward_hooks(model) == []  # held: no per-step work
    before = {name: float(layer.mix) for name, layer in hybrid_layers(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in random_batches(2, seed=4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {name: float(layer.mix) for name, layer in hybrid_layers(model).items()} == before


def test_spectrum_needs_the_gradient_estimate_of_a_lora_ga_start() -> None:
    with pytest.raises(ConfigError, match="spectrum.*LoRAGAConfig"):
        HybridConfig(low_rank=LoRAConfig(rank=2), rule=SpectrumRule())
    assert HybridConfig.from_dict({"low_rank": "lora-ga", "rule": "spectrum"}).rule == SpectrumRule()


def _trained_default_hybrid(steps: int, *, explicit: bool, accumulate: int = 1) -> nn.Module:
    """The default hybrid after ``steps`` AdamW steps of a plain loop, with or without ``update_mixing`` calls."""
    torch.manual_seed(0)
    model = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2)))
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2))
    batches = iter(random_batches(steps * accumulate, seed=5))
    for _ in range(steps):
        for _ in range(accumulate):
            model(**next(batches)).loss.backward()
        if explicit:
            update_mixing(model)
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_the_default_rule_runs_once_per_optimiser_step_in_any_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain loop that never calls update_mixing gets the rule from the optimiser-step hook, exactly as a loop that
    calls it (the hook then leaves the step alone: no second update of λ)."""
    by_hook = _trained_default_hybrid(3, explicit=False)
    by_call = _trained_default_hybrid(3, explicit=True)
    mixes = {name: float(layer.mix) for name, layer in hybrid_layers(by_hook).items()}
    assert len(set(mixes.values())) > 1 and all(m != 0.5 for m in mixes.values()), "λ moved, per layer"
    assert mixes == {name: float(layer.mix) for name, layer in hybrid_layers(by_call).items()}
    torch.testing.assert_close(dict(by_hook.named_parameters()), dict(by_call.named_parameters()), atol=0, rtol=0)
    torch.save(by_hook, io.BytesIO())  # nothing unpicklable was set on the model or its parameters

    calls = []
    real = mixing.mixing_step
    monkeypatch.setattr(mixing, "mixing_step", lambda layers, **kw: calls.append(len(layers)) or real(layers, **kw))
    _trained_default_hybrid(2, explicit=False, accumulate=3)  # three backward passes per step: one update per step
    assert len(calls) == 2
    plain = nn.Linear(4, 4)
    other = torch.optim.SGD(plain.parameters(), lr=0.1)  # an optimiser holding no hybrid parameter: not touched
    plain(torch.randn(2, 4)).sum().backward()
    other.step()
    fixed = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2), rule=None))
    optimizer = torch.optim.AdamW(parameter_groups(fixed, 1e-2))
    fixed(**random_batches(1)[0]).loss.backward()
    optimizer.step()  # the fixed hybrid has no rule to run
    assert len(calls) == 2


def test_a_loop_the_step_hook_cannot_see_is_warned_once() -> None:
    """A loop that updates the weights by hand (as under FSDP2, whose parameters the hook does not know) never runs
    the rule: after UNMIXED_FORWARDS training forward passes one warning says so and how to fix it."""
    model = attach(MODEL_FACTORIES["llama"](), HybridConfig(low_rank=LoRAConfig(rank=2))).train()
    batch = random_batches(1)[0]
    with pytest.warns(UserWarning, match=r"mixing rule \(protect\) has not run in 64 .*update_mixing\(model\)") as seen:
        for _ in range(mixing.UNMIXED_FORWARDS + 10):
            model(**batch)
    assert len([w for w in seen if "mixing rule" in str(w.message)]) == 1
    model(**batch).loss.backward()
    update_mixing(model)  # the rule ran: the count starts again
    assert all(layer.forwards_since_mix == 0 for layer in hybrid_layers(model).values())
