"""The main job on the offline defaults: fine-tune SmolLM2-135M on HumanEval with the training recipe, then prove
the outputs usable.

1. ``run_training`` (see ``run/recipe.py``): held-out loss and pass@1 (greedy, sandboxed) on HumanEval problems 132–163
   before and after fine-tuning on problems 0–131; report.md and loss.png in the output folder.
2. The saved adapter, loaded onto a fresh base model, and the merged export, loaded by plain ``transformers``,
   give the trained model's held-out loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.run import RunSummary, TrainConfig, run_training
from hybrid_peft.serialization import load_adapter
from hybrid_peft.tasks import get_task
from hybrid_peft.tasks.base import held_out_loss


@dataclass(frozen=True)
class DemoSettings:
    model: str = "smollm2-135m"
    # The default method: see BENCHMARKS.md for how it was chosen.
    method: str = "lora-ga"
    adapter: dict[str, Any] = field(default_factory=lambda: {"rank": 8, "alpha": 16.0})
    steps: int = 30
    batch_size: int = 4
    max_length: int = 320
    learning_rate: float = 5e-4
    seed: int = 0
    threads: int = 2
    output_dir: str = "runs/demo"


@dataclass(frozen=True)
class DemoResult:
    summary: RunSummary
    loss_reloaded: float  # the saved adapter on a fresh base model
    loss_merged: float  # the merged export loaded by plain transformers


def run_demo(settings: DemoSettings) -> DemoResult:
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    config = TrainConfig(
        model=settings.model,
        task="humaneval",
        method=settings.method,
        adapter=dict(settings.adapter),
        steps=settings.steps,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        eval_batch_size=8,
        generate=True,
        output_dir=settings.output_dir,
        merge=True,
        threads=settings.threads,
    )
    print(
        f"Fine-tuning {settings.model} with {settings.method} {settings.adapter} on HumanEval 0–131; evaluating on "
        "132–163 (held-out loss, pass@1 of greedy completions run in a sandbox) before and after.",
        flush=True,
    )
    summary = run_training(config, overwrite=True)  # the demo rewrites its own folder each time

    print("Checking the saved adapter (fresh base) and the merged export (plain transformers) ...", flush=True)
    task = get_task("humaneval")
    tokenizer = load_tokenizer(settings.model)
    rows = task.eval_rows()
    reloaded = load_adapter(load_model(settings.model), f"{settings.output_dir}/adapter")
    loss_reloaded = held_out_loss(task, reloaded, tokenizer, rows, 8, settings.max_length)
    del reloaded
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(f"{settings.output_dir}/merged", dtype=torch.float32)
    loss_merged = held_out_loss(task, merged, tokenizer, rows, 8, settings.max_length)

    before, after = summary.before, summary.after
    print("\nSummary")
    print(
        f"  model / method            {settings.model} / {settings.method} {settings.adapter}, "
        f"{summary.trainable_parameters:,} trainable parameters"
    )
    print(
        f"  training                  {settings.steps} steps of {settings.batch_size} x <= {settings.max_length} "
        f"tokens, median step {summary.median_step_s:.2f} s"
    )
    print(f"  held-out loss             {before['loss']:.4f} -> {after['loss']:.4f}")
    print(f"  held-out pass@1           {before['pass@1']:.3f} -> {after['pass@1']:.3f} ({len(rows)} problems)")
    print(f"  completions that parse    {before['parses']:.3f} -> {after['parses']:.3f}")
    print(f"  reloaded adapter / merged {loss_reloaded:.4f} / {loss_merged:.4f} (equal to the line above)")
    print(f"  wall time, peak RSS       {time.perf_counter() - started:.0f} s, {summary.peak_rss_mb:.0f} MB")
    print(f"  report                    {settings.output_dir}/report.md, loss.png, summary.json")
    if abs(loss_reloaded - after["loss"]) > 1e-4 or abs(loss_merged - after["loss"]) > 1e-3:
        raise RuntimeError("the reloaded or merged model disagrees with the trained one; please report this bug")
    return DemoResult(summary, loss_reloaded, loss_merged)
