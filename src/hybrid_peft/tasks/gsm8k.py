"""GSM8K (Cobbe et al. 2021) in its original JSONL form: one ``{"question", "answer"}`` object per line.

Training is supervised fine-tuning on ``Question: …\\nAnswer:`` → the worked answer (loss on the answer only).
Evaluation: held-out loss, and greedy generation scored by exact match of the final number (after ``####``, else
the last number the model wrote).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from hybrid_peft.errors import TaskDataError
from hybrid_peft.tasks.base import greedy_generate, held_out_loss, prompt_completion_batch
from hybrid_peft.tasks.data import read_text, resolve_data_dir
from hybrid_peft.tasks.datasets_source import DatasetRows, require_columns
from hybrid_peft.tasks.registry import register_task

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def load_gsm8k(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of ``gsm8k/<split>.jsonl`` under ``data_dir`` (default: the data folder, see ``tasks/data.py``)."""
    path = resolve_data_dir(data_dir) / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist; GSM8K's {split}.jsonl is expected there")
    rows = []
    for number, line in enumerate(read_text(path, "gsm8k").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}:{number} is not valid JSON ({exc})") from exc
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise TaskDataError(f"{path}:{number}: expected keys 'question' and 'answer'")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"{path} has no examples")
    return rows


NEXT_QUESTION = "\nQuestion:"  # where a completion that goes on to invent the next problem is cut


def gsm8k_prompt(row: dict[str, Any]) -> str:
    return f"Question: {row['question']}\nAnswer:"


def gsm8k_text(row: dict[str, Any]) -> str:
    return f"{gsm8k_prompt(row)} {row['answer']}"


def _normalise(number: str) -> str:
    number = number.replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value == int(value) else str(value)


def final_number(text: str) -> str | None:
    """The answer a solution states: the number after ``####``, else the last number in the text."""
    if "####" in text:
        match = NUMBER.search(text.split("####", 1)[1])
        return _normalise(match.group()) if match else None
    numbers = NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def _gsm8k_rows_from_records(source: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    require_columns(source, records, ("question", "answer"))
    return [{"question": r["question"], "answer": r["answer"]} for r in records]


@register_task("gsm8k")
class Gsm8kTask:
    name = "gsm8k"
    model_task = "causal-lm"
    num_labels = None
    primary_metric = "exact_match"
    data_folder = "gsm8k"

    def __init__(self, data_dir: str | os.PathLike | None = None, dataset: str | None = None) -> None:
        self.data_dir = data_dir
        self.rows = DatasetRows(dataset, _gsm8k_rows_from_records) if dataset is not None else None

    def train_rows(self) -> list[dict[str, Any]]:
        return self.rows.train if self.rows is not None else load_gsm8k("train", self.data_dir)

    def eval_rows(self) -> list[dict[str, Any]]:
        return self.rows.eval if self.rows is not None else load_gsm8k("test", self.data_dir)

    def batch(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
        return prompt_completion_batch(
            tokenizer, [gsm8k_prompt(r) for r in rows], [" " + r["answer"] for r in rows], max_length
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int = 8,
        max_length: int = 256,
        max_new_tokens: int = 192,
        generate: bool = True,
        loss_model: Any = None,
        per_example: dict[str, list[float]] | None = None,
        **_: Any,
    ) -> dict[str, float]:
        loss = held_out_loss(self, loss_model or model, tokenizer, rows, batch_size, max_length, per_example)
        metrics = {"loss": loss}
        if generate:
            completions = greedy_generate(
                model, tokenizer, [gsm8k_prompt(r) for r in rows], max_new_tokens, batch_size, stop=(NEXT_QUESTION,)
            )
            correct = [
                final_number(c.split(NEXT_QUESTION)[0]) == final_number(r["answer"])
                for c, r in zip(completions, rows, strict=True)
            ]
            metrics["exact_match"] = sum(correct) / len(rows)
            if per_example is not None:
                per_example["exact_match"] = [float(c) for c in correct]
        return metrics
