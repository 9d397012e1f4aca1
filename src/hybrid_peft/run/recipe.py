"""The training recipe: one run of any method (full fine-tuning and the PEFT baselines included), driven by a
:class:`~hybrid_peft.run.config.TrainConfig`::

    hybrid-peft train --config run.yaml --steps 200 --method hybrid --set rank=16

:class:`Recipe`'s methods are the stages, in order: ``setup_data``, ``setup_model`` (attach, first evaluation,
data-dependent initialisation, or restore from a checkpoint), ``setup_optimiser``, ``train`` (the loop of
``loop.py``, with logging, periodic evaluation and checkpoints), ``finish`` (final evaluation, saved result,
summary, report). Runs unchanged on one CPU or on several processes under ``torchrun`` / ``accelerate launch``:
only rank 0 writes files, each rank sees its own slice of every global batch.

Output folder::

    train_log.jsonl          one line per step (loss, lr, tokens/s, λ summary) and per periodic evaluation
    mixing.jsonl             the hybrid's λ and branch gradient norms per layer per step (with a mixing rule)
    checkpoints/step-N/      written atomically every ``save_every`` steps; ``--resume`` continues from the last
    adapter/                 the final adapter (model/ for full fine-tuning), merged/ on request
    eval_examples.json       each evaluation row's score after training ({metric: [...]}, the mean-over-rows metrics)
    summary.json, report.md, loss.png
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from hybrid_peft.adapters import after_backward_hooks, parameter_counts
from hybrid_peft.errors import ConfigError, HybridPeftError, NonFiniteLossError, TrainingInterrupted
from hybrid_peft.fileio import append_line, atomic_write_text
from hybrid_peft.losses import ChunkedLossModel
from hybrid_peft.models import load_model, load_tokenizer
from hybrid_peft.run.before import SharedBefore
from hybrid_peft.run.checkpoint import (
    RESUMABLE_CHANGES,
    TrainerState,
    checkpoint_folders,
    config_differences,
    latest_checkpoint,
    read_trainer_state,
    restore_training_state,
    save_checkpoint,
)
from hybrid_peft.run.config import TrainConfig
from hybrid_peft.run.folder import (
    EXAMPLES_FILE,
    LOG_FILE,
    MIXING_FILE,
    RESUME_CONFIG_FILE,
    RUN_OUTPUTS,
    RunFolderLock,
    before_checkpoint,
    read_log,
)
from hybrid_peft.run.interrupt import StopRequests
from hybrid_peft.run.loop import StepResult, batch_indices, batch_must_fit, make_optimiser, training_steps
from hybrid_peft.run.memory import check_fits, fit_check_enabled
from hybrid_peft.run.parallel import parallelism_for
from hybrid_peft.run.progress import ProgressLines
from hybrid_peft.run.provenance import peak_rss_mb, run_environment
from hybrid_peft.run.report import write_report
from hybrid_peft.run.retention import retention_loss, retention_texts
from hybrid_peft.run.summary import RunSummary
from hybrid_peft.run.trainees import FullFineTuning, OwnAdapter, resolved_adapter_options, trainee_for
from hybrid_peft.sandbox import require_sandbox
from hybrid_peft.tasks import get_task
from hybrid_peft.telemetry import ADAPTER_TELEMETRY_FILE, AdapterTelemetry, MixingTelemetry

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TRACKING_FOLDER = "tracking"  # --report-to tensorboard writes its event files here
LOSS_GROWTH_WARNING = 100.0  # warn once when the loss exceeds this multiple of the first step's


class Recipe:
    """One training run; :meth:`run` goes through every stage and returns the summary (``None`` on ranks > 0)."""

    def __init__(
        self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if resume and overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite discards it: choose one")
        self.config, self.resume, self.overwrite, self.progress = config, resume, overwrite, progress
        self.trainee = trainee_for(config.method)
        self.output_dir = Path(config.output_dir)
        self.started = time.perf_counter()
        # Without an accelerator, say so: accelerate sets up multi-process CPU training (gloo) only with cpu=True.
        for tracker in config.trackers:  # accelerate would drop a tracker whose package is missing, silently
            package = TRACKER_PACKAGES[tracker]
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"--report-to {tracker} needs the {package} package: pip install {package}")
        accelerator = Accelerator(
            cpu=_cpu_only(), log_with=config.trackers or None, project_dir=str(self.output_dir / TRACKING_FOLDER)
        )
        self.parallel = parallelism_for(config.fsdp, accelerator)
        self.rank, self.world, self.main = self.parallel.rank, self.parallel.world, self.parallel.main
        if config.threads:
            torch.set_num_threads(config.threads)
        set_seed(config.seed)
        self.history: list[dict[str, Any]] = []
        self.start_step = 0
        self.start_seconds = 0.0  # the method's start (LoRA-GA's gradient estimate), part of the training time
        self.metrics_before: dict[str, float] = {}
        # A checkpoint is good once the step after it had a finite loss; until then it is pending.
        self.last_good: Path | None = None
        self.pending: Path | None = None
        self.warned_growth = False

    def run(self) -> RunSummary | None:
        try:
            with RunFolderLock(self.output_dir, enabled=self.main):
                self.prepare_output_dir()
                self.setup_data()
                self.setup_model()
                self.setup_optimiser()
                self.train()
                return self.finish()
        except (OSError, SafetensorError) as exc:
            if not _out_of_space(exc):
                raise
            kept = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was kept"
            where = getattr(exc, "filename", None) or getattr(exc, "strerror", None) or "writing safetensors"
            raise HybridPeftError(
                f"no space left on the device holding {self.output_dir} ({where}); {kept}. "
                "Free space (or choose another --output-dir, or save less often with --save-every), then continue "
                "with --resume"
            ) from None

    # --- stages -------------------------------------------------------------------------------------------------

    def prepare_output_dir(self) -> None:
        """A fresh run needs a folder without another run's outputs (``--overwrite`` removes them), so that no old
        checkpoint can later be resumed as if it were this run's; ``--resume`` needs the folder's run to be this
        one."""
        if not self.main:
            return
        found = [name for name in RUN_OUTPUTS if (self.output_dir / name).exists()]
        if self.resume or not found:
            return
        if not self.overwrite:
            raise HybridPeftError(
                f"{self.output_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another --output-dir"
            )
        for name in found:
            path = self.output_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:  # a file, or a link (removed, never followed: what it points to is not the run's)
                path.unlink()

    def setup_data(self) -> None:
        config = self.config
        if self.main:
            origin = " (the method's default; --learning-rate to change)" if config.learning_rate_is_default else ""
            print(f"{config.method}: learning rate {config.learning_rate:g}{origin}", flush=True)
        self.task = get_task(
            config.task,
            data_dir=config.data_dir,
            dataset=config.dataset,
            examples_per_language=config.examples_per_language,
            eval_per_language=config.eval_per_language or None,
        )
        self.train_rows, self.eval_rows = self.task.train_rows(), self.task.eval_rows()
        self.retention = retention_texts(config.retention_data, config.task, config.data_dir, config.retention_examples)
        if config.eval_examples:
            self.eval_rows = self.eval_rows[: config.eval_examples]
        if not self.train_rows:
            raise HybridPeftError(f"task {self.task.name} has no training examples")
        self.train_rows, self.validation_rows = hold_out(self.train_rows, config.validation_examples)
        if config.generate and getattr(self.task, "runs_model_code", False):
            require_sandbox(config.unsafe_unsandboxed)
        self.tokenizer = load_tokenizer(config.model)

    def setup_model(self) -> None:
        config, trainee = self.config, self.trainee
        classifier = self.task.model_task == "sequence-classification"
        options = {"num_labels": self.task.num_labels} if classifier else {}
        if self.resume and not trainee.resumable:
            raise ConfigError(f"--resume is not offered for the PEFT baseline {config.method}")
        new_weights: list[str] = []
        if config.loss_chunk_tokens and self.task.model_task != "causal-lm":
            raise ConfigError(
                f"--loss-chunk-tokens chunks a language model's vocabulary; {self.task.name} trains a classifier"
            )
        if fit_check_enabled():  # stop with the estimate's figure and the options that fit, before loading anything
            check_fits(config, self.world)
        model = load_model(
            config.model,
            task=self.task.model_task,
            dtype=getattr(torch, config.dtype),
            quantise=config.quantise_base,
            report_new=new_weights.extend,
            **options,
        )
        # the base model's evaluation, shared with earlier runs from the same weights (a new head included) and rows
        self.shared_before = None
        if config.before_cache and self.main and not self.resume:
            texts = self.retention[0] if self.retention is not None else None
            self.shared_before = SharedBefore.for_run(config.before_cache, config, model, self.eval_rows, texts)
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and config.max_length > positions:
            raise ConfigError(
                f"--max-length {config.max_length} is beyond the {positions} positions {config.model} was trained "
                f"for; use --max-length {positions} or less"
            )
        if config.gradient_checkpointing:  # before LoRA-GA's gradient estimate, which then saves the same memory
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
            # Non-reentrant: recomputes each block in backward, with frozen inputs and custom autograd functions.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpoint = latest_checkpoint(self.output_dir) if self.resume else None
        if self.resume and checkpoint is None:
            raise HybridPeftError(f"--resume: no complete checkpoint under {self.output_dir / 'checkpoints'}")
        if checkpoint is not None:
            state = read_trainer_state(checkpoint)
            differences = config_differences(state.config, config.to_dict())
            if differences:
                raise HybridPeftError(
                    f"--resume: {checkpoint} was written by a run with other options ({'; '.join(differences)}). "
                    f"Only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume; restore the others, or "
                    "start a new run with --overwrite or another --output-dir"
                )
            model = trainee.restore(model, checkpoint)
            self.start_step, self.history, self.metrics_before = state.step, state.history, state.before
            self.start_seconds = state.start_seconds
            self.pending = checkpoint  # good once its next step has a finite loss; the one before it already is
            earlier = checkpoint_folders(self.output_dir)[:-1]
            self.last_good = earlier[-1] if earlier else None
            if self.main:  # drop log lines written after the checkpoint by the interrupted run
                for name in (LOG_FILE, MIXING_FILE, ADAPTER_TELEMETRY_FILE):
                    kept = [r for r in read_log(self.output_dir / name) if before_checkpoint(r, self.start_step)]
                    if (self.output_dir / name).is_file():
                        atomic_write_text(self.output_dir / name, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            model = self.model = self.inner = trainee.attach(model, config, classifier)
            if new_weights and self.main:
                print(
                    f"{config.model} gets a new classification head for {self.task.num_labels} labels "
                    f"({', '.join(new_weights)}): it starts from random values and trains fully"
                    + (" beside the adapter (and is saved with it)" if config.method != "full" else ""),
                    flush=True,
                )
            if self.main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                for stale in (LOG_FILE, MIXING_FILE, ADAPTER_TELEMETRY_FILE):
                    (self.output_dir / stale).unlink(missing_ok=True)
                self.metrics_before = self.evaluate_before()
                self.append_log({"step": 0, "eval": self.metrics_before})
            tick = time.perf_counter()
            model = trainee.initialise(model, config, classifier, lambda: self.initial_batches())
            self.start_seconds = time.perf_counter() - tick
        self.model = self.inner = model  # inner: the transformers model (what is saved, evaluated and mixed)
        self.checkpoint = checkpoint
        self.parallel.barrier()

    def setup_optimiser(self) -> None:
        config = self.config
        self.trainable, self.total = parameter_counts(self.model)
        self.model = self.parallel.shard(self.model)  # FSDP: before the optimiser, which then holds the shards
        self.optimizer, self.schedule = make_optimiser(
            self.model,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            steps=config.steps,
            warmup_steps=config.warmup_steps,
        )
        if self.checkpoint is not None:
            optimizer_state = restore_training_state(self.checkpoint, self.schedule)
            saved = read_trainer_state(self.checkpoint)
            self.parallel.load_optimizer_state(self.model, self.optimizer, optimizer_state, saved.step, self.checkpoint)
            if saved.processes != self.world and self.main:
                print(
                    f"resuming a run of {saved.processes} process(es) on {self.world}: the state is resharded, but "
                    "the batches from here on follow the new number of processes",
                    flush=True,
                )
            saved_rate = saved.config.get("learning_rate")
            if saved_rate != config.learning_rate:  # asked for a new rate: the optimiser and schedule take it
                factor = self.schedule.lr_lambdas[0](self.schedule.last_epoch)
                for group in self.optimizer.param_groups:  # each group keeps its multiplier of the run's rate
                    group["initial_lr"] = config.learning_rate * group.get("lr_scale", 1.0)
                    group["lr"] = group["initial_lr"] * factor
                self.schedule.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
                self.schedule._last_lr = [group["lr"] for group in self.optimizer.param_groups]
                if self.main:
                    print(
                        f"resuming at step {self.start_step} with learning rate {config.learning_rate:g} (the "
                        f"checkpoint's run used {saved_rate:g})",
                        flush=True,
                    )
        self.inner = self.model
        trained = self.model
        if config.loss_chunk_tokens:
            if self.parallel.sharded:
                raise ConfigError("--loss-chunk-tokens and --fsdp do not combine yet; drop one of them")
            trained = ChunkedLossModel(self.model, config.loss_chunk_tokens)
        self.model, self.optimizer = self.parallel.prepare(trained, self.optimizer)

    def train(self) -> None:
        config = self.config
        if config.trackers:
            flat = {
                k: v if isinstance(v, int | float | str | bool) else json.dumps(v) for k, v in config.to_dict().items()
            }
            self.parallel.accelerator.init_trackers(self.output_dir.name, config=flat)
        records = bool(after_backward_hooks(self.inner))  # a method with a per-step rule (the hybrid's) logs it
        telemetry = MixingTelemetry(self.output_dir / MIXING_FILE) if records and self.main else None
        watch = self.main and not self.parallel.sharded and isinstance(self.trainee, OwnAdapter | FullFineTuning)
        checks = AdapterTelemetry(self.output_dir / ADAPTER_TELEMETRY_FILE) if watch else None
        bar = tqdm(
            total=config.steps,
            initial=self.start_step,
            desc=config.method,
            unit="step",
            dynamic_ncols=True,
            disable=None if (self.progress and self.main) else True,  # None: shown on a terminal only
        )
        # where no bar is drawn (a log file, the bench's runs): a plain line every few seconds instead
        shown = self.progress and self.main and bar.disable
        lines = ProgressLines(config.method, config.steps, self.start_step) if shown else None
        if lines is not None:
            print(f"{config.method}: training {config.steps - self.start_step} steps", flush=True)
        steps = training_steps(
            self.model,
            self.batch_at,
            self.optimizer,
            self.schedule,
            start=self.start_step,
            stop=config.steps,
            max_grad_norm=config.max_grad_norm,
            parallel=self.parallel,
            watch=watch,
        )
        try:
            with StopRequests() as stop:
                for result in steps:
                    self.after_step(result, bar, lines, telemetry, checks)
                    done = result.step + 1
                    signum = stop.requested(self.world) if done < config.steps else 0
                    if signum:
                        self.stop_on_signal(done, signum)
        except NonFiniteLossError as exc:  # from the loop, or from a checkpoint that would hold non-finite weights
            if self.pending is not None and self.main:  # its weights gave a non-finite loss: keep it out of --resume
                os.replace(self.pending, self.pending.with_name(self.pending.name + ".nonfinite"))
            raise NonFiniteLossError(f"{exc}; {self.stopped_advice()}") from None
        finally:
            bar.close()

    def finish(self) -> RunSummary | None:
        summary = None
        model_state = self.parallel.model_state(self.inner) if self.trainee.needs_model_state else None
        with self.parallel.full_parameters(self.inner):
            bad = _non_finite_parameters(self.inner)
            if bad:  # never saved as the result: the last good checkpoint stays what --resume continues from
                raise NonFiniteLossError(
                    f"step {self.config.steps}: the last update made the weights non-finite ({bad[0]}"
                    f"{' and others' if len(bad) > 1 else ''}), so no result was saved; {self.stopped_advice()}"
                )
            in_sync = _ranks_in_sync(self.parallel, self.inner)
            if self.main:  # save before the final evaluation: an error or Ctrl-C there loses no training
                self.trainee.save_result(self.inner, self.output_dir, self.tokenizer, model_state)
        metrics_after = self.evaluate_where_needed("after")
        if self.main:
            self.append_log({"step": self.config.steps, "eval": metrics_after, "train_seconds": self.train_seconds})
        self.track({f"eval/{k}": v for k, v in metrics_after.items()}, self.config.steps)
        if self.config.trackers:
            self.parallel.accelerator.end_training()
        validation = self.evaluate_where_needed("validation", self.validation_rows) if self.validation_rows else {}
        if self.config.merge:
            with self.parallel.full_parameters(self.inner):
                if self.main:
                    self.trainee.save_merged(self.inner, self.output_dir, self.tokenizer)
        if self.main:
            summary = RunSummary(
                config=self.config,
                task=self.task.name,
                processes=self.world,
                distributed_type=self.parallel.distributed_type,
                ranks_in_sync=in_sync,
                trainable_parameters=self.trainable,
                total_parameters=self.total,
                before=self.metrics_before,
                after=metrics_after,
                validation=validation,
                final_loss=self.history[-1]["loss"] if self.history else None,
                median_step_s=_median([r["seconds"] for r in read_log(self.output_dir / LOG_FILE) if "seconds" in r]),
                wall_s=time.perf_counter() - self.started,
                peak_rss_mb=peak_rss_mb(),
                resumed_from_step=self.start_step,
                environment=run_environment(threads=self.config.threads),
                resolved_adapters=resolved_adapter_options(self.config),
                start_seconds=self.start_seconds,
            )
            summary.write(self.output_dir)
            write_report(self.output_dir, summary, read_log(self.output_dir / LOG_FILE))
        self.parallel.barrier()
        return summary

    # --- helpers ------------------------------------------------------------------------------------------------

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        config = self.config
        indices = batch_indices(step, len(self.train_rows), config.batch_size, config.seed, self.rank, self.world)
        return self.task.batch(self.tokenizer, [self.train_rows[i] for i in indices], config.max_length)

    def initial_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first ``init_batches`` training batches, for LoRA-GA's gradient estimate."""
        return [self.batch_at(i) for i in range(self.config.init_batches)]

    def evaluate_before(self) -> dict[str, float]:
        """The evaluation before training: read from an earlier run's with ``--before-cache`` where one matches,
        else evaluated (and recorded there for the next run)."""
        shared = self.shared_before
        metrics = shared.read() if shared is not None else None
        if metrics is not None:
            if self.progress:
                origin = f"{shared.path}, an earlier run's of the same base model, rows and options"
                print(f"{self.config.method}: the evaluation before training from {origin}", flush=True)
            return metrics
        metrics = self.evaluate("before")
        if shared is not None:
            shared.write(metrics)
        return metrics

    def evaluate_where_needed(
        self, label: str, rows: list[dict[str, Any]] | None = None, *, generate: bool | None = None
    ) -> dict[str, float]:
        """Evaluate on the main process (on every process when the parameters are sharded: each holds a part);
        the metrics are the main process's, ``{}`` elsewhere."""
        if self.main or self.parallel.evaluates_on_every_process:
            metrics = self.evaluate(label, rows, generate=generate)
            return metrics if self.main else {}
        return {}

    @property
    def train_seconds(self) -> float:
        """Seconds spent training so far: the method's start (LoRA-GA's gradient estimate, which replaces no step)
        and every training step; evaluation and checkpoints not counted, resumed runs included."""
        return self.start_seconds + sum(record.get("seconds", 0.0) for record in self.history)

    def evaluate(
        self, label: str, rows: list[dict[str, Any]] | None = None, *, generate: bool | None = None
    ) -> dict[str, float]:
        """The task's metrics on ``rows`` (default: the evaluation rows); ``generate=False`` skips the generation
        metrics (periodic evaluations: the held-out loss and the classification metrics only)."""
        config = self.config
        model = self.inner
        rows = self.eval_rows if rows is None else rows
        if self.progress and self.main:
            print(f"{config.method}: evaluating ({label}) on {len(rows)} rows", flush=True)
        per_example: dict[str, list[float]] | None = {} if label == "after" else None
        with batch_must_fit(
            f"evaluation ({label}) with --eval-batch-size {config.eval_batch_size}",
            "lower --eval-batch-size or --max-length",
        ):
            metrics = self.task.evaluate(
                model,
                self.tokenizer,
                rows,
                batch_size=config.eval_batch_size,
                max_length=config.max_length,
                generate=config.generate and generate is not False,
                allow_unsandboxed=config.unsafe_unsandboxed,
                loss_model=ChunkedLossModel(model, config.loss_chunk_tokens) if config.loss_chunk_tokens else None,
                per_example=per_example,
            )
            if label in ("before", "after") and self.retention is not None:  # forgetting: general text, not the task
                texts, _ = self.retention
                size = config.eval_batch_size
                loss = retention_loss(
                    model,
                    self.tokenizer,
                    texts,
                    max_length=config.max_length,
                    batch_size=size,
                    per_example=per_example,  # after training: each text's loss, so a bench pairs runs text by text
                )
                if loss is not None:
                    metrics["retention_loss"] = loss
            if per_example and self.main:
                document = {"evaluation": label, "rows": len(rows), "scores": per_example}
                atomic_write_text(self.output_dir / EXAMPLES_FILE, json.dumps(document) + "\n")
            return metrics

    def after_step(
        self,
        result: StepResult,
        bar: tqdm,
        lines: ProgressLines | None,
        telemetry: MixingTelemetry | None,
        checks: AdapterTelemetry | None,
    ) -> None:
        """Everything after one training step: logs, progress, periodic evaluation and checkpoint."""
        config = self.config
        if self.pending is not None:  # its next step trained with a finite loss
            self.last_good, self.pending = self.pending, None
        if telemetry is not None:
            telemetry.log(result.step, result.mixing)
        if checks is not None:
            checks.log(result.step, self.inner, result.block_grad_norms)
        self.log_step(result, bar)
        done = result.step + 1
        if lines is not None:
            lines.update(done, result.loss, result.seconds)
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            metrics = self.evaluate_where_needed(f"step {done}", generate=False)  # generation: at the end
            self.append_log({"step": done, "eval": metrics, "train_seconds": self.train_seconds})
            self.track({f"eval/{k}": v for k, v in metrics.items()}, done)
            self.parallel.barrier()
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            self.pending = self.save_checkpoint(done)
            self.parallel.barrier()

    def stop_on_signal(self, done: int, signum: int) -> None:
        """SIGINT or SIGTERM during training: a checkpoint after step ``done`` (unless one was just written), the
        run's options beside it, and the command that continues it."""
        just_saved = bool(self.config.save_every) and done % self.config.save_every == 0  # the same on every process
        checkpoint = self.pending if just_saved else self.save_checkpoint(done)
        self.parallel.barrier()
        resume_config = self.output_dir / RESUME_CONFIG_FILE
        if self.main:
            atomic_write_text(resume_config, json.dumps(self.config.to_dict(), indent=1) + "\n")
        launcher = "hybrid-peft" if self.world == 1 else f"torchrun --nproc_per_node {self.world} -m hybrid_peft.cli"
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {done} of {self.config.steps}: saved {checkpoint}. Continue with: "
            f"{launcher} train --config {resume_config} --resume",
            signum,
        )

    def stopped_advice(self) -> str:
        if self.last_good is None:
            return "stopped (no good checkpoint yet). Lower --learning-rate, set --max-grad-norm, or check the data"
        return (
            f"stopped (the last good checkpoint is {self.last_good}). Lower the rate and continue from there with "
            "--resume --learning-rate RATE, set --max-grad-norm, or check the data"
        )

    def log_step(self, result: StepResult, bar: tqdm) -> None:
        tokens = result.tokens * self.world
        record: dict[str, Any] = {"step": result.step, "loss": result.loss, "lr": result.learning_rate}
        postfix = {"loss": f"{result.loss:.3f}", "tok/s": f"{tokens / result.seconds:.0f}"}
        if result.mixing:
            values = [r["lambda"] for r in result.mixing.values()]
            record["lambda"] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
            postfix["λ"] = f"{record['lambda']['mean']:.2f}"
        record |= {"seconds": result.seconds, "tokens_per_s": tokens / result.seconds}
        self.history.append({"step": result.step, "loss": result.loss, "seconds": result.seconds})
        first = self.history[0]["loss"]
        if not self.warned_growth and first > 0 and result.loss > LOSS_GROWTH_WARNING * first:
            self.warned_growth = True
            warnings.warn(
                f"step {result.step}: the training loss {result.loss:.3g} is over {LOSS_GROWTH_WARNING:g}× the first "
                f"step's ({first:.3g}); training is diverging: lower --learning-rate "
                f"(now {self.config.learning_rate:g})",
                stacklevel=2,
            )
        bar.set_postfix(postfix)
        bar.update(1)
        self.append_log(record)
        tracked = {"train/loss": result.loss, "train/learning_rate": result.learning_rate}
        tracked["train/tokens_per_s"] = record["tokens_per_s"]
        tracked |= {f"lambda/{name}": r["lambda"] for name, r in result.mixing.items()}
        self.track(tracked, result.step + 1)

    def track(self, values: dict[str, float], step: int) -> None:
        """Send ``values`` to the ``--report-to`` trackers (accelerate logs from the main process only)."""
        if self.config.trackers and values:
            self.parallel.accelerator.log(values, step=step)

    def append_log(self, record: dict[str, Any]) -> None:
        if self.main:
            append_line(self.output_dir / LOG_FILE, json.dumps(record))

    def save_checkpoint(self, step: int) -> Path | None:
        """Every process calls this (gathering sharded state is collective); the main one writes and returns the
        checkpoint's folder."""
        optimizer_state = self.parallel.optimizer_state(self.inner, self.optimizer)
        model_state = self.parallel.model_state(self.inner) if self.trainee.needs_model_state else None
        with self.parallel.full_parameters(self.inner):
            bad = _non_finite_parameters(self.inner)
            if bad or not self.main:
                return self._checkpoint_refused(step, bad)
            state = TrainerState(
                step, self.history, self.metrics_before, self.config.to_dict(), self.world, self.start_seconds
            )
            return save_checkpoint(
                self.output_dir,
                state,
                lambda folder: self.trainee.save_weights(self.inner, folder, model_state),
                optimizer_state,
                self.schedule,
            )

    @staticmethod
    def _checkpoint_refused(step: int, bad: list[str]) -> None:
        """No checkpoint from this process: it is not the main one, or (on every process alike) the weights are
        non-finite, which is never written or named as good."""
        if bad:
            raise NonFiniteLossError(
                f"step {step}: the weights became non-finite ({bad[0]}{' and others' if len(bad) > 1 else ''})"
            )


