"""Running model-written code (HumanEval completions) in a sandbox.

Each program runs in fresh Linux namespaces made with ``unshare`` (util-linux, part of every Debian/Ubuntu base
system; as root directly, otherwise inside a user namespace)::

    network   a new network namespace: no interface but a downed loopback, so nothing is reachable
    PIDs      a new PID namespace: the caller and every other process are invisible and cannot be signalled; when
              the program's namespace ends (it exits, times out or breaks a limit) the kernel kills every process
              left in it, daemons included
    mounts    a new root: the system's /usr, /etc, /bin, /lib* and the Python installation read-only, a fresh /proc
              and a minimal /dev, and one writable scratch folder (a small tmpfs) as the working directory; the
              caller's files, home and temporary folders are not there at all
    user      as root, the program runs as ``nobody`` with no capabilities and ``no_new_privs``
    env       empty but for PATH, HOME, TMPDIR and LANG

Limits: wall time; memory and process count for the whole tree through a cgroup (v1 or v2) where this process may
create one, else per-process address-space and process-count limits; output read with a byte cap (the rest is
discarded and the run fails); file size. :func:`isolation_problem` says why a machine cannot sandbox; there
:func:`run_python` refuses to run anything unless ``allow_unsandboxed=True`` (the command line's
``--unsafe-unsandboxed``), which runs the program as a plain child process with the per-process limits only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from hybrid_peft.errors import HybridPeftError

NOBODY = 65534
SYSTEM_FOLDERS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "random", "urandom")
UNSAFE_FLAG = "--unsafe-unsandboxed"


class SandboxUnavailableError(HybridPeftError, OSError):
    """This machine cannot isolate model-written code, and running it unisolated was not allowed."""


@dataclass(frozen=True)
class RunResult:
    passed: bool
    reason: str  # "passed", "failed", "timed out", "output limit"
    output: str


# --- the program that sets up the sandbox inside the new namespaces --------------------------------------------

# Runs as (namespace) root inside the new mount, PID, network, IPC and UTS namespaces; argv: an empty folder to
# build the new root on (a tmpfs mounted there, in this namespace only), scratch size in MB, the uid/gid to become
# (or -1), the interpreter, the folders to show read-only. Reads the program on stdin.
LAUNCHER = r"""
import ctypes, os, subprocess, sys
root, scratch_mb, uid, max_processes, python, *shown = sys.argv[1:]
import struct
# A seccomp filter (x86_64): new namespaces and mounts are refused with EPERM, clone3 with ENOSYS (so the C library
# falls back to clone, whose flags the filter can read), any other architecture's system calls with EPERM.
ALLOW, DENY, NO_CLONE3 = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
REFUSED = (272, 308, 165, 166, 155, 428, 429, 430, 431, 432, 442)  # unshare setns mount umount2 pivot_root fs*
def statement(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)
program = [statement(0x20, 4), statement(0x15, 0xC000003E, 1, 0), statement(0x06, DENY),  # arch is x86_64
           statement(0x20, 0), statement(0x35, 0x40000000, 0, 1), statement(0x06, DENY)]  # no x32 calls
for number in REFUSED:
    program += [statement(0x15, number, 0, 1), statement(0x06, DENY)]
program += [statement(0x15, 435, 0, 1), statement(0x06, NO_CLONE3),
            statement(0x15, 56, 0, 3), statement(0x20, 16), statement(0x45, NAMESPACE_FLAGS, 0, 1),
            statement(0x06, DENY), statement(0x06, ALLOW)]
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
FILTER = b"".join(program)
SECCOMP_PROGRAM = SockFprog(len(program), FILTER)
source = sys.stdin.buffer.read()
devnull = os.open("/dev/null", os.O_RDONLY)
os.dup2(devnull, 0)
def run(*command):
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
run("mount", "--make-rprivate", "/")
run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", root)
for folder in shown:
    if not os.path.exists(folder):
        continue
    target = root + folder
    if os.path.islink(folder):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(folder), target)
        continue
    os.makedirs(target, exist_ok=True)
    run("mount", "--rbind", folder, target)
    run("mount", "-o", "remount,bind,ro,nosuid,nodev", target)
os.makedirs(root + "/proc")
run("mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", root + "/proc")
os.makedirs(root + "/dev")
for device in ("null", "zero", "random", "urandom"):
    open(root + "/dev/" + device, "w").close()
    run("mount", "--bind", "/dev/" + device, root + "/dev/" + device)
os.makedirs(root + "/sandbox")
run("mount", "-t", "tmpfs", "-o", "size=%sm,mode=1777,nosuid,nodev" % scratch_mb, "tmpfs", root + "/sandbox")
with open(root + "/sandbox/program.py", "wb") as handle:
    handle.write(source)
run("mount", "-o", "remount,ro,bind", root)
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(root)
os.makedirs("sandbox/.old")
if libc.syscall(155, b".", b"sandbox/.old") != 0:  # pivot_root(2) on x86_64
    raise OSError(ctypes.get_errno(), "pivot_root failed")
