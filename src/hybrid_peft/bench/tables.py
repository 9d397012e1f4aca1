"""The bench's tables (``results.md``, ``results.csv``, ``sweep.csv``, ``report.html``): per task each method's mean ±
std over seeds, its paired difference to the reference method, forgetting, time to quality and the paper's checks."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_peft.bench.rows import (
    CSV_FIELDS,
    BenchRow,
    PairedDifference,
    aggregate,
    chosen_rates,
    paired_differences,
    paired_example_differences,
)
from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.html_report import write_html_report
from hybrid_peft.telemetry import telemetry_summary

if TYPE_CHECKING:
    from hybrid_peft.bench.plan import BenchPlan


MEASURES = ("metric", "held_out_loss", "forgetting")  # what the tables pair, by seed and by example


def mean_cell(value: tuple[float, float] | None, digits: int = 4, std: bool = True, signed: bool = False) -> str:
    """A ``(mean, standard deviation)`` cell, ``mean ± sd`` (the mean alone without ``std``); "–" for none."""
    if value is None:
        return "–"
    mean, deviation = value
    shown = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{shown} ± {deviation:.{digits}f}" if std else shown


def _factors(factors: tuple[float, ...]) -> str:
    return ", ".join(f"{f:g}" for f in factors)


def sweep_table(plan: BenchPlan, sweep_rows: list[BenchRow]) -> list[str]:
    """Per task: each method's validation metric (and loss) at every candidate rate, the chosen one in bold."""
    if plan.sweep is None or not sweep_rows:
        return []
    rates = chosen_rates(plan, sweep_rows)
    lines = [
        "## Learning-rate sweep",
        "",
        f"Seed {plan.sweep.seed}, each method's rate × {_factors(plan.sweep.factors)}"
        + "".join(
            f" ({method}: × {_factors(factors)})"
            for method, factors in plan.method_factors.items()
            if any(r.method == method for r in sweep_rows)
        )
        + "; validation "
        "metric (validation loss) on training rows held out of training (each task's count below), never the "
        "evaluation set. **Bold**: the rate chosen ("
        + ("lowest validation loss" if plan.sweep.select == "loss" else "best validation metric, ties by loss")
        + "), which the tables above report.",
        "",
    ]
    for task in dict.fromkeys(r.task for r in sweep_rows):
        task_rows = [r for r in sweep_rows if r.task == task]
        # a task may hold out its own count (``validation_examples`` in its options) over the sweep's
        counts = sorted({r.validation_examples for r in task_rows if r.validation_examples})
        held_out = " or ".join(str(c) for c in counts) or str(plan.sweep.validation_examples)
        lines += [
            f"### {task}",
            "",
            f"Validated on {held_out} held-out training rows.",
            "",
            "| method | " + " | ".join(["rate: validation metric (loss)"] * 1) + " |",
            "|---|---|",
        ]
        for method in dict.fromkeys(r.method for r in task_rows):
            cells = []
            for row in sorted((r for r in task_rows if r.method == method), key=lambda r: r.learning_rate):
                if not row.ok:
                    text = f"{row.learning_rate:g}: failed"
                else:
                    metric = row.validation_metric
                    shown = "–" if metric is None else f"{metric:.4f}"
                    text = f"{row.learning_rate:g}: {shown} ({row.validation_loss:.4f})"
                cells.append(f"**{text}**" if rates.get((task, method)) == row.learning_rate else text)
            lines.append(f"| {method} | {' · '.join(cells)} |")
        lines.append("")
    return lines


def paired_cell(difference: PairedDifference | None, digits: int = 4, seeds: bool = True, plain: bool = False) -> str:
    """``+0.0123 [-0.0040, +0.0286]`` (the mean and its 95% interval; bold where it excludes 0), or the mean alone
    from one seed; with ``seeds=False`` (a bootstrap over rows) the number of seeds averaged follows. ``plain``: no
    bold and no seed count, for the terminal."""
    if difference is None:
        return "–"
    if seeds and difference.low is None:
        return f"{difference.mean:+.{digits}f} (1 seed)"
    text = f"{difference.mean:+.{digits}f} [{difference.low:+.{digits}f}, {difference.high:+.{digits}f}]"
    if plain:
        return text
    text = text if difference.verdict == "level" else f"**{text}**"
    return text if seeds else f"{text} ({difference.seeds} seeds)"


