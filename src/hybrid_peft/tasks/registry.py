"""The task registry: ``@register_task(name)`` on a task factory; :func:`hybrid_peft.tasks.get_task` builds one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TASK_FACTORIES: dict[str, Callable[..., Any]] = {}


def register_task(name: str) -> Callable:
    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        TASK_FACTORIES[name] = factory
        return factory

    return decorator
