"""Pair any recorded runs with a reference run, each named by method and rate, by seed and by evaluation row.

    python benchmarks/paired_records.py docs/bench/math-records --reference lora@4.5e-3 \
        --runs lora@2.5e-3,hybrid@2.5e-3,hybrid-sigmoid@4.5e-3

A bench's tables pair each method at the rate its sweep chose. To ask what a method does at another rate (a point
between two of the grid's, say, beside a rule that acts like a lower rate), pair its runs at that rate as they lie
in a records folder (``hybrid-peft bench ... --records DIR``; layout ``DIR/<task>/<method>/lr-<rate>/seed-<s>/``).
Each ``method@rate`` becomes one row: its mean task metric (where the runs scored one, e.g. accuracy), held-out
loss and forgetting over the seeds it finished, and the difference to the reference on the seeds both finished, with
the bench's own 95% intervals: the paired t-interval across seeds (``paired_differences``) and the bootstrap over
evaluation rows (``paired_example_differences``, where both runs recorded each row's score). ``--plots DIR`` draws
them on the bench's learn–forget plot. Nothing here chooses a rate: the tuned comparison stays the bench's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from hybrid_peft.bench.plan import BenchRun
from hybrid_peft.bench.rows import BenchRow, mean_std, paired_differences, paired_example_differences
from hybrid_peft.bench.tables import MEASURES, mean_cell, paired_cell
from hybrid_peft.run.summary import SUMMARY_FILE, RunSummary


def parse_run(text: str) -> tuple[str, float]:
    """``method@rate`` -> (method, rate)."""
    method, _, rate = text.strip().rpartition("@")
    try:
        value = float(rate)
    except ValueError:
        value = 0.0
    if not method or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: name a run as METHOD@RATE, e.g. lora@2.5e-3")
    return method, value


def read_rows(records: Path, task: str, method: str, rate: float) -> list[BenchRow]:
    """One result row per finished seed of ``method`` at ``rate`` on ``task`` in ``records``, named ``method@rate``
    (its folder the record's, so the per-row scores are read from there)."""
    folder = records / task / method / f"lr-{rate:g}"
    rows = []
    for seed_folder in sorted(folder.glob("seed-*")):
        if not (seed_folder / SUMMARY_FILE).is_file():
            continue
        try:
            summary = RunSummary.read(seed_folder)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SystemExit(f"{seed_folder}: unreadable run summary ({exc})") from exc
        run = BenchRun(task, f"{method}@{rate:g}", summary.config.seed, summary.config)
        rows.append(dataclasses.replace(BenchRow.of(run, summary), folder=str(seed_folder)))
    return rows


def table(rows: list[BenchRow], reference: str, task: str) -> list[str]:
    """The markdown table: each run's means over seeds and its differences to ``reference``, in the task's metric
    (where the runs scored one: accuracy on a classification task, none on the math profile's loss-only runs), the
    held-out loss and forgetting."""
    # the measures the bench's own tables pair; the metric only where these runs scored one
    measures = [m for m in MEASURES if m != "metric" or any(r.metric is not None for r in rows)]
    by_seed = {m: paired_differences(rows, m, reference).get(task, {}) for m in measures}
    by_row = {m: paired_example_differences(rows, reference, m).get(task, {}) for m in measures}
    names = {"metric": (rows[0].metric_name,) * 2, "held_out_loss": ("held-out loss", "loss")}  # (column, in a Δ)
    header = ["run", "seeds"]
    for measure in measures:
        column, short = names.get(measure, (measure, measure))
        header += [column, f"Δ {short} (seeds)", f"Δ {short} (rows)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r.method for r in rows):
        runs = [r for r in rows if r.method == name and r.ok]
        cells = [name, ",".join(str(r.seed) for r in runs)]
        for measure in measures:
            spread = mean_std([r.value(measure) for r in runs])
            cells.append(mean_cell(spread, std=len(runs) > 1, signed=measure == "forgetting"))
            cells += ["–", "–"] if name == reference else [
                paired_cell(by_seed[measure].get(name)), paired_cell(by_row[measure].get(name))
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="a records folder (hybrid-peft bench ... --records DIR)")
    parser.add_argument("--reference", required=True, type=parse_run, help="METHOD@RATE every run is paired with")
    parser.add_argument(
        "--runs",
        required=True,
        type=lambda text: [parse_run(part) for part in text.split(",") if part.strip()],
        help="comma-separated METHOD@RATE runs to pair with the reference",
    )
    parser.add_argument("--task", help="the task folder (default: every task folder holding the reference's runs)")
    parser.add_argument("--plots", type=Path, help="a folder for these runs' learn–forget plot (learn_forget.png)")
    args = parser.parse_args(argv)
    if not args.records.is_dir():
        parser.error(f"no records folder at {args.records}")
    reference_method, reference_rate = args.reference
    reference = f"{reference_method}@{reference_rate:g}"
    tasks = [args.task] if args.task else sorted(p.name for p in args.records.iterdir() if p.is_dir())
    printed, plotted = 0, []
    for task in tasks:
        base = read_rows(args.records, task, reference_method, reference_rate)
        if not base:
            if args.task:
                parser.error(f"no finished run of {reference} in {args.records / task}")
            continue
        others = dict.fromkeys(run for run in args.runs if run != args.reference)  # each once, the reference once
        rows = base + [row for method, rate in others for row in read_rows(args.records, task, method, rate)]
        missing = [f"{m}@{r:g}" for m, r in args.runs if not any(row.method == f"{m}@{r:g}" for row in rows)]
        if missing:
            print(f"{task}: no finished run of {', '.join(missing)} in {args.records / task}", file=sys.stderr)
        print(f"{task}, paired with {reference}:\n")
        print("\n".join(table(rows, reference, task)) + "\n")
        printed += 1
        plotted += rows
    if not printed:
        parser.error(f"no finished run of {reference} under {args.records}")
    if args.plots:
        import matplotlib

        from hybrid_peft.bench.plots import learn_forget_plots, method_style

        matplotlib.use("Agg")
        args.plots.mkdir(parents=True, exist_ok=True)
        for path in learn_forget_plots([r for r in plotted if r.ok], method_style(plotted), args.plots):
            print(f"wrote {path}")
    print(
        "(mean ± standard deviation over seeds; Δ: the run minus the reference, 95% paired t-interval across the "
        "seeds both finished, and bootstrap over evaluation rows; bold: the interval excludes 0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
