"""Export for other tools: a merged checkpoint plain ``transformers`` loads (every method), and PEFT's adapter
formats for the methods PEFT can express (LoRA and LoRA-GA as LoRA, BOFT as BOFT)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hybrid_peft.adapters import _parent_and_child, adapter_layers, layers_by_class
from hybrid_peft.errors import HybridPeftError
from hybrid_peft.fileio import atomic_write_text, atomic_write_with
from hybrid_peft.layer import linear_weight, quantisation_of

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def clear_quantization_state(model: nn.Module) -> None:
    """Forget a GGUF quantizer left by ``from_pretrained(gguf_file=...)``: the weights are already dequantized,
    and ``save_pretrained`` would otherwise write a checkpoint that claims to be quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        model.hf_quantizer = None
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        model.is_quantized = False


@contextlib.contextmanager
def _dequantised_identity(model: nn.Module) -> Iterator[None]:
    """Inside, the model does not claim to be quantised (its quantised layers were replaced by plain ones)."""
    saved = {name: getattr(model, name, None) for name in ("hf_quantizer", "is_quantized")}
    config = getattr(model, "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    model.hf_quantizer, model.is_quantized = None, False
    if quantization_config is not None:
        del config.quantization_config
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(model, name, value)
        if quantization_config is not None:
            config.quantization_config = quantization_config


@contextlib.contextmanager
def merged_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily merge every adapter and put the plain base modules back, so the model looks exactly like a
    merged ``transformers`` model; on exit the adapters return, unmerged if they were unmerged before."""
    layers = adapter_layers(model)
    was_merged = {name: layer.merged for name, layer in layers.items()}
    # A quantised base cannot hold merged weights: every quantised linear (adapted or not) is replaced by a plain
    # one holding its dequantised (merged) weight, so the whole model is written dequantised.
    quantised = {
        name: module
        for name, module in model.named_modules()
        if quantisation_of(module) and name not in layers and name.rpartition(".")[0] not in layers  # not wrapped
    }
    replaced: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        if layer.quantised:
            replaced[name] = _plain_linear(layer.merged_weight(), layer.base_layer)
        else:
            layer.merge()
    for name, module in quantised.items():
        replaced[name] = _plain_linear(linear_weight(module), module)
    originals = {}
    for name in [*layers, *quantised]:
        parent, child = _parent_and_child(model, name)
        originals[name] = getattr(parent, child)
        setattr(parent, child, replaced.get(name, layers[name].base_layer if name in layers else None))
    try:
        yield model
    finally:
        for name, original in originals.items():
            parent, child = _parent_and_child(model, name)
            setattr(parent, child, original)
        for name, layer in layers.items():
            if not was_merged[name] and not layer.quantised:
                layer.unmerge()


def _plain_linear(weight: torch.Tensor, like: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (``(out, in)``) and ``like``'s bias: a quantised layer, dequantised."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=like.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if like.bias is not None:
            linear.bias.copy_(like.bias.float())
    return linear.requires_grad_(False)


def save_merged(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` with every adapter merged in as an ordinary ``save_pretrained`` checkpoint.

    The result loads with ``AutoModel*.from_pretrained(directory)`` and no hybrid-peft installed. The model in
    memory keeps its adapters (merged only for the duration of the save). Files go to a temporary sibling folder
    first and are moved into place at the end, so an interrupted export leaves no half-written checkpoint.
    """
    if not hasattr(model, "save_pretrained"):
        raise HybridPeftError(f"{type(model).__name__} has no save_pretrained; save_merged needs a transformers model")
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    clear_quantization_state(model)
    quantised = any(quantisation_of(m) for m in model.modules())
    with merged_view(model), _dequantised_identity(model) if quantised else contextlib.nullcontext():
        model.save_pretrained(staging)
    if quantised:
        warnings.warn(
            f"the base model is quantised, so {directory} holds the merged model dequantised (fp32 weights): a "
            "quantised base cannot hold merged weights; quantise it again when loading if you want it small",
            stacklevel=2,
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        backup = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(directory, backup)
        os.replace(staging, directory)
        shutil.rmtree(backup)
    else:
        os.replace(staging, directory)
    return directory


def peft_export(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT's tensors and config for ``model``'s adapters, from the layer class's ``peft_export`` hook (LoRA and
    LoRA-GA as LoRA, BOFT as BOFT)."""
    groups = layers_by_class(model)
    if not groups:
        raise HybridPeftError("the model has no adapters attached; nothing to export")
    exports = {cls: cls.peft_export(model, layers) for cls, layers in groups.items()}
    inexpressible = sorted(cls.__name__ for cls, export in exports.items() if export is None)
    if inexpressible:
        raise HybridPeftError(
            f"PEFT has no adapter format for {', '.join(inexpressible)} (PEFT exports cover LoRA, LoRA-GA and "
            "BOFT). For these methods the merged checkpoint is the export: save_merged(model, folder) (or "
            "hybrid-peft train --merge) writes a plain transformers model that from_pretrained loads without "
            "hybrid-peft"
        )
    if len(exports) > 1:
        kinds = sorted(cls.__name__ for cls in exports)
        raise HybridPeftError(f"PEFT export takes one kind of adapter per model; this model mixes {kinds}")
    return next(iter(exports.values()))


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s adapter in PEFT's format (LoRA/LoRA-GA as LoRA, BOFT as BOFT):
    ``PeftModel.from_pretrained(base, directory)`` loads it and computes the same function."""
    tensors, peft_config = peft_export(model)
    directory = Path(directory)
    atomic_write_with(
        directory / PEFT_WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    atomic_write_text(directory / PEFT_CONFIG_NAME, json.dumps(peft_config, indent=2) + "\n")
    return directory
