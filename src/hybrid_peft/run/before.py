"""The evaluation before training, shared between runs that start from the same model.

Every adapter starts at the identity, so at step 0 the model of any method, rate or seed is the base model: runs of
one task on one base model each evaluate the same model on the same rows. With ``--before-cache DIR`` (the bench
sets it to ``OUTPUT/before``) the first such run writes its metrics there and the others read them instead of
evaluating; on the math profile that is about a minute a run, and 4–5 minutes with greedy decoding.

A run shares only with runs that would evaluate exactly the same thing. The key is a hash of the base model (its
name, dtype, quantisation and a fingerprint of its weights: each tensor's shape and sampled values), the task,
the evaluation rows and the retention texts themselves, the evaluation options (``max_length``, ``eval_batch_size``,
``generate``, ``loss_chunk_tokens``, ``unsafe_unsandboxed``) and hybrid-peft's version. The weights are fingerprinted
as loaded, before any adapter: a classifier's new head, drawn from the run's seed, is part of them, so classifier runs
share with runs of the same seed only. An unreadable or foreign entry is evaluated again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_peft.adapters import fingerprint_weight
from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.version import __version__

EVALUATION_OPTIONS = ("task", "max_length", "eval_batch_size", "generate", "loss_chunk_tokens", "unsafe_unsandboxed")


def weights_fingerprint(model: nn.Module) -> dict[str, dict]:
    """Shape and a few evenly spaced values of every tensor of ``model``'s state: what tells an adapter file's base
    model apart (:func:`~hybrid_peft.adapters.fingerprint_weight`), here for the whole state, new heads included."""
    state = model.state_dict()
    return {name: fingerprint_weight(t) for name, t in state.items() if isinstance(t, torch.Tensor) and not t.is_meta}


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SharedBefore:
    """One entry of a ``--before-cache`` folder: ``read`` the metrics a run with the same key wrote, ``write`` them."""

    path: Path
    key: str
    described: dict[str, Any]

    @classmethod
    def for_run(
        cls,
        folder: str | Path,
        config: Any,
        model: nn.Module,
        rows: list[dict[str, Any]],
        retention_texts: list[str] | None,
    ) -> SharedBefore:
        """The entry for a run of ``config`` on the freshly loaded base ``model`` (before any adapter is attached)."""
        described = {
            "model": config.model,
            "dtype": config.dtype,
            "quantise_base": config.quantise_base,
            **{name: getattr(config, name) for name in EVALUATION_OPTIONS},
            "rows": len(rows),
            "retention_texts": None if retention_texts is None else len(retention_texts),
            "version": __version__,
        }
        key = _digest(
            {
                **described,
                "weights": weights_fingerprint(model),
                "rows": _digest(rows),
                "retention_texts": None if retention_texts is None else _digest(retention_texts),
            }
        )
        return cls(Path(folder) / f"{key[:24]}.json", key, described)

    def read(self) -> dict[str, float] | None:
        """The metrics a run with this key wrote, or None (none yet; an unreadable or foreign entry warns)."""
        if not self.path.is_file():
            return None
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            metrics = document["metrics"]
            valid = (
                document["key"] == self.key
                and isinstance(metrics, dict)
                and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in metrics.items())
            )
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            message = f"{self.path} is not a readable evaluation of this run's base model; evaluating again"
            warnings.warn(message, stacklevel=2)
            return None
        return {k: float(v) for k, v in metrics.items()}

    def write(self, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (written atomically; a non-finite value is not shared, so a later run evaluates)."""
        if not all(math.isfinite(v) for v in metrics.values()):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"key": self.key, "evaluated": self.described, "metrics": metrics}
        atomic_write_text(self.path, json.dumps(document, indent=2) + "\n")
