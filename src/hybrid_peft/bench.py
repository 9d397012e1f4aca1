"""``hybrid-peft bench CONFIG``: every method beside full fine-tuning on quality, time and memory.

A bench config (YAML; ``quick`` and ``full`` are built in, see ``bench_profiles/``) names tasks, methods and seeds::

    output_dir: runs/bench-quick
    seeds: [0, 1, 2]
    defaults: {threads: 2, generate: false}             # any training option (hybrid-peft train --help)
    tasks:
      sst2-minilm: {task: sst2, model: minilm-l6, steps: 60, batch_size: 16, max_length: 64}
    methods:
      full: {method: full, learning_rate: 5.0e-5}
      lora: {method: lora, adapter: {rank: 8, alpha: 16}}
      hybrid-share: {method: hybrid, adapter: {rank: 8, block_size: 4, rule: share}, tasks: {gsm8k-smollm2: {...}}}

Each (task, method, seed) is one ``hybrid-peft train --config run.json`` in its own process (so peak memory is the
run's own), in ``OUTPUT_DIR/runs/<task>/<method>/seed-<n>/``. A run whose ``summary.json`` exists is reused, so an
interrupted bench continues where it stopped (``--rerun`` starts over), but only if the summary records the same
training as the config asks for now: edit a task's steps or a method's rate and those runs are stale, left out of the
tables and run again when selected. Options merge as defaults < task < method < the method's
entry for that task. Outputs, rewritten after every run:

    results.csv      one row per run: metric, held-out loss, median step time, wall time, peak RSS, parameters
    results.md       per task: mean ± std over seeds, time and memory as multiples of full fine-tuning
    plots/           loss curves per task, quality against peak memory and against step time, λ heatmaps
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hybrid_peft.errors import ConfigError
from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.registry import available_methods
from hybrid_peft.run import FULL, RunSummary, TrainConfig, merge_options
from hybrid_peft.run.summary import SUMMARY_FILE
from hybrid_peft.run.trainees import OwnAdapter
from hybrid_peft.tasks import primary_metric
from hybrid_peft.telemetry import plot_mixing_heatmap

CSV_FIELDS = (
    "task",
    "method",
    "seed",
    "status",
    "recipe_method",
    "model",
    "base_task",
    "metric_name",
    "metric_before",
    "metric",
    "loss_before",
    "held_out_loss",
    "final_train_loss",
    "median_step_s",
    "wall_s",
    "peak_rss_mb",
    "trainable_parameters",
    "total_parameters",
    "commit",
    "finished_at",
    "error",
)


@dataclass(frozen=True)
class BenchRun:
    task: str
    method: str
    seed: int
    config: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir)


@dataclass(frozen=True)
class BenchPlan:
    name: str
    output_dir: Path
    seeds: tuple[int, ...]
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    run_timeout_s: float = 3600.0

    def runs(
        self, tasks: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None
    ) -> list[BenchRun]:
        """Every (task, method, seed) as a validated training config; ``tasks``/``methods`` select by key, ``seeds``
        replaces the config's seeds."""
        for chosen, known, kind in ((tasks, self.tasks, "task"), (methods, self.methods, "method")):
            unknown = sorted(set(chosen or []) - set(known))
            if unknown:
                raise ConfigError(f"bench {self.name}: unknown {kind}(s) {unknown}; this config has {sorted(known)}")
        runs = []
        for task_key, task_options in self.tasks.items():
            if tasks and task_key not in tasks:
                continue
            for method_key, method_options in self.methods.items():
                if methods and method_key not in methods:
                    continue
                method_options = dict(method_options)
                per_task = method_options.pop("tasks", {}) or {}
                for seed in self.seeds if seeds is None else seeds:
                    options = merge_options(self.defaults, task_options)
                    options = merge_options(options, method_options)
                    options = merge_options(options, per_task.get(task_key, {}))
                    folder = self.output_dir / "runs" / task_key / method_key / f"seed-{seed}"
                    options |= {"seed": seed, "output_dir": str(folder)}
                    try:
                        config = TrainConfig.from_dict(options)
                    except ConfigError as exc:
                        raise ConfigError(f"bench {self.name}, task {task_key}, method {method_key}: {exc}") from exc
                    runs.append(BenchRun(task_key, method_key, seed, config))
        return runs


