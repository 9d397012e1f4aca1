"""GSM8K (Cobbe et al. 2021) in its original JSONL form: one ``{"question", "answer"}`` object per line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def default_data_dir() -> Path | None:
    """``$HYBRID_PEFT_DATA`` or a ``shared/data`` folder beside the working directory's parents, if present."""
    if env := os.environ.get("HYBRID_PEFT_DATA"):
        return Path(env)
    for parent in [Path.cwd(), *Path.cwd().parents]:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def load_gsm8k(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of ``gsm8k/<split>.jsonl`` under ``data_dir`` (default: :func:`default_data_dir`)."""
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if base is None:
        raise FileNotFoundError("no data folder: pass data_dir= or set HYBRID_PEFT_DATA to the folder holding gsm8k/")
    path = base / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; GSM8K's {split}.jsonl is expected there")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{number}: expected keys 'question' and 'answer', got {sorted(row)}")
        rows.append(row)
    return rows


def gsm8k_text(row: dict[str, Any]) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"
