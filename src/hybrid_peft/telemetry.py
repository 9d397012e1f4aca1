"""Watching and driving the hybrid's mixing outside the recipe: per-step telemetry of λ and the branch gradient
norms (JSON lines), a heatmap of λ per layer per step, and a Hugging Face ``Trainer`` callback that runs the mixing
rule before each optimiser step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hybrid_peft.errors import HybridPeftError
from hybrid_peft.methods.hybrid import update_mixing

# --- telemetry -------------------------------------------------------------------------------------------------


class MixingTelemetry:
    """Appends one JSON line per step: ``{"step": t, "layers": {name: {"lambda", "grad_low_rank", ...}}}``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, records: dict[str, dict[str, float]]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "layers": records}) + "\n")


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


# --- Hugging Face Trainer ----------------------------------------------------------------------------------------


def mixing_callback(telemetry_path: str | os.PathLike | None = None, *, sharded: bool = False) -> Any:
    """A ``transformers.TrainerCallback`` that runs :func:`update_mixing` before every optimiser step (and logs)."""
    from transformers import TrainerCallback

    telemetry = MixingTelemetry(telemetry_path) if telemetry_path else None

    class HybridMixingCallback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            records = update_mixing(model, sharded=sharded)
            if telemetry is not None and state.is_world_process_zero:
                telemetry.log(state.global_step, records)

    return HybridMixingCallback()
