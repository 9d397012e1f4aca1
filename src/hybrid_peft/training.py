"""A small training loop shared by the demo and the benchmarks (the full recipe builds on it).

Plain PyTorch: AdamW over the parameters that require grad, linear warm-up then cosine decay, a progress bar, a
clear stop on a non-finite loss.
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def tokenize_lm(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Causal-LM batch: labels are the input ids, with padding masked out of the loss."""
    batch = tokenizer(list(texts), max_length=max_length, truncation=True, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def shuffled_batches(
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    seed: int = 0,  # noqa: ANN001
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: each epoch is a fresh seeded shuffle of ``texts``."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(len(texts)), len(texts))
        indices, order = order[:batch_size], order[batch_size:]
        yield tokenize_lm(tokenizer, [texts[i] for i in indices], max_length)


def fixed_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict]:  # noqa: ANN001
    return [tokenize_lm(tokenizer, texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy over ``batches`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train(was_training)
    return total / tokens


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def median_step_s(self) -> float:
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2] if ordered else float("nan")


def train(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    description: str = "training",
    progress: bool = True,
    mixing_log: str | os.PathLike | None = None,
) -> TrainLog:
    """Train ``steps`` AdamW steps on the parameters that require grad; returns the per-step losses and times.

    Models with hybrid layers get their mixing rule applied after every backward pass (λ per layer from the
    gradient norms), with one telemetry line per step written to ``mixing_log`` when given."""
    from hybrid_peft.methods.hybrid import MixingTelemetry, hybrid_layers, update_mixing

    mixing = bool(hybrid_layers(model))
    telemetry = MixingTelemetry(mixing_log) if mixing and mixing_log is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: attach an adapter or unfreeze the model first")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps, warmup))
    model.train()
    log = TrainLog()
    bar = tqdm(range(steps), desc=description, unit="step", dynamic_ncols=True, disable=not progress)
    for step in bar:
        batch = next(batches)
        tick = time.perf_counter()
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the training loss is {loss.item()}; lower the learning rate")
        loss.backward()
        if mixing:
            records = update_mixing(model)
            if telemetry is not None:
                telemetry.log(step, records)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.step_seconds.append(time.perf_counter() - tick)
        log.losses.append(loss.item())
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}", step_s=f"{log.step_seconds[-1]:.2f}")
    return log
