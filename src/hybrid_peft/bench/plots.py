"""The bench's plots under ``plots/``, one function each: training loss per task, quality against memory and against
step time, the learn–forget picture, λ heatmaps and time to quality."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_peft.bench.rows import BenchRow, aggregate
from hybrid_peft.bench.tables import time_to_quality
from hybrid_peft.telemetry import plot_mixing_heatmap

if TYPE_CHECKING:
    from hybrid_peft.bench.plan import BenchPlan

Style = dict[str, dict[str, Any]]


def write_plots(plan: BenchPlan, rows: list[BenchRow]) -> list[Path]:
    """Every plot of the bench, under ``plots/``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    folder = plan.output_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    style = method_style(rows)
    ok = [r for r in rows if r.ok]
    return [
        *loss_plots(ok, style, folder),
        *quality_plots(rows, style, folder),
        *learn_forget_plots(ok, style, folder),
        *mixing_heatmaps(ok, folder),
        *time_to_quality_plots(rows, style, folder),
    ]


def method_style(rows: list[BenchRow]) -> Style:
    """A colour and marker per method, the same in every plot; full fine-tuning in black."""
    import matplotlib.pyplot as plt

    palette, markers = plt.get_cmap("tab20").colors, "osD^v<>Pp*hX"
    methods = list(dict.fromkeys(r.method for r in rows))
    full = {r.method for r in rows if r.full}
    return {
        m: {
            "color": "black" if m in full else palette[k % len(palette)],
            "marker": markers[k % len(markers)],
            "linestyle": "--" if m in full else "-",
        }
        for k, m in enumerate(methods)
    }


def _loss_curve(folder: Path) -> list[float]:
    path = folder / "train_log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r and "eval" not in r]


def loss_plots(ok: list[BenchRow], style: Style, folder: Path) -> list[Path]:
    """Per task: each method's training loss, seed mean, smoothed."""
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(r.task for r in ok):
        figure, axis = plt.subplots(figsize=(7, 4))
        for method in dict.fromkeys(r.method for r in ok if r.task == task):
            curves = [c for r in ok if r.task == task and r.method == method if (c := _loss_curve(Path(r.folder)))]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            window = max(1, length // 20)
            smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(length)]
            look = style[method]
            axis.plot(range(1, length + 1), smooth, label=method, linewidth=1.2, linestyle=look["linestyle"],
                      color=look["color"])  # fmt: skip
        labels = ("step", "training loss (seed mean, smoothed)", f"{task}: training loss")
        written.append(_save_line_plot(figure, axis, labels, folder / f"loss_{task}.png"))
    return written


def _task_grid(count: int) -> tuple[Any, Any]:
    """A figure with one panel per task (up to three a row), room on the right for one legend."""
    import matplotlib.pyplot as plt

    columns = min(3, count)
    lines = math.ceil(count / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns + 2, 3.6 * lines), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, axes


