"""Running a bench: each run in its own ``hybrid-peft train`` process, finished runs reused while their options are
today's, the rates a sweep chose, and the loop that rewrites the outputs after every run."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid_peft.bench.plan import BenchPlan, BenchRun
from hybrid_peft.bench.rows import BenchRow, chosen_rates
from hybrid_peft.bench.tables import write_outputs
from hybrid_peft.config import AdapterConfig
from hybrid_peft.errors import ConfigError, HybridPeftError
from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.run import RunSummary, TrainConfig
from hybrid_peft.run.summary import SUMMARY_FILE
from hybrid_peft.run.trainees import resolved_adapter_options
from hybrid_peft.serialization import saved_configs
from hybrid_peft.tasks import check_task_data


def _comparable(config: TrainConfig, resolved_adapters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What decides a run's result: every option but where it is written, with the adapter's defaults filled in (so
    ``{rank: 8}`` and ``{rank: 8, gate: update}`` compare equal while the default gate is ``update``). A finished
    run passes the adapter options it recorded as resolved when it ran (a default changed since is not applied to
    it); a run recorded before they existed is resolved with today's defaults."""
    data = config.to_dict()
    data.pop("output_dir")
    data.pop("before_cache")  # where the evaluation before training is shared: the same evaluation either way
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
    if _comparable(summary.config, _read_as_today(resolved)) != _comparable(run.config):
        return None
    return summary


