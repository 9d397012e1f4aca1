"""Ctrl-C (SIGINT) and SIGTERM (what schedulers and ``docker stop`` send) while training: the run finishes the step it
is in, saves a checkpoint and says how to continue, instead of losing every step since the last checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Inside ``with StopRequests() as stop:`` SIGINT and SIGTERM are remembered rather than acted on; the loop asks
    :meth:`requested` at each step boundary. A second Ctrl-C stops at once (``KeyboardInterrupt``). Outside the block
    the previous handlers are back. Handlers can only be set from the main thread; elsewhere nothing changes."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"{signal.Signals(signum).name} received: stopping after this step, with a checkpoint "
            "(Ctrl-C again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, world: int = 1) -> int:
        """The signal asked for (0: none), the same on every process (a collective when ``world`` > 1)."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
