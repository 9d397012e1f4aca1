"""Plain progress lines for runs whose output is not a terminal (a log file, a pipe, the bench's and the demo's
runs), where no progress bar is drawn: the step, the loss, the step time and the time left, every few seconds."""

from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_EVERY_S = 5.0


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressLines:
    """``update`` after each step prints ``label: step 12/80 · loss 0.5123 · 1.31 s/step · 1 min 29 s left`` for the
    first and the last step and otherwise at most every ``every_s`` seconds. The time left extrapolates the wall time
    per step since the first step of this process (evaluations and checkpoints included)."""

    def __init__(
        self,
        label: str,
        total: int,
        start: int = 0,
        *,
        every_s: float = PROGRESS_EVERY_S,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.total, self.start, self.every_s = label, total, start, every_s
        self.echo = echo or (lambda line: print(line, flush=True))
        self.clock = clock
        self.began = clock()
        self.last_shown: float | None = None

    def update(self, done: int, loss: float, step_seconds: float) -> None:
        """``done`` steps finished (of ``total``); ``loss`` and ``step_seconds`` of the last one."""
        now = self.clock()
        due = self.last_shown is None or now - self.last_shown >= self.every_s or done >= self.total
        if not due:
            return
        self.last_shown = now
        per_step = (now - self.began) / max(done - self.start, 1)
        left = per_step * max(self.total - done, 0)
        self.echo(
            f"{self.label}: step {done}/{self.total} · loss {loss:.4f} · {step_seconds:.2f} s/step · "
            f"{format_duration(left)} left"
        )
