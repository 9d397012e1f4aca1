"""The training recipe: one loop for every method (full fine-tuning included), driven by a config.

    hybrid-peft train --config run.yaml --steps 200 --method hybrid --set rank=16

Runs unchanged on one CPU, or on several processes/GPUs under ``torchrun`` / ``accelerate launch`` (DDP, tested on
CPU; FSDP and DeepSpeed through accelerate's config, GPU only and not yet tested): only rank 0 writes files, every
rank sees different batches, and the hybrid's λ stays identical across ranks (gradients are averaged before the
rule runs).

Output folder::

    train_log.jsonl          one line per step (loss, lr, tokens/s, λ summary) and per evaluation
    mixing.jsonl             the hybrid's λ and branch gradient norms per layer per step
    checkpoints/step-N/      written atomically every ``save_every`` steps; ``--resume`` continues from the last
    adapter/                 the final adapter (or model/ for full fine-tuning), merged/ on request
    summary.json, report.md, loss.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybrid_peft.config import require_float, require_int
from hybrid_peft.errors import ConfigError, HybridPeftError
from hybrid_peft.fileio import atomic_write_text

FULL = "full"


class NonFiniteLossError(HybridPeftError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class BatchDoesNotFitError(HybridPeftError, MemoryError):
    """A training or evaluation batch ran out of (accelerator or host) memory."""


OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


class batch_must_fit:  # noqa: N801 - used as a context manager, like contextlib's
    """Inside ``with batch_must_fit(what, fix):`` an out-of-memory failure becomes one sentence naming the batch
    and the fix. Reusable (the training loop wraps forward and backward with the same instance)."""

    def __init__(self, what: str, fix: str) -> None:
        self.what, self.fix = what, fix

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, traceback: object) -> bool:
        if exc is None or isinstance(exc, HybridPeftError):
            return False
        out_of_memory = isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
            isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OUT_OF_MEMORY_MARKERS)
        )
        if not out_of_memory:
            return False
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BatchDoesNotFitError(f"{self.what} does not fit in memory ({first_line[:200]}); {self.fix}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. Field names are the command-line flags (``--learning-rate``) and YAML/JSON keys."""

    model: str = "smollm2-135m"
    task: str = "humaneval"
    data_dir: str | None = None
    dataset: str | None = None
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    steps: int = 30
    batch_size: int = 4
    max_length: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 3
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    seed: int = 0
    examples_per_language: int = 32
    eval_per_language: int = 0
    init_batches: int = 8
    eval_every: int = 0
    eval_examples: int = 0
    eval_batch_size: int = 8
    generate: bool = True
    save_every: int = 0
    output_dir: str = "runs/train"
    merge: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            require_int(name, getattr(self, name), minimum=1)
        for name in (
            "warmup_steps",
            "seed",
            "init_batches",
            "eval_every",
            "eval_examples",
            "save_every",
            "threads",
            "examples_per_language",
            "eval_per_language",
        ):
            require_int(name, getattr(self, name), minimum=0)
        require_int("eval_batch_size", self.eval_batch_size, minimum=1)
        require_float("learning_rate", self.learning_rate, minimum=0.0, min_inclusive=False)
        require_float("weight_decay", self.weight_decay, minimum=0.0)
        require_float("max_grad_norm", self.max_grad_norm, minimum=0.0)
        if not isinstance(self.adapter, dict):
            raise ConfigError(f"adapter: expected a mapping of the method's options, got {self.adapter!r}")
        from hybrid_peft.peers import is_peer, peer_options

        if is_peer(self.method):
            peer_options(self.method, self.adapter)
            if self.save_every or self.merge:
                raise ConfigError(
                    f"{self.method} is a PEFT baseline for benchmarks: --save-every and --merge are offered for "
                    "hybrid-peft's own methods only"
                )
        elif self.method != FULL:
            self.adapter_config()  # validates the method name and its options now, not after the model loads

    def adapter_config(self) -> Any:
        from hybrid_peft.config import AdapterConfig

        return AdapterConfig.from_dict({"method": self.method, **self.adapter})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """A YAML or JSON file, then ``overrides`` on top (``adapter`` options are merged, not replaced)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
            raise ConfigError(f"config file {path} could not be parsed: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of options")
        return cls.from_dict(merge_options(data, overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def merge_options(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if key == "adapter" and isinstance(value, dict):
            merged["adapter"] = {**merged.get("adapter", {}), **value}
        else:
            merged[key] = value
    return merged


# --- data order ---------------------------------------------------------------------------------------------------


def batch_indices(step: int, count: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of this rank's examples at ``step``: each epoch is a seeded permutation, the global batch is
    ``batch_size × world`` consecutive entries, each rank takes its own slice. A pure function of the step, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    global_batch = batch_size * world
    start = step * global_batch + rank * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, count)
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --- checkpoints -------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path | None:
    folder = output_dir / "checkpoints"
    complete = [p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()] if folder.is_dir() else []
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    schedule: Any,
    history: list[dict],
    config: TrainConfig,
    before: dict[str, float],
) -> Path:
    """Everything needed to continue exactly, written to a temporary folder and renamed into place."""
    from safetensors.torch import save_file

    from hybrid_peft.serialization import save_adapter

    final = output_dir / "checkpoints" / f"step-{step:06d}"
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if config.method == FULL:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            str(staging / "model.safetensors"),
        )
    else:
        save_adapter(model, staging / "adapter")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        staging / "training.pt",
    )
    atomic_write_text(
        staging / "trainer_state.json",
        json.dumps({"step": step, "history": history, "before": before, "config": config.to_dict()}, indent=1),
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


# --- the run -----------------------------------------------------------------------------------------------------


def run_training(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and save as ``config`` says; returns the summary (also written to ``summary.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from hybrid_peft.adapters import attach, parameter_counts
    from hybrid_peft.methods.hybrid import MixingTelemetry, hybrid_layers, update_mixing
    from hybrid_peft.methods.lora_ga import lora_ga_initialise
    from hybrid_peft.models import load_model, load_tokenizer
    from hybrid_peft.peers import attach_peer, is_peer, save_peer
    from hybrid_peft.serialization import load_adapter, save_adapter
    from hybrid_peft.tasks.base import get_task
    from hybrid_peft.training import peak_rss_mb

    # Without an accelerator, say so: accelerate only sets up multi-process CPU training (gloo) when cpu=True.
    accelerator = Accelerator(cpu=_cpu_only())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    started = time.perf_counter()

    task = get_task(
        config.task,
        data_dir=config.data_dir,
        dataset=config.dataset,
        examples_per_language=config.examples_per_language,
        eval_per_language=config.eval_per_language or None,
    )
    train_rows, eval_rows = task.train_rows(), task.eval_rows()
    if config.eval_examples:
        eval_rows = eval_rows[: config.eval_examples]
    if not train_rows:
        raise HybridPeftError(f"task {task.name} has no training examples")
    tokenizer = load_tokenizer(config.model)
    model_options = {"num_labels": task.num_labels} if task.model_task == "sequence-classification" else {}
    model = load_model(config.model, task=task.model_task, **model_options)

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        rows = [
            train_rows[i] for i in batch_indices(step, len(train_rows), config.batch_size, config.seed, rank, world)
        ]
        return task.batch(tokenizer, rows, config.max_length)

    def evaluate(label: str) -> dict[str, float]:
        target = accelerator.unwrap_model(model)
        with batch_must_fit(
            f"evaluation ({label}) with --eval-batch-size {config.eval_batch_size}",
            "lower --eval-batch-size or --max-length",
        ):
            return task.evaluate(
                target,
                tokenizer,
                eval_rows,
                batch_size=config.eval_batch_size,
                max_length=config.max_length,
                generate=config.generate,
            )

    peer = is_peer(config.method)
    if resume and peer:
        raise ConfigError(f"--resume is not offered for the PEFT baseline {config.method}")
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        raise HybridPeftError(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}")
    history: list[dict[str, Any]] = []
    start_step = 0
    metrics_before: dict[str, float] = {}
    if peer:
        head = next((n for n in ("classifier", "score") if hasattr(model, n)), None)
        if task.model_task == "sequence-classification" and head is None:
            raise ConfigError(f"{config.method}: the model has no 'classifier' or 'score' head to train")
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
            metrics_before = evaluate("before")
        model = attach_peer(
            model,
            config.method,
            config.adapter,
            gradient_batches=lambda: [batch_at(i) for i in range(config.init_batches)],
            head=head if task.model_task == "sequence-classification" else None,
        )
    elif config.method == FULL:
        if checkpoint is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    elif checkpoint is not None:
        load_adapter(model, checkpoint / "adapter", trainable=True)
    else:
        attach(model, config.adapter_config())
        if task.model_task == "sequence-classification":
            head = getattr(model, "classifier", None) or getattr(model, "score", None)
            for p in head.parameters() if head is not None else []:
                p.requires_grad_(True)  # a new head is trained fully and saved with the adapter
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        start_step, history, metrics_before = state["step"], state["history"], state.get("before", {})
        if main:  # drop log lines written after the checkpoint by the interrupted run
            for log in (output_dir / "train_log.jsonl", output_dir / "mixing.jsonl"):
                if log.is_file():
                    kept = [r for r in _read_log(log) if r.get("step", -1) < start_step]
                    atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
    trainable, total = parameter_counts(model)

    if checkpoint is None:
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
            for stale in ("train_log.jsonl", "mixing.jsonl"):
                (output_dir / stale).unlink(missing_ok=True)
            if not peer:
                metrics_before = evaluate("before")
        if (
            not peer
            and config.method != FULL
            and any(getattr(m, "needs_gradient_init", False) for m in model.modules())
        ):
            lora_ga_initialise(model, [batch_at(i) for i in range(config.init_batches)])
    accelerator.wait_for_everyone()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.steps, min(config.warmup_steps, config.steps))
    )
    if checkpoint is not None:
        saved = torch.load(checkpoint / "training.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    mixing = bool(hybrid_layers(inner))
    sharded = str(accelerator.distributed_type.value) == "FSDP"  # gradients are shards: all-reduce the norms
    telemetry = MixingTelemetry(output_dir / "mixing.jsonl") if mixing and main else None
    log_path = output_dir / "train_log.jsonl"

    model.train()
    bar = tqdm(
        range(start_step, config.steps),
        initial=start_step,
        total=config.steps,
        desc=f"{config.method}",
        unit="step",
        dynamic_ncols=True,
        disable=not (progress and main),
    )
    last_good = checkpoint
    for step in bar:
        batch = {k: v.to(accelerator.device) for k, v in batch_at(step).items()}
        tick = time.perf_counter()
        fits = batch_must_fit(
            f"step {step}: a batch of {config.batch_size} × {batch['input_ids'].shape[-1]} tokens",
            "lower --batch-size or --max-length (or train on a machine with more memory)",
        )
        with fits:
            loss = model(**batch).loss
        mean_loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(mean_loss_value):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"step {step}: the training loss is {mean_loss_value}; stopped ({where}). Lower --learning-rate, "
                "set --max-grad-norm, or check the data"
            )
        with fits:
            accelerator.backward(loss)
        record: dict[str, Any] = {"step": step, "loss": mean_loss_value, "lr": schedule.get_last_lr()[0]}
        if mixing:
            records = update_mixing(inner, sharded=sharded)
            values = [r["lambda"] for r in records.values()]
            record["lambda"] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
            if telemetry is not None:
                telemetry.log(step, records)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - tick
        tokens = int(batch["attention_mask"].sum()) * world if "attention_mask" in batch else 0
        record |= {"seconds": seconds, "tokens_per_s": tokens / seconds}
        history.append({"step": step, "loss": mean_loss_value})
        postfix = {"loss": f"{mean_loss_value:.3f}", "tok/s": f"{tokens / seconds:.0f}"}
        if mixing:
            postfix["λ"] = f"{record['lambda']['mean']:.2f}"
        bar.set_postfix(postfix)
        if main:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            if main:
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": step, "eval": evaluate(f"step {done}")}) + "\n")
            accelerator.wait_for_everyone()
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            if main:
                last_good = save_checkpoint(
                    output_dir, done, inner, optimizer, schedule, history, config, metrics_before
                )
            accelerator.wait_for_everyone()

    in_sync = _ranks_in_sync(accelerator, inner)
    metrics_after = evaluate("after") if main else {}
    summary: dict[str, Any] = {}
    if main:
        if config.method == FULL:
            inner.save_pretrained(output_dir / "model")
            tokenizer.save_pretrained(output_dir / "model")
        elif peer:
            save_peer(inner, output_dir / "adapter")
        else:
            save_adapter(inner, output_dir / "adapter")
            if config.merge:
                from hybrid_peft.export import save_merged

                save_merged(inner, output_dir / "merged", tokenizer=tokenizer)
        summary = {
            "config": config.to_dict(),
            "task": task.name,
            "processes": world,
            "distributed_type": str(accelerator.distributed_type.value),
            "ranks_in_sync": in_sync,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "before": metrics_before,
            "after": metrics_after,
            "final_loss": history[-1]["loss"] if history else None,
            "median_step_s": _median([r.get("seconds") for r in _read_log(log_path) if "seconds" in r]),
            "wall_s": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb(),
            "resumed_from_step": start_step,
            "environment": run_environment(threads=config.threads),
        }
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_report(output_dir, summary, history)
    accelerator.wait_for_everyone()
    return summary


def source_commit() -> str | None:
    """The git commit of the running ``hybrid_peft`` source (``+dirty`` when tracked files under it differ), or None
    for an installed package."""
    import subprocess

    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        changed = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def run_environment(threads: int = 0) -> dict[str, Any]:
    """What produced a run, for the reader of its numbers: versions, source commit, device, CPU threads, UTC time."""
    import datetime
    import platform

    import transformers

    from hybrid_peft import __version__

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hybrid_peft": __version__,
        "commit": source_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
    }


def _cpu_only() -> bool:
    """accelerate sets up multi-process CPU training (gloo) only with ``cpu=True``, and that mode is DDP: an FSDP or
    DeepSpeed launch on a machine without an accelerator would otherwise run unsynchronised copies. Say so."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return False
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() in ("1", "true"):
            warnings.warn(
                f"{name} was requested but there is no GPU: accelerate trains on CPU with DDP (gloo) instead; "
                "summary.json records the distributed_type used",
                stacklevel=3,
            )
    return True


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ranks_in_sync(accelerator: Any, model: Any) -> bool:
    """True when every rank holds the same trainable weights (a checksum all-gathered from each)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    gathered = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    return bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9))


def write_report(output_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """``report.md`` (settings and before/after metrics) and ``loss.png`` (the training loss curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([h["step"] + 1 for h in history], [h["loss"] for h in history], linewidth=1)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_title(f"{summary['config']['model']} · {summary['config']['method']} · {summary['task']}")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(output_dir / "loss.png", dpi=120)
        plt.close(figure)
    config = summary["config"]
    lines = [
        f"# {config['method']} on {summary['task']} ({config['model']})",
        "",
        f"{config['steps']} steps of batch {config['batch_size']} × {summary['processes']} process(es), "
        f"max length {config['max_length']}, learning rate {config['learning_rate']:g}, seed {config['seed']}; "
        f"adapter options {config['adapter'] or 'default'}.",
        "",
        f"Trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}.",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in sorted(set(summary["before"]) | set(summary["after"])):
        before, after = summary["before"].get(key), summary["after"].get(key)
        lines.append(
            f"| {key} | {'' if before is None else f'{before:.4f}'} | {'' if after is None else f'{after:.4f}'} |"
        )
    lines += [
        "",
        f"Wall time {summary['wall_s']:.0f} s, median step {summary['median_step_s'] or float('nan'):.2f} s, "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB.",
        "",
    ]
    environment = summary.get("environment")
    if environment:
        lines += [
            f"Run on {environment['device']} with {environment['threads']} thread(s), finished "
            f"{environment['finished_at']}; hybrid-peft {environment['hybrid_peft']} (commit "
            f"{environment['commit'] or 'unknown'}), torch {environment['torch']}, "
            f"transformers {environment['transformers']}.",
            "",
        ]
    lines += [
        "![training loss](loss.png)",
        "",
    ]
    atomic_write_text(output_dir / "report.md", "\n".join(lines))
