"""Selecting target modules by name: ``"all-linear"``, a regular expression, or a list of names/suffixes."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from hybrid_peft.config import ALL_LINEAR, AdapterConfig
from hybrid_peft.errors import TargetError
from hybrid_peft.layer import AdapterLayer, is_supported_base


def name_matches(name: str, entry: str) -> bool:
    """PEFT's rule for a list entry: the full name, or a suffix starting at a dot."""
    return name == entry or name.endswith("." + entry)


def linear_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every supported linear layer that is not already inside an adapter, by full module name."""
    inside_adapter: set[str] = set()
    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_adapter):
            continue
        if isinstance(module, AdapterLayer):
            inside_adapter.add(name)
            continue
        if is_supported_base(module):
            candidates[name] = module
    return candidates


# Task heads that "all-linear" leaves alone: they are new (classification) or tied to the embeddings (LM head).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def _output_head_names(model: nn.Module, candidates: dict[str, nn.Module]) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return {name for name, module in candidates.items() if module is head or name.split(".", 1)[0] in HEAD_NAMES}


def _summarise(names: Iterable[str], limit: int = 12) -> str:
    """Distinct last name components (``q_proj, k_proj, ...``), the useful part for choosing targets."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    text = ", ".join(suffixes[:limit])
    return text + (f", ... ({len(suffixes)} distinct)" if len(suffixes) > limit else "")


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules ``config`` selects, in model order. Raises :class:`TargetError` when it can't."""
    candidates = linear_candidates(model)
    if not candidates:
        raise TargetError(
            f"{type(model).__name__} has no nn.Linear or Conv1D layer that is free to adapt "
            "(adapters already attached? call detach() first)"
        )
    targets = config.targets
    if targets == ALL_LINEAR:
        heads = _output_head_names(model, candidates)
        selected = [n for n in candidates if n not in heads]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        selected = [n for n in candidates if pattern.fullmatch(n)]
        if not selected:
            other = [n for n, m in model.named_modules() if n and pattern.fullmatch(n) and n not in candidates]
            hint = f"; it matches only non-linear modules {other[:5]}" if other else ""
            raise TargetError(
                f"target pattern {targets!r} matched no linear layer of {type(model).__name__}{hint}. "
                f"The pattern must match the full module name, e.g. r'.*\\.(q_proj|v_proj)'. "
                f"Linear layers: {_summarise(candidates)}"
            )
    else:
        selected = [n for n in candidates if any(name_matches(n, entry) for entry in targets)]
        unknown = [entry for entry in targets if not any(name_matches(n, entry) for n in candidates)]
        if unknown:
            others = [n for n, _ in model.named_modules() if any(name_matches(n, e) for e in unknown)]
            hint = f" ({others[:3]} exist but are not nn.Linear/Conv1D)" if others else ""
            message = (
                f"unknown target module name(s) {unknown} in {type(model).__name__}{hint}. "
                f"Linear layers you can target: {_summarise(candidates)} (or 'all-linear')"
            )
            if not selected:
                raise TargetError(message)
            # A list may name layers of several architectures; the ones this model lacks are only worth a warning.
            warnings.warn(message, stacklevel=3)
    selected = [n for n in selected if not any(name_matches(n, entry) for entry in config.exclude)]
    if not selected:
        raise TargetError(f"every module selected by targets={targets!r} is excluded by exclude={list(config.exclude)}")
    return selected
