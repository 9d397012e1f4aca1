"""A run's human-readable outputs: ``report.md`` (settings, metrics before and after, time, memory, provenance),
``loss.png`` (training and held-out loss against steps and against training time), ``lambda.png`` (the hybrid's λ
per layer over training) and ``report.html`` (all of it in one self-contained page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.html_report import write_html_report
from hybrid_peft.run.folder import MIXING_FILE
from hybrid_peft.run.summary import RunSummary
from hybrid_peft.telemetry import plot_mixing_heatmap, read_mixing_telemetry


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
        elapsed, total = {}, 0.0  # training seconds after each step (evaluations and checkpoints not counted)
        for record in training:
            total += record.get("seconds", 0.0)
            elapsed[record["step"] + 1] = total
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
        for axis, by_time in zip(axes, (False, True), strict=True):
            x = [elapsed[r["step"] + 1] if by_time else r["step"] for r in training]
            axis.plot(x, [r["loss"] for r in training], linewidth=1, label="training loss")
            if evaluations:
                points = [
                    (r.get("train_seconds", elapsed.get(r["step"], 0.0)) if by_time else r["step"], r["eval"]["loss"])
                    for r in evaluations
                ]
                axis.plot(*zip(*points, strict=True), "o--", linewidth=1, markersize=4, label="held-out loss")
            axis.set_xlabel("training time, s" if by_time else "step (updates done; as in train_log.jsonl)")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("loss")
        axes[0].legend(fontsize=8)
        figure.suptitle(f"{config.model} · {config.method} · {summary.task}", fontsize=10)
        figure.tight_layout()
        figure.savefig(output_dir / "loss.png", dpi=110)
        plt.close(figure)
    mixing = output_dir / MIXING_FILE
    has_mixing = mixing.is_file() and bool(read_mixing_telemetry(mixing))
    if has_mixing:
        plot_mixing_heatmap(mixing, output_dir / "lambda.png", title=f"λ per layer: {config.method} on {summary.task}")
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
    lines += ["![training and held-out loss against steps and training time](loss.png)", ""]
    if has_mixing:
        lines += ["## The hybrid's mix", "", "![λ per layer over training](lambda.png)", ""]
    lines += telemetry_lines(output_dir)
    text = "\n".join(lines)
    atomic_write_text(output_dir / "report.md", text)
    write_html_report(output_dir, text, f"{config.method} on {summary.task} ({config.model})")


def telemetry_lines(output_dir: Path) -> list[str]:
    """The paper's checks from ``adapter_telemetry.jsonl`` (when the run wrote it), as report lines."""
    from hybrid_peft.telemetry import ADAPTER_TELEMETRY_FILE, summarise_adapter_telemetry

    path = output_dir / ADAPTER_TELEMETRY_FILE
    if not path.is_file():
        return []
    return ["## Adapter telemetry", "", *summarise_adapter_telemetry(path), ""]