def markdown_table(plan: BenchPlan, rows: list[BenchRow], sweep_rows: list[BenchRow] = ()) -> str:
    reference, *others = plan.references
    lines = [f"# Bench `{plan.name}`", ""]
    seeds = ", ".join(str(s) for s in sorted({r.seed for r in rows}))
    lines += [
        f"Seeds {seeds or '–'}; mean ± std over the seeds that finished (a value without ± is one seed's). **Δ vs "
        f"{reference}**: the method minus {reference} on the same seed, mean over the seeds both finished with a 95% "
        "paired t-interval across seeds; in bold where the interval excludes 0, else the two are level. **Δ by "
        "example**: where runs recorded each evaluation row's score, the same difference row by row (seeds "
        "averaged) with a 95% bootstrap interval over rows: whether another evaluation set would agree, where the "
        "seed interval says whether other training seeds would; a difference is real when both exclude 0. "
        "**Forgetting**: the rise of the loss per token on general text that is not the task "
        "(`retention_data`), before to after training; lower keeps more of what the model knew. Time and memory "
        "ratios are to full fine-tuning on the same task in the same bench (median training-step time; peak process "
        "RSS; means over the finished seeds).",
        "",
    ]
    metric_differences = paired_differences(rows, "metric", reference)
    forgetting_differences = paired_differences(rows, "forgetting", reference)
    loss_differences = paired_differences(rows, "held_out_loss", reference)
    example_differences = {measure: paired_example_differences(rows, reference, measure) for measure in MEASURES}
    for task, entries in aggregate(rows).items():
        task_rows = [r for r in rows if r.task == task]
        lines += [f"## {task} ({task_rows[0].model}, {task_rows[0].base_task})", ""]
        metric = entries[0]["metric_name"]
        by_example, loss_by_example, forgot_by_example = (example_differences[m].get(task, {}) for m in MEASURES)
        lines.append(
            f"| method | rate | {metric} | Δ vs {reference} [95% CI] | "
            + ("Δ by example [95% CI] | " if by_example else "")
            + "before | held-out loss | Δ loss [95% CI] | "
            + ("Δ loss by example [95% CI] | " if loss_by_example else "")
            + "forgetting | Δ forgetting [95% CI] | "
            + ("Δ forgetting by example [95% CI] | " if forgot_by_example else "")
            + "step s | time × full | peak RSS MB | memory × full | trainable | runs ok |"
        )
        lines.append("|---" * (15 + bool(by_example) + bool(loss_by_example) + bool(forgot_by_example)) + "|")
        for e in entries:
            ratio = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            trainable = "–" if e["trainable_parameters"] is None else f"{e['trainable_parameters'][0]:,.0f}"
            spread = e["ok"] > 1  # one seed has no spread: print the value alone, not "± 0"
            rate = ", ".join(f"{r:g}" for r in e["learning_rates"]) or "–"
            versus = metric_differences.get(task, {}).get(e["method"])
            forgot = forgetting_differences.get(task, {}).get(e["method"])
            loss = loss_differences.get(task, {}).get(e["method"])
            lines.append(
                f"| {e['method']} | {rate} | {mean_cell(e['metric'], std=spread)} | {paired_cell(versus)} | "
                + (f"{paired_cell(by_example.get(e['method']), seeds=False)} | " if by_example else "")
                + f"{mean_cell(e['metric_before'], std=False)} | {mean_cell(e['held_out_loss'], std=spread)} | "
                f"{paired_cell(loss)} | "
                + (f"{paired_cell(loss_by_example.get(e['method']), seeds=False)} | " if loss_by_example else "")
                + f"{mean_cell(e['forgetting'], std=spread, signed=True)} | {paired_cell(forgot)} | "
                + (f"{paired_cell(forgot_by_example.get(e['method']), seeds=False)} | " if forgot_by_example else "")
                + f"{mean_cell(e['median_step_s'], 3, std=False)} | {ratio(e['time_x_full'])} | "
                f"{mean_cell(e['peak_rss_mb'], 0, std=False)} | {ratio(e['memory_x_full'])} | {trainable} | "
                f"{e['ok']}/{e['runs']} |"
            )
        for r in (r for r in task_rows if not r.ok):
            lines.append(f"\nFailed: {r.method} seed {r.seed}: {r.error}")
        lines.append("")
    for other in others:
        lines += versus_lines(rows, other)
    lines += time_to_quality_lines(rows)
    lines += telemetry_lines(rows)
    lines += sweep_table(plan, list(sweep_rows))
    return "\n".join(lines) + "\n"