os.chdir("/")
if libc.umount2(b"/sandbox/.old", 2) != 0:  # MNT_DETACH: the old root is gone from this namespace
    raise OSError(ctypes.get_errno(), "umount of the old root failed")
os.rmdir("/sandbox/.old")
os.chdir("/sandbox")
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if int(uid) >= 0:
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL again: a change of user cleared the one unshare set
for capability in range(64):  # no capabilities, even as the namespace's root: the process limit then applies
    libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
libc.capset(header, (ctypes.c_uint32 * 6)())
import resource
resource.setrlimit(resource.RLIMIT_NPROC, (int(max_processes), int(max_processes)))
if os.uname().machine == "x86_64":
    libc.prctl(22, 2, ctypes.byref(SECCOMP_PROGRAM))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
os.execve(python, [python, "-I", "-S", "program.py"],
          {"PATH": "/usr/bin:/bin", "HOME": "/sandbox", "TMPDIR": "/sandbox", "LANG": "C.UTF-8"})
"""


def _interpreter() -> tuple[str, list[str]]:
    """The real Python executable (not a virtual environment's link to it) and the folders it needs."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    folders = {os.path.realpath(sys.base_prefix), os.path.dirname(executable)}
    return executable, sorted(folders)


def _unshare_command() -> list[str]:
    command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--ipc", "--uts"]
    if os.geteuid() != 0:
        command += ["--user", "--map-root-user"]
    return command


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """None when programs can be sandboxed here, else why not (checked once per process, by sandboxing one)."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces; this is {sys.platform}"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    try:
        result = _run_isolated("print(6 * 7)", timeout=20.0, memory_mb=256, max_processes=16, max_output=4096)
    except OSError as exc:
        return f"the sandbox could not start ({exc})"
    if not (result.passed and result.output.strip() == "42"):
        return f"the sandbox could not start ({result.reason}: {result.output.strip()[-300:] or 'no output'})"
    return None


def require_sandbox(allow_unsandboxed: bool = False) -> None:
    """Before work that will end in running model-written code: raise now, not after an hour of training, when this
    machine cannot sandbox it and running it unisolated was not allowed (and warn when it was)."""
    problem = isolation_problem()
    if problem is None:
        return
    if not allow_unsandboxed:
        raise SandboxUnavailableError(_refusal(problem))
    warnings.warn(f"model-written code will run without isolation ({problem}); {UNSAFE_FLAG} was given", stacklevel=2)


def _refusal(problem: str) -> str:
    return (
        f"cannot sandbox model-written code on this machine: {problem}. Run where Linux namespaces are available "
        f"(as root, or with unprivileged user namespaces enabled), pass --no-generate to skip the metrics that run "
        f"code, or pass {UNSAFE_FLAG} to run it as a plain child process, which isolates nothing"
    )


def run_python(
    source: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 64,
    max_output: int = 1 << 20,
    allow_unsandboxed: bool = False,
) -> RunResult:
    """Run ``source`` with ``python -I -S`` in the sandbox; ``passed`` when it exits with status 0 in time, within
    the limits. Every process it started is gone when this returns."""
    problem = isolation_problem()
    if problem is None:
        return _run_isolated(
            source, timeout=timeout, memory_mb=memory_mb, max_processes=max_processes, max_output=max_output
        )
    if not allow_unsandboxed:
        raise SandboxUnavailableError(_refusal(problem))
    return _run_unisolated(source, timeout=timeout, memory_mb=memory_mb, max_output=max_output)


# --- cgroups --------------------------------------------------------------------------------------------------


class _TreeLimits:
    """A cgroup holding the sandbox's whole process tree, with memory and process-count limits, where this process
    may create one (cgroup v2 with the memory and pids controllers, or v1's memory and pids hierarchies)."""

    def __init__(self, memory_mb: int, max_processes: int) -> None:
        self.folders: list[Path] = []
        name = f"hybrid-peft-sandbox-{uuid.uuid4().hex[:12]}"
        unified = Path("/sys/fs/cgroup")
        try:
            if (unified / "cgroup.controllers").is_file():
                folder = self._v2_parent(unified) / name
                folder.mkdir()
                self.folders = [folder]
                (folder / "memory.max").write_text(str(memory_mb << 20))
                (folder / "memory.swap.max").write_text("0") if (folder / "memory.swap.max").exists() else None
                (folder / "pids.max").write_text(str(max_processes))
            elif (unified / "memory").is_dir() and (unified / "pids").is_dir():
                # under this process's own cgroups, so the caller's limits still bound the sandbox
                memory = self._v1_parent(unified, "memory") / name
                pids = self._v1_parent(unified, "pids") / name
                memory.mkdir()
                self.folders.append(memory)
                pids.mkdir()
                self.folders.append(pids)
                (memory / "memory.limit_in_bytes").write_text(str(memory_mb << 20))
                swap = memory / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(memory_mb << 20))
                (pids / "pids.max").write_text(str(max_processes))
        except OSError:
            self.remove()
            self.folders = []

    @staticmethod
    def _v2_parent(root: Path) -> Path:
        own = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split("::", 1)[-1]
        parent = root / own.lstrip("/")
        controllers = (parent / "cgroup.subtree_control").read_text().split()
        if not {"memory", "pids"} <= set(controllers):
            raise OSError("the memory and pids controllers are not delegated here")
        return parent

    @staticmethod
    def _v1_parent(root: Path, controller: str) -> Path:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return root / controller / path.lstrip("/")
        raise OSError(f"this process is in no {controller} cgroup")

    @property
    def active(self) -> bool:
        return bool(self.folders)

    def join(self) -> None:
        """Move the calling process into the cgroup (called in the child before it runs anything)."""
        for folder in self.folders:
            (folder / "cgroup.procs").write_text(str(os.getpid()))

    def kill_all(self) -> None:
        for _ in range(50):
            pids = set()
            for folder in self.folders:
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (folder / "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self) -> None:
        for folder in self.folders:
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


# --- running --------------------------------------------------------------------------------------------------


def _child_limits(memory_mb: int, cpu_seconds: int, max_processes: int | None, tree: _TreeLimits | None) -> None:
    if tree is not None:
        tree.join()
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if max_processes is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))


