"""A bench run's result row (:class:`BenchRow`), the per-method aggregate over seeds, and paired comparisons.

Paired differences: methods in one bench share seeds, data order and evaluation rows, so each method is compared with
a reference (LoRA by default) seed by seed: d_s = value(method, seed s) − value(reference, seed s) over the seeds both
finished, reported as mean(d) with a 95% paired t-interval across seeds, mean ± t(0.975, n − 1)·sd(d)/√n. "Level"
means the interval covers 0, "ahead"/"behind" that it does not; its half-width is the comparison's resolution.

Example by example (:func:`paired_example_differences`): where a run recorded each evaluation row's score
(``eval_examples.json``: accuracy as 0/1, exact match, pass@1), d_i = mean over seeds of score(method, s, i) −
score(reference, s, i) for each row i, and a 95% percentile bootstrap over rows (10,000 resamples, a fixed seed) of
mean(d). It answers "would another evaluation set of this size agree?", where the seed interval answers "would
other training seeds agree?"; a difference is real when both exclude 0. The held-out loss and forgetting are paired
the same way where runs recorded each row's loss per token (and each general-text passage's after training), the
mean weighted by each row's tokens as the runs' own means are; forgetting's "before" is the base model's, the same
for every run of a task, so its difference row by row is that of the losses after training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hybrid_peft.run import FULL
from hybrid_peft.run.folder import EXAMPLES_FILE
from hybrid_peft.tasks import primary_metric

if TYPE_CHECKING:
    from hybrid_peft.bench.plan import BenchPlan, BenchRun
    from hybrid_peft.run import RunSummary

REFERENCE = "lora"
RETENTION = "retention_loss"
# t(0.975, df) for df = 1..30; above that the normal quantile (1.96) is within 2%.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class BenchRow:
    """One run's result: what it was, whether it finished, and what it measured (None where it measured nothing)."""

    task: str
    method: str
    seed: int
    status: str  # ok, failed, or missing (not run yet)
    recipe_method: str
    model: str
    base_task: str
    metric_name: str
    learning_rate: float | None
    metric_before: float | None = None
    metric: float | None = None
    validation_metric: float | None = None
    validation_loss: float | None = None
    validation_examples: int | None = None  # training rows held out for the validation figures (0: none)
    loss_before: float | None = None
    held_out_loss: float | None = None
    retention_before: float | None = None  # loss per token on general text before training (run/retention.py)
    retention_after: float | None = None
    final_train_loss: float | None = None
    median_step_s: float | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    commit: str | None = None
    finished_at: str | None = None
    error: str = ""
    folder: str = ""

    @classmethod
    def of(cls, run: BenchRun, summary: RunSummary | None, error: str | None = None, status: str = "") -> BenchRow:
        """The row of ``run`` from its summary (None: it did not finish, ``error`` says why)."""
        config = run.config
        row = cls(
            task=run.task,
            method=run.method,
            seed=run.seed,
            status=status or ("ok" if summary else "failed"),
            recipe_method=config.method,
            model=config.model,
            base_task=config.task,
            metric_name=primary_metric(config.task),
            learning_rate=config.learning_rate,
            validation_examples=config.validation_examples,
            folder=str(run.folder),
            error=error or "",
        )
        if summary is None:
            return row
        environment = summary.environment
        return dataclasses.replace(
            row,
            metric_before=summary.before.get(row.metric_name),
            metric=summary.after.get(row.metric_name),
            loss_before=summary.before.get("loss"),
            validation_metric=summary.validation.get(row.metric_name),
            validation_loss=summary.validation.get("loss"),
            held_out_loss=summary.after.get("loss"),
            retention_before=summary.before.get(RETENTION),
            retention_after=summary.after.get(RETENTION),
            final_train_loss=summary.final_loss,
            median_step_s=summary.median_step_s,
            wall_s=summary.wall_s,
            peak_rss_mb=summary.peak_rss_mb,
            trainable_parameters=summary.trainable_parameters,
            total_parameters=summary.total_parameters,
            commit=environment.commit if environment else None,
            finished_at=environment.finished_at if environment else None,
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def full(self) -> bool:
        return self.recipe_method == FULL

    @property
    def forgetting(self) -> float | None:
        """The rise of the general-text loss over training (> 0: the model forgot some of what it knew)."""
        if self.retention_before is None or self.retention_after is None:
            return None
        return self.retention_after - self.retention_before

    @property
    def gain(self) -> float | None:
        """The task metric's rise over training."""
        return None if self.metric is None or self.metric_before is None else self.metric - self.metric_before

    @property
    def learnt(self) -> tuple[float, str] | None:
        """What the run learnt, for the learn–forget picture: the metric's gain, or, where the metric was not
        measured (a loss-only run), the fall of the held-out loss; with its axis label."""
        if self.gain is not None:
            return self.gain, f"gain in {self.metric_name} (after − before)"
        if self.held_out_loss is not None and self.loss_before is not None:
            return self.loss_before - self.held_out_loss, "fall of the held-out loss (before − after)"
        return None

    def value(self, key: str) -> float | None:
        """A field or property by name (``metric``, ``forgetting``, ``held_out_loss``, ...)."""
        return getattr(self, key)


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(BenchRow) if f.name != "folder") + ("forgetting",)


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


