"""hybrid-peft: parameter-efficient fine-tuning on a small budget.

Attach LoRA, LoRA-GA, BOFT, the unitary adapter and the hybrid to any Hugging Face model by module name; save,
load, merge and export them. The training recipe, bench and estimator live in ``hybrid_peft.run``,
``hybrid_peft.bench`` and ``hybrid_peft.estimate``.
"""

from __future__ import annotations

from hybrid_peft.adapters import (
    adapter_layers,
    adapter_parameters,
    attach,
    detach,
    merge,
    parameter_counts,
    parameter_groups,
    unmerge,
)
from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import (
    AdapterFileError,
    BaseModelMismatchError,
    ConfigError,
    HybridPeftError,
    ModelLoadError,
    TargetError,
)
from hybrid_peft.export import export_peft, save_merged
from hybrid_peft.gradient_estimation import estimate_gradients
from hybrid_peft.layer import AdapterLayer
from hybrid_peft.methods import (
    BOFTConfig,
    BOFTLayer,
    HybridConfig,
    HybridLayer,
    LoRAConfig,
    LoRAGAConfig,
    LoRAGALayer,
    LoRALayer,
    UnitaryConfig,
    UnitaryLayer,
)
from hybrid_peft.methods.hybrid import split_steps, update_mixing
from hybrid_peft.methods.lora_ga import apply_lora_ga_factors, lora_ga_factors_for, lora_ga_initialise
from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.registry import available_methods, get_method, register_method
from hybrid_peft.serialization import load_adapter, read_adapter_config, save_adapter
from hybrid_peft.telemetry import mixing_callback, plot_mixing_heatmap
from hybrid_peft.version import __version__

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "AdapterLayer",
    "BOFTConfig",
    "BOFTLayer",
    "BaseModelMismatchError",
    "ConfigError",
    "HybridConfig",
    "HybridLayer",
    "HybridPeftError",
    "LoRAConfig",
    "LoRAGAConfig",
    "LoRAGALayer",
    "LoRALayer",
    "ModelLoadError",
    "TargetError",
    "UnitaryConfig",
    "UnitaryLayer",
    "__version__",
    "adapter_layers",
    "adapter_parameters",
    "apply_lora_ga_factors",
    "attach",
    "available_methods",
    "detach",
    "estimate_gradients",
    "export_peft",
    "get_method",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "lora_ga_factors_for",
    "lora_ga_initialise",
    "merge",
    "mixing_callback",
    "parameter_counts",
    "parameter_groups",
    "plot_mixing_heatmap",
    "read_adapter_config",
    "register_method",
    "save_adapter",
    "save_merged",
    "split_steps",
    "unmerge",
    "update_mixing",
]
