"""hybrid-peft: parameter-efficient fine-tuning on a small budget.

Attach LoRA (and, as they land, LoRA-GA, BOFT, the unitary adapter and the hybrid) to any Hugging Face model by
module name; save, load, merge and export them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hybrid_peft.adapters import (  # noqa: E402
    adapter_layers,
    adapter_parameters,
    attach,
    detach,
    merge,
    parameter_counts,
    unmerge,
)
from hybrid_peft.config import AdapterConfig  # noqa: E402
from hybrid_peft.errors import (  # noqa: E402
    AdapterFileError,
    BaseModelMismatchError,
    ConfigError,
    HybridPeftError,
    ModelLoadError,
    TargetError,
)
from hybrid_peft.export import export_peft, save_merged  # noqa: E402
from hybrid_peft.gradient_estimation import estimate_gradients  # noqa: E402
from hybrid_peft.layer import AdapterLayer  # noqa: E402
from hybrid_peft.methods import (  # noqa: E402
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
from hybrid_peft.methods.hybrid import mixing_callback, plot_mixing_heatmap, update_mixing  # noqa: E402
from hybrid_peft.methods.lora_ga import initialise_lora_ga, lora_ga_factors_for, lora_ga_initialise  # noqa: E402
from hybrid_peft.models import load_model, load_tokenizer  # noqa: E402
from hybrid_peft.registry import available_methods, get_method, register_method  # noqa: E402
from hybrid_peft.serialization import load_adapter, read_adapter_config, save_adapter  # noqa: E402

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
    "attach",
    "available_methods",
    "detach",
    "estimate_gradients",
    "export_peft",
    "get_method",
    "initialise_lora_ga",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "lora_ga_factors_for",
    "lora_ga_initialise",
    "merge",
    "mixing_callback",
    "parameter_counts",
    "plot_mixing_heatmap",
    "read_adapter_config",
    "register_method",
    "save_adapter",
    "save_merged",
    "unmerge",
    "update_mixing",
]
