"""A finished run's record, :class:`RunSummary`: written as ``summary.json`` by the recipe, read by the bench, the
demo and the command line. It round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_peft.fileio import atomic_write_text
from hybrid_peft.run.config import TrainConfig
from hybrid_peft.run.provenance import Environment

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RunSummary:
    config: TrainConfig
    task: str
    processes: int
    distributed_type: str
    ranks_in_sync: bool
    trainable_parameters: int
    total_parameters: int
    before: dict[str, float]  # the task's metrics before training (and the held-out "loss")
    after: dict[str, float]  # ... and after
    final_loss: float | None  # the last step's training loss
    median_step_s: float | None
    wall_s: float
    peak_rss_mb: float
    resumed_from_step: int
    environment: Environment | None = None
    validation: dict[str, float] = dataclasses.field(default_factory=dict)  # on --validation-examples, at the end
    # every option of each adapter as the run resolved it (its defaults filled in), so that a later change of a
    # default cannot make the run look as if it had used the new one; None for full fine-tuning, the PEFT peers
    # and runs recorded before the field existed
    resolved_adapters: list[dict[str, Any]] | None = None
    # seconds of the method's start before step 1 (LoRA-GA's gradient estimate; about 0 for the others), counted in the
    # training time of the time-to-quality table; None for runs recorded before the field existed
    start_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["config"] = TrainConfig.from_dict(data["config"])
        environment = data.get("environment")
        if environment is not None:
            known = {f.name for f in dataclasses.fields(Environment)}
            values["environment"] = Environment(**{k: environment.get(k) for k in known})
        return cls(**values)

    def write(self, output_dir: str | os.PathLike) -> Path:
        path = Path(output_dir) / SUMMARY_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, output_dir: str | os.PathLike) -> RunSummary:
        return cls.from_dict(json.loads((Path(output_dir) / SUMMARY_FILE).read_text(encoding="utf-8")))

    def metric(self, name: str, when: str = "after") -> float | None:
        return (self.after if when == "after" else self.before).get(name)
