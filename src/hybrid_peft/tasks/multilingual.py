"""Few-shot multilingual tasks, as in the paper's low-resource experiments: XNLI (natural language inference,
accuracy) and FLORES-200 (English → X translation, chrF++ and BLEU via sacrebleu).

Training sets take ``examples_per_language`` examples per language (32 by default), drawn reproducibly from the
dev split with the seed; evaluation uses examples the training set did not take (XNLI: the rest of dev; FLORES:
devtest), ``eval_per_language`` of them per language.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.errors import TaskDataError
from hybrid_peft.tasks.base import (
    classification_batch,
    classify_rows,
    greedy_generate,
    held_out_loss,
    prompt_completion_batch,
)
from hybrid_peft.tasks.data import read_text, resolve_data_dir
from hybrid_peft.tasks.registry import register_task

XNLI_LABELS = ("entailment", "neutral", "contradiction")
FLORES_NAMES = {
    "arb_Arab": "Arabic",
    "deu_Latn": "German",
    "fra_Latn": "French",
    "hin_Deva": "Hindi",
    "npi_Deva": "Nepali",
    "spa_Latn": "Spanish",
    "swh_Latn": "Swahili",
    "yor_Latn": "Yoruba",
    "zho_Hans": "Chinese",
}


def _few_shot_split(count: int, shots: int, seed: int, language: str) -> tuple[list[int], list[int]]:
    if shots > count:
        raise TaskDataError(f"{language}: asked for {shots} training examples but the file has only {count}")
    chosen = sorted(random.Random(f"{seed}:{language}").sample(range(count), shots))
    taken = set(chosen)
    return chosen, [i for i in range(count) if i not in taken]


@register_task("xnli")
class XnliTask:
    """XNLI dev files ``xnli/dev-<lang>.tsv`` (premise, hypothesis, label), one 3-way classifier for all languages."""

    name = "xnli"
    model_task = "sequence-classification"
    num_labels = len(XNLI_LABELS)
    primary_metric = "accuracy"
    data_folder = "xnli"

    def __init__(
        self,
        data_dir: Any = None,
        examples_per_language: int = 32,
        eval_per_language: int = 100,
        languages: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        folder = resolve_data_dir(data_dir) / "xnli"
        available = sorted(p.stem.removeprefix("dev-") for p in folder.glob("dev-*.tsv"))
        if not available:
            raise TaskDataError(f"no XNLI files (dev-<lang>.tsv) in {folder}")
        self.languages = list(languages or available)
        unknown = sorted(set(self.languages) - set(available))
        if unknown:
            raise TaskDataError(f"no XNLI file for language(s) {unknown} in {folder}; available: {available}")
        self.train, self.eval = [], []
        for language in self.languages:
            rows = self._read(folder / f"dev-{language}.tsv", language)
            chosen, rest = _few_shot_split(len(rows), examples_per_language, seed, language)
            self.train += [rows[i] for i in chosen]
            self.eval += [rows[i] for i in rest[:eval_per_language]]

    @staticmethod
    def _read(path: Path, language: str) -> list[dict[str, Any]]:
        rows = []
        for number, line in enumerate(read_text(path, "xnli").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3 or fields[2] not in XNLI_LABELS:
                raise TaskDataError(f"{path}:{number}: expected premise<TAB>hypothesis<TAB>one of {XNLI_LABELS}")
            rows.append(
                {"text": fields[0], "text_pair": fields[1], "label": XNLI_LABELS.index(fields[2]), "language": language}
            )
        return rows

    def train_rows(self) -> list[dict[str, Any]]:
        return self.train

    def eval_rows(self) -> list[dict[str, Any]]:
        return self.eval

    def batch(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
        return classification_batch(tokenizer, rows, max_length)

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int = 32,
        max_length: int = 128,
        per_example: dict[str, list[float]] | None = None,
        **_: Any,
    ) -> dict[str, float]:
        predictions, loss = classify_rows(model, tokenizer, rows, batch_size, max_length, per_example)
        correct: dict[str, list[bool]] = {}
        for row, prediction in zip(rows, predictions, strict=True):
            correct.setdefault(row["language"], []).append(prediction == row["label"])
        metrics = {f"accuracy_{lang}": sum(v) / len(v) for lang, v in sorted(correct.items())}
        metrics["accuracy"] = sum(sum(v) for v in correct.values()) / len(rows)
        metrics["loss"] = loss
        return metrics


@register_task("flores")
class FloresTask:
    """FLORES-200 English → X: ``flores/{dev,devtest}/<code>.{dev,devtest}`` aligned line by line."""

    name = "flores"
    model_task = "causal-lm"
    num_labels = None
    primary_metric = "chrf++"
    data_folder = "flores"

    def __init__(
        self,
        data_dir: Any = None,
        examples_per_language: int = 32,
        eval_per_language: int = 25,
        languages: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        folder = resolve_data_dir(data_dir) / "flores"
        self.languages = list(languages or [c for c in FLORES_NAMES if (folder / "dev" / f"{c}.dev").is_file()])
        if not self.languages:
            raise TaskDataError(f"no FLORES files in {folder} (expected dev/<code>.dev and devtest/<code>.devtest)")
        english_dev = self._lines(folder / "dev" / "eng_Latn.dev")
        english_test = self._lines(folder / "devtest" / "eng_Latn.devtest")
        self.train, self.eval = [], []
        for code in self.languages:
            if code not in FLORES_NAMES:
                raise TaskDataError(f"unknown FLORES language {code!r}; known: {sorted(FLORES_NAMES)}")
            dev = self._lines(folder / "dev" / f"{code}.dev", len(english_dev))
            test = self._lines(folder / "devtest" / f"{code}.devtest", len(english_test))
            chosen, _ = _few_shot_split(len(dev), examples_per_language, seed, code)
            self.train += [{"source": english_dev[i], "target": dev[i], "language": code} for i in chosen]
            self.eval += [
                {"source": english_test[i], "target": test[i], "language": code}
                for i in range(min(eval_per_language, len(test)))
            ]

    @staticmethod
    def _lines(path: Path, expected: int | None = None) -> list[str]:
        if not path.is_file():
            raise TaskDataError(f"{path} does not exist")
        lines = read_text(path, "flores").splitlines()
        if expected is not None and len(lines) != expected:
            raise TaskDataError(f"{path} has {len(lines)} lines but the English file has {expected}; not aligned")
        return lines

    @staticmethod
    def prompt(row: dict[str, Any]) -> str:
        return (
            f"Translate English to {FLORES_NAMES[row['language']]}.\nEnglish: {row['source']}\n"
            f"{FLORES_NAMES[row['language']]}:"
        )

    def train_rows(self) -> list[dict[str, Any]]:
        return self.train

    def eval_rows(self) -> list[dict[str, Any]]:
        return self.eval

    def batch(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
        return prompt_completion_batch(
            tokenizer, [self.prompt(r) for r in rows], [" " + r["target"] for r in rows], max_length
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int = 8,
        max_length: int = 256,
        max_new_tokens: int = 128,
        generate: bool = True,
        loss_model: Any = None,
        per_example: dict[str, list[float]] | None = None,
        **_: Any,
    ) -> dict[str, float]:
        loss = held_out_loss(self, loss_model or model, tokenizer, rows, batch_size, max_length, per_example)
        metrics = {"loss": loss}
        if generate:
            import sacrebleu

            outputs = greedy_generate(model, tokenizer, [self.prompt(r) for r in rows], max_new_tokens, batch_size)
            hypotheses = [o.strip().split("\n")[0] for o in outputs]
            by_language: dict[str, tuple[list[str], list[str]]] = {}
            for row, hypothesis in zip(rows, hypotheses, strict=True):
                by_language.setdefault(row["language"], ([], []))
                by_language[row["language"]][0].append(hypothesis)
                by_language[row["language"]][1].append(row["target"])
            for code, (hyps, refs) in sorted(by_language.items()):
                tokenize = "zh" if code.startswith("zho") else "13a"
                metrics[f"chrf++_{code}"] = sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
                metrics[f"bleu_{code}"] = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score
            languages = sorted(by_language)
            metrics["chrf++"] = sum(metrics[f"chrf++_{c}"] for c in languages) / len(languages)
            metrics["bleu"] = sum(metrics[f"bleu_{c}"] for c in languages) / len(languages)
        return metrics
