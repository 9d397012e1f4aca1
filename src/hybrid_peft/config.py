"""Adapter configurations: frozen dataclasses that validate themselves and round-trip through JSON.

Every method subclasses :class:`AdapterConfig`, sets the class variable ``method`` and checks its own fields in
``validate``. Unknown keys are an error when a config is built from a dict (``strict=True``) and a warning when an
old file is loaded (``strict=False``), so files written by a newer version still load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from hybrid_peft.errors import ConfigError
from hybrid_peft.registry import get_method

ConfigT = TypeVar("ConfigT", bound="AdapterConfig")

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every adapter shares.

    Args:
        targets: which modules get an adapter. ``"all-linear"`` (every ``nn.Linear`` / GPT-2 ``Conv1D`` except the
            task head: the output embeddings and top-level ``lm_head``/``classifier``/``score``/``qa_outputs``),
            a single string (a regular expression matched against the full module name), or a
            sequence of names (a module matches when its full name equals an entry or ends with ``"." + entry``,
            so ``["q_proj", "v_proj"]`` selects those projections in every layer).
        exclude: names or suffixes (same rule as a targets sequence) of modules never to adapt.
    """

    method: ClassVar[str] = ""

    targets: str | tuple[str, ...] = ALL_LINEAR
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists from JSON or user code become tuples so that the config stays hashable and immutable.
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.exclude, (list, str)):
            object.__setattr__(
                self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
            )
        self._validate_targets()
        self.validate()

    def _validate_targets(self) -> None:
        if isinstance(self.targets, str):
            if not self.targets:
                raise ConfigError("targets: empty string; use 'all-linear', a regular expression or a list of names")
            if self.targets != ALL_LINEAR:
                try:
                    re.compile(self.targets)
                except re.error as exc:
                    raise ConfigError(f"targets: {self.targets!r} is not a valid regular expression ({exc})") from exc
        elif isinstance(self.targets, tuple):
            if not self.targets:
                raise ConfigError("targets: empty list; name at least one module, or use 'all-linear'")
            bad = [t for t in self.targets if not isinstance(t, str) or not t]
            if bad:
                raise ConfigError(f"targets: every entry must be a non-empty module name, got {bad!r}")
        else:
            raise ConfigError(f"targets: expected a string or a list of strings, got {type(self.targets).__name__}")
        bad = [t for t in self.exclude if not isinstance(t, str) or not t]
        if bad:
            raise ConfigError(f"exclude: every entry must be a non-empty module name, got {bad!r}")

    def validate(self) -> None:
        """Check method-specific fields; subclasses raise :class:`ConfigError` naming the field."""

    # --- costs of one adapted ``in → out`` linear layer, read by ``hybrid-peft estimate`` -----------------------

    # The training recipe's learning rate when none is given (AdamW, warm-up then cosine): the rate this method did
    # best at in the benchmark; methods override it.
    default_learning_rate: ClassVar[float] = 1e-3

    # The layer keeps its output for backward (BOFT's scaled linear recovers x W0ᵀ from it).
    keeps_output: ClassVar[bool] = False

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Trainable numbers the layer adds."""
        raise NotImplementedError(f"{type(self).__name__} does not state its parameter count")

    def frozen_count(self, in_features: int, out_features: int) -> int:
        """Numbers the layer keeps but does not train (LoRA-GA's start ``A0``, ``B0``)."""
        return 0

    def saved_per_token(self, in_features: int, out_features: int) -> int:
        """Activations kept per token for backward beyond the layer's input (LoRA's rank-r projection)."""
        return 0

    def flops_per_token(self, in_features: int, out_features: int) -> int:
        """Multiply-adds per token of the adapter's own forward pass (backward costs about twice that)."""
        return 0

    def fixed_activations(self, in_features: int, out_features: int) -> int:
        """fp32 numbers kept for backward once per step whatever the batch (BOFT's b×b rotations)."""
        return 0

    # --- serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], *, strict: bool = True) -> ConfigT:
        """Build a config from a dict such as :meth:`to_dict` returns.

        Called on :class:`AdapterConfig` itself, the ``"method"`` key picks the subclass from the registry.
        With ``strict=False`` (used when loading saved files) unknown keys are dropped with a warning.
        """
        data = dict(data)
        method = data.pop("method", None)
        target_cls: type[AdapterConfig] = cls
        if cls is AdapterConfig:
            if method is None:
                raise ConfigError("config has no 'method' key; add one, e.g. {'method': 'lora', ...}")
            target_cls = get_method(method).config_class
            if target_cls.from_dict.__func__ is not AdapterConfig.from_dict.__func__:  # it reads its own dicts
                return target_cls.from_dict(data, strict=strict)  # type: ignore[return-value]
        elif method is not None and method != cls.method:
            raise ConfigError(f"method: this is a {cls.__name__} ({cls.method!r}) but the data says {method!r}")
        names = {f.name for f in dataclasses.fields(target_cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            message = f"unknown {target_cls.method} config field(s) {unknown}; valid fields are {sorted(names)}"
            if strict:
                raise ConfigError(message)
            warnings.warn(message + " (ignored)", stacklevel=2)
            data = {k: v for k, v in data.items() if k in names}
        return target_cls(**data)  # type: ignore[return-value]

    @classmethod
    def option_names(cls) -> set[str]:
        """The keys :meth:`from_dict` takes (besides ``method``)."""
        return {field.name for field in dataclasses.fields(cls)}

    @classmethod
    def from_json(cls: type[ConfigT], text: str, *, strict: bool = True) -> ConfigT:
        return cls.from_dict(json.loads(text), strict=strict)

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        return dataclasses.replace(self, **changes)

    @classmethod
    def upgrade_saved(
        cls, data: dict[str, Any], version: int, tensors: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Convert a config written in adapter format ``version`` (older than today's) to today's form, and, when
        given, the tensors of the modules that use it (``{module: {name: tensor}}``, changed in place) so that the
        adapter computes what it computed. Raise :class:`ConfigError` saying how to convert where it cannot be done.
        Unchanged by default: fields added since then take their defaults."""
        return data


# --- small validators shared by method configs ------------------------------------------------------------------


def require_int(name: str, value: Any, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def require_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (value == minimum and not min_inclusive)):
        bound = ">=" if min_inclusive else ">"
        raise ConfigError(f"{name}: must be {bound} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (value == maximum and not max_inclusive)):
        bound = "<=" if max_inclusive else "<"
        raise ConfigError(f"{name}: must be {bound} {maximum}, got {value}")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")


def require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
