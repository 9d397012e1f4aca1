"""Bad input gets an error that names the problem and the fix; nothing is half-done afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_peft import HybridPeftError, LoRAConfig, attach, load_adapter, save_adapter
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.errors import AdapterFileError, BaseModelMismatchError, ConfigError, TargetError
from hybrid_peft.serialization import CONFIG_NAME, WEIGHTS_NAME

from conftest import model_output, tiny_gpt2, tiny_llama
from method_cases import perturb_adapters


def saved_adapter(tmp_path) -> str:  # noqa: ANN001
    model = attach(tiny_llama(), LoRAConfig(rank=4))
    perturb_adapters(model)
    return str(save_adapter(model, tmp_path / "adapter"))


def test_unknown_target_lists_candidates() -> None:
    with pytest.raises(TargetError, match=r"unknown target module name\(s\) \['qproj'\].*q_proj.*v_proj"):
        attach(tiny_llama(), LoRAConfig(targets=["qproj"]))


def test_regex_matching_nothing_explains() -> None:
    with pytest.raises(TargetError, match="matched no linear layer.*full module name"):
        attach(tiny_llama(), LoRAConfig(targets="q_proj"))  # a regex must match the whole name


def test_target_that_is_not_linear() -> None:
    with pytest.raises(TargetError, match="not nn.Linear/Conv1D"):
        attach(tiny_llama(), LoRAConfig(targets=["input_layernorm"]))


def test_everything_excluded() -> None:
    with pytest.raises(TargetError, match="excluded"):
        attach(tiny_llama(), LoRAConfig(targets=["q_proj"], exclude=["q_proj"]))


def test_attach_twice_to_same_modules() -> None:
    model = attach(tiny_llama(), LoRAConfig(targets=["q_proj"]))
    with pytest.raises(TargetError):
        attach(model, LoRAConfig(targets=["q_proj"]))
    attach(model, LoRAConfig(targets=["v_proj"]))  # disjoint modules are fine
    assert len(adapter_layers(model)) == 4


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_must_be_positive(rank: int) -> None:
    with pytest.raises(ConfigError, match="rank: must be >= 1"):
        LoRAConfig(rank=rank)


def test_adapter_for_another_model(tmp_path) -> None:  # noqa: ANN001
    directory = saved_adapter(tmp_path)
    with pytest.raises(BaseModelMismatchError, match="different weight values|trained on"):
        load_adapter(tiny_llama(seed=1), directory)  # same architecture, other weights
    with pytest.raises(BaseModelMismatchError, match="has no linear layer named"):
        load_adapter(tiny_gpt2(), directory)  # other architecture
    other = tiny_llama(seed=1)
    load_adapter(other, directory, check_base=False)  # the user can insist
    assert adapter_layers(other)


def test_same_model_in_bf16_is_accepted(tmp_path, input_ids: torch.Tensor) -> None:  # noqa: ANN001
    directory = saved_adapter(tmp_path)
    reference = model_output(load_adapter(tiny_llama().eval(), directory), input_ids)
    model = load_adapter(tiny_llama().to(torch.bfloat16).eval(), directory)
    assert adapter_layers(model), "the adapter was not attached"
    torch.testing.assert_close(model_output(model, input_ids).float(), reference, atol=0.1, rtol=0.05)


def test_truncated_weights_file(tmp_path) -> None:  # noqa: ANN001
    directory = saved_adapter(tmp_path)
    weights = tmp_path / "adapter" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match="truncated, corrupt"):
        load_adapter(model, directory)
    assert not adapter_layers(model), "a failed load must leave the model untouched"


def test_truncated_file_with_matching_checksum_still_caught(tmp_path) -> None:  # noqa: ANN001
    directory = saved_adapter(tmp_path)
    weights = tmp_path / "adapter" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:50])
    config_path = tmp_path / "adapter" / CONFIG_NAME
    document = json.loads(config_path.read_text())
    from hybrid_peft.fileio import sha256_file

    document["weights_sha256"] = sha256_file(weights)
    config_path.write_text(json.dumps(document))
    with pytest.raises(AdapterFileError, match="could not be read as safetensors"):
        load_adapter(tiny_llama(), directory)


def test_corrupt_or_missing_config(tmp_path) -> None:  # noqa: ANN001
    directory = saved_adapter(tmp_path)
    config_path = tmp_path / "adapter" / CONFIG_NAME
    config_path.write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(tiny_llama(), directory)
    config_path.unlink()
    with pytest.raises(AdapterFileError, match="missing"):
        load_adapter(tiny_llama(), directory)
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_peft_directory_is_recognised(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterFileError, match="PEFT adapter"):
        load_adapter(tiny_llama(), tmp_path)


def test_loading_onto_a_model_with_adapters(tmp_path) -> None:  # noqa: ANN001
    directory = saved_adapter(tmp_path)
    model = attach(tiny_llama(), LoRAConfig())
    with pytest.raises(HybridPeftError, match="detach"):
        load_adapter(model, directory)


def test_save_without_adapters(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(HybridPeftError, match="no adapters"):
        save_adapter(tiny_llama(), tmp_path)


def test_saving_again_overwrites_atomically(tmp_path, input_ids: torch.Tensor) -> None:  # noqa: ANN001
    model = attach(tiny_llama(), LoRAConfig(rank=4)).eval()
    save_adapter(model, tmp_path / "adapter")
    perturb_adapters(model, seed=9)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files
    fresh = load_adapter(tiny_llama().eval(), tmp_path / "adapter")
    torch.testing.assert_close(model_output(fresh, input_ids), model_output(model, input_ids), atol=1e-6, rtol=0)


def test_trained_head_is_saved_and_loaded_with_the_adapter(tmp_path) -> None:  # noqa: ANN001
    from conftest import tiny_bert_classifier

    model = attach(tiny_bert_classifier(), LoRAConfig(rank=2)).eval()
    for p in model.classifier.parameters():  # a new head trains fully (PEFT's modules_to_save)
        p.requires_grad_(True)
    perturb_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    ids = torch.randint(0, 97, (2, 9))
    expected = model_output(model, ids)
    save_adapter(model, tmp_path / "adapter")
    document = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert document["trained_base_parameters"] == ["classifier.weight", "classifier.bias"]
    fresh = load_adapter(tiny_bert_classifier().eval(), tmp_path / "adapter")
    torch.testing.assert_close(model_output(fresh, ids), expected, atol=1e-6, rtol=0)


def test_a_weight_past_two_to_the_24_elements_attaches_and_keeps_its_fingerprint(tmp_path) -> None:  # noqa: ANN001
    """Llama-3.2-3B's MLP weights (3072 × 8192 = 25,165,824 values): float32 linspace put the fingerprint's last sample
    one past the end. Every index stays in range, the last is the last value, and the sampled positions of smaller
    weights (what saved adapters recorded) are unchanged."""
    from hybrid_peft.adapters import fingerprint_weight

    weight = torch.zeros(3072, 8192)
    weight[-1, -1] = 7.0  # the last value
    sample = fingerprint_weight(weight)["sample"]
    assert len(sample) == 16 and sample[-1] == 7.0 and sample[:-1] == [0.0] * 15
    small = torch.arange(64 * 32, dtype=torch.float64).reshape(64, 32)
    expected = torch.linspace(0, 64 * 32 - 1, steps=16).round().tolist()
    assert fingerprint_weight(small)["sample"] == expected
    model = torch.nn.Sequential(torch.nn.Linear(8192, 3072, bias=False))
    attach(model, LoRAConfig(rank=2, targets=["0"]))
    save_adapter(model, tmp_path / "adapter")
    fresh = torch.nn.Sequential(torch.nn.Linear(8192, 3072, bias=False))
    fresh.load_state_dict({"0.weight": model[0].base_layer.weight.detach()})
    load_adapter(fresh, tmp_path / "adapter")  # the fingerprints agree
