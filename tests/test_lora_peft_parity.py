"""Numeric parity with PEFT 0.21's LoRA: same A, B -> same outputs; our PEFT export loads in PEFT unchanged."""

from __future__ import annotations

import pytest
import torch

from hybrid_peft import LoRAConfig, attach, export_peft
from hybrid_peft.adapters import adapter_layers

from conftest import MODEL_FACTORIES, model_output
from method_cases import perturb_adapters

peft = pytest.importorskip("peft")

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value", "dense"],
}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_weights_same_outputs_as_peft(model_kind: str, use_rslora: bool, input_ids: torch.Tensor) -> None:
    targets = TARGETS[model_kind]
    ours = attach(MODEL_FACTORIES[model_kind](), LoRAConfig(rank=4, alpha=8.0, use_rslora=use_rslora, targets=targets))
    perturb_adapters(ours, seed=3)

    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8.0, use_rslora=use_rslora, target_modules=targets, fan_in_fan_out=model_kind == "gpt2"
    )
    reference = peft.get_peft_model(MODEL_FACTORIES[model_kind](), peft_config)
    reference_modules = dict(reference.base_model.model.named_modules())
    layers = adapter_layers(ours)
    assert len(layers) == sum(1 for m in reference_modules.values() if isinstance(m, peft.tuners.lora.LoraLayer))
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = reference_modules[name]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    reference.eval()
    torch.testing.assert_close(
        model_output(ours.eval(), input_ids), model_output(reference, input_ids), atol=1e-6, rtol=0
    )


def test_peft_loads_our_export(model_kind: str, input_ids: torch.Tensor, tmp_path) -> None:  # noqa: ANN001
    ours = attach(MODEL_FACTORIES[model_kind](), LoRAConfig(rank=4, alpha=16.0, targets="all-linear")).eval()
    perturb_adapters(ours, seed=5)
    export_peft(ours, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODEL_FACTORIES[model_kind](), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(ours, input_ids), atol=1e-6, rtol=0)
