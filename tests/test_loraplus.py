"""LoRA+ (``loraplus_lr_ratio``): B at a multiple of A's rate, in LoRA, LoRA-GA and the hybrid's low-rank part; the
same training as PEFT's ``create_loraplus_optimizer``."""

from __future__ import annotations

import pytest
import torch

from hybrid_peft import HybridConfig, LoRAConfig, attach, load_adapter, parameter_groups, save_adapter
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.errors import ConfigError
from hybrid_peft.methods.lora_ga import LoRAGAConfig

from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _rates(model: torch.nn.Module, learning_rate: float) -> dict[str, float]:
    """Each trainable parameter's local name -> its group's rate (one rate per local name, checked)."""
    rate_of = {id(p): group["lr"] for group in parameter_groups(model, learning_rate) for p in group["params"]}
    rates: dict[str, set[float]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            rates.setdefault(name.rsplit(".", 1)[-1], set()).add(rate_of[id(parameter)])
    assert all(len(values) == 1 for values in rates.values()), rates
    return {name: values.pop() for name, values in rates.items()}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LoRAConfig(targets=TARGETS), {"lora_A": 1e-3, "lora_B": 1e-3}),
        (LoRAConfig(loraplus_lr_ratio=16, targets=TARGETS), {"lora_A": 1e-3, "lora_B": 16e-3}),
        (LoRAConfig(loraplus_lr_ratio=16, lr_scale=0.5, targets=TARGETS), {"lora_A": 5e-4, "lora_B": 8e-3}),
        (LoRAGAConfig(loraplus_lr_ratio=4, targets=TARGETS), {"lora_A": 1e-3, "lora_B": 4e-3}),
        (
            HybridConfig(low_rank=LoRAConfig(loraplus_lr_ratio=16), targets=TARGETS),
            {"lora_A": 1e-3, "lora_B": 16e-3, "boft_skew": 3e-4, "boft_scale": 3e-4},
        ),
    ],
    ids=["lora", "lora+", "lora+-scaled", "lora-ga+", "hybrid-lora+"],
)
def test_b_trains_at_the_ratio_of_a_rate(config: object, expected: dict[str, float]) -> None:
    rates = _rates(attach(tiny_llama(), config), 1e-3)
    assert rates.keys() == expected.keys()
    for name, rate in expected.items():
        assert rates[name] == pytest.approx(rate)


def test_the_ratio_reaches_the_hybrid_from_a_dict_and_is_validated() -> None:
    """``--set loraplus_lr_ratio=16`` (bare: only the low-rank part has it) and the dotted form both set the part;
    a ratio that is not a positive number is refused with its name."""
    for data in ({"loraplus_lr_ratio": 16}, {"low_rank.loraplus_lr_ratio": 16}):
        assert HybridConfig.from_dict(data).low_rank.loraplus_lr_ratio == 16
    assert HybridConfig.from_dict(HybridConfig.from_dict({"loraplus_lr_ratio": 16}).to_dict()).low_rank == LoRAConfig(
        loraplus_lr_ratio=16
    )
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
            LoRAConfig(loraplus_lr_ratio=bad)


def test_the_ratio_is_saved_and_changes_no_output(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = attach(tiny_llama(), LoRAConfig(loraplus_lr_ratio=16, targets=TARGETS))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert next(iter(adapter_layers(loaded).values())).config.loraplus_lr_ratio == 16
    plain = attach(tiny_llama(), LoRAConfig(targets=TARGETS))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    torch.testing.assert_close(plain(ids).logits, model(ids).logits)


def test_same_training_as_peft_create_loraplus_optimizer() -> None:
    """Three AdamW steps with B at 16× A's rate: our LoRA and PEFT's LoRA under ``create_loraplus_optimizer`` start
    from the same A, B and end with the same A, B."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    ours = attach(tiny_llama(), LoRAConfig(rank=4, alpha=8.0, loraplus_lr_ratio=16, targets=TARGETS))
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=TARGETS))
    modules = dict(reference.base_model.model.named_modules())
    layers = adapter_layers(ours)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_B.normal_(0, 0.05, generator=generator)
            modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            modules[name].lora_B["default"].weight.copy_(layer.lora_B)
    start = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in layers.items()}
    ours_optimiser = torch.optim.AdamW(parameter_groups(ours, 1e-3), weight_decay=0.0)
    reference_optimiser = create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.0
    )
    for step in range(3):
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 + step))
        for model, optimiser in ((ours, ours_optimiser), (reference, reference_optimiser)):
            optimiser.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimiser.step()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_A, modules[name].lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B, modules[name].lora_B["default"].weight)
    # Adam moves each entry by about the rate per step: B's steps are about 16 times A's
    moved_a = max(float((layer.lora_A.detach() - start[name][0]).abs().max()) for name, layer in layers.items())
    moved_b = max(float((layer.lora_B.detach() - start[name][1]).abs().max()) for name, layer in layers.items())
    assert moved_b > 8 * moved_a > 0
