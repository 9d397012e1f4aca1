"""What produced a run, for the reader of its numbers: versions, source commit, device, threads, peak memory."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.version import __version__


@dataclass(frozen=True)
class Environment:
    finished_at: str
    hybrid_peft: str
    commit: str | None
    torch: str
    transformers: str
    python: str
    device: str
    cpu_count: int | None
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def source_commit() -> str | None:
    """The git commit of the running ``hybrid_peft`` source (``+dirty`` when tracked files under it differ), or None
    for an installed package."""
    source = Path(__file__).resolve().parents[1]
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


def run_environment(threads: int = 0) -> Environment:
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return Environment(
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        hybrid_peft=__version__,
        commit=source_commit(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        device=device,
        cpu_count=os.cpu_count(),
        threads=threads or torch.get_num_threads(),
    )
