"""Pair methods with a reference by seed across bench results files, for runs that predate run records.

    python benchmarks/paired_by_seed.py docs/bench/2026-12-05-math/results.csv runs/tbl-math-rules/results.csv \
        --reference hybrid --methods hybrid-sigmoid,hybrid-pressure

A bench pairs only the runs it finds in its own output folder. Runs made before run records existed (their
folders gone, their ``results.csv`` kept under docs/bench/) can still be paired with newer ones on the same task,
seed and data order: this reads every ``results.csv`` given (oldest first), matches each method's finished runs
with the reference's by (task, seed), and prints the mean of ``method − reference`` with the bench's 95% paired
t-interval across seeds (``hybrid_peft.bench.rows.paired_difference``), for each measure. A run found in two files
takes the later file's values (it says so on stderr where they differ). By-row intervals need the runs' per-row
records and come from the bench itself.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from hybrid_peft.bench.rows import PairedDifference, paired_difference
from hybrid_peft.bench.tables import paired_cell

MEASURES = ("held_out_loss", "forgetting")


def read_runs(paths: list[Path], measures: tuple[str, ...]) -> dict[tuple[str, str, int], dict[str, float]]:
    """(task, method, seed) -> measure -> value over every finished run in ``paths``.

    A (task, method, seed) in more than one file (a run reused by a later bench, or made again) takes the later
    file's values; where they differ, the largest difference is printed to stderr, so a rerun that did not
    reproduce cannot pass unseen (and a run at another rate is named as such)."""
    runs: dict[tuple[str, str, int], dict[str, float]] = {}
    earlier_rates: dict[tuple[str, str, int], str | None] = {}
    for path in paths:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"task", "method", "seed", "status", *measures} - set(reader.fieldnames or ())
            if missing:
                raise SystemExit(
                    f"{path}: not a bench results.csv with {', '.join(measures)} (missing {sorted(missing)})"
                )
            for record in reader:
                if record["status"] != "ok":
                    continue
                key = (record["task"], record["method"], int(record["seed"]))
                values = {m: float(record[m]) if record[m] not in ("", None) else math.nan for m in measures}
                rate = record.get("learning_rate") or None  # an optional column: older files may lack it
                earlier = runs.get(key)
                if earlier is not None:
                    _say_what_replaces(key, path, rate, earlier_rates.get(key), values, earlier, measures)
                runs[key] = values
                earlier_rates[key] = rate
    return runs


def _say_what_replaces(
    key: tuple[str, str, int],
    path: Path,
    rate: str | None,
    earlier_rate: str | None,
    values: dict[str, float],
    earlier: dict[str, float],
    measures: tuple[str, ...],
) -> None:
    """A later file's run of a (task, method, seed) replaces the earlier one's: say so on stderr, as a run at another
    rate (a chosen replacement) or, at the same rate with other values, as a rerun that did not reproduce."""
    run = f"{key[1]} on {key[0]}, seed {key[2]}"
    if rate is not None and earlier_rate is not None and float(rate) != float(earlier_rate):
        print(f"{run}: {path}'s run at rate {rate} replaces an earlier file's at {earlier_rate}", file=sys.stderr)
        return
    gaps = [abs(values[m] - earlier[m]) for m in measures if not math.isnan(values[m] - earlier[m])]
    if gaps and max(gaps) > 0:
        print(
            f"{run}: {path}'s run replaces an earlier file's at the same rate with other values (largest "
            f"difference {max(gaps):.2g}): a rerun that did not reproduce",
            file=sys.stderr,
        )


def pair(
    runs: dict[tuple[str, str, int], dict[str, float]], reference: str, methods: list[str] | None, measure: str
) -> list[tuple[str, str, list[int], PairedDifference]]:
    """One (task, method, seeds, PairedDifference) per method beside ``reference`` on a task, on their common seeds."""
    tasks = sorted({task for task, _, _ in runs})
    out = []
    for task in tasks:
        names = sorted({m for t, m, _ in runs if t == task and m != reference})
        for method in [m for m in methods if m != reference] if methods else names:
            seeds = sorted(
                s for t, m, s in runs
                if t == task and m == method and (task, reference, s) in runs
                and not math.isnan(runs[task, method, s][measure]) and not math.isnan(runs[task, reference, s][measure])
            )  # fmt: skip
            if not seeds:
                continue
            values = [runs[task, method, s][measure] for s in seeds]
            references = [runs[task, reference, s][measure] for s in seeds]
            out.append((task, method, seeds, paired_difference(values, references)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench results.csv files (docs/bench/*/results.csv)")
    parser.add_argument("--reference", default="lora", help="the method every other is paired with (default: lora)")
    parser.add_argument("--methods", help="comma-separated methods to pair (default: every other method found)")
    parser.add_argument(
        "--measures",
        default=",".join(MEASURES),
        help=f"comma-separated results.csv columns (default: {','.join(MEASURES)})",
    )
    args = parser.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            parser.error(f"no results file at {path}")
    measures = tuple(m for m in args.measures.split(",") if m)
    runs = read_runs(args.results, measures)
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    if not any(method == args.reference for _, method, _ in runs):
        parser.error(f"no finished run of the reference {args.reference!r} in {', '.join(map(str, args.results))}")
    columns = {
        measure: {(t, m): (s, d) for t, m, s, d in pair(runs, args.reference, methods, measure)} for measure in measures
    }
    keys = sorted({key for by_key in columns.values() for key in by_key})
    if not keys:
        print(f"no method shares a seed with {args.reference}", file=sys.stderr)
        return 1
    print("| task | method | seeds | " + " | ".join(f"Δ {m} vs {args.reference}" for m in measures) + " |")
    print("|---|---|---|" + "---|" * len(measures))
    for task, method in keys:
        seeds = next(columns[m][task, method][0] for m in measures if (task, method) in columns[m])
        cells = [paired_cell(columns[m].get((task, method), ((), None))[1]) for m in measures]  # "–" if absent
        print(f"| {task} | {method} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    print(f"\n(95% paired t-intervals across seeds, {args.reference} on the same seed; bold: the interval excludes 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
