"""A run's output folder: what a run writes there, the JSON-lines logs (read tolerantly: a crash can tear the last
line), and the lock that keeps a second run out while one is writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybrid_peft.errors import HybridPeftError

LOG_FILE = "train_log.jsonl"
MIXING_FILE = "mixing.jsonl"
LOCK_FILE = ".lock"
RESUME_CONFIG_FILE = "resume_config.json"  # the run's options, written when a signal stops it
EXAMPLES_FILE = "eval_examples.json"  # each evaluation row's score after training (the bench pairs runs by row)
# What a run writes into its folder (besides the lock): a folder holding any of these holds a run.
RUN_OUTPUTS = (
    "checkpoints",
    LOG_FILE,
    MIXING_FILE,
    "adapter",
    "model",
    "merged",
    "summary.json",
    "report.md",
    "report.html",
    "loss.png",
    "lambda.png",
    "adapter_telemetry.jsonl",
    "tracking",
    RESUME_CONFIG_FILE,
    EXAMPLES_FILE,
)


def before_checkpoint(record: dict[str, Any], step: int) -> bool:
    """Whether a log line belongs to the run up to a checkpoint after ``step`` updates: training lines of the steps
    before it (a line's "step" is the update's index), evaluations up to it (their "step" counts updates done)."""
    return record.get("step", -1) <= step if "eval" in record else record.get("step", -1) < step


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line torn by a crash mid-write (only ever the last) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunFolderLock:
    """An exclusive lock on the run folder for the run's duration (``filelock``, as the model cache uses), so that
    two runs cannot interleave their logs and checkpoints in one folder; the operating system releases it if the
    process dies."""

    def __init__(self, folder: Path, *, enabled: bool = True) -> None:
        from filelock import FileLock

        self.folder, self.enabled = folder, enabled
        self.lock = FileLock(str(folder / LOCK_FILE), timeout=0)

    def __enter__(self) -> RunFolderLock:
        from filelock import Timeout

        if self.enabled:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
            except Timeout:
                raise HybridPeftError(
                    f"{self.folder} is in use by another run; wait for it or choose another --output-dir"
                ) from None
            except OSError as exc:  # read-only, not a folder, a name too long, ...
                raise HybridPeftError(
                    f"cannot write the run's folder {self.folder} ({exc.strerror or exc}); choose another --output-dir"
                ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled and self.lock.is_locked:
            self.lock.release()
