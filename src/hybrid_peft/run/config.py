"""A training run's options: :class:`TrainConfig`, a frozen dataclass whose field names are the command-line flags
(``--learning-rate``) and the YAML/JSON keys of ``--config``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_peft.config import require_choice, require_float, require_int
from hybrid_peft.errors import ConfigError
from hybrid_peft.models import QUANTISATIONS
from hybrid_peft.run.trainees import trainee_for

DTYPES = ("float32", "bfloat16", "float16")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. ``method`` is one of hybrid-peft's adapters, ``full`` (full fine-tuning) or a PEFT
    baseline (``peft-lora`` ...); ``adapter`` holds the method's options (``--set KEY=VALUE``)."""

    model: str = "smollm2-135m"
    task: str = "humaneval"
    data_dir: str | None = None
    dataset: str | None = None
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    steps: int = 30
    batch_size: int = 4
    max_length: int = 256
    learning_rate: float | None = None  # None: the method's default (trainees.py), resolved when the config is built
    warmup_steps: int = 3
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    seed: int = 0
    examples_per_language: int = 32
    eval_per_language: int = 0
    init_batches: int = 8
    eval_every: int = 0
    eval_examples: int = 0
    validation_examples: int = 0  # >0: held out of the training rows (seeded), evaluated at the end (rate choice)
    eval_batch_size: int = 8
    retention_data: str = "auto"  # general text scored before and after training (run/retention.py), or "none"
    retention_examples: int = 200
    before_cache: str | None = None  # a folder where runs from the same base model share the evaluation before training
    generate: bool = True
    save_every: int = 0
    output_dir: str = "runs/train"
    merge: bool = False
    threads: int = 0
    dtype: str = "float32"  # the frozen base's dtype; adapters and their optimiser state stay fp32
    quantise_base: str | None = None  # "nf4" or "int8": the frozen base quantised with bitsandbytes
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # >0: the causal-LM loss over the vocabulary in chunks of this many tokens
    fsdp: bool = False
    unsafe_unsandboxed: bool = False
    report_to: str | None = (
        None  # experiment trackers through accelerate: "tensorboard", "wandb", "mlflow", comma-separated
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            require_int(name, getattr(self, name), minimum=1)
        for name in (
            "warmup_steps",
            "seed",
            "init_batches",
            "eval_every",
            "eval_examples",
            "validation_examples",
            "save_every",
            "threads",
            "examples_per_language",
            "eval_per_language",
            "retention_examples",
        ):
            require_int(name, getattr(self, name), minimum=0)
        require_int("eval_batch_size", self.eval_batch_size, minimum=1)
        require_int("loss_chunk_tokens", self.loss_chunk_tokens, minimum=0)
        require_choice("dtype", self.dtype, DTYPES)
        if self.quantise_base is not None:
            require_choice("quantise_base", self.quantise_base, QUANTISATIONS)
            if self.fsdp:
                raise ConfigError("--quantise-base and --fsdp do not combine (FSDP2 shards plain tensors); pick one")
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", trainee_for(self.method).default_learning_rate(self))
            object.__setattr__(self, "learning_rate_is_default", True)
        require_float("learning_rate", self.learning_rate, minimum=0.0, min_inclusive=False)
        require_float("weight_decay", self.weight_decay, minimum=0.0)
        require_float("max_grad_norm", self.max_grad_norm, minimum=0.0)
        for tracker in self.trackers:
            require_choice("report_to", tracker, TRACKERS)
        if not isinstance(self.adapter, dict):
            raise ConfigError(f"adapter: expected a mapping of the method's options, got {self.adapter!r}")
        trainee_for(self.method).validate(self)

    @property
    def trackers(self) -> list[str]:
        return [t.strip() for t in (self.report_to or "").split(",") if t.strip()]

    # True when the learning rate is the method's default (not a field: set by __post_init__ when none was given).
    learning_rate_is_default = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """A YAML or JSON file, then ``overrides`` on top (``adapter`` options are merged, not replaced).

        The file may also be a finished run's ``summary.json`` (a run folder's, or a bench record's): its ``config``
        is read, so any recorded run can be rerun, or bracketed at another rate, from the record alone."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
            raise ConfigError(f"config file {path} could not be parsed: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of options")
        if _is_run_summary(data):
            data = data["config"]
            if not isinstance(data, dict):
                raise ConfigError(f"run summary {path}: its 'config' must be a mapping of options, got {data!r}")
        return cls.from_dict(merge_options(data, overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_run_summary(data: dict[str, Any]) -> bool:
    """True for a run's ``summary.json`` (its options under ``config``, beside the run's results)."""
    return "config" in data and "after" in data  # neither is a training option, so no options file has both


def merge_options(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; the ``adapter`` mapping is merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if key == "adapter" and isinstance(value, dict):
            merged["adapter"] = {**merged.get("adapter", {}), **value}
        else:
            merged[key] = value
    return merged
