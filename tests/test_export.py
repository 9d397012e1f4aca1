"""A merged export is an ordinary transformers checkpoint; the model in memory keeps its adapters."""

from __future__ import annotations

import pytest
import torch
import transformers

from hybrid_peft import HybridPeftError, attach, export_peft, save_merged
from hybrid_peft.adapters import adapter_layers

from conftest import MODEL_FACTORIES, model_output
from method_cases import METHOD_CASES, perturb_adapters

AUTO_CLASSES = {
    "llama": transformers.AutoModelForCausalLM,
    "gpt2": transformers.AutoModelForCausalLM,
    "bert": transformers.AutoModelForSequenceClassification,
}


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_merged_export_loads_in_plain_transformers(model_kind: str, method: str, input_ids, tmp_path) -> None:  # noqa: ANN001
    model = attach(MODEL_FACTORIES[model_kind](), METHOD_CASES[method]).eval()
    perturb_adapters(model)
    expected = model_output(model, input_ids)
    save_merged(model, tmp_path / "merged")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging folders must be gone"

    # The model in memory is unchanged: adapters still attached and unmerged.
    layers = adapter_layers(model)
    assert layers and not any(layer.merged for layer in layers.values())
    torch.testing.assert_close(model_output(model, input_ids), expected, atol=1e-5, rtol=0)  # merge+unmerge rounding

    plain = AUTO_CLASSES[model_kind].from_pretrained(tmp_path / "merged").eval()
    assert not any("base_layer" in name or "lora" in name for name in plain.state_dict())
    torch.testing.assert_close(model_output(plain, input_ids), expected, atol=1e-5, rtol=0)

    save_merged(model, tmp_path / "merged")  # exporting again over an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_peft_export_refuses_mixed_configs(tmp_path) -> None:  # noqa: ANN001
    model = attach(MODEL_FACTORIES["llama"](), METHOD_CASES["lora"].replace(targets=["q_proj"]))
    attach(model, METHOD_CASES["lora"].replace(targets=["v_proj"], rank=2))
    with pytest.raises(HybridPeftError, match="one LoRA config"):
        export_peft(model, tmp_path)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_loads_our_boft_export_with_the_same_logits(kind: str, input_ids, tmp_path) -> None:  # noqa: ANN001
    """One butterfly factor: PEFT 0.21 on CPU builds every BOFT layer with one factor (more need its CUDA extension)."""
    import json

    import peft

    ours = attach(MODEL_FACTORIES[kind](), METHOD_CASES["boft-m1"]).eval()
    perturb_adapters(ours, seed=3)
    export_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_block_size"] == 4 and config["boft_n_butterfly_factor"] == 1
    loaded = peft.PeftModel.from_pretrained(MODEL_FACTORIES[kind](), tmp_path / "peft").eval()
    assert any(isinstance(m, peft.tuners.boft.BOFTLayer) for m in loaded.modules())
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(ours, input_ids), atol=1e-5, rtol=0)


def test_boft_export_with_two_factors_holds_peft_tensors_and_conv1d_is_refused(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    from hybrid_peft.methods.butterfly import skew_symmetric

    ours = attach(MODEL_FACTORIES["llama"](), METHOD_CASES["boft-m2"])
    perturb_adapters(ours, seed=3)
    export_peft(ours, tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for name, layer in adapter_layers(ours).items():
        boft_r = tensors[f"base_model.model.{name}.boft_R"]
        assert boft_r.shape == (2, layer.block_num, 4, 4)  # PEFT's (m, N, b, b)
        torch.testing.assert_close(boft_r, skew_symmetric(layer.boft_skew.detach(), 4))
        torch.testing.assert_close(tensors[f"base_model.model.{name}.boft_s"], layer.boft_scale.detach()[:, None])
    gpt2 = attach(MODEL_FACTORIES["gpt2"](), METHOD_CASES["boft-m1"])
    with pytest.raises(HybridPeftError, match=r"nn.Linear layers only.*save_merged"):
        export_peft(gpt2, tmp_path / "gpt2")


@pytest.mark.parametrize("method", ["unitary", "hybrid-share"])
def test_peft_export_of_methods_peft_cannot_express_points_to_the_merged_checkpoint(method: str, tmp_path) -> None:  # noqa: ANN001
    model = attach(MODEL_FACTORIES["llama"](), METHOD_CASES[method])
    with pytest.raises(HybridPeftError, match=r"PEFT has no adapter format for (Unitary|Hybrid)Layer.*save_merged"):
        export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_peft_export_refuses_lora_beside_boft(tmp_path) -> None:  # noqa: ANN001
    model = attach(MODEL_FACTORIES["llama"](), METHOD_CASES["lora"].replace(targets=["q_proj"]))
    attach(model, METHOD_CASES["boft-m1"].replace(targets=["v_proj"]))
    with pytest.raises(HybridPeftError, match="one kind of adapter"):
        export_peft(model, tmp_path)
