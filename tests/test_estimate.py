"""``hybrid-peft estimate``: parameter counts agree with real models and adapters; sharding and quantisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybrid_peft import HybridConfig, LoRAConfig, LoRAGAConfig, attach
from hybrid_peft.adapters import parameter_counts
from hybrid_peft.cli import main
from hybrid_peft.errors import ConfigError
from hybrid_peft.estimate import estimate, load_architecture, method_config
from hybrid_peft.registry import methods_in_registration_order

from conftest import tiny_bert_classifier, tiny_llama

# Every registered method, at the settings the estimates below are asked for.
CONFIGS = {
    method: (lambda method=method: method_config(method, rank=4, block_size=4, butterfly_factors=2))
    for method in methods_in_registration_order()
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
    if method != "full":
        attach(model, CONFIGS[method]())
    trainable, _ = parameter_counts(model)
    guess = estimate(arch, method, rank=4, block_size=4, butterfly_factors=2, dtype="float32")
    assert guess.trainable == trainable


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves in one training forward, parameters and buffers excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(saved.values())


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert_classifier], ids=["llama", "bert"])
@pytest.mark.parametrize("method", ["full", *CONFIGS])
def test_activations_match_what_autograd_saves(factory, method: str, tmp_path: Path) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    model = factory()
    arch = architecture_of(model, tmp_path)
    if method != "full":
        attach(model, CONFIGS[method]())
    batch_size, seq_len = 2, 32
    ids = torch.randint(5, arch.vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids if arch.decoder else torch.zeros(batch_size, dtype=torch.long)
    measured = saved_activation_bytes(model.train(), {"input_ids": ids, "labels": labels})
    # CPU attention: the fused kernel for the decoder (no dropout), the materialised scores for BERT (dropout).
    attention = "flash" if arch.decoder else "math"
    guess = estimate(arch, method, batch_size=batch_size, seq_len=seq_len, dtype="float32", rank=4, block_size=4,
                     butterfly_factors=2, attention=attention)  # fmt: skip
    # The estimate's logits term is the loss's peak (log-probabilities and two gradients); autograd saves one.
    saved_logits = batch_size * seq_len * arch.vocab * 4 if arch.decoder else 0
    logits = 3 * saved_logits
    assert guess.activations - logits + saved_logits == pytest.approx(measured, rel=0.12)


def test_memory_parts_follow_the_options() -> None:
    arch = load_architecture("70b")
    assert 68e9 < arch.parameters() < 70e9  # Llama-2-70B has 68.98 B parameters
    assert 400e9 < load_architecture("405b").parameters() < 410e9
    full = estimate(arch, "full", dtype="bfloat16")
    assert full.weights == arch.parameters() * 2 and full.gradients == arch.parameters() * 2
    assert full.optimiser == arch.parameters() * 4  # AdamW m, v in bf16, as torch keeps them for bf16 weights
    sharded = estimate(arch, "full", dtype="bfloat16", zero=3, world=8)
    assert sharded.optimiser == full.optimiser / 8 and sharded.weights == full.weights / 8
    assert estimate(arch, "full", zero=1, world=8).gradients == full.gradients
    lora = estimate(arch, "lora")
    assert lora.total < 0.5 * full.total and lora.flops < full.flops
    # Frozen weights skip the weight-gradient matmul (4·P instead of 6·P per token); the hybrid runs its low-rank
    # branch next to BOFT's rotation: at rank r with its default plain LoRA start, at rank 2r with a LoRA-GA start
    # and the update gate ([A; A0], [B, −B0]).

    frozen = full.flops * 4 / 6
    boft, hybrid = estimate(arch, "boft"), estimate(arch, "hybrid")
    assert hybrid.flops - boft.flops == pytest.approx(lora.flops - frozen)
    lora_ga_start = HybridConfig(low_rank=LoRAGAConfig(rank=8))
    assert lora_ga_start.low_rank_width == 16 and HybridConfig(low_rank=LoRAConfig(rank=8)).low_rank_width == 8
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


def test_the_built_in_llama_3_shapes_have_their_published_sizes() -> None:
    sizes = {name: load_architecture(name).parameters() for name in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")}
    assert sizes == {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}
