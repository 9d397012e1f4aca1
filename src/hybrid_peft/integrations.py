"""Training with the tools people already use: ``transformers.Trainer``, TRL's trainers (``SFTTrainer``,
``DPOTrainer``, ...), which are Trainers, and a plain loop under ``accelerate``.

Adapters attach in place, so the model a Trainer receives is the user's own ``transformers`` model with some linear
layers wrapped. What a Trainer cannot know about is what the methods need around the optimiser step;
:class:`HybridPeftCallback` supplies it:

- **the data-dependent start** (LoRA-GA's, the hybrid's with a ``LoRAGAConfig`` low-rank part) runs at train begin on
  the Trainer's first ``init_batches`` training batches, every process on its own shard with the gradient estimate
  summed across processes, so every rank starts from the same factors; skipped on resume and where it already ran;
- **the per-step hook** (the hybrid's gradient-norm rule, when it has one) runs after every backward pass, before the
  optimiser step, and is logged to ``telemetry_path``;
- **the rate multiples** (the hybrid's ``orthogonal.lr_scale``): the Trainer's own optimiser trains every parameter
  at one rate, so the callback warns when the optimiser ignores them; pass
  ``optimizers=(torch.optim.AdamW(parameter_groups(model, lr)), None)`` to the Trainer;
- **shareable checkpoints**: at every Trainer save, ``checkpoint-N/adapter/`` holds the adapter as
  :func:`~hybrid_peft.save_adapter` writes it (a few MB; the Trainer's own files hold the whole wrapped model, for
  ``resume_from_checkpoint``).

Usage (the README's "Use it with TRL, the Trainer and accelerate" is copied from ``tests/test_integrations.py``)::

    attach(model, HybridConfig(targets="all-linear"))
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data, processing_class=tokenizer,
                         optimizers=(torch.optim.AdamW(parameter_groups(model, 1e-3)), None),
                         callbacks=[HybridPeftCallback()])
    trainer.train()
    save_adapter(model, "out/adapter")
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hybrid_peft.adapters import adapter_layers, after_backward_hooks, initialise_adapters, prepare_optimiser
from hybrid_peft.serialization import save_adapter
from hybrid_peft.telemetry import MixingTelemetry, warn_if_rate_scales_not_applied

ADAPTER_FOLDER = "adapter"  # inside each of the Trainer's checkpoint-N folders


def needs_data_start(model: nn.Module) -> bool:
    """Whether an attached method has a data-dependent start (LoRA-GA's) that has not run yet."""
    return any(
        layer.needs_gradient_init and not getattr(layer, "initialised", False)
        for layer in adapter_layers(model).values()
    )


def _unwrap(module: Any) -> Any:
    """The model inside accelerate's/DDP's wrappers, and the optimiser inside accelerate's."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "optimizer", module) if isinstance(module, torch.optim.Optimizer) else module


def _first(loader: Any, count: int) -> Any:
    """The first ``count`` batches of ``loader``, its iterator closed after (accelerate's loaders track open ones)."""
    iterator = iter(loader)
    try:
        yield from itertools.islice(iterator, count)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class HybridPeftCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` (so TRL's trainers too) that runs what the attached methods need around
    training (module docstring): their data-dependent start at train begin, their after-backward hook before every
    optimiser step, a warning when the optimiser ignores their rate multiples, and ``checkpoint-N/adapter/`` at every
    save.

    Args:
        telemetry_path: where the per-step hook's records go (one JSON line per step, from the main process);
            none by default.
        init_batches: how many training batches the data-dependent start estimates the gradient from.
        loss_fn: ``(model, batch) -> loss`` for that estimate; by default ``model(**batch).loss``.
        save_adapters: write ``checkpoint-N/adapter/`` at every Trainer save.
        sharded: the model is sharded (FSDP2), so the hook's gradient norms are reduced across processes.
    """

    def __init__(
        self,
        telemetry_path: str | os.PathLike | None = None,
        *,
        init_batches: int = 8,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        save_adapters: bool = True,
        sharded: bool = False,
    ) -> None:
        self.telemetry = MixingTelemetry(telemetry_path) if telemetry_path else None
        self.init_batches = init_batches
        self.loss_fn = loss_fn
        self.save_adapters = save_adapters
        self.sharded = sharded
        self.hooks: list[Callable[[], dict]] | None = None  # the methods' after-backward hooks, found once

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):  # noqa: ANN001, ANN201
        model = _unwrap(model)
        if model is None:
            return
        if state.global_step == 0 and needs_data_start(model):
            if train_dataloader is None:
                raise RuntimeError("the data-dependent start needs the Trainer's train_dataloader; none was passed")
            batches = lambda: _first(train_dataloader, self.init_batches)  # noqa: E731
            was_training = model.training
            model.train()
            initialise_adapters(model, batches, loss_fn=self.loss_fn, progress=state.is_world_process_zero)
            model.train(was_training)
        if optimizer is not None:
            inner = _unwrap(optimizer)
            prepare_optimiser(inner, model)
            warn_if_rate_scales_not_applied(inner, model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if self.hooks is None:
            self.hooks = after_backward_hooks(_unwrap(model), sharded=self.sharded)
        records: dict[str, dict] = {}
        for hook in self.hooks:
            records.update(hook())
        if self.telemetry is not None and state.is_world_process_zero:
            self.telemetry.log(state.global_step, records)

    def on_save(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        model = _unwrap(model)
        if self.save_adapters and not self.sharded and model is not None and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_FOLDER
            if adapter_layers(model):
                save_adapter(model, folder)


def mixing_callback(telemetry_path: str | os.PathLike | None = None, *, sharded: bool = False) -> HybridPeftCallback:
    """:class:`HybridPeftCallback` logging the mixing rule to ``telemetry_path`` (the name before version 0.3)."""
    return HybridPeftCallback(telemetry_path, sharded=sharded)
