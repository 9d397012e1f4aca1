"""Retention: what training made the model forget, as the rise of its loss on general text that is not its task.

Before and after training the recipe scores the model as a causal language model on ``retention_examples`` passages
(mean negative log-likelihood per token, the measure PEFT's ``method_comparison`` calls forgetting). The text:

- ``retention_data: auto`` (the default): FLORES-200's English devtest from the data folder, for every task but
  FLORES itself (whose evaluation holds those sentences); else English prose that every Python installation carries
  (the documentation topics of ``pydoc_data``), so a machine without the data folder measures it too;
- a path: a text file (one passage per non-empty line) or JSON lines with a ``text`` field;
- ``none``: not measured.

A causal LM is scored directly. A sequence classifier over a decoder whose output embedding is tied to its input
embedding (SmolLM2's) is scored through its backbone and that tied head, which training does not touch, so the
measure sees what the adapters changed in the backbone. An encoder (MiniLM) has no such head: not measured (None).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_peft.errors import ConfigError
from hybrid_peft.tasks.data import default_data_dir, read_text

AUTO, NONE = "auto", "none"
FLORES_ENGLISH = Path("flores") / "devtest" / "eng_Latn.devtest"


def retention_texts(option: str | None, task: str, data_dir: str | None, count: int) -> tuple[list[str], str] | None:
    """``(passages, where they come from)`` for the option, or None when retention is not measured."""
    if option in (None, "", NONE) or count == 0:
        return None
    if option == AUTO:
        base = Path(data_dir) if data_dir else default_data_dir()
        if task != "flores" and base is not None and (base / FLORES_ENGLISH).is_file():
            path = base / FLORES_ENGLISH
            return _lines(read_text(path, "retention data"))[:count], "FLORES-200 English devtest"
        return _python_docs()[:count], "Python's documentation topics (pydoc_data)"
    path = Path(option)
    if not path.is_file():
        raise ConfigError(f"retention_data: {option!r} is not a file; give a text file, 'auto' or 'none'")
    text = read_text(path, "retention data")
    if path.suffix == ".jsonl":
        passages = [json.loads(line).get("text", "") for line in text.splitlines() if line.strip()]
    else:
        passages = _lines(text)
    passages = [p for p in passages if p.strip()]
    if not passages:
        raise ConfigError(f"retention_data: {path} holds no text")
    return passages[:count], path.name


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _python_docs() -> list[str]:
    """Paragraphs of prose (no code, 200–1000 characters) from Python's documentation topics, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation
        return []
    paragraphs = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            flat = " ".join(paragraph.split())
            if 200 <= len(flat) <= 1000 and not paragraph.startswith((" ", "\t")) and ">>>" not in flat:
                paragraphs.append(flat)
    return paragraphs


def _language_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """``(backbone, tied output embedding)`` of a sequence classifier over a decoder with tied embeddings."""
    config = getattr(model, "config", None)
    backbone = getattr(model, "base_model", None)
    if config is None or backbone is None or backbone is model or not getattr(config, "tie_word_embeddings", False):
        return None
    if not _decoder_only(config):
        return None
    embeddings = backbone.get_input_embeddings()
    return (backbone, embeddings.weight) if embeddings is not None else None


def _decoder_only(config: Any) -> bool:
    """A decoder-only architecture (Llama, GPT-2, ...): it has a causal-LM class and no masked-LM one (BERT has
    both). Read from the model type, not ``config.architectures``, which saving a classifier rewrites."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _transformers_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside PEFT's wrappers (``PeftModel``, ``PeftMixedModel`` and their tuners)."""
    for _ in range(4):
        if not type(model).__module__.startswith("peft."):
            break
        # the wrapper's own child (attribute lookups forward to the wrapped model, so they cannot tell)
        inner = model._modules.get("base_model") or model._modules.get("model")
        if inner is None:
            break
        model = inner
    return model


CHUNK_TOKENS = 256  # the vocabulary's logits for this many tokens at a time (SmolLM2: 50 MB), never for a batch


def _scoring_parts(model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None] | None:
    """``(backbone, head weight, head bias)``: a causal LM's base model and output embedding, or a decoder
    classifier's backbone and tied input embedding; None when the model cannot be scored as a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    if head is not None and backbone is not None and backbone is not model:
        return backbone, head.weight, getattr(head, "bias", None)
    tied = _language_head(model)
    return None if tied is None else (tied[0], tied[1], None)


@torch.no_grad()
def retention_loss(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int,
    batch_size: int,
    per_example: dict[str, list[float]] | None = None,
) -> float | None:
    """Mean NLL per token of ``model`` as a causal LM on ``texts``; None when the model cannot be scored so. The
    logits are formed a few hundred tokens at a time, so scoring adds little to the run's peak memory. With
    ``per_example``, each text's mean NLL per token goes to ``per_example["retention_loss"]`` and its number of
    scored tokens to ``per_example["retention_tokens"]`` (the token-weighted mean of the texts is the result)."""
    model = _transformers_model(model)
    parts = _scoring_parts(model)
    if not texts or parts is None:
        return None
    backbone, weight, bias = parts
    was_training, padding_side = model.training, getattr(tokenizer, "padding_side", "right")
    model.eval()
    tokenizer.padding_side = "right"  # positions count from the first token
    total, tokens = 0.0, 0
    text_sums, text_tokens = torch.zeros(len(texts), dtype=torch.float64), torch.zeros(len(texts), dtype=torch.int64)
    try:
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            device = next(model.parameters()).device
            ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
            output = backbone(input_ids=ids, attention_mask=mask)
            if not hasattr(output, "last_hidden_state"):  # a wrapper this module does not know: not measured
                return None
            hidden = output.last_hidden_state[:, :-1]
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            keep = targets != -100
            text_of_token = start + keep.nonzero()[:, 0].cpu()  # each scored token's text
            hidden, targets = hidden[keep], targets[keep]  # (tokens, d): padding never reaches the head
            for chunk in range(0, len(targets), CHUNK_TOKENS):
                piece = hidden[chunk : chunk + CHUNK_TOKENS].to(weight.dtype)
                logits = F.linear(piece, weight, bias).float()
                if per_example is None:
                    total += float(F.cross_entropy(logits, targets[chunk : chunk + CHUNK_TOKENS], reduction="sum"))
                    continue
                losses = F.cross_entropy(logits, targets[chunk : chunk + CHUNK_TOKENS], reduction="none")
                total += float(losses.sum())
                text_sums.index_add_(0, text_of_token[chunk : chunk + CHUNK_TOKENS], losses.detach().cpu().double())
            tokens += len(targets)
            text_tokens.index_add_(0, text_of_token, torch.ones_like(text_of_token))
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    if per_example is not None and tokens:
        per_example["retention_loss"] = (text_sums / text_tokens.clamp(min=1)).tolist()
        per_example["retention_tokens"] = text_tokens.double().tolist()
    return total / tokens if tokens else None
