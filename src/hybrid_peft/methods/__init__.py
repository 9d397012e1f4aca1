"""Built-in methods, one file each. Importing this package registers them, in this order (the order of
``hybrid-peft estimate``'s rows): a new method adds its import here."""

# isort: off
from hybrid_peft.methods.lora import LoRAConfig, LoRALayer
from hybrid_peft.methods.lora_ga import LoRAGAConfig, LoRAGALayer
from hybrid_peft.methods.boft import BOFTConfig, BOFTLayer
from hybrid_peft.methods.unitary import UnitaryConfig, UnitaryLayer
from hybrid_peft.methods.hybrid import HybridConfig, HybridLayer

# isort: on

__all__ = [
    "BOFTConfig",
    "BOFTLayer",
    "HybridConfig",
    "HybridLayer",
    "LoRAConfig",
    "LoRAGAConfig",
    "LoRAGALayer",
    "LoRALayer",
    "UnitaryConfig",
    "UnitaryLayer",
]
