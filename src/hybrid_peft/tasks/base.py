"""What a task is to the training recipe (the :class:`Task` protocol) and the helpers tasks share: batching,
classification and generation loops, metrics.

A task is a small object with a name, the kind of model it needs (``causal-lm`` or ``sequence-classification``),
the metric it is ranked by (``primary_metric``, higher is better) and where its data lives (``data_folder``, under
the data folder; ``None`` for data a package ships), ``train_rows()`` / ``eval_rows()``,
``batch(tokenizer, rows, max_length)`` and ``evaluate(model, tokenizer, rows)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class Task(Protocol):
    name: str
    model_task: str  # "causal-lm" or "sequence-classification"
    num_labels: int | None
    primary_metric: str  # the key of evaluate()'s result a benchmark ranks by (higher is better)
    data_folder: str | None  # under the data folder (--data-dir); None when a package ships the data

    def train_rows(self) -> list[dict[str, Any]]: ...

    def eval_rows(self) -> list[dict[str, Any]]: ...

    def batch(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]: ...

    def evaluate(self, model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], **options: Any) -> dict[str, float]:
        """Metrics of ``model`` on ``rows``; options: ``batch_size``, ``max_length``, ``generate`` (generation
        metrics), ``loss_model`` (what computes the held-out loss, e.g. the chunked loss; default ``model``),
        ``per_example`` (a dict the task fills with ``{metric: [score of each row, in order]}`` for the metrics that
        are a mean over rows, e.g. accuracy as 0/1, for paired comparisons example by example)."""
        ...


# --- batching helpers -------------------------------------------------------------------------------------------


def warn_if_truncated(
    tokenizer: Any, texts: Sequence[str], max_length: int, pairs: Sequence[str] | None = None
) -> None:
    encoded = tokenizer(list(texts), list(pairs) if pairs is not None else None, add_special_tokens=True)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    longest = max(lengths, default=0)
    if longest > max_length:
        warnings.warn(  # one message per max_length, so Python shows it once rather than for every batch
            f"some sequences are longer than max_length={max_length} tokens and are truncated; raise --max-length "
            "to keep them whole",
            stacklevel=3,
        )


def classification_batch(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    """Sentence or sentence-pair classification batch from rows ``{"text", "text_pair" (or None), "label"}``."""
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and rows[0].get("text_pair") is not None else None
    warn_if_truncated(tokenizer, texts, max_length, pairs)
    encoded = tokenizer(texts, pairs, max_length=max_length, truncation=True, padding=True, return_tensors="pt")
    encoded["labels"] = torch.tensor([r["label"] for r in rows])
    return dict(encoded)


def length_sorted_batches(
    make_batch: Callable[[Any, Sequence[dict[str, Any]], int], dict[str, torch.Tensor]],
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    max_length: int,
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(row indices, batch)`` pairs covering ``rows``, the rows grouped by token length (longest first) so that each
    batch pads to little (sentences and problems of mixed lengths in row order pad to their batch's longest). For
    evaluation, where the order does not matter; training keeps its shuffled order. ``make_batch`` is a task's
    ``batch``. The longest batch comes first, so a batch size too large for memory fails at once."""
    lengths = [make_batch(tokenizer, [row], max_length)["input_ids"].shape[1] for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [(chunk, make_batch(tokenizer, [rows[i] for i in chunk], max_length)) for chunk in chunks]


@torch.no_grad()
def classify(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    max_length: int,
    row_losses: list[float] | None = None,
) -> tuple[list[int], float]:
    """Predicted classes of ``rows`` (in their order) and their mean loss, in eval mode (restored afterwards);
    batched by length (:func:`length_sorted_batches`). With ``row_losses`` (an empty list) each row's cross-entropy
    is put there in the rows' order, so a benchmark can pair the held-out loss row by row; their mean is the loss
    returned."""
    was_training = model.training
    model.eval()
    predictions, total_loss = [0] * len(rows), 0.0
    losses = [0.0] * len(rows)
    for chunk, batch in length_sorted_batches(classification_batch, tokenizer, rows, batch_size, max_length):
        output = model(**batch)
        total_loss += float(output.loss) * len(chunk)
        for row, prediction in zip(chunk, output.logits.argmax(-1).tolist(), strict=True):
            predictions[row] = prediction
        if row_losses is not None:
            each = F.cross_entropy(output.logits.float(), batch["labels"], reduction="none")
            for row, value in zip(chunk, each.tolist(), strict=True):
                losses[row] = value
    model.train(was_training)
    if row_losses is not None:
        row_losses[:] = losses
    return predictions, total_loss / len(rows)


def classify_rows(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    max_length: int,
    per_example: dict[str, list[float]] | None = None,
) -> tuple[list[int], float]:
    """:func:`classify` for a task's ``evaluate``: with ``per_example``, each row's correctness goes to
    ``per_example["accuracy"]`` and its loss to ``per_example["loss"]`` (no ``loss_tokens``: every row weighs alike
    in the mean), in the rows' order, for the bench's pairing by row."""
    row_losses = [] if per_example is not None else None
    predictions, loss = classify(model, tokenizer, rows, batch_size, max_length, row_losses)
    if per_example is not None:
        per_example["accuracy"] = [float(p == r["label"]) for p, r in zip(predictions, rows, strict=True)]
        per_example["loss"] = row_losses
    return predictions, loss


def prompt_completion_batch(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Causal-LM batch of ``prompt + completion`` with the loss on the completion tokens only (right padding).

    Too long a pair keeps the start of the completion (at least half of ``max_length``) and the end of the prompt,
    with a warning: cutting from the right alone would leave long prompts with nothing to learn from."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, truncated = [], 0
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        if len(prompt_ids) + len(completion_ids) > max_length:
            truncated += 1
            completion_ids = completion_ids[: max(max_length - len(prompt_ids), max_length // 2)]
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(completion_ids)) :]
        rows.append((prompt_ids, completion_ids))
    if truncated:
        warnings.warn(  # one message per max_length, so Python shows it once rather than for every batch
            f"some examples are longer than max_length={max_length} tokens and are truncated (prompt from the left, "
            "completion from the right); raise --max-length to keep them whole",
            stacklevel=2,
        )
    width = max(len(p) + len(c) for p, c in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (prompt_ids, completion_ids) in enumerate(rows):
        ids = prompt_ids + completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt_ids) : len(ids)] = torch.tensor(completion_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def mean_loss(
    model: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    after_batch: Callable[[int, dict[str, torch.Tensor], Any], None] | None = None,
) -> float:
    """Token- (or example-) weighted mean loss over batches, in eval mode (restored afterwards). ``after_batch``
    (batch number, batch, model output) sees each batch's output before it is freed: one batch's output is alive
    at a time."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for number, batch in enumerate(batches):
            output = model(**batch)
            labels = batch["labels"]
            n = int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.shape[0]
            total += float(output.loss) * n
            count += n
            if after_batch is not None:
                after_batch(number, batch, output)
            del output  # before the next batch's forward
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def completion_loss_and_accuracy(model: Any, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Causal-LM batches (``labels`` -100 outside the completion): the token-weighted mean loss and the share of
    completion tokens that are the model's top-1 prediction, in one forward pass per batch, in eval mode."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        output = model(**batch)
        targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        scored = targets != -100
        n = int(scored.sum())
        total += float(output.loss) * n
        correct += int((output.logits[:, :-1].argmax(-1) == targets)[scored].sum())
        count += n
    model.train(was_training)
    return total / max(count, 1), correct / max(count, 1)


ROW_LOSS_CHUNK = 32  # positions per piece of a row's loss: 32 × a 49k vocabulary is 6 MB, so recording rows adds
# nothing to a run's peak memory


def held_out_loss(
    task: Task,
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    max_length: int,
    per_example: dict[str, list[float]] | None = None,
) -> float:
    """:func:`mean_loss` of ``rows`` batched the way ``task`` batches its training data, grouped by length
    (:func:`length_sorted_batches`; the mean does not depend on the grouping).

    With ``per_example`` (a causal LM whose output carries its logits), each row's mean loss per completion token
    goes to ``per_example["loss"]`` and its number of scored tokens to ``per_example["loss_tokens"]``, in the rows'
    order: the token-weighted mean of the rows is the returned loss, so a bench can pair two runs row by row."""
    batches = length_sorted_batches(task.batch, tokenizer, rows, batch_size, max_length)
    if per_example is None:
        return mean_loss(model, [batch for _, batch in batches])
    losses, tokens = [0.0] * len(rows), [0] * len(rows)
    scored_rows = True

    def record_rows(number: int, batch: dict[str, torch.Tensor], output: Any) -> None:
        nonlocal scored_rows
        logits, labels = getattr(output, "logits", None), batch["labels"]
        if logits is None or labels.dim() != 2:  # a loss-only model (the chunked loss): no rows
            scored_rows = False
            return
        targets = labels[:, 1:]
        for position, index in enumerate(batches[number][0]):  # row by row, a few scored positions at a time
            scored = (targets[position] != -100).nonzero()[:, 0]
            tokens[index] = len(scored)
            row_sum = 0.0
            for start in range(0, len(scored), ROW_LOSS_CHUNK):
                chunk = scored[start : start + ROW_LOSS_CHUNK]
                piece = logits[position].index_select(0, chunk).float()  # (chunk, vocab): small
                row_sum += float(F.cross_entropy(piece, targets[position][chunk], reduction="sum"))
            losses[index] = row_sum / max(tokens[index], 1)

    loss = mean_loss(model, [batch for _, batch in batches], after_batch=record_rows)
    if scored_rows:
        per_example["loss"], per_example["loss_tokens"] = losses, [float(t) for t in tokens]
    return loss


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy completions (decoded, prompt removed), batched with left padding.

    With ``stop``, a prompt's decoding ends as soon as its completion contains one of those strings (the completion
    keeps the string; the caller cuts there), and a batch ends when all of its prompts have: up to the stop the text
    is the same as decoding all ``max_new_tokens``, in a fraction of the time for a model that rambles on."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=None, leave=False)  # terminal only
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, return_token_type_ids=False)
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}),
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


# --- metrics -----------------------------------------------------------------------------------------------------


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, binary F1 (positive class 1) and Matthews correlation (binary; multi-class uses its general form)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    n = len(labels)
    accuracy = sum(p == y for p, y in zip(predictions, labels, strict=True)) / n
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels, strict=True))
    fp = sum(p == 1 and y != 1 for p, y in zip(predictions, labels, strict=True))
    fn = sum(p != 1 and y == 1 for p, y in zip(predictions, labels, strict=True))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef(predictions, labels)}


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Gorodkin's multi-class MCC (equals the binary formula for two classes); 0 when undefined."""
    classes = sorted(set(labels) | set(predictions))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for p, y in zip(predictions, labels, strict=True):
        confusion[index[y]][index[p]] += 1
    total = len(labels)
    correct = sum(confusion[i][i] for i in range(k))
    true_counts = [sum(row) for row in confusion]
    predicted_counts = [sum(confusion[i][j] for i in range(k)) for j in range(k)]
    numerator = correct * total - sum(t * p for t, p in zip(true_counts, predicted_counts, strict=True))
    denominator = math.sqrt(
        (total**2 - sum(p * p for p in predicted_counts)) * (total**2 - sum(t * t for t in true_counts))
    )
    return numerator / denominator if denominator else 0.0