def _non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """The trained parameters holding inf or NaN (never saved as a checkpoint or a result)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def _out_of_space(exc: BaseException) -> bool:
    """A full disk or quota: an ``OSError``, or safetensors' writer reporting the OS error in its message."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(marker in text for marker in ("StorageFull", "No space left", f"code: {errno.ENOSPC}"))


VALIDATION_SEED = 20250724  # the held-out draw is the same for every run seed, so rates are chosen on one set


def hold_out(rows: list[dict[str, Any]], count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training rows, validation rows)``: ``count`` rows drawn with a fixed seed, the rest in their order."""
    if count == 0:
        return rows, []
    if count >= len(rows):
        raise ConfigError(
            f"--validation-examples {count} leaves no training rows (the task has {len(rows)}); hold out fewer"
        )
    chosen = set(random.Random(VALIDATION_SEED).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def run_training(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunSummary | None:
    """Train, evaluate and save as ``config`` says; returns the summary (also written to ``summary.json``), or None
    on processes other than rank 0. ``resume`` continues the folder's run from its last checkpoint; ``overwrite``
    replaces a run already in the folder (without either, a folder holding a run is an error)."""
    return Recipe(config, resume=resume, overwrite=overwrite, progress=progress).run()


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


def _ranks_in_sync(parallel: Any, model: torch.nn.Module) -> bool:
    """True when every rank holds the same trainable weights (a checksum all-gathered from each; call it with the
    parameters whole)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    gathered = parallel.gather(checksum.reshape(1))
    return bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9))
