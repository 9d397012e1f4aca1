"""Before a run loads its model: will it fit? ``hybrid-peft estimate``'s figure for the run's options against the
memory this process can have (the accelerator's free memory, or the host's available memory), and, when it does
not fit, the first of the recipe's savings that would make it fit."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from hybrid_peft.errors import HybridPeftError

if TYPE_CHECKING:
    from hybrid_peft.run.config import TrainConfig

GIB = 2**30


class RunDoesNotFitError(HybridPeftError, MemoryError):
    """The estimated peak memory of a run exceeds what the machine has."""


def available_bytes() -> int | None:
    """Free accelerator memory, or the host's available memory (Linux ``MemAvailable``); None when unknown."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_options(config: TrainConfig, world: int) -> dict[str, Any]:
    """``estimate``'s options for a run: its batch, length, dtype, adapter sizes and savings."""
    adapter = config.adapter
    options: dict[str, Any] = {
        "batch_size": config.batch_size,
        "seq_len": config.max_length,
        "dtype": config.dtype,
        "rank": adapter.get("rank", 8),
        "block_size": adapter.get("block_size", 4) or 4,
        "butterfly_factors": adapter.get("butterfly_factors", 1),
        "checkpointing": config.gradient_checkpointing,
        "loss_chunk_tokens": config.loss_chunk_tokens,
    }
    if config.quantise_base is not None:
        options["quantised_base"] = 4 if config.quantise_base == "nf4" else 8
    if config.fsdp:
        options |= {"zero": 3, "world": world}
    return options


def check_fits(config: TrainConfig, world: int = 1, available: int | None = None) -> float | None:
    """Raise :class:`RunDoesNotFitError` when the run's estimated peak exceeds ``available`` bytes (default: what
    :func:`available_bytes` finds), naming the estimate and the savings that would make it fit. Returns the estimate
    in bytes (None for runs the estimator does not model: PEFT baselines, models without a readable config)."""
    from hybrid_peft.estimate import METHODS, estimate, load_architecture

    if config.method not in METHODS:
        return None
    try:
        arch = load_architecture(config.model)
    except HybridPeftError:
        return None
    available = available_bytes() if available is None else available
    options = estimate_options(config, world)
    attention = "flash" if arch.decoder else "math"
    peak = estimate(arch, config.method, attention=attention, **options).total
    if available is None or peak <= available:
        return peak
    savings: list[tuple[str, dict[str, Any]]] = []
    if config.method != "full" and config.quantise_base is None:
        savings.append(("--quantise-base nf4", {"quantised_base": 4}))
    if not config.gradient_checkpointing:
        savings.append(("--gradient-checkpointing", {"checkpointing": True}))
    if arch.decoder and not config.loss_chunk_tokens:
        savings.append(("--loss-chunk-tokens 1024", {"loss_chunk_tokens": 1024}))
    tried: dict[str, Any] = {}
    flags: list[str] = []
    advice = None
    for flag, change in savings:
        tried |= change
        flags.append(flag)
        if estimate(arch, config.method, attention=attention, **(options | tried)).total <= available:
            advice = " ".join(flags)
            break
    fix = (
        f"add {advice} (estimated to fit)"
        if advice
        else "lower --batch-size or --max-length, shard it over more processes with --fsdp, or use a larger machine"
    )
    raise RunDoesNotFitError(
        f"{config.model} with {config.method} at batch {config.batch_size} × {config.max_length} needs about "
        f"{peak / GIB:,.1f} GiB (hybrid-peft estimate) but {available / GIB:,.1f} GiB are available: {fix}. "
        f"Set {SKIP_VARIABLE}=1 to start anyway"
    )


SKIP_VARIABLE = "HYBRID_PEFT_SKIP_FIT_CHECK"


def fit_check_enabled() -> bool:
    return os.environ.get(SKIP_VARIABLE, "").lower() not in ("1", "true", "yes")
