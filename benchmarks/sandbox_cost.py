"""Cost of the sandbox for model-written code: wall time of ``run_python`` on a trivial program and on one
HumanEval check (canonical solution), sandboxed and, for reference, as a plain child process.

    python benchmarks/sandbox_cost.py --repeats 20

Prints one markdown table (median and max over the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from hybrid_peft.sandbox import _run_unisolated, isolation_problem, run_python
    from hybrid_peft.tasks.humaneval import check_program, load_humaneval

    problem = isolation_problem()
    if problem is not None:
        raise SystemExit(f"no sandbox on this machine: {problem}")
    humaneval = load_humaneval()[2]
    programs = {
        "print(1)": "print(1)",
        "HumanEval/2 check": check_program(humaneval, humaneval["canonical_solution"]),
    }
    runners = {
        "sandboxed": lambda source: run_python(source),
        "plain child process": lambda source: _run_unisolated(source, timeout=10, memory_mb=1024, max_output=1 << 20),
    }
    print("| program | runner | median s | max s |")
    print("|---|---|---|---|")
    for name, source in programs.items():
        for runner_name, runner in runners.items():
            times = []
            for _ in range(args.repeats):
                tick = time.perf_counter()
                result = runner(source)
                times.append(time.perf_counter() - tick)
                assert result.passed, result
            print(f"| {name} | {runner_name} | {statistics.median(times):.3f} | {max(times):.3f} |")


if __name__ == "__main__":
    main()
