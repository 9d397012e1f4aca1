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

    results.csv      one row per run (:class:`BenchRow`): metric, held-out loss, retention, step time, peak RSS, ...
    results.md       per task: mean ± std over seeds, each method's paired difference to LoRA with its 95% interval,
                     forgetting, time and memory as multiples of full fine-tuning
    plots/           loss curves, quality against memory and against step time, learn–forget, λ heatmaps

The package: ``plan`` (the config → validated runs), ``running`` (one process per run, reuse, the loop over runs),
``rows`` (a run's result row, aggregation and paired comparisons), ``tables`` (results.md) and ``plots``.
"""

from hybrid_peft.bench.plan import BenchPlan, BenchRun, Sweep, builtin_profiles, load_plan
from hybrid_peft.bench.rows import BenchRow, aggregate, chosen_rates, paired_differences
from hybrid_peft.bench.running import execute, finished_row, run_bench, run_state
from hybrid_peft.bench.tables import markdown_table, telemetry_lines, time_to_quality, time_to_quality_lines

__all__ = [
    "BenchPlan",
    "BenchRow",
    "BenchRun",
    "Sweep",
    "aggregate",
    "builtin_profiles",
    "chosen_rates",
    "execute",
    "finished_row",
    "load_plan",
    "markdown_table",
    "paired_differences",
    "run_bench",
    "run_state",
    "telemetry_lines",
    "time_to_quality",
    "time_to_quality_lines",
]