def _save_grid(figure: Any, axes: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    handles = {h.get_label(): h for a in axes.flat for h in a.get_legend_handles_labels()[0]}
    figure.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
    figure.tight_layout(rect=(0, 0, 1 - 1.6 / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def quality_plots(rows: list[BenchRow], style: Style, folder: Path) -> list[Path]:
    """Quality (seed mean ± std) against peak memory and against step time, a panel per task, log x."""
    import matplotlib.ticker

    table = aggregate(rows)
    if not table:
        return []
    written = []
    for key, label, name in (
        ("peak_rss_mb", "peak RSS (MB)", "quality_vs_memory.png"),
        ("median_step_s", "median step time (s)", "quality_vs_time.png"),
    ):
        figure, axes = _task_grid(len(table))
        for axis, (task, entries) in zip(axes.flat, table.items(), strict=False):
            for entry in entries:
                if entry["metric"] is None or entry[key] is None:
                    continue
                look = style[entry["method"]]
                axis.errorbar(entry[key][0], entry["metric"][0], yerr=entry["metric"][1], fmt=look["marker"],
                              color=look["color"], capsize=3, markersize=6, label=entry["method"])  # fmt: skip
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xlabel(f"{label}, log scale")
            axis.set_ylabel(entries[0]["metric_name"])
            axis.set_title(task)
            axis.grid(alpha=0.3, which="both")
        written.append(_save_grid(figure, axes, folder / name))
    return written


def learn_forget_plots(ok: list[BenchRow], style: Style, folder: Path) -> list[Path]:
    """The learn–forget picture, a panel per task with a retention measure: the task metric's gain over training (x;
    the fall of the held-out loss where no metric was measured) against the rise of the general-text loss (y), one
    point per method and seed, the seed mean larger. Down and to the right is better: more learnt, less forgotten."""
    measured = [r for r in ok if r.learnt is not None and r.forgetting is not None]
    tasks = list(dict.fromkeys(r.task for r in measured))
    if not tasks:
        return []
    figure, axes = _task_grid(len(tasks))
    for axis, task in zip(axes.flat, tasks, strict=False):
        task_rows = [r for r in measured if r.task == task]
        for method in dict.fromkeys(r.method for r in task_rows):
            points = [(r.learnt[0], r.forgetting) for r in task_rows if r.method == method]
            look = style[method]
            axis.scatter(*zip(*points, strict=True), color=look["color"], marker=look["marker"], s=14, alpha=0.45)
            mean = (statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points))
            axis.scatter(*mean, color=look["color"], marker=look["marker"], s=60, edgecolors="black", label=method)
        axis.axhline(0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel(task_rows[0].learnt[1])
        axis.set_ylabel("forgetting: rise of general-text loss")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    return [_save_grid(figure, axes, folder / "learn_forget.png")]


def mixing_heatmaps(ok: list[BenchRow], folder: Path) -> list[Path]:
    """λ per layer and step for each hybrid with a rule, from its first finished seed."""
    first_seed: dict[tuple[str, str], int] = {}
    for row in ok:
        first_seed.setdefault((row.task, row.method), row.seed)
    written = []
    for row in ok:
        telemetry = Path(row.folder) / "mixing.jsonl"
        if row.seed == first_seed[(row.task, row.method)] and telemetry.is_file():
            title = f"λ per layer: {row.method} on {row.task} (seed {row.seed})"
            written.append(plot_mixing_heatmap(telemetry, folder / f"lambda_{row.task}_{row.method}.png", title=title))
    return written


def time_to_quality_plots(rows: list[BenchRow], style: Style, folder: Path) -> list[Path]:
    """Per task: held-out loss against training time (seed means), with the time-to-quality targets."""
    import matplotlib.pyplot as plt

    written = []
    for task, data in time_to_quality(rows).items():
        if not data["methods"]:
            continue
        figure, axis = plt.subplots(figsize=(7, 4))
        for method, result in data["methods"].items():
            length = min(len(c) for c in result["curves"])
            seconds = [statistics.fmean(c[i][1] for c in result["curves"]) for i in range(length)]
            losses = [statistics.fmean(c[i][2] for c in result["curves"]) for i in range(length)]
            look = style[method]
            axis.plot(seconds, losses, marker=look["marker"], color=look["color"], markersize=4, linewidth=1.2,
                      linestyle=look["linestyle"], label=method)  # fmt: skip
        for method, target in data["targets"].values():
            axis.axhline(target, color="grey", linewidth=0.8, linestyle=":")
            axis.annotate(f"{method}'s final", (axis.get_xlim()[1], target), fontsize=7, ha="right", va="bottom")
        if data["full_run_seconds"]:  # the paper's claim read as time to quality: full's loss in half its time
            half = 0.5 * data["full_run_seconds"]
            axis.axvline(half, color="grey", linewidth=0.8, linestyle="--")
            axis.annotate(" ½ full run", (half, 0.98), xycoords=("data", "axes fraction"), fontsize=7, va="top")
        labels = (
            "training time, s (seed mean; evaluation not counted)",
            "held-out loss (seed mean)",
            f"{task}: held-out loss against training time",
        )
        written.append(_save_line_plot(figure, axis, labels, folder / f"time_to_quality_{task}.png"))
    return written


def _save_line_plot(figure: Any, axis: Any, labels: tuple[str, str, str], path: Path) -> Path:
    """Label, grid, legend to the right, save and close; returns ``path``."""
    import matplotlib.pyplot as plt

    xlabel, ylabel, title = labels
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
