"""``hybrid-peft estimate``: parameter counts agree with real models and adapters; sharding and quantisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_peft import BOFTConfig, HybridConfig, LoRAConfig, LoRAGAConfig, UnitaryConfig, attach
from hybrid_peft.adapters import parameter_counts
from hybrid_peft.cli import main
from hybrid_peft.errors import ConfigError
from hybrid_peft.estimate import estimate, load_architecture

from conftest import tiny_bert_classifier, tiny_llama

CONFIGS = {
    "lora": lambda: LoRAConfig(rank=4, alpha=8),
    "lora-ga": lambda: LoRAGAConfig(rank=4, alpha=8),
    "boft": lambda: BOFTConfig(block_size=4, butterfly_factors=2),
    "unitary": lambda: UnitaryConfig(),
    "hybrid": lambda: HybridConfig(rank=4, alpha=8, block_size=4, butterfly_factors=2),
}


def architecture_of(model, tmp_path: Path):  # noqa: ANN001, ANN201
    path = tmp_path / "config.json"
    path.write_text(model.config.to_json_string())
    return load_architecture(str(path))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert_classifier], ids=["llama", "bert"])
@pytest.mark.parametrize("method", ["full", *CONFIGS])
def test_parameter_counts_match_real_models(factory, method: str, tmp_path: Path) -> None:  # noqa: ANN001
    model = factory()
    arch = architecture_of(model, tmp_path)
    assert arch.parameters() == sum(p.numel() for p in model.parameters())
    if method == "unitary" and not arch.decoder:
        pytest.skip("the unitary default targets are a decoder's attention projections")
    if method != "full":
        attach(model, CONFIGS[method]())
    trainable, _ = parameter_counts(model)
    guess = estimate(arch, method, rank=4, block_size=4, butterfly_factors=2, dtype="float32")
    assert guess.trainable == trainable


def test_memory_parts_follow_the_options() -> None:
    arch = load_architecture("70b")
    assert 68e9 < arch.parameters() < 70e9  # Llama-2-70B has 68.98 B parameters
    assert 400e9 < load_architecture("405b").parameters() < 410e9
    full = estimate(arch, "full", dtype="bfloat16")
    assert full.weights == arch.parameters() * 2 and full.gradients == arch.parameters() * 2
    assert full.optimiser == arch.parameters() * 12  # AdamW m, v and an fp32 master copy
    sharded = estimate(arch, "full", dtype="bfloat16", zero=3, world=8)
    assert sharded.optimiser == full.optimiser / 8 and sharded.weights == full.weights / 8
    assert estimate(arch, "full", zero=1, world=8).gradients == full.gradients
    lora = estimate(arch, "lora")
    assert lora.total < 0.5 * full.total and lora.flops < full.flops
    quantised = estimate(arch, "lora", quantised_base=4)
    assert quantised.weights < 0.3 * lora.weights
    longer = estimate(arch, "lora", seq_len=1024)
    assert longer.activations == pytest.approx(2 * lora.activations)
    with pytest.raises(ConfigError, match="cannot be fully fine-tuned"):
        estimate(arch, "full", quantised_base=4)
    with pytest.raises(ConfigError, match="unknown method"):
        estimate(arch, "dora")


def test_bad_configs_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="lacks"):
        load_architecture(str(bad))
    assert main(["estimate", "--model", "7b", "--methods", "full,lora", "--zero", "2", "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "| lora |" in out and "ZeRO 2 over 4" in out
