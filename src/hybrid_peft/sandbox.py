"""Running model-written code: a separate process with a time limit, a memory limit, no network and a throwaway
working directory. Good enough for benchmark code (HumanEval), not a security boundary against a determined
attacker: run untrusted models inside a container as well."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRELUDE = """\
import socket as _socket


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this sandbox")


for _name in ("socket", "create_connection", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _no_network)
del _name
"""


@dataclass(frozen=True)
class RunResult:
    passed: bool
    reason: str  # "passed", "failed", "timed out"
    output: str


def _limits(memory_mb: int, cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> RunResult:
    """Run ``source`` with ``python -I`` in a fresh temporary directory; ``passed`` when it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="hybrid-peft-sandbox-") as work:
        program = Path(work) / "program.py"
        program.write_text(PRELUDE + "\n" + source, encoding="utf-8")
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": work,
            "TMPDIR": work,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-I", str(program)],
            cwd=work,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _limits(memory_mb, int(timeout) + 1),  # noqa: PLW1509
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return RunResult(False, "timed out", output.decode("utf-8", "replace")[-2000:])
        text = output.decode("utf-8", "replace")[-2000:]
        return RunResult(process.returncode == 0, "passed" if process.returncode == 0 else "failed", text)
