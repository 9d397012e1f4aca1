"""The ``hybrid-peft`` command line.

hybrid-peft info --model smollm2-135m --targets all-linear     which modules an adapter would touch
hybrid-peft demo                                                the main job on the offline defaults
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence

from hybrid_peft import __version__
from hybrid_peft.errors import ConfigError, HybridPeftError


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

    architectures = AutoConfig.from_pretrained(path).architectures or []
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


def command_demo(args: argparse.Namespace) -> int:
    from hybrid_peft.demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            learning_rate=args.learning_rate,
            rank=args.rank,
            threads=args.threads,
            output_dir=args.output_dir,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-peft",
        description="Parameter-efficient fine-tuning on a small budget (LoRA, LoRA-GA, BOFT, unitary, hybrid).",
    )
    parser.add_argument("--version", action="version", version=f"hybrid-peft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_threads = min(2, os.cpu_count() or 1)

    info = commands.add_parser("info", help="show which modules an adapter would be attached to, and its size")
    info.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, minilm-l6), hub id or folder")
    info.add_argument("--task", default="auto", choices=["auto", "causal-lm", "sequence-classification", "base"])
    info.add_argument(
        "--targets",
        default="all-linear",
        help="'all-linear', comma-separated names (q_proj,v_proj) or 're:<regex>' on full names",
    )
    info.add_argument("--method", default="lora", help="adapter method (lora, lora-ga, boft, unitary, hybrid)")
    info.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field of the method, e.g. --set rank=16 --set block_size=8 (repeatable)",
    )
    info.add_argument("--all", action="store_true", help="one row per module instead of one per module kind")
    info.add_argument("--threads", type=int, default=default_threads)
    info.set_defaults(handler=command_info)

    demo = commands.add_parser("demo", help="fine-tune the default model with LoRA on HumanEval, offline (~3 min)")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--max-length", type=int, default=192)
    demo.add_argument("--learning-rate", type=float, default=1e-3)
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--threads", type=int, default=default_threads)
    demo.add_argument("--output-dir", default="runs/demo")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except HybridPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
