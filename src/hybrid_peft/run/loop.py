"""The one training loop, used by the recipe, the benchmarks and the tests alike.

Each step: forward, check the loss, backward, the attached methods' after-backward hooks (the hybrid's mixing rule,
when it has one), clip, optimiser step, schedule step. :func:`training_steps` yields a :class:`StepResult` after each
step and leaves logging, evaluation and checkpoints to its caller. The batches are a pure function of the step
(:func:`batch_indices`), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hybrid_peft.adapters import after_backward_hooks, parameter_groups, prepare_optimiser
from hybrid_peft.errors import BatchDoesNotFitError, HybridPeftError, NonFiniteLossError, first_line
from hybrid_peft.telemetry import block_gradient_norms

OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


def batch_indices(step: int, count: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of this rank's examples at ``step``: each epoch is a seeded permutation, the global batch is
    ``batch_size × world`` consecutive entries, each rank takes its own slice."""
    global_batch = batch_size * world
    start = step * global_batch + rank * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, count)
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimiser(
    model: nn.Module, *, learning_rate: float, weight_decay: float, steps: int, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters that require grad, with :func:`warmup_cosine`; one parameter group per learning
    rate multiplier that adapter layers ask for (:meth:`AdapterLayer.learning_rate_scales`); then each method's
    ``prepare_optimiser`` hook (:func:`~hybrid_peft.adapters.prepare_optimiser`). AdamW runs its fused
    kernel where every parameter allows it (:func:`fused_optimiser_supported`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HybridPeftError("no parameter requires grad: attach an adapter or unfreeze the model first")
    optimizer = torch.optim.AdamW(
        parameter_groups(model, learning_rate),  # the run's own rate first: its group's rate is logged
        lr=learning_rate,
        weight_decay=weight_decay,
        fused=fused_optimiser_supported(params) or None,
    )
    prepare_optimiser(optimizer, model)
    warmup = min(warmup_steps, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    return optimizer, schedule


FUSED_DEVICES = ("cpu", "cuda")


def fused_optimiser_supported(params: list[nn.Parameter]) -> bool:
    """Whether AdamW's fused kernel can take ``params``: floating point, on the CPU or a CUDA device. It updates every
    parameter in one pass over memory, where PyTorch's default on CPU is a loop of about ten operations per
    parameter (``benchmarks/optimiser_step.py`` times both)."""
    return all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


class batch_must_fit:  # noqa: N801 - used as a context manager, like contextlib's
    """Inside ``with batch_must_fit(what, fix):`` an out-of-memory failure becomes one sentence naming the batch
    and the fix. Reusable (the training loop wraps forward and backward with the same instance)."""

    def __init__(self, what: str, fix: str) -> None:
        self.what, self.fix = what, fix

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, traceback: object) -> bool:
        if exc is None or isinstance(exc, HybridPeftError):
            return False
        out_of_memory = isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
            isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OUT_OF_MEMORY_MARKERS)
        )
        if not out_of_memory:
            return False
        raise BatchDoesNotFitError(f"{self.what} does not fit in memory ({first_line(exc, 200)}); {self.fix}") from None


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float  # mean over processes
    learning_rate: float  # the rate this step used
    seconds: float  # forward to optimiser step, this process
    tokens: int  # attention-masked tokens in this process's batch
    mixing: dict[str, dict[str, float]] = field(default_factory=dict)  # the hooks' records: the hybrid's λ per layer
    block_grad_norms: dict[int, float] = field(default_factory=dict)  # with watch=True: ‖∇‖ per transformer block


def training_steps(
    model: nn.Module,
    batch_at: Callable[[int], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    *,
    start: int,
    stop: int,
    max_grad_norm: float = 0.0,
    parallel: Any = None,
    watch: bool = False,
) -> Iterator[StepResult]:
    """Train steps ``start .. stop-1``, yielding after each. With several processes pass the run's ``parallel``
    strategy (``run/parallel.py``) and the model and optimiser it prepared: it does the backward pass, the
    clipping and the loss's mean over processes; the after-backward hooks see the averaged gradients (the hybrid's
    rule all-reduces the norms of the shards under FSDP). ``watch`` adds each block's gradient norm to the result
    (not under FSDP, whose gradients are shards), outside the step's timing."""
    inner = parallel.unwrap(model) if parallel is not None else model
    sharded = parallel is not None and parallel.sharded
    hooks = after_backward_hooks(inner, sharded=sharded)  # none for methods without a per-step rule
    device = parallel.device if parallel is not None else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    for step in range(start, stop):
        batch = batch_at(step)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        tick = time.perf_counter()
        fits = batch_must_fit(
            f"step {step}: a batch of {batch['input_ids'].shape[0]} × {batch['input_ids'].shape[-1]} tokens",
            "lower --batch-size or --max-length (or train on a machine with more memory)",
        )
        with fits:
            loss = model(**batch).loss
        loss_value = parallel.mean(loss) if parallel is not None else loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"step {step}: the training loss is {loss_value}")
        with fits:
            parallel.backward(loss) if parallel is not None else loss.backward()
        learning_rate = schedule.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0)  # the run's rate
        records = {}
        for hook in hooks:
            records.update(hook())
        watched = time.perf_counter()
        block_norms = block_gradient_norms(inner) if watch and not sharded else {}
        watched = time.perf_counter() - watched
        if max_grad_norm:
            if parallel is not None:
                parallel.clip(params, max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if loss.is_cuda:
            torch.cuda.synchronize()  # time the step, not the launch of its kernels
        seconds = time.perf_counter() - tick - watched
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        yield StepResult(step, loss_value, learning_rate, seconds, tokens, records, block_norms)
