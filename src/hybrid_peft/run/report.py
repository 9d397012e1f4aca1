"""A run's human-readable outputs: ``report.md`` (settings, metrics before and after, time, memory, provenance)
and ``loss.png`` (the training loss against steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.run.summary import RunSummary


def write_report(output_dir: Path, summary: RunSummary, log: list[dict[str, Any]]) -> None:
    """``log`` is ``train_log.jsonl``'s records: training steps (``"step"``: the update's index, its ``"loss"`` computed
    with the weights after that many updates) and evaluations (``"step"``: updates done), drawn on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = summary.config
    training = [r for r in log if "loss" in r and "eval" not in r]
    evaluations = [r for r in log if "eval" in r and "loss" in r["eval"]]
    if training or evaluations:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([r["step"] for r in training], [r["loss"] for r in training], linewidth=1, label="training loss")
        if evaluations:
            axis.plot(
                [r["step"] for r in evaluations],
                [r["eval"]["loss"] for r in evaluations],
                "o--",
                linewidth=1,
                markersize=4,
                label="held-out loss",
            )
        axis.set_xlabel("step (updates done; the same numbers as train_log.jsonl)")
        axis.set_ylabel("loss")
        axis.set_title(f"{config.model} · {config.method} · {summary.task}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(output_dir / "loss.png", dpi=120)
        plt.close(figure)
    lines = [
        f"# {config.method} on {summary.task} ({config.model})",
        "",
        f"{config.steps} steps of batch {config.batch_size} × {summary.processes} process(es), "
        f"max length {config.max_length}, learning rate {config.learning_rate:g}, seed {config.seed}; "
        f"adapter options {config.adapter or 'default'}.",
        "",
        f"Trainable parameters: {summary.trainable_parameters:,} of {summary.total_parameters:,}.",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in sorted(set(summary.before) | set(summary.after)):
        before, after = summary.before.get(key), summary.after.get(key)
        lines.append(
            f"| {key} | {'' if before is None else f'{before:.4f}'} | {'' if after is None else f'{after:.4f}'} |"
        )
    lines += [
        "",
        f"Wall time {summary.wall_s:.0f} s, median step {summary.median_step_s or float('nan'):.2f} s, "
        f"peak RSS {summary.peak_rss_mb:.0f} MB.",
        "",
    ]
    environment = summary.environment
    if environment is not None:
        lines += [
            f"Run on {environment.device} with {environment.threads} thread(s), finished "
            f"{environment.finished_at}; hybrid-peft {environment.hybrid_peft} (commit "
            f"{environment.commit or 'unknown'}), torch {environment.torch}, "
            f"transformers {environment.transformers}.",
            "",
        ]
    lines += ["![training loss](loss.png)", ""]
    atomic_write_text(output_dir / "report.md", "\n".join(lines))
