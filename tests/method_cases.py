"""The conformance table: one row per method (and per notable option). A new method adds rows here."""

from __future__ import annotations

import torch

from hybrid_peft import AdapterConfig, BOFTConfig, LoRAConfig, UnitaryConfig
from hybrid_peft.adapters import adapter_parameters

METHOD_CASES: dict[str, AdapterConfig] = {
    "lora": LoRAConfig(rank=4, alpha=8.0),
    "lora-rslora": LoRAConfig(rank=4, alpha=8.0, use_rslora=True),
    "boft-m1": BOFTConfig(block_size=4, butterfly_factors=1),
    "boft-m2": BOFTConfig(block_size=4, butterfly_factors=2),
    "boft-blocknum-dropout": BOFTConfig(block_size=0, block_num=4, butterfly_factors=2, dropout=0.25),
    "unitary": UnitaryConfig(),
    "unitary-all-linear": UnitaryConfig(targets="all-linear"),
    "lora-dropout": LoRAConfig(rank=2, alpha=4.0, dropout=0.1, targets=r".*\.(q_proj|c_attn|query|value)"),
}


def perturb_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter tensor random values, so that the adapter changes the model (at init most are identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
