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
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hybrid_peft.errors import ConfigError, HybridPeftError
from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.html_report import write_html_report
from hybrid_peft.run import FULL, RunSummary, TrainConfig, merge_options
from hybrid_peft.run.summary import SUMMARY_FILE
from hybrid_peft.run.trainees import resolved_adapter_options
from hybrid_peft.serialization import saved_configs
from hybrid_peft.tasks import primary_metric
from hybrid_peft.telemetry import plot_mixing_heatmap, telemetry_summary

CSV_FIELDS = (
    "task",
    "method",
    "seed",
    "status",
    "recipe_method",
    "model",
    "base_task",
    "metric_name",
    "learning_rate",
    "metric_before",
    "metric",
    "validation_metric",
    "validation_loss",
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

    @property
    def key(self) -> tuple[str, str, int, float]:
        return self.task, self.method, self.seed, self.config.learning_rate


@dataclass(frozen=True)
class Sweep:
    """A learning-rate sweep: each method at its rate times each factor, on one seed, trained without
    ``validation_examples`` held-out training rows and ranked on them (never on the evaluation set); the best rate
    then runs on every seed. Ranked by the task's primary metric, ties broken by the validation loss (``select:
    loss`` ranks by the loss alone)."""

    factors: tuple[float, ...]
    seed: int = 0
    validation_examples: int = 256
    select: str = "metric"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Sweep:
        known = {"factors", "seed", "validation_examples", "select"}
        if not isinstance(data, dict) or not data.get("factors") or set(data) - known:
            raise ConfigError(
                f"{where}: 'sweep' takes {{factors: [0.3, 1, 3, 10], seed: 0, validation_examples: 256, select: "
                f"metric|loss}} (factors of each method's rate), got {data!r}"
            )
        factors = tuple(float(f) for f in data["factors"])
        if any(f <= 0 for f in factors) or len(set(factors)) != len(factors):
            raise ConfigError(f"{where}: sweep factors must be distinct and positive, got {list(factors)}")
        sweep = cls(
            factors, int(data.get("seed", 0)), int(data.get("validation_examples", 256)), data.get("select", "metric")
        )
        if sweep.select not in ("metric", "loss") or sweep.validation_examples < 1:
            raise ConfigError(f"{where}: sweep needs select 'metric' or 'loss' and validation_examples ≥ 1")
        return sweep

    def rates(self, base: float) -> list[float]:
        return [float(f"{base * factor:.2g}") for factor in self.factors]


@dataclass(frozen=True)
class BenchPlan:
    name: str
    output_dir: Path
    seeds: tuple[int, ...]
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    run_timeout_s: float = 3600.0
    sweep: Sweep | None = None

    def _check(self, tasks: list[str] | None, methods: list[str] | None) -> None:
        for chosen, known, kind in ((tasks, self.tasks, "task"), (methods, self.methods, "method")):
            unknown = sorted(set(chosen or []) - set(known))
            if unknown:
                raise ConfigError(f"bench {self.name}: unknown {kind}(s) {unknown}; this config has {sorted(known)}")

    def _pairs(self, tasks: list[str] | None, methods: list[str] | None) -> list[tuple[str, str]]:
        self._check(tasks, methods)
        return [
            (task, method)
            for task in self.tasks
            if not tasks or task in tasks
            for method in self.methods
            if not methods or method in methods
        ]

    def run(self, task_key: str, method_key: str, seed: int, learning_rate: float | None = None) -> BenchRun:
        """One validated run: options merge defaults < task < method < the method's entry for the task; with a
        sweep, ``learning_rate`` (else the merged options' rate) and the validation rows are set too."""
        method_options = dict(self.methods[method_key])
        per_task = method_options.pop("tasks", {}) or {}
        options = merge_options(self.defaults, self.tasks[task_key])
        options = merge_options(options, method_options)
        options = merge_options(options, per_task.get(task_key, {}))
        folder = self.output_dir / "runs" / task_key / method_key
        if self.sweep is not None:
            options.setdefault("validation_examples", self.sweep.validation_examples)
            if learning_rate is None:
                learning_rate = self.base_rate(task_key, method_key)
            options["learning_rate"] = learning_rate
            folder = folder / f"lr-{learning_rate:g}"
        options |= {"seed": seed, "output_dir": str(folder / f"seed-{seed}")}
        try:
            config = TrainConfig.from_dict(options)
        except ConfigError as exc:
            raise ConfigError(f"bench {self.name}, task {task_key}, method {method_key}: {exc}") from exc
        return BenchRun(task_key, method_key, seed, config)

    def base_rate(self, task_key: str, method_key: str) -> float:
        """The rate the config gives (or the method's default): the centre of its sweep."""
        method_options = dict(self.methods[method_key])
        per_task = method_options.pop("tasks", {}) or {}
        options = merge_options(merge_options(self.defaults, self.tasks[task_key]), method_options)
        try:
            return float(TrainConfig.from_dict(merge_options(options, per_task.get(task_key, {}))).learning_rate)
        except ConfigError as exc:
            raise ConfigError(f"bench {self.name}, task {task_key}, method {method_key}: {exc}") from exc

    def sweep_runs(self, tasks: list[str] | None = None, methods: list[str] | None = None) -> list[BenchRun]:
        """The sweep's runs (none without a sweep): every selected (task, method) at each candidate rate."""
        if self.sweep is None:
            return []
        return [
            self.run(task, method, self.sweep.seed, rate)
            for task, method in self._pairs(tasks, methods)
            for rate in self.sweep.rates(self.base_rate(task, method))
        ]

    def runs(
        self,
        tasks: list[str] | None = None,
        methods: list[str] | None = None,
        seeds: list[int] | None = None,
        rates: dict[tuple[str, str], float] | None = None,
    ) -> list[BenchRun]:
        """Every (task, method, seed) as a validated training config; ``tasks``/``methods`` select by key, ``seeds``
        replaces the config's seeds. With a sweep, each (task, method) runs at its chosen rate from ``rates``; pairs
        without one (their sweep has not finished) are left out."""
        runs = []
        for task, method in self._pairs(tasks, methods):
            if self.sweep is not None and (rates is None or (task, method) not in rates):
                continue
            rate = rates[task, method] if self.sweep is not None and rates else None
            runs += [self.run(task, method, seed, rate) for seed in (self.seeds if seeds is None else seeds)]
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
    known = {"output_dir", "seeds", "tasks", "methods", "defaults", "run_timeout_s", "description", "sweep"}
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
        sweep=Sweep.from_dict(data["sweep"], f"bench config {config}") if data.get("sweep") is not None else None,
    )
    # every combination validates before anything runs
    plan.sweep_runs() if plan.sweep is not None else plan.runs()
    return plan