AGGREGATED = ("metric", "metric_before", "held_out_loss", "forgetting", "median_step_s", "wall_s", "peak_rss_mb",
              "trainable_parameters")  # fmt: skip


def aggregate(rows: list[BenchRow]) -> dict[str, list[dict[str, Any]]]:
    """Per task, one entry per method (in run order): mean ± std over seeds and ratios to full fine-tuning."""
    by_task: dict[str, dict[str, list[BenchRow]]] = {}
    for row in rows:
        by_task.setdefault(row.task, {}).setdefault(row.method, []).append(row)
    table: dict[str, list[dict[str, Any]]] = {}
    for task, methods in by_task.items():
        entries = []
        for method, method_rows in methods.items():
            ok = [r for r in method_rows if r.ok]
            entry: dict[str, Any] = {
                "method": method,
                "runs": len(method_rows),
                "ok": len(ok),
                "metric_name": method_rows[0].metric_name,
                "full": method_rows[0].full,
                "learning_rates": sorted({r.learning_rate for r in method_rows if r.learning_rate}),
            }
            for key in AGGREGATED:
                entry[key] = mean_std([r.value(key) for r in ok])
            entries.append(entry)
        full = next((e for e in entries if e["full"] and e["ok"]), None)
        for entry in entries:
            for key, ratio in (("median_step_s", "time_x_full"), ("peak_rss_mb", "memory_x_full")):
                entry[ratio] = (
                    entry[key][0] / full[key][0] if full and entry[key] and full[key] and full[key][0] else None
                )
        table[task] = entries
    return table


@dataclass(frozen=True)
class PairedDifference:
    """``method − reference`` of one value over the seeds both finished: mean, 95% interval (None with one seed)."""

    mean: float
    low: float | None
    high: float | None
    seeds: int

    @property
    def verdict(self) -> str:
        """``level`` when the interval covers 0 (or there is none), else ``above`` or ``below``."""
        if self.low is None or self.high is None or self.low <= 0 <= self.high:
            return "level"
        return "above" if self.low > 0 else "below"


def paired_difference(values: list[float], references: list[float]) -> PairedDifference | None:
    """The paired t-interval of ``values − references`` (matched by position, one pair per seed)."""
    differences = [v - r for v, r in zip(values, references, strict=True)]
    if not differences:
        return None
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedDifference(mean, None, None, 1)
    t = T_975[len(differences) - 2] if len(differences) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(differences) / math.sqrt(len(differences))
    return PairedDifference(mean, mean - half, mean + half, len(differences))


