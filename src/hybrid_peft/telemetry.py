"""Watching adapters train: the hybrid's per-step λ and branch gradient norms (``mixing.jsonl``) with a heatmap, the
paper's checks for every method (``adapter_telemetry.jsonl``: each adapted block's gradient norm, so gradient-norm
preservation through depth, and each rotation's orthogonality error ‖RᵀR − I‖) and their one-line summaries. The
Trainer callback is :class:`hybrid_peft.integrations.HybridPeftCallback`."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_peft.adapters import adapter_layers, rate_scales_not_applied
from hybrid_peft.errors import HybridPeftError
from hybrid_peft.fileio import append_line
from hybrid_peft.norms import grouped_squared_norms

ADAPTER_TELEMETRY_FILE = "adapter_telemetry.jsonl"
BLOCK_INDEX = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")  # Llama/BERT/GPT-2 block lists

# --- telemetry -------------------------------------------------------------------------------------------------


TELEMETRY_DIGITS = 6  # significant digits kept of each logged value


class MixingTelemetry:
    """Appends one JSON line per step: ``{"step": t, "layers": {name: {"lambda", "grad_low_rank", ...}}}``, each value
    to :data:`TELEMETRY_DIGITS` significant digits: a line holds every layer's values each step, and at full
    precision most of the file is digits that no plot or summary reads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, records: dict[str, dict[str, float]]) -> None:
        if not records:
            return
        layers = {name: {k: _rounded(v) for k, v in values.items()} for name, values in records.items()}
        append_line(self.path, json.dumps({"step": step, "layers": layers}))


def _rounded(value: float) -> float:
    return float(f"{value:.{TELEMETRY_DIGITS}g}") if math.isfinite(value) else value


