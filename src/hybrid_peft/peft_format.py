"""What every PEFT adapter file shares; each method that PEFT can express writes its own part in its layer's
``peft_export`` hook (``methods/lora.py``, ``methods/boft.py``), which ``export_peft`` calls."""

from __future__ import annotations

from typing import Any

from torch import nn

from hybrid_peft.errors import HybridPeftError
from hybrid_peft.layer import is_transposed
from hybrid_peft.serialization import model_name


def one_config(layers: dict[str, nn.Module], kind: str) -> Any:
    """The one config all ``layers`` share (PEFT's format has one per adapter)."""
    configs = {layer.config for layer in layers.values()}
    if len(configs) != 1:
        raise HybridPeftError(f"PEFT export needs one {kind} config for all layers; this model mixes several")
    return configs.pop()


def peft_adapter_config(
    model: nn.Module, layers: dict[str, nn.Module], peft_type: str, **fields: Any
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``layers`` with the method's own ``fields``."""
    return {
        "peft_type": peft_type,
        "task_type": None,
        "base_model_name_or_path": model_name(model),
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(is_transposed(layer.base_layer) for layer in layers.values()),
        "bias": "none",
        "inference_mode": True,
        "modules_to_save": None,
        **fields,
    }
