"""Tasks: data readers (local files, files a package ships, or a Hugging Face dataset; never the network unless the
user asks for a hub id) with their batching and evaluation. :func:`get_task` builds one by name.

Adding a task: one module here with a class that follows :class:`~hybrid_peft.tasks.base.Task` (name, model kind,
``primary_metric``, ``data_folder``, rows, batch, evaluate) decorated with ``@register_task("name")``, its import
below, and a row in ``tests/test_tasks.py`` with a small fixture under ``tests/data/``.
"""

from __future__ import annotations

import inspect
from typing import Any

from hybrid_peft.errors import TaskDataError
from hybrid_peft.tasks import glue, gsm8k, humaneval, multilingual  # noqa: F401  (importing registers them)
from hybrid_peft.tasks.base import Task
from hybrid_peft.tasks.data import resolve_data_dir
from hybrid_peft.tasks.registry import TASK_FACTORIES

SPEC_PREFIX = "glue-spec:"


def available_tasks() -> list[str]:
    return sorted(TASK_FACTORIES)


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name (or ``glue-spec:<spec.json>``). ``options`` a task does not take (e.g.
    ``examples_per_language`` for GLUE) are ignored, so one recipe config serves every task."""
    if name.startswith(SPEC_PREFIX):
        return glue.GlueTask.from_spec_file(
            name.removeprefix(SPEC_PREFIX), options.get("data_dir"), options.get("dataset")
        )
    if name not in TASK_FACTORIES:
        raise TaskDataError(f"unknown task {name!r}; choose one of {available_tasks()} or {SPEC_PREFIX}<spec.json>")
    factory = TASK_FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    if options.get("dataset") is not None and "dataset" not in accepted:
        supported = sorted(n for n, f in TASK_FACTORIES.items() if "dataset" in inspect.signature(f).parameters)
        raise TaskDataError(
            f"task {name!r} reads only its own files; --dataset works with {supported} and {SPEC_PREFIX}"
        )
    return factory(**{k: v for k, v in options.items() if k in accepted and v is not None})


def check_task_data(name: str, *, data_dir: Any = None, dataset: str | None = None) -> None:
    """Raise :class:`TaskDataError` now when the task's files cannot be found (no data folder, or none of its
    sub-folder in it): what a bench checks once before its first run rather than failing every run on it."""
    task = get_task(name, data_dir=data_dir, dataset=dataset)
    if task.data_folder is None or dataset is not None:
        return
    folder = resolve_data_dir(data_dir) / task.data_folder
    if not folder.is_dir():
        raise TaskDataError(
            f"task {name!r} reads {task.data_folder}/ in the data folder, and {folder} is not a folder: pass "
            "--data-dir (or data_dir=) or set HYBRID_PEFT_DATA to the folder that holds it"
        )


def primary_metric(task_name: str) -> str:
    """The metric a task is ranked by, without reading its data (a ``glue-spec:`` task's from its spec file)."""
    if task_name.startswith(SPEC_PREFIX):
        try:
            return glue.read_spec(task_name.removeprefix(SPEC_PREFIX)).primary_metric
        except TaskDataError:
            return "accuracy"
    factory = TASK_FACTORIES.get(task_name)
    return getattr(factory, "primary_metric", "accuracy")
