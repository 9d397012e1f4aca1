"""The conformance table: one row per method (and per notable option). A new method adds rows here.

Rows whose layers need a data-dependent start (the layers say so: ``needs_gradient_init``) get a LoRA-GA
initialisation from random batches right after attach.
"""

from __future__ import annotations

import torch

from hybrid_peft import (
    BOFTConfig,
    HybridConfig,
    LoRAConfig,
    LoRAGAConfig,
    PressureRule,
    ProtectRule,
    ShareRule,
    SigmoidRule,
    SpectrumRule,
    UnitaryConfig,
    lora_ga_initialise,
)
from hybrid_peft.adapters import adapter_layers, adapter_parameters
from hybrid_peft.config import AdapterConfig

from conftest import VOCAB

METHOD_CASES: dict[str, AdapterConfig] = {
    "lora": LoRAConfig(rank=4, alpha=8.0),
    "lora-rslora": LoRAConfig(rank=4, alpha=8.0, use_rslora=True),
    "lora-dropout": LoRAConfig(rank=2, alpha=4.0, dropout=0.1, targets=r".*\.(q_proj|c_attn|query|value)"),
    "lora-ga-exact": LoRAGAConfig(rank=2, alpha=4.0),
    "lora-ga-sketch-peft-scale": LoRAGAConfig(rank=2, alpha=4.0, estimator="sketch", scale="peft"),
    "boft-m1": BOFTConfig(block_size=4, butterfly_factors=1),
    "boft-m2": BOFTConfig(block_size=4, butterfly_factors=2),
    "boft-blocknum-dropout": BOFTConfig(block_size=0, block_num=4, butterfly_factors=2, dropout=0.25),
    "hybrid-default": HybridConfig(low_rank=LoRAConfig(rank=2, alpha=4.0)),  # both branches at full strength
    "hybrid-share": HybridConfig(
        low_rank=LoRAConfig(rank=2, alpha=4.0), orthogonal=BOFTConfig(lr_scale=1.0), rule=ShareRule(mix_init=0.4)
    ),
    "hybrid-sigmoid-m2": HybridConfig(
        low_rank=LoRAConfig(rank=2, alpha=4.0, lr_scale=2.0),
        orthogonal=BOFTConfig(butterfly_factors=2, lr_scale=10.0),
        rule=SigmoidRule(gates="max"),
    ),
    "hybrid-lora-ga-start": HybridConfig(low_rank=LoRAGAConfig(rank=2, alpha=4.0)),
    "hybrid-lora-ga-sketch-share": HybridConfig(
        low_rank=LoRAGAConfig(rank=2, alpha=4.0, estimator="sketch"), rule=ShareRule(mix_init=0.3)
    ),
    "hybrid-max-gates-dropout": HybridConfig(
        low_rank=LoRAConfig(rank=2, alpha=4.0, dropout=0.1),
        orthogonal=BOFTConfig(dropout=0.25),
        rule=ShareRule(gates="max"),
    ),
    "hybrid-pressure": HybridConfig(low_rank=LoRAConfig(rank=2, alpha=4.0), rule=PressureRule(ema=0.5)),
    "hybrid-protect-max-gates": HybridConfig(low_rank=LoRAConfig(rank=2, alpha=4.0), rule=ProtectRule(gates="max")),
    "hybrid-spectrum": HybridConfig(low_rank=LoRAGAConfig(rank=2, alpha=4.0), rule=SpectrumRule()),
    "unitary": UnitaryConfig(),
    "unitary-all-linear": UnitaryConfig(targets="all-linear"),
}


def random_batches(count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (2, 10), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def _classification_or_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return logits.float().pow(2).mean()  # works for LM and classification heads alike


def prepare_lora_ga(model: torch.nn.Module) -> None:
    lora_ga_initialise(model, random_batches(), loss_fn=_classification_or_lm_loss)


def prepare(method: str, model: torch.nn.Module) -> torch.nn.Module:
    if any(layer.needs_gradient_init for layer in adapter_layers(model).values()):
        prepare_lora_ga(model)
    return model


def offsets_base(model: torch.nn.Module) -> bool:
    """True when an adapter has changed its base weight in place (LoRA-GA's offset), which detach undoes to
    rounding rather than bitwise."""
    return any(getattr(layer, "offset_applied", False) for layer in adapter_layers(model).values())


def perturb_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter tensor random values, so that the adapter changes the model (at init most are identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if torch.all(p == 1):  # a multiplicative scale (BOFT's s): keep it away from 0, as training does
                p.mul_(torch.exp(scale * noise))
            else:
                p.add_(scale * noise)