def paired_differences(
    rows: list[BenchRow], key: str = "metric", reference: str = REFERENCE
) -> dict[str, dict[str, PairedDifference]]:
    """Per task, per method other than ``reference``: its paired difference to ``reference`` in ``key``; tasks
    without the reference, or methods sharing no finished seed with it, are left out."""
    table: dict[str, dict[str, PairedDifference]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        by_method: dict[str, dict[int, float]] = {}
        for row in rows:
            value = row.value(key) if row.task == task and row.ok else None
            if value is not None:
                by_method.setdefault(row.method, {})[row.seed] = value
        base = by_method.get(reference)
        if not base:
            continue
        for method, values in by_method.items():
            seeds = sorted(set(values) & set(base))
            if method == reference or not seeds:
                continue
            difference = paired_difference([values[s] for s in seeds], [base[s] for s in seeds])
            if difference is not None:
                table.setdefault(task, {})[method] = difference
    return table


BOOTSTRAP_RESAMPLES = 10_000


# what each measure reads from a run's eval_examples.json: (scores, token weights); None: the row's task metric
EXAMPLE_MEASURES: dict[str, tuple[str | None, str | None]] = {
    "metric": (None, None),
    "held_out_loss": ("loss", "loss_tokens"),
    "forgetting": ("retention_loss", "retention_tokens"),  # after training; before is the shared base model
}


@functools.lru_cache(maxsize=256)
def _recorded_file(path: str, version: tuple[int, int]) -> dict[str, Any]:
    """A run's ``eval_examples.json`` scores, read once per version of the file (a table reads each run's file once
    per measure and method pair; ``version``, its modification time and size, makes a rewritten file read again)."""
    try:
        scores = json.loads(Path(path).read_text(encoding="utf-8")).get("scores", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return scores if isinstance(scores, dict) else {}


def _recorded_scores(row: BenchRow, name: str) -> list[float] | None:
    path = Path(row.folder) / EXAMPLES_FILE
    if not row.ok or not row.folder or not path.is_file():
        return None
    stat = path.stat()
    scores = _recorded_file(str(path), (stat.st_mtime_ns, stat.st_size)).get(name)
    return [float(v) for v in scores] if isinstance(scores, list) else None


def example_scores(row: BenchRow, measure: str = "metric") -> list[float] | None:
    """Each evaluation row's score after training as the run recorded it: in the row's metric (``metric``), its
    held-out loss per token (``held_out_loss``) or each general-text passage's loss per token (``forgetting``).
    None where it recorded none: a run before these files existed, a metric that is no mean over rows (MCC), a
    loss-only model (the chunked loss)."""
    name = EXAMPLE_MEASURES[measure][0] or row.metric_name
    return _recorded_scores(row, name)


def example_weights(row: BenchRow, measure: str) -> list[float] | None:
    """Each row's weight in ``measure``'s mean: its scored tokens for the losses (they are per-token means); None
    (every row alike) for the task metric."""
    weights = EXAMPLE_MEASURES[measure][1]
    return _recorded_scores(row, weights) if weights else None


def bootstrap_difference(
    values: list[list[float]],
    references: list[list[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    weights: list[float] | None = None,
) -> PairedDifference:
    """The mean of ``values − references`` (one list per seed, one score per evaluation row, rows in the same order)
    and its 95% percentile bootstrap interval over rows, the seeds averaged row by row. With ``weights`` (a row's
    tokens, for losses per token) the mean is weighted, as the run's own mean over tokens is."""
    differences = (np.asarray(values, dtype=np.float64) - np.asarray(references, dtype=np.float64)).mean(axis=0)
    w = np.ones_like(differences) if weights is None else np.asarray(weights, dtype=np.float64)
    generator = np.random.default_rng(seed)
    picks = generator.integers(0, len(differences), (resamples, len(differences)))
    means = (differences[picks] * w[picks]).sum(axis=1) / np.maximum(w[picks].sum(axis=1), 1e-300)
    low, high = np.quantile(means, [0.025, 0.975])
    return PairedDifference(float((differences * w).sum() / w.sum()), float(low), float(high), len(values))


def _same_before(row: BenchRow, reference: BenchRow, measure: str) -> bool:
    """Forgetting row by row compares the after-training losses, which is the difference of the rises only when both
    runs started from the same model (the same loss before, as every run of one task and base model does)."""
    if measure != "forgetting":
        return True
    before, base = row.retention_before, reference.retention_before
    return before is not None and base is not None and abs(before - base) <= 1e-6 * max(1.0, abs(base))


def paired_example_differences(
    rows: list[BenchRow], reference: str = REFERENCE, measure: str = "metric"
) -> dict[str, dict[str, PairedDifference]]:
    """Per task, per method other than ``reference``: its difference to ``reference`` in ``measure`` (the task metric,
    the held-out loss or forgetting), bootstrap over evaluation rows (:func:`bootstrap_difference`) on the seeds both
    recorded row scores for (with the same rows and, for losses, the same tokens per row)."""
    table: dict[str, dict[str, PairedDifference]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        by_method: dict[str, dict[int, tuple[BenchRow, list[float], list[float] | None]]] = {}
        for row in rows:
            scores = example_scores(row, measure) if row.task == task else None
            if scores:
                by_method.setdefault(row.method, {})[row.seed] = (row, scores, example_weights(row, measure))
        base = by_method.get(reference)
        if not base:
            continue
        for method, recorded in by_method.items():
            seeds = [
                s
                for s in sorted(set(recorded) & set(base))
                if len(recorded[s][1]) == len(base[s][1])
                and recorded[s][2] == base[s][2]
                and (measure == "metric" or base[s][2] is not None)
                and _same_before(recorded[s][0], base[s][0], measure)
            ]
            if method != reference and seeds:
                table.setdefault(task, {})[method] = bootstrap_difference(
                    [recorded[s][1] for s in seeds], [base[s][1] for s in seeds], weights=base[seeds[0]][2]
                )
    return table


def chosen_rates(plan: BenchPlan, sweep_rows: list[BenchRow]) -> dict[tuple[str, str], float]:
    """The best rate per (task, method) whose sweep has finished every candidate: the highest validation metric,
    ties (and ``select: loss``) by the lowest validation loss. Failed candidates never win."""
    if plan.sweep is None:
        return {}
    by_pair: dict[tuple[str, str], list[BenchRow]] = {}
    for row in sweep_rows:
        by_pair.setdefault((row.task, row.method), []).append(row)
    chosen = {}
    for pair, rows in by_pair.items():
        if len(rows) < len(plan.factors(pair[1])) or any(r.status == "missing" for r in rows):
            continue  # its sweep has not finished
        ok = [r for r in rows if r.ok and r.validation_loss is not None]
        if not ok:
            continue

        def rank(row: BenchRow) -> tuple[float, float]:
            metric = row.validation_metric
            metric = -math.inf if metric is None or plan.sweep.select == "loss" else metric
            return (-metric, row.validation_loss)

        chosen[pair] = min(ok, key=rank).learning_rate
    return chosen
