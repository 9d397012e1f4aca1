"""Built-in methods. Importing this package registers them."""

from hybrid_peft.methods.boft import BOFTConfig, BOFTLayer
from hybrid_peft.methods.hybrid import HybridConfig, HybridLayer
from hybrid_peft.methods.lora import LoRAConfig, LoRALayer
from hybrid_peft.methods.lora_ga import LoRAGAConfig, LoRAGALayer
from hybrid_peft.methods.unitary import UnitaryConfig, UnitaryLayer

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
