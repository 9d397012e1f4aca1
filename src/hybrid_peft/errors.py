"""Exceptions raised by hybrid-peft. Each message names the problem and how to fix it."""

from __future__ import annotations


class HybridPeftError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(HybridPeftError, ValueError):
    """A configuration field has a bad value, or an unknown field was given."""


class TargetError(HybridPeftError, ValueError):
    """Target module patterns matched nothing, matched a module of an unsupported type, or overlap."""


class AdapterFileError(HybridPeftError, OSError):
    """An adapter directory is missing a file, or a file is corrupt, truncated or inconsistent."""


class BaseModelMismatchError(HybridPeftError, ValueError):
    """An adapter is being loaded onto a different base model than the one it was trained for."""


class ModelLoadError(HybridPeftError, OSError):
    """A model alias, hub id or folder could not be resolved or loaded."""


class TaskDataError(HybridPeftError, ValueError):
    """A task's data file is missing, empty or malformed."""


class NonFiniteLossError(HybridPeftError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class BatchDoesNotFitError(HybridPeftError, MemoryError):
    """A training or evaluation batch ran out of (accelerator or host) memory."""


class TrainingInterrupted(HybridPeftError):
    """Training stopped on a signal after saving a checkpoint; ``exit_status`` is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