# --- running -----------------------------------------------------------------------------------------------------


def _comparable(config: TrainConfig, resolved_adapters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What decides a run's result: every option but where it is written, with the adapter's defaults filled in (so
    ``{rank: 8}`` and ``{rank: 8, gate: update}`` compare equal while the default gate is ``update``). A finished
    run passes the adapter options it recorded as resolved when it ran (a default changed since is not applied to
    it); a run recorded before they existed is resolved with today's defaults."""
    data = config.to_dict()
    data.pop("output_dir")
    resolved = resolved_adapters if resolved_adapters is not None else resolved_adapter_options(config)
    if resolved is not None:
        data["adapter"] = resolved
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
    if summary is None:
        return None
    resolved = summary.resolved_adapters if summary.resolved_adapters is not None else _saved_adapter_options(run)
    if _comparable(summary.config, resolved) != _comparable(run.config):
        return None
    return summary


def _saved_adapter_options(run: BenchRun) -> list[dict[str, Any]] | None:
    """For a run that did not record its resolved adapter options: the options its saved adapter was trained with
    (fields its format version did not store filled with that version's defaults, not today's), or None."""
    try:
        return [config.to_dict() for config in saved_configs(run.folder / "adapter")]
    except HybridPeftError:
        return None


def run_state(run: BenchRun) -> str:
    """``finished`` (reused), ``stale`` (finished with other options; runs again) or ``new``."""
    if _read_summary(run) is None:
        return "new"
    return "finished" if finished_summary(run) is not None else "stale"


def stream_process(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    echo: Any = None,
    shown: tuple[str, ...] = (),
) -> str | None:
    """Run ``command``, its output (stdout and stderr) written to ``log_path`` and, for the lines that start with
    one of ``shown`` (all lines when empty), passed to ``echo`` as they come; ``None`` when it exits with status 0,
    else what went wrong. Killed after ``timeout_s`` seconds, or when the caller is interrupted."""
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"
        )

        def kill() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                if echo is not None and line.strip() and (not shown or line.startswith(shown)):
                    echo(f"  {line.rstrip()}")
            status = process.wait()
        except BaseException:  # Ctrl-C in the bench: the run goes too
            process.kill()
            process.wait()
            raise
        finally:
            timer.cancel()
    if timed_out.is_set():
        return f"timed out after {timeout_s:.0f} s"
    return None if status == 0 else f"exit status {status}"