def read_mixing_telemetry(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_mixing_heatmap(telemetry: str | os.PathLike, output: str | os.PathLike, title: str | None = None) -> Path:
    """A layers × steps heatmap of λ from a telemetry JSONL file, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_mixing_telemetry(telemetry)
    if not rows:
        raise HybridPeftError(f"{telemetry} holds no telemetry rows")
    names = list(rows[0]["layers"])
    values = [[row["layers"].get(name, {}).get("lambda", float("nan")) for row in rows] for name in names]
    steps = [row["step"] for row in rows]
    figure, axis = plt.subplots(figsize=(min(14, 4 + len(steps) / 10), min(12, 2 + len(names) / 6)))
    image = axis.imshow(
        values,
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5),
    )
    axis.set_xlabel("step")
    axis.set_ylabel("layer")
    if len(names) <= 40:
        axis.set_yticks(range(len(names)), [n.removeprefix("model.") for n in names], fontsize=6)
    axis.set_title(title or "λ per layer (1 = low-rank LoRA-GA branch, 0 = orthogonal BOFT branch)")
    figure.colorbar(image, ax=axis, label="λ")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


# --- the paper's checks, for every method ------------------------------------------------------------------------


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to (``model.layers.3.mlp.up_proj`` → 3), or None."""
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


@torch.no_grad()
def block_gradient_norms(model: nn.Module) -> dict[int, float]:
    """‖∇‖ of the trained parameters of each transformer block (after ``backward()``), by block index: the
    adapters' for an adapted model, every weight's under full fine-tuning."""
    grads, blocks = [], []
    for name, p in model.named_parameters():
        block = block_index(name)
        if block is not None and p.requires_grad and p.grad is not None:
            grads.append(p.grad.detach())
            blocks.append(block)
    if not grads:
        return {}
    order = sorted(set(blocks))  # block indices → 0..n−1
    slot = {block: i for i, block in enumerate(order)}
    squares = grouped_squared_norms(grads, [slot[b] for b in blocks], len(order), grads[0].device)
    return dict(zip(order, squares.sqrt().tolist(), strict=True))  # one host read for every block


@torch.no_grad()
def orthogonality_errors(model: nn.Module) -> dict[str, float]:
    """‖RᵀR − I‖_F of each adapter rotation (BOFT's and the hybrid's butterfly blocks, the unitary adapter's
    ρ(U)), by layer name; layers without a rotation are left out."""
    errors = {}
    for name, layer in adapter_layers(model).items():
        error = layer.orthogonality_error()
        if error is not None:
            errors[name] = error
    return errors


class AdapterTelemetry:
    """Appends ``{"step", "block_grad_norms"}`` every step and ``"orthogonality"`` every ``every`` steps (and at
    step 0) to ``adapter_telemetry.jsonl``."""

    def __init__(self, path: str | os.PathLike, every: int = 10) -> None:
        self.path, self.every = Path(path), every

    def log(self, step: int, model: nn.Module, block_norms: dict[int, float]) -> None:
        record: dict[str, Any] = {"step": step, "block_grad_norms": {str(k): v for k, v in block_norms.items()}}
        if step % self.every == 0:
            errors = orthogonality_errors(model)
            if errors:
                record["orthogonality"] = errors
        append_line(self.path, json.dumps(record))


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rank(values: list[float]) -> list[float]:
    """Ranks from 0, tied values sharing the mean of their positions."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank), None when undefined: fewer than three layers, or
    either side constant (λ under the ``fixed`` rule)."""
    if len(x) < 3:
        return None
    rx, ry = _rank(x), _rank(y)
    try:
        return statistics.correlation(rx, ry)
    except statistics.StatisticsError:
        return None


def telemetry_summary(folder: str | os.PathLike) -> dict[str, float]:
    """A run's checks as numbers: ``depth_ratio`` (median over steps of ‖∇‖ first adapted block / last),
    ``orthogonality_error`` (the largest ‖RᵀR − I‖_F over layers and logged steps), ``lambda_gradient_spearman``
    (median over steps of the rank correlation, across layers, of λ and the layer's gradient norm; hybrid only),
    ``final_lambda`` (the low-rank share λ at the last logged step, mean over layers; hybrid only). Keys whose data
    the run did not write are absent."""
    folder = Path(folder)
    summary: dict[str, float] = {}
    path = folder / ADAPTER_TELEMETRY_FILE
    if path.is_file():
        records = _read_lines(path)
        ratios = []
        for record in records:
            norms = record["block_grad_norms"]
            if len(norms) >= 2:
                blocks = sorted(norms, key=int)
                last = norms[blocks[-1]]
                if last > 0:
                    ratios.append(norms[blocks[0]] / last)
        if ratios:
            summary["depth_ratio"] = statistics.median(ratios)
        errors = [max(r["orthogonality"].values()) for r in records if r.get("orthogonality")]
        if errors:
            summary["orthogonality_error"] = max(errors)
    mixing = folder / "mixing.jsonl"
    if mixing.is_file():
        correlations = []
        rows = _read_lines(mixing)
        for row in rows:
            layers = list(row["layers"].values())
            magnitude = [math.hypot(r["grad_low_rank"], r["grad_orthogonal"]) for r in layers]
            value = spearman([r["lambda"] for r in layers], magnitude)
            if value is not None:
                correlations.append(value)
        if correlations:
            summary["lambda_gradient_spearman"] = statistics.median(correlations)
        if rows and rows[-1]["layers"]:
            summary["final_lambda"] = statistics.fmean(r["lambda"] for r in rows[-1]["layers"].values())
    return summary


def summarise_adapter_telemetry(path: str | os.PathLike) -> list[str]:
    """Report lines for a run folder's telemetry (see :func:`telemetry_summary`)."""
    summary = telemetry_summary(Path(path).parent)
    lines = []
    if "depth_ratio" in summary:
        lines.append(
            f"- Gradient-norm preservation through depth: ‖∇‖ of the first adapted block / the last, median over "
            f"steps: {summary['depth_ratio']:.3f} (1 = preserved)."
        )
    if "orthogonality_error" in summary:
        lines.append(
            f"- Orthogonality of the rotations: the largest ‖RᵀR − I‖_F over layers and logged steps: "
            f"{summary['orthogonality_error']:.2e}."
        )
    if "lambda_gradient_spearman" in summary:
        lines.append(
            f"- λ against each layer's gradient magnitude: Spearman ρ across layers, median over steps: "
            f"{summary['lambda_gradient_spearman']:+.3f}."
        )
    if "final_lambda" in summary:
        lines.append(f"- The low-rank share λ at the last step, mean over layers: {summary['final_lambda']:.3f}.")
    return lines


# --- Hugging Face Trainer ----------------------------------------------------------------------------------------


def warn_if_rate_scales_not_applied(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Warn, naming the fix, when ``optimizer`` does not apply the learning-rate multiples ``model``'s adapters ask
    for (:func:`~hybrid_peft.adapters.rate_scales_not_applied`)."""
    wrong = rate_scales_not_applied(optimizer, model)
    if wrong:
        asked = ", ".join(f"{a:g}× (applied {b:g}×)" for a, b in sorted(wrong.items()))
        warnings.warn(
            f"the adapters ask for some parameters at a multiple of the learning rate ({asked}; e.g. the hybrid's "
            "orthogonal.lr_scale), which this optimiser does not apply: build it from "
            "hybrid_peft.parameter_groups(model, learning_rate), e.g. Trainer(..., optimizers=(torch.optim.AdamW("
            "parameter_groups(model, lr)), None))",
            stacklevel=2,
        )
