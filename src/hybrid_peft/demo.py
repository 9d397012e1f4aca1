"""The main job on the offline defaults (``hybrid-peft demo``, ``make demo``): what the library is for, in minutes.

``compare`` (the default) fine-tunes SmolLM2-135M as an SST-2 classifier with full fine-tuning, LoRA and the hybrid,
each at the rate its learning-rate sweep chose (BENCHMARKS.md), on the same data order and budget, each run in its
own process (so each peak memory is its own), through the bench (``bench_profiles/demo.yaml``). It prints one
side-by-side table (accuracy before → after, held-out loss, time per step and in all, peak memory, trainable
parameters, each against full fine-tuning), after checking that the best adapter, reloaded onto a fresh base model,
and its merged export, loaded by plain ``transformers``, give the trained model's held-out loss. ``report.html`` in
the output folder holds the tables and plots.

``humaneval`` is the earlier job: one method on HumanEval 0–131, pass@1 (sandboxed) on 132–163, reload and merge.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.run import FULL, RunSummary, TrainConfig, run_training
from hybrid_peft.serialization import load_adapter
from hybrid_peft.tasks import get_task
from hybrid_peft.tasks.base import held_out_loss

DEMO_PROFILE = "demo"
RELOAD_TOLERANCE = 1e-4  # held-out loss: a reloaded adapter computes the same function
MERGE_TOLERANCE = 1e-3  # the merged weights round differently


@dataclass(frozen=True)
class ComparisonRow:
    method: str
    summary: RunSummary
    loss_reloaded: float | None = None  # adapters: the saved adapter on a fresh base model
    loss_merged: float | None = None  # adapters: the merged export in plain transformers


def run_comparison(
    output_dir: str = "runs/demo",
    methods: list[str] | None = None,
    data_dir: str | None = None,
    threads: int | None = None,
    echo: Any = print,
    profile: str = DEMO_PROFILE,
) -> list[ComparisonRow]:
    """Run the demo profile's methods (all, or ``methods``) from scratch, print the side-by-side table, check reload
    and merge; returns one row per method that finished. ``profile``: another bench config of one task."""
    from hybrid_peft.bench import load_plan, run_bench

    started = time.perf_counter()
    plan = load_plan(profile, output_dir=output_dir)
    extra = {k: v for k, v in (("data_dir", data_dir), ("threads", threads)) if v}
    plan = dataclasses.replace(plan, defaults={**plan.defaults, **extra})
    ((task_key, task_options),) = plan.tasks.items()
    task = get_task(task_options["task"], data_dir=data_dir)
    task.train_rows()  # no data folder: stop now with the fix, not after the first run
    runs = plan.runs(methods=methods)
    echo(
        f"{len(runs)} runs of {task_options['steps']} steps of {task_options['batch_size']} sentences: "
        f"{', '.join(r.method for r in runs)} on {task.name} with {task_options['model']}, each at its tuned rate "
        f"({', '.join(f'{r.method} {r.config.learning_rate:g}' for r in runs)}), one process each"
    )
    run_bench(plan, methods=methods, rerun=True, echo=echo)
    results = []
    for run in runs:
        try:
            summary = RunSummary.read(run.folder)
        except OSError:
            continue
        results.append(ComparisonRow(run.method, summary))
    if not results:
        raise RuntimeError(f"no demo run finished; see the run.log files under {output_dir}/runs/")
    adapters = [r for r in results if r.summary.config.method != FULL]
    if adapters:  # the best adapter's files, checked: reloaded onto a fresh base, and merged into plain transformers
        best = max(adapters, key=lambda r: (r.summary.after.get(task.primary_metric, 0.0), -r.summary.after["loss"]))
        echo(f"Checking {best.method}'s adapter reloaded onto a fresh base model, and its merged export ...")
        results = [_check_reload_and_merge(r, task) if r is best else r for r in results]
    echo("")
    for line in comparison_table(results):
        echo(line)
    echo("")
    echo(
        f"Wall time {time.perf_counter() - started:.0f} s. Report: {output_dir}/report.html (tables and plots, one "
        f"file); each run's own report.html under {output_dir}/runs/{task_key}/."
    )
    bad = [
        r.method
        for r in results
        if r.loss_reloaded is not None
        and (
            abs(r.loss_reloaded - r.summary.after["loss"]) > RELOAD_TOLERANCE
            or abs(r.loss_merged - r.summary.after["loss"]) > MERGE_TOLERANCE
        )
    ]
    if bad:
        raise RuntimeError(f"the reloaded or merged model of {bad} disagrees with the trained one; please report this")
    return results


def _check_reload_and_merge(row: ComparisonRow, task: Any) -> ComparisonRow:
    config = row.summary.config
    if config.method == FULL:
        return row
    from transformers import AutoModelForSequenceClassification

    folder = Path(config.output_dir)
    tokenizer = load_tokenizer(config.model)
    rows = task.eval_rows()[: config.eval_examples or None]
    # the adapter restores the head, so the fresh model's "new head" report is not news
    fresh = load_model(
        config.model, task="sequence-classification", num_labels=task.num_labels, report_new=lambda names: None
    )
    reloaded = load_adapter(fresh, folder / "adapter")
    loss_reloaded = held_out_loss(task, reloaded, tokenizer, rows, config.eval_batch_size, config.max_length)
    del reloaded, fresh
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one quiet check, not a loading bar per model
    try:
        merged = AutoModelForSequenceClassification.from_pretrained(folder / "merged", dtype=torch.float32)
    finally:
        if shown:  # the caller's setting, as it was
            transformers_logging.enable_progress_bar()
    loss_merged = held_out_loss(task, merged, tokenizer, rows, config.eval_batch_size, config.max_length)
    return dataclasses.replace(row, loss_reloaded=loss_reloaded, loss_merged=loss_merged)


def comparison_table(rows: list[ComparisonRow]) -> list[str]:
    """The side-by-side table: each method's numbers and, in brackets, their ratio to full fine-tuning."""
    full = next((r.summary for r in rows if r.summary.config.method == FULL), None)
    metric = "accuracy"

    def ratio(value: float | None, reference: float | None) -> str:
        return f" ({value / reference:.2f}×)" if full is not None and value and reference else ""

    header = (
        f"| method | rate | {metric} before → after | held-out loss | step s (× full) | training s (× full) | "
        "peak MB (× full) | trainable (× full) | reloaded / merged loss |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        s = row.summary
        training = s.median_step_s * s.config.steps if s.median_step_s else None
        full_training = full.median_step_s * full.config.steps if full and full.median_step_s else None
        checks = "–" if row.loss_reloaded is None else f"{row.loss_reloaded:.4f} / {row.loss_merged:.4f}"
        lines.append(
            f"| {row.method} | {s.config.learning_rate:g} | {s.before.get(metric, float('nan')):.3f} → "
            f"{s.after.get(metric, float('nan')):.3f} | {s.after['loss']:.4f} | "
            f"{s.median_step_s:.3f}{ratio(s.median_step_s, full and full.median_step_s)} | "
            f"{training:.0f}{ratio(training, full_training)} | "
            f"{s.peak_rss_mb:.0f}{ratio(s.peak_rss_mb, full and full.peak_rss_mb)} | "
            f"{s.trainable_parameters:,}{ratio(s.trainable_parameters, full and full.trainable_parameters)} | "
            f"{checks} |"
        )
    return lines


# --- the HumanEval job -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    model: str = "smollm2-135m"
    method: str = "lora-ga"
    adapter: dict[str, Any] = field(default_factory=lambda: {"rank": 8, "alpha": 16.0})
    steps: int = 30
    batch_size: int = 4
    max_length: int = 320
    learning_rate: float = 5e-4
    seed: int = 0
    threads: int = 2
    output_dir: str = "runs/demo-humaneval"


@dataclass(frozen=True)
class DemoResult:
    summary: RunSummary
    loss_reloaded: float  # the saved adapter on a fresh base model
    loss_merged: float  # the merged export loaded by plain transformers


def run_humaneval_demo(settings: DemoSettings) -> DemoResult:
    """Fine-tune on HumanEval 0–131 with the recipe, pass@1 (greedy, sandboxed) on 132–163 before and after, then
    check the saved adapter on a fresh base and the merged export in plain transformers."""
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
    print(f"  report                    {settings.output_dir}/report.html, report.md, loss.png, summary.json")
    if abs(loss_reloaded - after["loss"]) > RELOAD_TOLERANCE or abs(loss_merged - after["loss"]) > MERGE_TOLERANCE:
        raise RuntimeError("the reloaded or merged model disagrees with the trained one; please report this bug")
    return DemoResult(summary, loss_reloaded, loss_merged)
