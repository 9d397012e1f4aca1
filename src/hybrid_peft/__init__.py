"""hybrid-peft: parameter-efficient fine-tuning on a small budget.

Attach LoRA, LoRA-GA, BOFT, the unitary adapter and the hybrid to any Hugging Face model by module name; train it in
any loop; save, load, merge and export it. The root holds what a user calls; the rest stays importable from its
module (``hybrid_peft.adapters``, ``hybrid_peft.methods``, ``hybrid_peft.errors``, ``hybrid_peft.registry``,
``hybrid_peft.run`` for the training recipe, ``hybrid_peft.bench``, ``hybrid_peft.estimate``).
"""

from __future__ import annotations

from hybrid_peft.adapters import attach, detach, merge, parameter_counts, parameter_groups, unmerge
from hybrid_peft.errors import HybridPeftError
from hybrid_peft.export import export_peft, save_merged
from hybrid_peft.methods import BOFTConfig, HybridConfig, LoRAConfig, LoRAGAConfig, UnitaryConfig
from hybrid_peft.methods.hybrid import update_mixing
from hybrid_peft.methods.lora_ga import lora_ga_initialise
from hybrid_peft.methods.mixing import PressureRule, ProtectRule, ShareRule, SigmoidRule, SpectrumRule
from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.serialization import load_adapter, save_adapter
from hybrid_peft.version import __version__

__all__ = [
    "BOFTConfig",
    "HybridPeftCallback",
    "HybridConfig",
    "HybridPeftError",
    "LoRAConfig",
    "LoRAGAConfig",
    "PressureRule",
    "ProtectRule",
    "ShareRule",
    "SigmoidRule",
    "SpectrumRule",
    "UnitaryConfig",
    "__version__",
    "attach",
    "detach",
    "export_peft",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "lora_ga_initialise",
    "merge",
    "mixing_callback",
    "parameter_counts",
    "parameter_groups",
    "save_adapter",
    "save_merged",
    "unmerge",
    "update_mixing",
]

_LAZY = {"HybridPeftCallback": "hybrid_peft.integrations", "mixing_callback": "hybrid_peft.integrations"}


def __getattr__(name: str):  # noqa: ANN202
    """The Trainer callback, imported on first use (``transformers.TrainerCallback`` takes seconds to import)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybrid_peft' has no attribute {name!r}")