def _read_as_today(recorded: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A run's recorded adapter options read as today's configs: a field added since the run is filled with its
    default, which keeps the behaviour from before the field existed (as every new field's default must), so adding
    a field (``loraplus_lr_ratio``) leaves earlier runs reusable while a changed value still makes them stale. Options
    today's configs cannot read (a field removed since) compare as recorded."""
    if recorded is None:
        return None
    read = []
    for options in recorded:
        try:
            read.append(AdapterConfig.from_dict(options).to_dict())
        except (ConfigError, TypeError, ValueError):
            read.append(options)
    return read


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


def execute(run: BenchRun, timeout_s: float, rerun: bool = False, echo: Any = None) -> BenchRow:
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
            return BenchRow.of(run, None, f"{failure or 'no summary.json'}: {detail[-300:]}")
        summary = RunSummary.read(run.folder)
    return BenchRow.of(run, summary)


class _Progress:
    """``[n/N]`` and an estimate of the time left: the median time of the runs that trained, times the runs still
    to train (those known to be finished already, ``reusable``, take no time)."""

    def __init__(self, total: int, echo: Any, reusable: set[tuple] = frozenset()) -> None:
        self.total, self.echo, self.done = total, echo, 0
        self.reusable = set(reusable)  # keys of runs not yet reported that will be reused
        self.started = time.perf_counter()
        self.durations: list[float] = []

    def start(self, run: BenchRun) -> None:
        """A heading before a run's own output, which names only its recipe method (``hybrid:``), not the key."""
        self.echo(f"→ {_name(run)} (run {self.done + 1} of {self.total})")

    def report(self, run: BenchRun, row: BenchRow, seconds: float, ran: bool) -> None:
        self.done += 1
        self.reusable.discard(run.key)
        if ran:
            self.durations.append(seconds)
        shown = "failed: " + row.error if not row.ok else _describe(row)
        left = max(0, self.total - self.done - len(self.reusable))
        eta = f", about {_duration(statistics.median(self.durations) * left)} left" if self.durations and left else ""
        self.echo(
            f"[{self.done}/{self.total}] {_name(run)}: {shown} "
            f"({seconds:.0f} s; bench {_duration(time.perf_counter() - self.started)}{eta})"
        )


def _name(run: BenchRun) -> str:
    rate = f" · lr {run.config.learning_rate:g}" if "lr-" in run.folder.parent.name else ""
    return f"{run.task} · {run.method}{rate} · seed {run.seed}"


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
    after_run: Callable[[BenchRun], None] | None = None,
) -> list[BenchRow]:
    """Run (or reuse) every selected run, rewriting the outputs after each (and calling ``after_run`` with each run
    that trained); returns the result rows (with a sweep: the sweep's runs, then the chosen rates' runs on the other
    seeds). The outputs cover every finished run of the config in the output folder, not only this selection."""
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    sweep = plan.sweep_runs(tasks, methods)
    chosen_now = chosen_rates(plan, [finished_row(r) for r in sweep])
    every_sweep = plan.sweep_runs()
    every = every_sweep + plan.runs(seeds=seeds, rates=chosen_rates(plan, [finished_row(r) for r in every_sweep]))
    selected_runs = sweep + plan.runs(tasks, methods, seeds, chosen_now)
    to_train = [r for r in selected_runs if rerun or finished_summary(r) is None]
    for task, data_dir, dataset in dict.fromkeys(
        (r.config.task, r.config.data_dir, r.config.dataset) for r in to_train
    ):
        check_task_data(task, data_dir=data_dir, dataset=dataset)  # once, not a failure in every run
    stale = [r for r in every if run_state(r) == "stale"]
    if stale:
        selected = {r.key for r in selected_runs}
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
    progress = _Progress(total, echo, reusable={r.key for r in selected_runs} - {r.key for r in to_train})
    rows: dict[tuple[str, str, int, float], BenchRow] = {}
    unwritten = False  # rows since the outputs were last written

    def execute_and_report(run: BenchRun) -> None:
        nonlocal unwritten
        tick = time.perf_counter()
        ran = rerun or finished_summary(run) is None
        if ran:
            progress.start(run)
        row = execute(run, plan.run_timeout_s, rerun, echo if ran else None)
        rows[run.key] = row
        progress.report(run, row, time.perf_counter() - tick, ran)
        unwritten = True
        if ran:  # after each run that trained, so an interrupted bench leaves its tables; reused runs wait for the end
            write_outputs(plan, *_with_finished_runs(plan, rows, seeds))
            unwritten = False
            if after_run is not None:
                after_run(run)

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


def finished_row(run: BenchRun) -> BenchRow:
    """The row of a run that finished with today's options, else a row saying it has not."""
    summary = finished_summary(run)
    return BenchRow.of(run, summary) if summary is not None else BenchRow.of(run, None, "not run yet", "missing")


def bench_rows(plan: BenchPlan, seeds: list[int] | None = None) -> list[BenchRow]:
    """Every finished result row of the config (each method at its chosen rate), as the tables report them."""
    return _with_finished_runs(plan, {}, seeds)[0]


def _with_finished_runs(
    plan: BenchPlan, rows: dict[tuple[str, str, int, float], BenchRow], seeds: list[int] | None = None
) -> tuple[list[BenchRow], list[BenchRow]]:
    """``(result rows, sweep rows)``: this invocation's rows plus every other run of the config that finished
    earlier (an earlier ``--tasks``, ``--methods`` or ``--seeds`` part), in the config's order, so the tables always
    cover everything run so far. Result rows are at each method's chosen rate when the config sweeps."""

    def known(run: BenchRun) -> BenchRow | None:
        if run.key in rows:
            return rows[run.key]
        summary = finished_summary(run)
        return BenchRow.of(run, summary) if summary is not None else None

    sweep_runs = plan.sweep_runs()
    sweep_rows = [row for run in sweep_runs if (row := known(run)) is not None]
    rates = chosen_rates(plan, [known(run) or BenchRow.of(run, None, "", "missing") for run in sweep_runs])
    all_seeds = sorted(set(plan.seeds) | set(seeds or ()))
    results = [row for run in plan.runs(seeds=all_seeds, rates=rates) if (row := known(run)) is not None]
    return results, sweep_rows


def _describe(row: BenchRow) -> str:
    parts = [f"{row.metric_name} {row.metric:.4f}"] if row.metric is not None else []  # not measured (no generation)
    if row.held_out_loss is not None:
        parts.append(f"loss {row.held_out_loss:.4f}")
    if row.forgetting is not None:
        parts.append(f"forgetting {row.forgetting:+.4f}")
    if row.validation_loss is not None:
        shown = row.validation_metric
        parts.append(f"validation {'' if shown is None else f'{shown:.4f} / '}{row.validation_loss:.4f}")
    if row.median_step_s is not None:
        parts.append(f"step {row.median_step_s:.3f} s")
    if row.peak_rss_mb is not None:
        parts.append(f"{row.peak_rss_mb:.0f} MB")
    return ", ".join(parts)
