"""External peers for the benchmark: PEFT 0.21's own LoRA, LoRA-GA, BOFT, OFT, and its mixed-adapter LoRA+OFT stacking
(``PeftMixedModel``: the closest existing hybrid, a static sum of two adapters with no mixing rule).

They run through the same training recipe as our methods (``--method peft-lora`` …), on the same data, seeds and
targets, so the benchmark compares methods rather than loops. Options (``--set``) and their defaults:

=============  ========================================================================
peft-lora      rank=8, alpha=16, dropout=0
peft-lora-ga   rank=8, alpha=16, direction=ArB2r, scale=stable (gradient from the init batches)
peft-boft      block_size=4, butterfly_factors=1, dropout=0
peft-oft       oft_block_size=4 (PEFT's OFT, block-diagonal Cayley rotations; method_comparison's OFT row)
peft-lora+oft  rank=8, alpha=16, oft_block_size=4 (LoRA and OFT both active on every target)
=============  ========================================================================

``targets`` takes the same forms as ours (``all-linear``, names, a regex); it is expanded to module names here
because PEFT's LoRA-GA preprocessing cannot expand ``all-linear`` itself. Checkpoints and ``--resume`` are not
offered for peers (they are baselines, not products); the final weights are saved with PEFT's ``save_pretrained``
(``PeftMixedModel`` cannot save, so its trainable tensors go to ``trainable.safetensors``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.errors import ConfigError

PEER_DEFAULTS: dict[str, dict[str, Any]] = {
    "peft-lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear"},
    "peft-lora-ga": {"rank": 8, "alpha": 16.0, "direction": "ArB2r", "scale": "stable", "targets": "all-linear"},
    "peft-boft": {"block_size": 4, "butterfly_factors": 1, "dropout": 0.0, "targets": "all-linear"},
    "peft-oft": {"oft_block_size": 4, "targets": "all-linear"},
    "peft-lora+oft": {"rank": 8, "alpha": 16.0, "oft_block_size": 4, "targets": "all-linear"},
}


# Learning rates when none is given: the rates their hybrid-peft counterparts use.
PEER_LEARNING_RATES: dict[str, float] = {
    "peft-lora": 1e-3,
    "peft-lora-ga": 1e-3,
    "peft-boft": 1e-2,
    "peft-oft": 1e-2,
    "peft-lora+oft": 1e-3,
}


def is_peer(method: str) -> bool:
    return method in PEER_DEFAULTS


def peer_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The peer's options with defaults filled in; unknown keys are an error naming the valid ones."""
    defaults = PEER_DEFAULTS[method]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"{method}: unknown option(s) {unknown}; valid options are {sorted(defaults)}")
    return {**defaults, **options}


def _target_names(model: torch.nn.Module, targets: Any) -> list[str]:
    from hybrid_peft.config import AdapterConfig
    from hybrid_peft.targeting import select_targets

    config = AdapterConfig.from_dict({"method": "lora", "targets": targets})
    return sorted(select_targets(model, config))


def attach_peer(
    model: torch.nn.Module,
    method: str,
    options: dict[str, Any],
    *,
    gradient_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    head: str | None = None,
) -> torch.nn.Module:
    """Wrap ``model`` with the PEFT peer ``method``; returns the PEFT model to train. ``head`` names a new task head
    that is trained fully (``modules_to_save``)."""
    import peft

    settings = peer_options(method, options)
    names = _target_names(model, settings["targets"])
    extra = {"modules_to_save": [head]} if head else {}
    if method == "peft-lora":
        config = peft.LoraConfig(
            r=settings["rank"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules=names,
            **extra,
        )
        return peft.get_peft_model(model, config)
    if method == "peft-lora-ga":
        if gradient_batches is None:
            raise ConfigError("peft-lora-ga needs batches for its gradient estimate")
        config = peft.LoraConfig(
            r=settings["rank"],
            lora_alpha=settings["alpha"],
            target_modules=names,
            init_lora_weights="lora_ga",
            lora_ga_config=peft.LoraGAConfig(direction=settings["direction"], scale=settings["scale"]),
            **extra,
        )

        def train_step() -> None:
            for batch in gradient_batches():
                model(**batch).loss.backward()

        peft.preprocess_loraga(model, config, train_step)
        model.zero_grad(set_to_none=True)
        return peft.get_peft_model(model, config)
    if method == "peft-boft":
        config = peft.BOFTConfig(
            boft_block_size=settings["block_size"],
            boft_n_butterfly_factor=settings["butterfly_factors"],
            boft_dropout=settings["dropout"],
            target_modules=names,
            **extra,
        )
        return peft.get_peft_model(model, config)
    if method == "peft-oft":
        config = peft.OFTConfig(r=0, oft_block_size=settings["oft_block_size"], target_modules=names, **extra)
        return peft.get_peft_model(model, config)
    if method == "peft-lora+oft":
        lora = peft.LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], target_modules=names, **extra)
        oft = peft.OFTConfig(r=0, oft_block_size=settings["oft_block_size"], target_modules=names)
        mixed = peft.get_peft_model(model, lora, adapter_name="low_rank", mixed=True)
        mixed.add_adapter("orthogonal", oft)
        mixed.set_adapter(["low_rank", "orthogonal"])
        return mixed
    raise ConfigError(f"unknown peer method {method!r}; peers are {sorted(PEER_DEFAULTS)}")


def save_peer(model: torch.nn.Module, folder: Path) -> None:
    """PEFT's own format where it can save; otherwise every trainable tensor in one safetensors file."""
    from peft import PeftMixedModel
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftMixedModel):
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(folder / "trainable.safetensors"))
    else:
        model.save_pretrained(str(folder))