def _read_capped(stream, limit: int, sink: list[bytes], exceeded: threading.Event) -> None:  # noqa: ANN001
    total = 0
    while chunk := stream.read1(65536):
        if total < limit:
            sink.append(chunk[: limit - total])
        total += len(chunk)
        if total > limit:
            exceeded.set()
            return


def _communicate(process: subprocess.Popen, timeout: float, max_output: int, kill) -> RunResult:  # noqa: ANN001
    chunks: list[bytes] = []
    exceeded = threading.Event()
    reader = threading.Thread(target=_read_capped, args=(process.stdout, max_output, chunks, exceeded), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    reason = None
    while reason is None:
        if exceeded.is_set():
            reason = "output limit"
        elif process.poll() is not None:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
            reason = "output limit" if exceeded.is_set() else ("timed out" if reader.is_alive() else "done")
        elif time.monotonic() > deadline:
            reason = "timed out"
        else:
            time.sleep(0.01)
    kill()
    process.wait()
    reader.join(timeout=5)
    process.stdout.close()
    text = b"".join(chunks).decode("utf-8", "replace")
    if reason == "done":
        passed = process.returncode == 0
        return RunResult(passed, "passed" if passed else "failed", text[-2000:])
    return RunResult(False, reason, text[-2000:])


def _run_isolated(source: str, *, timeout: float, memory_mb: int, max_processes: int, max_output: int) -> RunResult:
    python, folders = _interpreter()
    shown = [*SYSTEM_FOLDERS, *(f for f in folders if not f.startswith(SYSTEM_FOLDERS))]
    uid = NOBODY if os.geteuid() == 0 else -1
    tree = _TreeLimits(memory_mb, max_processes)
    root = tempfile.mkdtemp(prefix="hybrid-peft-sandbox-root-")  # stays empty outside the namespace
    command = [
        *_unshare_command(), python, "-I", "-S", "-c", LAUNCHER,
        root, "64", str(uid), str(max_processes), python, *shown,
    ]  # fmt: skip
    # The launcher limits the process count inside the namespace (counted there afresh, without capabilities);
    # without a cgroup, each process's address space is limited too (the tree holds at most max_processes of them).
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            cwd="/",
            start_new_session=True,
            preexec_fn=lambda: _child_limits(  # noqa: PLW1509 - sets limits between fork and exec
                0 if tree.active else memory_mb + 256,
                int(timeout) + 2,
                None,
                tree if tree.active else None,
            ),
        )
        try:
            process.stdin.write(source.encode("utf-8"))
            process.stdin.close()
        except BrokenPipeError:
            pass

        def kill() -> None:
            _kill_tree(process.pid)  # every process it started, in whatever session or group
            tree.kill_all()

        return _communicate(process, timeout, max_output, kill)
    finally:
        tree.kill_all()
        tree.remove()
        with contextlib.suppress(OSError):
            os.rmdir(root)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from ``/proc``'s children lists), deepest last."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                queue += children
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s whole tree: stopped first (so it cannot fork away), then killed, its group too."""
    tree = [pid, *_descendants(pid)]
    for member in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGSTOP)
    for member in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _run_unisolated(source: str, *, timeout: float, memory_mb: int, max_output: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="hybrid-peft-unsandboxed-") as work:
        program = Path(work) / "program.py"
        program.write_text(source, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-I", str(program)],
            cwd=work,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _child_limits(memory_mb, int(timeout) + 1, None, None),  # noqa: PLW1509
        )

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

        return _communicate(process, timeout, max_output, kill)