def execute(run: BenchRun, timeout_s: float, rerun: bool = False, echo: Any = None) -> dict[str, Any]:
    """One run in its own ``hybrid-peft train`` process; its result row (reused when it finished with the same
    options, see :func:`finished_summary`). The run's output goes to its ``run.log`` and, line by line, to
    ``echo``."""
    summary_path = run.folder / SUMMARY_FILE
    summary = None if rerun else finished_summary(run)
    if summary is None:
        run.folder.mkdir(parents=True, exist_ok=True)
        summary_path.unlink(missing_ok=True)
        atomic_write_text(run.folder / "run.json", json.dumps(run.config.to_dict(), indent=1) + "\n")
        config_file = str(run.folder / "run.json")
        command = [sys.executable, "-m", "hybrid_peft.cli", "train", "--config", config_file, "--overwrite"]
        env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TQDM_DISABLE": "1"}
        # the terminal gets the run's progress, warnings and errors; run.log everything (its summary included)
        shown = (f"{run.config.method}:", "warning:", "error:", "Traceback")
        failure = stream_process(command, env, run.folder / "run.log", timeout_s, echo, shown)
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
        "learning_rate": run.config.learning_rate,
        "folder": str(run.folder),
        "status": "ok" if summary else "failed",
        "error": error or "",
    }
    if summary:
        environment = summary.environment
        row |= {
            "metric_before": summary.before.get(metric_name),
            "metric": summary.after.get(metric_name),
            "loss_before": summary.before.get("loss"),
            "validation_metric": summary.validation.get(metric_name),
            "validation_loss": summary.validation.get("loss"),
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


def chosen_rates(plan: BenchPlan, sweep_rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """The best rate per (task, method) whose sweep has finished every candidate: the highest validation metric,
    ties (and ``select: loss``) by the lowest validation loss. Failed candidates never win."""
    if plan.sweep is None:
        return {}
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sweep_rows:
        by_pair.setdefault((row["task"], row["method"]), []).append(row)
    chosen = {}
    for pair, rows in by_pair.items():
        if len(rows) < len(plan.sweep.factors) or any(r["status"] == "missing" for r in rows):
            continue  # its sweep has not finished
        ok = [r for r in rows if r["status"] == "ok" and r.get("validation_loss") is not None]
        if not ok:
            continue

        def rank(row: dict[str, Any]) -> tuple[float, float]:
            metric = row.get("validation_metric")
            metric = -math.inf if metric is None or plan.sweep.select == "loss" else metric
            return (-metric, row["validation_loss"])

        chosen[pair] = min(ok, key=rank)["learning_rate"]
    return chosen


class _Progress:
    """``[n/N]`` and an estimate of the time left from the runs that actually ran (reused runs take no time)."""

    def __init__(self, total: int, echo: Any) -> None:
        self.total, self.echo, self.done = total, echo, 0
        self.started = time.perf_counter()
        self.durations: list[float] = []

    def report(self, run: BenchRun, row: dict[str, Any], seconds: float, ran: bool) -> None:
        self.done += 1
        if ran:
            self.durations.append(seconds)
        shown = "failed: " + row["error"] if row["status"] != "ok" else _describe(row)
        left = self.total - self.done
        eta = f", about {_duration(statistics.median(self.durations) * left)} left" if self.durations and left else ""
        rate = f" · lr {run.config.learning_rate:g}" if "lr-" in run.folder.parent.name else ""
        self.echo(
            f"[{self.done}/{self.total}] {run.task} · {run.method}{rate} · seed {run.seed}: {shown} "
            f"({seconds:.0f} s; bench {_duration(time.perf_counter() - self.started)}{eta})"
        )


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def run_bench(
    plan: BenchPlan,
    *,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    rerun: bool = False,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Run (or reuse) every selected run, rewriting the outputs after each; returns the result rows (with a sweep:
    the sweep's runs, then the chosen rates' runs on the other seeds). The outputs cover every finished run of the
    config in the output folder, not only this selection."""
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    sweep = plan.sweep_runs(tasks, methods)
    chosen_now = chosen_rates(plan, [finished_row(r) for r in sweep])
    every_sweep = plan.sweep_runs()
    every = every_sweep + plan.runs(seeds=seeds, rates=chosen_rates(plan, [finished_row(r) for r in every_sweep]))
    stale = [r for r in every if run_state(r) == "stale"]
    if stale:
        selected = {r.key for r in sweep + plan.runs(tasks, methods, seeds, chosen_now)}
        again = sum(r.key in selected for r in stale)
        echo(
            f"{len(stale)} finished run(s) used other options than the config now gives (e.g. {stale[0].task} · "
            f"{stale[0].method} · seed {stale[0].seed}); they are left out of the tables"
            + (f", and the {again} selected now run again" if again else "; select them to run them again")
        )
    seed_list = list(plan.seeds if seeds is None else seeds)
    later_seeds = [s for s in seed_list if plan.sweep is None or s != plan.sweep.seed]
    pairs = plan._pairs(tasks, methods)
    total = len(sweep) + (len(pairs) * len(later_seeds) if plan.sweep else len(plan.runs(tasks, methods, seeds)))
    progress = _Progress(total, echo)
    rows: dict[tuple[str, str, int, float], dict[str, Any]] = {}
    unwritten = False  # rows since the outputs were last written

    def execute_and_report(run: BenchRun) -> None:
        nonlocal unwritten
        tick = time.perf_counter()
        ran = rerun or finished_summary(run) is None
        row = execute(run, plan.run_timeout_s, rerun, echo if ran else None)
        rows[run.key] = row
        progress.report(run, row, time.perf_counter() - tick, ran)
        unwritten = True
        if ran:  # after each run that trained, so an interrupted bench leaves its tables; reused runs wait for the end
            write_outputs(plan, *_with_finished_runs(plan, rows, seeds))
            unwritten = False

    for run in sweep:
        execute_and_report(run)
    rates = chosen_rates(plan, [rows.get(r.key) or finished_row(r) for r in sweep])
    if plan.sweep is not None:
        for (task, method), rate in rates.items():
            echo(
                f"{task} · {method}: learning rate {rate:g} chosen on {plan.sweep.validation_examples} validation rows"
            )
    for run in plan.runs(tasks, methods, later_seeds if plan.sweep else seeds, rates):
        execute_and_report(run)
    if unwritten:
        write_outputs(plan, *_with_finished_runs(plan, rows, seeds))
    return list(rows.values())


def finished_row(run: BenchRun) -> dict[str, Any]:
    """The row of a run that finished with today's options, else a row saying it has not."""
    summary = finished_summary(run)
    return _row(run, summary, None) if summary is not None else _row(run, None, "not run yet") | {"status": "missing"}


def _with_finished_runs(
    plan: BenchPlan, rows: dict[tuple[str, str, int, float], dict[str, Any]], seeds: list[int] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(result rows, sweep rows)``: this invocation's rows plus every other run of the config that finished
    earlier (an earlier ``--tasks``, ``--methods`` or ``--seeds`` part), in the config's order, so the tables always
    cover everything run so far. Result rows are at each method's chosen rate when the config sweeps."""

    def known(run: BenchRun) -> dict[str, Any] | None:
        if run.key in rows:
            return rows[run.key]
        summary = finished_summary(run)
        return _row(run, summary, None) if summary is not None else None

    sweep_runs = plan.sweep_runs()
    sweep_rows = [row for run in sweep_runs if (row := known(run)) is not None]
    rates = chosen_rates(plan, [known(run) or {**_row(run, None, ""), "status": "missing"} for run in sweep_runs])
    all_seeds = sorted(set(plan.seeds) | set(seeds or ()))
    results = [row for run in plan.runs(seeds=all_seeds, rates=rates) if (row := known(run)) is not None]
    return results, sweep_rows


def _describe(row: dict[str, Any]) -> str:
    metric = row.get("metric")
    parts = [f"{row['metric_name']} {metric:.4f}"] if metric is not None else []  # not measured (no generation)
    if row.get("held_out_loss") is not None:
        parts.append(f"loss {row['held_out_loss']:.4f}")
    if row.get("validation_loss") is not None:
        shown = row.get("validation_metric")
        parts.append(f"validation {'' if shown is None else f'{shown:.4f} / '}{row['validation_loss']:.4f}")
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
                "learning_rates": sorted({r["learning_rate"] for r in method_rows if r.get("learning_rate")}),
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


def sweep_table(plan: BenchPlan, sweep_rows: list[dict[str, Any]]) -> list[str]:
    """Per task: each method's validation metric (and loss) at every candidate rate, the chosen one in bold."""
    if plan.sweep is None or not sweep_rows:
        return []
    rates = chosen_rates(plan, sweep_rows)
    lines = [
        "## Learning-rate sweep",
        "",
        f"Seed {plan.sweep.seed}, each method's rate × {', '.join(f'{f:g}' for f in plan.sweep.factors)}; validation "
        f"metric (validation loss) on {plan.sweep.validation_examples} rows held out of the training data, never the "
        "evaluation set. **Bold**: the rate chosen ("
        + ("lowest validation loss" if plan.sweep.select == "loss" else "best validation metric, ties by loss")
        + "), which the tables above report.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in sweep_rows):
        task_rows = [r for r in sweep_rows if r["task"] == task]
        lines += [
            f"### {task}",
            "",
            "| method | " + " | ".join(["rate: validation metric (loss)"] * 1) + " |",
            "|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in task_rows):
            cells = []
            for row in sorted((r for r in task_rows if r["method"] == method), key=lambda r: r["learning_rate"]):
                if row["status"] != "ok":
                    text = f"{row['learning_rate']:g}: failed"
                else:
                    metric = row.get("validation_metric")
                    shown = "–" if metric is None else f"{metric:.4f}"
                    text = f"{row['learning_rate']:g}: {shown} ({row['validation_loss']:.4f})"
                cells.append(f"**{text}**" if rates.get((task, method)) == row["learning_rate"] else text)
            lines.append(f"| {method} | {' · '.join(cells)} |")
        lines.append("")
    return lines


def markdown_table(plan: BenchPlan, rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]] = ()) -> str:
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
            f"| method | rate | {metric} | before | held-out loss | step s | time × full | peak RSS MB | memory × full "
            "| trainable | runs ok |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for e in entries:
            ratio = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            trainable = "–" if e["trainable_parameters"] is None else f"{e['trainable_parameters'][0]:,.0f}"
            spread = e["ok"] > 1  # one seed has no spread: print the value alone, not "± 0"
            rate = ", ".join(f"{r:g}" for r in e["learning_rates"]) or "–"
            lines.append(
                f"| {e['method']} | {rate} | {_fmt(e['metric'], std=spread)} | {_fmt(e['metric_before'], std=False)} | "
                f"{_fmt(e['held_out_loss'], std=spread)} | {_fmt(e['median_step_s'], 3, std=False)} | "
                f"{ratio(e['time_x_full'])} | "
                f"{_fmt(e['peak_rss_mb'], 0, std=False)} | {ratio(e['memory_x_full'])} | {trainable} | "
                f"{e['ok']}/{e['runs']} |"
            )
        failed = [r for r in task_rows if r["status"] != "ok"]
        for r in failed:
            lines.append(f"\nFailed: {r['method']} seed {r['seed']}: {r['error']}")
        lines.append("")
    lines += time_to_quality_lines(rows)
    lines += telemetry_lines(rows)
    lines += sweep_table(plan, list(sweep_rows))
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(plan: BenchPlan, rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]] = ()) -> None:
    """``results.csv`` (and ``sweep.csv`` with a sweep), ``results.md``, ``plots/`` and ``report.html`` (the tables
    and every plot in one self-contained page)."""
    atomic_write_text(plan.output_dir / "results.csv", _csv(rows))
    if plan.sweep is not None:
        atomic_write_text(plan.output_dir / "sweep.csv", _csv(list(sweep_rows)))
    text = markdown_table(plan, rows, list(sweep_rows))
    atomic_write_text(plan.output_dir / "results.md", text)
    plots = write_plots(plan, rows)
    figures = ["## Plots", ""] + [f"![{path.stem}](plots/{path.name})" for path in plots]
    write_html_report(plan.output_dir, text + "\n" + "\n\n".join(figures) + "\n", f"hybrid-peft bench {plan.name}")


# --- time to quality and the paper's checks ----------------------------------------------------------------------


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


def time_to_quality(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: the two targets (full fine-tuning's final held-out loss, seed mean, and the best method's among those
    with the most finished seeds) and, per method, the median over seeds of the steps and training seconds to reach
    each, a seed that never did counting as never (None when most seeds never did), with ``seeds`` reached of all.
    A target that is a seed mean is missed by about half the seeds of the method that set it, by construction: the
    median, not "every seed", is the fair summary."""
    table: dict[str, dict[str, Any]] = {}
    for task, entries in aggregate(rows).items():
        ok = [r for r in rows if r["task"] == task and r["status"] == "ok"]
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
        for entry in entries:
            curves = [evaluation_curve(Path(r["folder"])) for r in ok if r["method"] == entry["method"]]
            curves = [c for c in curves if c]
            if not curves:
                continue
            reached = {}
            for key, (_, target) in targets.items():
                times = [time_to_loss(c, target) or (math.inf, math.inf) for c in curves]
                steps, seconds = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
                hits = sum(math.isfinite(t[0]) for t in times)
                reached[key] = None if math.isinf(seconds) else (steps, seconds, hits, len(times))
            methods[entry["method"]] = {"reached": reached, "curves": curves}
        table[task] = {"targets": targets, "methods": methods}
    return table


def time_to_quality_lines(rows: list[dict[str, Any]]) -> list[str]:
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
        "(k/n): seeds that reached it. `–`: most seeds never reached it within the run.",
        "",
    ]
    for task, data in table.items():
        if not data["methods"]:
            continue
        targets = data["targets"]
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
                    cells.append(f"{steps:.0f} steps, {seconds:.1f} s ({hits}/{seeds})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def telemetry_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's checks per method (median over seeds): gradient-norm ratio first/last adapted block,
    the largest orthogonality error, λ's rank correlation with the layers' gradient magnitudes, λ at the end."""
    keys = ("depth_ratio", "orthogonality_error", "lambda_gradient_spearman", "final_lambda")
    per_method: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        summary = telemetry_summary(Path(row["folder"]))
        bucket = per_method.setdefault((row["task"], row["method"]), {k: [] for k in keys})
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


def _loss_curve(folder: Path) -> list[float]:
    path = folder / "train_log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r and "eval" not in r]


def write_plots(plan: BenchPlan, rows: list[dict[str, Any]]) -> list[Path]:
    """Every plot of the bench, under ``plots/``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder = plan.output_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
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
                _loss_curve(Path(r["folder"])) for r in ok if r["task"] == task and r["method"] == entry["method"]
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
        labels = ("step", "training loss (seed mean, smoothed)", f"{task}: training loss")
        written.append(_save_line_plot(figure, axis, labels, folder / f"loss_{task}.png"))

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
        written.append(folder / name)

    first_seed: dict[tuple[str, str], int] = {}
    for row in ok:
        first_seed.setdefault((row["task"], row["method"]), row["seed"])
    for row in ok:
        telemetry = Path(row["folder"]) / "mixing.jsonl"
        if row["seed"] == first_seed[(row["task"], row["method"])] and telemetry.is_file():
            written.append(
                plot_mixing_heatmap(
                    telemetry,
                    folder / f"lambda_{row['task']}_{row['method']}.png",
                    title=f"λ per layer: {row['method']} on {row['task']} (seed {row['seed']})",
                )
            )

    for task, data in time_to_quality(rows).items():
        if not data["methods"]:
            continue
        figure, axis = plt.subplots(figsize=(7, 4))
        for method, result in data["methods"].items():
            length = min(len(c) for c in result["curves"])
            seconds = [statistics.fmean(c[i][1] for c in result["curves"]) for i in range(length)]
            losses = [statistics.fmean(c[i][2] for c in result["curves"]) for i in range(length)]
            look = style[method]
            axis.plot(
                seconds,
                losses,
                marker=look["marker"],
                color=look["color"],
                markersize=4,
                linewidth=1.2,
                linestyle="--" if method in full_methods else "-",
                label=method,
            )
        for method, target in data["targets"].values():
            axis.axhline(target, color="grey", linewidth=0.8, linestyle=":")
            axis.annotate(f"{method}'s final", (axis.get_xlim()[1], target), fontsize=7, ha="right", va="bottom")
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