def builtin_profiles() -> list[str]:
    folder = resources.files("hybrid_peft") / "bench_profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_plan(config: str, output_dir: str | None = None) -> BenchPlan:
    """A built-in profile name (``quick``, ``full``) or a YAML/JSON file."""
    import yaml

    if config in builtin_profiles():
        text = (resources.files("hybrid_peft") / "bench_profiles" / f"{config}.yaml").read_text(encoding="utf-8")
        name = config
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"bench config {config!r} is neither a built-in profile {builtin_profiles()} nor a file")
        text, name = path.read_text(encoding="utf-8"), path.stem
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"bench config {config}: not valid YAML/JSON ({exc})") from exc
    known = {"output_dir", "seeds", "tasks", "methods", "defaults", "run_timeout_s", "description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"bench config {config}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    for key in ("tasks", "methods"):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise ConfigError(f"bench config {config}: '{key}' must map names to training options")
    plan = BenchPlan(
        name=name,
        output_dir=Path(output_dir or data.get("output_dir") or f"runs/bench-{name}"),
        seeds=tuple(data.get("seeds", [0])),
        tasks=data["tasks"],
        methods=data["methods"],
        defaults=data.get("defaults", {}) or {},
        run_timeout_s=float(data.get("run_timeout_s", 3600)),
    )
    plan.runs()  # every combination validates before anything runs
    return plan


# --- running -----------------------------------------------------------------------------------------------------


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """What decides a run's result: every option but where it is written, with the adapter's defaults filled in (so
    ``{rank: 8}`` and ``{rank: 8, gate: update}`` compare equal while the default gate is ``update``)."""
    data = config.to_dict()
    data.pop("output_dir")
    if config.method in available_methods():
        data["adapter"] = asdict(OwnAdapter.adapter_config(config))
    return data


def _read_summary(run: BenchRun) -> RunSummary | None:
    """The run's summary, or None when it has not finished (or its summary is unreadable)."""
    try:
        return RunSummary.read(run.folder)
    except (OSError, ValueError, TypeError, KeyError, ConfigError):
        return None


def finished_summary(run: BenchRun) -> RunSummary | None:
    """The run's summary when it finished with the options the config gives it now, else None: a run that finished
    with other options (a task's steps or a method's rate edited since) is stale, its numbers no longer answer for
    this config."""
    summary = _read_summary(run)
    if summary is None or _comparable(summary.config) != _comparable(run.config):
        return None
    return summary


def run_state(run: BenchRun) -> str:
    """``finished`` (reused), ``stale`` (finished with other options; runs again) or ``new``."""
    if _read_summary(run) is None:
        return "new"
    return "finished" if finished_summary(run) is not None else "stale"


def execute(run: BenchRun, timeout_s: float, rerun: bool = False) -> dict[str, Any]:
    """One run in its own ``hybrid-peft train`` process; its result row (reused when it finished with the same
    options, see :func:`finished_summary`)."""
    summary_path = run.folder / SUMMARY_FILE
    summary = None if rerun else finished_summary(run)
    if summary is None:
        run.folder.mkdir(parents=True, exist_ok=True)
        summary_path.unlink(missing_ok=True)
        atomic_write_text(run.folder / "run.json", json.dumps(run.config.to_dict(), indent=1) + "\n")
        config_file = str(run.folder / "run.json")
        command = [sys.executable, "-m", "hybrid_peft.cli", "train", "--config", config_file, "--overwrite"]
        env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TQDM_DISABLE": "1"}
        with open(run.folder / "run.log", "w", encoding="utf-8") as log:
            try:
                finished = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False
                )
                failure = None if finished.returncode == 0 else f"exit status {finished.returncode}"
            except subprocess.TimeoutExpired:
                failure = f"timed out after {timeout_s:.0f} s"
        if failure or not summary_path.is_file():
            lines = (run.folder / "run.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            detail = next((line for line in reversed(lines) if line.strip()), "") if lines else ""
            return _row(run, None, f"{failure or 'no summary.json'}: {detail[-300:]}")
        summary = RunSummary.read(run.folder)
    return _row(run, summary, None)


def _row(run: BenchRun, summary: RunSummary | None, error: str | None) -> dict[str, Any]:
    metric_name = primary_metric(run.config.task)
    row: dict[str, Any] = {
        "task": run.task,
        "method": run.method,
        "recipe_method": run.config.method,
        "seed": run.seed,
        "model": run.config.model,
        "base_task": run.config.task,
        "metric_name": metric_name,
        "status": "ok" if summary else "failed",
        "error": error or "",
    }
    if summary:
        environment = summary.environment
        row |= {
            "metric_before": summary.before.get(metric_name),
            "metric": summary.after.get(metric_name),
            "loss_before": summary.before.get("loss"),
            "held_out_loss": summary.after.get("loss"),
            "final_train_loss": summary.final_loss,
            "median_step_s": summary.median_step_s,
            "wall_s": summary.wall_s,
            "peak_rss_mb": summary.peak_rss_mb,
            "trainable_parameters": summary.trainable_parameters,
            "total_parameters": summary.total_parameters,
            "commit": environment.commit if environment else None,
            "finished_at": environment.finished_at if environment else None,
        }
    return row


def run_bench(
    plan: BenchPlan,
    *,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    rerun: bool = False,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Run (or reuse) every selected run, rewriting the outputs after each; returns the result rows. The outputs
    cover every finished run of the config in the output folder, not only this selection."""
    runs = plan.runs(tasks, methods, seeds)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    stale = [r for r in plan.runs(seeds=seeds) if run_state(r) == "stale"]
    if stale:
        selected = {(r.task, r.method, r.seed) for r in runs}
        again = sum((r.task, r.method, r.seed) in selected for r in stale)
        echo(
            f"{len(stale)} finished run(s) used other options than the config now gives (e.g. {stale[0].task} · "
            f"{stale[0].method} · seed {stale[0].seed}); they are left out of the tables"
            + (f", and the {again} selected now run again" if again else "; select them to run them again")
        )
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    started = time.perf_counter()
    for number, run in enumerate(runs, start=1):
        tick = time.perf_counter()
        row = execute(run, plan.run_timeout_s, rerun)
        rows[run.task, run.method, run.seed] = row
        shown = "failed: " + row["error"] if row["status"] != "ok" else _describe(row)
        echo(
            f"[{number}/{len(runs)}] {run.task} · {run.method} · seed {run.seed}: {shown} "
            f"({time.perf_counter() - tick:.0f} s; bench {time.perf_counter() - started:.0f} s)"
        )
        write_outputs(plan, _with_finished_runs(plan, rows, seeds))
    return list(rows.values())


def _with_finished_runs(
    plan: BenchPlan, rows: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int] | None = None
) -> list[dict[str, Any]]:
    """This invocation's rows plus every other run of the config that finished earlier (an earlier ``--tasks``,
    ``--methods`` or ``--seeds`` part), in the config's order, so the tables always cover everything run so far."""
    combined = []
    for run in plan.runs(seeds=sorted(set(plan.seeds) | set(seeds or ()))):
        key = (run.task, run.method, run.seed)
        if key in rows:
            combined.append(rows[key])
        elif (summary := finished_summary(run)) is not None:
            combined.append(_row(run, summary, None))
    return combined


def _describe(row: dict[str, Any]) -> str:
    metric = row.get("metric")
    parts = [f"{row['metric_name']} {metric:.4f}" if metric is not None else f"{row['metric_name']} –"]
    if row.get("held_out_loss") is not None:
        parts.append(f"loss {row['held_out_loss']:.4f}")
    if row.get("median_step_s") is not None:
        parts.append(f"step {row['median_step_s']:.3f} s")
    if row.get("peak_rss_mb") is not None:
        parts.append(f"{row['peak_rss_mb']:.0f} MB")
    return ", ".join(parts)


# --- outputs -----------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per task, one entry per method (in run order): mean ± std over seeds and ratios to full fine-tuning."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], {}).setdefault(row["method"], []).append(row)
    table: dict[str, list[dict[str, Any]]] = {}
    for task, methods in by_task.items():
        entries = []
        for method, method_rows in methods.items():
            ok = [r for r in method_rows if r["status"] == "ok"]
            entry: dict[str, Any] = {
                "method": method,
                "runs": len(method_rows),
                "ok": len(ok),
                "metric_name": method_rows[0]["metric_name"],
                "full": method_rows[0].get("recipe_method", method) == FULL,
            }
            for key in (
                "metric",
                "metric_before",
                "held_out_loss",
                "median_step_s",
                "wall_s",
                "peak_rss_mb",
                "trainable_parameters",
            ):
                entry[key] = mean_std([r.get(key) for r in ok])
            entries.append(entry)
        full = next((e for e in entries if e["full"] and e["ok"]), None)
        for entry in entries:
            for key, ratio in (("median_step_s", "time_x_full"), ("peak_rss_mb", "memory_x_full")):
                entry[ratio] = (
                    entry[key][0] / full[key][0] if full and entry[key] and full[key] and full[key][0] else None
                )
        table[task] = entries
    return table


def _fmt(value: tuple[float, float] | None, digits: int = 4, std: bool = True) -> str:
    if value is None:
        return "–"
    mean, deviation = value
    return f"{mean:.{digits}f} ± {deviation:.{digits}f}" if std else f"{mean:.{digits}f}"


def markdown_table(plan: BenchPlan, rows: list[dict[str, Any]]) -> str:
    lines = [f"# Bench `{plan.name}`", ""]
    seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))
    lines += [
        f"Seeds {seeds or '–'}; mean ± std over the seeds that finished (a value without ± is one seed's). Time and "
        "memory ratios are to full fine-tuning on the same task in the same bench (median training-step time; peak "
        "process RSS; means over the finished seeds).",
        "",
    ]
    for task, entries in aggregate(rows).items():
        task_rows = [r for r in rows if r["task"] == task]
        lines += [f"## {task} ({task_rows[0]['model']}, {task_rows[0]['base_task']})", ""]
        metric = entries[0]["metric_name"]
        lines.append(
            f"| method | {metric} | before | held-out loss | step s | time × full | peak RSS MB | memory × full "
            "| trainable | runs ok |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for e in entries:
            ratio = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            trainable = "–" if e["trainable_parameters"] is None else f"{e['trainable_parameters'][0]:,.0f}"
            spread = e["ok"] > 1  # one seed has no spread: print the value alone, not "± 0"
            lines.append(
                f"| {e['method']} | {_fmt(e['metric'], std=spread)} | {_fmt(e['metric_before'], std=False)} | "
                f"{_fmt(e['held_out_loss'], std=spread)} | {_fmt(e['median_step_s'], 3, std=False)} | "
                f"{ratio(e['time_x_full'])} | "
                f"{_fmt(e['peak_rss_mb'], 0, std=False)} | {ratio(e['memory_x_full'])} | {trainable} | "
                f"{e['ok']}/{e['runs']} |"
            )
        failed = [r for r in task_rows if r["status"] != "ok"]
        for r in failed:
            lines.append(f"\nFailed: {r['method']} seed {r['seed']}: {r['error']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_outputs(plan: BenchPlan, rows: list[dict[str, Any]]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(plan.output_dir / "results.csv", buffer.getvalue())
    atomic_write_text(plan.output_dir / "results.md", markdown_table(plan, rows))
    write_plots(plan, rows)


def _loss_curve(folder: Path) -> list[float]:
    path = folder / "train_log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r and "eval" not in r]


def write_plots(plan: BenchPlan, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder = plan.output_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows)
    palette = plt.get_cmap("tab20").colors
    markers = "osD^v<>Pp*hX"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    full_methods = {r["method"] for r in rows if r.get("recipe_method") == FULL}
    style = {
        m: {"color": "black" if m in full_methods else palette[k % len(palette)], "marker": markers[k % len(markers)]}
        for k, m in enumerate(methods)
    }
    ok = [r for r in rows if r["status"] == "ok"]
    for task, entries in table.items():
        figure, axis = plt.subplots(figsize=(7, 4))
        for entry in entries:
            curves = [
                _loss_curve(plan.output_dir / "runs" / task / entry["method"] / f"seed-{r['seed']}")
                for r in ok
                if r["task"] == task and r["method"] == entry["method"]
            ]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            window = max(1, length // 20)
            smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(length)]
            axis.plot(
                range(1, length + 1),
                smooth,
                label=entry["method"],
                linewidth=1.2,
                linestyle="--" if entry["full"] else "-",
                color=style[entry["method"]]["color"],
            )
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (seed mean, smoothed)")
        axis.set_title(f"{task}: training loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figure.tight_layout()
        figure.savefig(folder / f"loss_{task}.png", dpi=120)
        plt.close(figure)

    for key, label, name in (
        ("peak_rss_mb", "peak RSS (MB)", "quality_vs_memory.png"),
        ("median_step_s", "median step time (s)", "quality_vs_time.png"),
    ):
        tasks = list(table)
        if not tasks:
            continue
        columns = min(3, len(tasks))
        lines = math.ceil(len(tasks) / columns)
        figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns + 2, 3.6 * lines), squeeze=False)
        for axis in axes.flat[len(tasks) :]:
            axis.set_visible(False)
        for axis, task in zip(axes.flat, tasks, strict=False):
            for entry in table[task]:
                if entry["metric"] is None or entry[key] is None:
                    continue
                look = style[entry["method"]]
                axis.errorbar(
                    entry[key][0],
                    entry["metric"][0],
                    yerr=entry["metric"][1],
                    fmt=look["marker"],
                    color=look["color"],
                    capsize=3,
                    markersize=6,
                    label=entry["method"],
                )
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xlabel(f"{label}, log scale")
            axis.set_ylabel(table[task][0]["metric_name"])
            axis.set_title(task)
            axis.grid(alpha=0.3, which="both")
        handles = {h.get_label(): h for a in axes.flat for h in a.get_legend_handles_labels()[0]}
        figure.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
        figure.tight_layout(rect=(0, 0, 1 - 1.6 / figure.get_figwidth(), 1))
        figure.savefig(folder / name, dpi=120)
        plt.close(figure)

    first_seed: dict[tuple[str, str], int] = {}
    for row in ok:
        first_seed.setdefault((row["task"], row["method"]), row["seed"])
    for row in ok:
        telemetry = plan.output_dir / "runs" / row["task"] / row["method"] / f"seed-{row['seed']}" / "mixing.jsonl"
        if row["seed"] == first_seed[(row["task"], row["method"])] and telemetry.is_file():
            plot_mixing_heatmap(
                telemetry,
                folder / f"lambda_{row['task']}_{row['method']}.png",
                title=f"λ per layer: {row['method']} on {row['task']} (seed {row['seed']})",
            )