def versus_lines(rows: list[BenchRow], reference: str) -> list[str]:
    """Per task, every method's paired differences to a further reference (the main table's columns of Δ)."""
    measures = {key: paired_differences(rows, key, reference) for key in MEASURES}
    by_example = {key: paired_example_differences(rows, reference, key) for key in MEASURES}
    lines = []
    for task in dict.fromkeys(r.task for r in rows):
        methods = [m for m in dict.fromkeys(r.method for r in rows if r.task == task) if m != reference]
        if not any(method in table.get(task, {}) for table in measures.values() for method in methods):
            continue  # the reference did not run on this task
        metric = next(r.metric_name for r in rows if r.task == task)
        lines += [
            f"### {task}: paired to {reference}",
            "",
            f"The method minus {reference}, as the Δ columns above.",
            "",
            f"| method | Δ {metric} [95% CI] | Δ by example [95% CI] | Δ held-out loss [95% CI] | Δ loss by example "
            "[95% CI] | Δ forgetting [95% CI] | Δ forgetting by example [95% CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in methods:
            cells = [
                cell
                for key in MEASURES
                for cell in (
                    paired_cell(measures[key].get(task, {}).get(method)),
                    paired_cell(by_example[key].get(task, {}).get(method), seeds=False),
                )
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def terminal_summary(plan: BenchPlan, rows: list[BenchRow]) -> str:
    """What the bench prints when it ends: per task, each method's metric, its paired difference to the reference (by
    seed, and by evaluation row where recorded) and its forgetting with the same difference; results.md has the rest."""
    reference = plan.references[0]
    differences = {key: paired_differences(rows, key, reference) for key in MEASURES}
    by_example = {key: paired_example_differences(rows, reference, key) for key in MEASURES}
    lines = []
    for task, entries in aggregate(rows).items():
        # the task's metric, or the held-out loss where no run measured one (a loss-only profile)
        key = "metric" if any(e["metric"] for e in entries) else "held_out_loss"
        metric = entries[0]["metric_name"] if key == "metric" else "held-out loss"
        table = [["method", metric, f"Δ vs {reference} (seeds)", "Δ (rows)", "forgetting", "Δ forgetting", "Δ (rows)"]]
        for e in entries:
            method = e["method"]
            table.append(
                [
                    method,
                    mean_cell(e[key], std=e["ok"] > 1),
                    paired_cell(differences[key].get(task, {}).get(method), plain=True),
                    paired_cell(by_example[key].get(task, {}).get(method), seeds=False, plain=True),
                    mean_cell(e["forgetting"], std=False, signed=True),
                    paired_cell(differences["forgetting"].get(task, {}).get(method), plain=True),
                    paired_cell(by_example["forgetting"].get(task, {}).get(method), seeds=False, plain=True),
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += [f"{task}:"] + [
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
        ]
    if lines:
        lines.append(
            "(95% intervals: paired t across seeds, bootstrap over evaluation rows; a difference is real where both "
            "exclude 0)"
        )
    return "\n".join(lines)


def _csv(rows: list[BenchRow]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({name: row.value(name) for name in CSV_FIELDS} for row in rows)
    return buffer.getvalue()


def write_outputs(plan: BenchPlan, rows: list[BenchRow], sweep_rows: list[BenchRow] = ()) -> None:
    """``results.csv`` (and ``sweep.csv`` with a sweep), ``results.md``, ``plots/`` and ``report.html`` (the tables
    and every plot in one self-contained page)."""
    atomic_write_text(plan.output_dir / "results.csv", _csv(rows))
    if plan.sweep is not None:
        atomic_write_text(plan.output_dir / "sweep.csv", _csv(list(sweep_rows)))
    text = markdown_table(plan, rows, list(sweep_rows))
    atomic_write_text(plan.output_dir / "results.md", text)
    from hybrid_peft.bench.plots import write_plots  # the plots read the time-to-quality table of this module

    plots = write_plots(plan, rows)
    figures = ["## Plots", ""] + [f"![{path.stem}](plots/{path.name})" for path in plots]
    write_html_report(plan.output_dir, text + "\n" + "\n\n".join(figures) + "\n", f"hybrid-peft bench {plan.name}")


def evaluation_curve(folder: Path) -> list[tuple[int, float, float]]:
    """``(step, training seconds, held-out loss)`` of every evaluation after step 0 in a run's log (runs without
    ``train_seconds`` in their log, written before it existed, give none)."""
    path = folder / "train_log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [
        (r["step"], r["train_seconds"], r["eval"]["loss"])
        for r in records
        if "eval" in r and "loss" in r["eval"] and r.get("train_seconds") is not None and r["step"] > 0
    ]


def time_to_loss(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """``(steps, training seconds)`` at the first evaluation whose held-out loss is at most ``target``."""
    return next(((step, seconds) for step, seconds, loss in curve if loss <= target), None)


def time_to_quality(rows: list[BenchRow]) -> dict[str, dict[str, Any]]:
    """Per task: the two targets (full fine-tuning's final held-out loss, seed mean, and the best method's among those
    with the most finished seeds) and, per method, the median over seeds of the steps and training seconds to reach
    each, a seed that never did counting as never (None when most seeds never did), with ``seeds`` reached of all.
    Only runs evaluated during training (``eval_every``) count: a final evaluation alone says nothing of when. A
    target that is a seed mean is missed by about half the seeds of the method that set it, by construction: the
    median, not "every seed", is the fair summary. ``full_run_seconds``: full fine-tuning's whole run (the training
    seconds at its last evaluation, median over seeds), the time the paper's "less training time" is measured
    against; None without a full fine-tuning run."""
    table: dict[str, dict[str, Any]] = {}
    for task, entries in aggregate(rows).items():
        ok = [r for r in rows if r.task == task and r.ok]
        full = next((e for e in entries if e["full"] and e["held_out_loss"]), None)
        finished = [e for e in entries if e["held_out_loss"]]
        if not finished:
            continue
        most = max(e["ok"] for e in finished)
        best = min((e for e in finished if e["ok"] == most), key=lambda e: e["held_out_loss"][0])
        targets = {}
        if full is not None:
            targets["full"] = (full["method"], full["held_out_loss"][0])
        if best is not full:  # when full fine-tuning is the best, its one target is not measured and shown twice
            targets["best"] = (best["method"], best["held_out_loss"][0])
        methods = {}
        full_run = None
        for entry in entries:
            curves = [evaluation_curve(Path(r.folder)) for r in ok if r.method == entry["method"]]
            curves = [c for c in curves if len(c) > 1]  # a run evaluated only at its end has no time to quality
            if not curves:
                continue
            reached = {}
            for key, (_, target) in targets.items():
                times = [time_to_loss(c, target) or (math.inf, math.inf) for c in curves]
                steps, seconds = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
                hits = sum(math.isfinite(t[0]) for t in times)
                reached[key] = None if math.isinf(seconds) else (steps, seconds, hits, len(times))
            methods[entry["method"]] = {"reached": reached, "curves": curves}
            if entry is full:
                full_run = statistics.median(c[-1][1] for c in curves)
        table[task] = {"targets": targets, "methods": methods, "full_run_seconds": full_run}
    return table


def time_to_quality_lines(rows: list[BenchRow]) -> list[str]:
    table = time_to_quality(rows)
    if not any(t["methods"] for t in table.values()):
        return []
    lines = [
        "## Time to quality",
        "",
        "Steps and training seconds (the steps, and the gradient estimate of a LoRA-GA start; evaluation not counted; "
        "median over seeds, a seed that never reached the target counting as never) until the held-out loss, "
        "evaluated every `eval_every` steps, first reaches a target: full fine-tuning's final held-out loss (seed "
        "mean), and the best method's among those with the most seeds. "
        "(k/n): seeds that reached it. `–`: most seeds never reached it within the run. "
        + (
            "**× full run**: those seconds over full fine-tuning's whole run (its training seconds, median over "
            "seeds): below 0.5 is the paper's claim of about 2× less training time, read as time to quality. "
            if any(t["full_run_seconds"] for t in table.values())
            else ""
        )
        + "Seconds come from runs made one after another, so they carry the machine's drift between runs.",
        "",
    ]
    for task, data in table.items():
        if not data["methods"]:
            continue
        targets, full_run = data["targets"], data["full_run_seconds"]
        keys = [k for k in ("full", "best") if k in targets]
        heads = [f"to {targets[k][0]}'s {targets[k][1]:.4f}" for k in keys]
        lines += [f"### {task}", "", "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(keys)]
        for method, data_method in data["methods"].items():
            cells = []
            for key in keys:
                value = data_method["reached"][key]
                if value is None:
                    cells.append("–")
                else:
                    steps, seconds, hits, seeds = value
                    ratio = f", {seconds / full_run:.2f}× full run" if full_run else ""
                    cells.append(f"{steps:.0f} steps, {seconds:.1f} s{ratio} ({hits}/{seeds})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def telemetry_lines(rows: list[BenchRow]) -> list[str]:
    """The paper's checks per method (median over seeds): gradient-norm ratio first/last adapted block,
    the largest orthogonality error, λ's rank correlation with the layers' gradient magnitudes, λ at the end."""
    keys = ("depth_ratio", "orthogonality_error", "lambda_gradient_spearman", "final_lambda")
    per_method: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        if not row.ok:
            continue
        summary = telemetry_summary(Path(row.folder))
        bucket = per_method.setdefault((row.task, row.method), {k: [] for k in keys})
        for key in keys:
            if key in summary:
                bucket[key].append(summary[key])
    if not any(any(v) for v in per_method.values()):
        return []
    lines = [
        "## The paper's checks",
        "",
        "Median over seeds. **‖∇‖ first/last block**: the adapter gradient norm of the first adapted transformer "
        "block over the last one's, median over steps (1: preserved through depth). **‖RᵀR − I‖**: the largest "
        "orthogonality error of any rotation at any logged step. **ρ(λ, ‖∇‖)**: Spearman correlation across layers "
        "of λ and the layer's gradient magnitude, median over steps (hybrids). **λ at the end**: the low-rank "
        "branch's share at the last step, mean over layers (hybrids; the orthogonal branch has 1 − λ).",
        "",
        "| task | method | ‖∇‖ first/last block | ‖RᵀR − I‖ | ρ(λ, ‖∇‖) | λ at the end |",
        "|---|---|---|---|---|---|",
    ]
    for (task, method), values in per_method.items():
        shown = [
            f"{statistics.median(values[k]):{'.2e' if k == 'orthogonality_error' else '.3f'}}" if values[k] else "–"
            for k in keys
        ]
        lines.append(f"| {task} | {method} | " + " | ".join(shown) + " |")
    return [*lines, ""]
