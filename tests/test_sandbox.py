"""The sandbox for model-written code, attacked the ways a hostile completion would: each test fails if its attack
succeeds. Where this machine cannot sandbox, every attack must instead be refused before it runs."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from hybrid_peft import sandbox
from hybrid_peft.sandbox import SandboxUnavailableError, isolation_problem, run_python

ISOLATED = isolation_problem() is None


def attack(source: str, **limits) -> sandbox.RunResult:  # noqa: ANN003
    """Run ``source`` in the sandbox; where there is none, check that it is refused and skip the rest of the test."""
    if not ISOLATED:
        with pytest.raises(SandboxUnavailableError, match="--unsafe-unsandboxed"):
            run_python(source, **limits)
        pytest.skip(f"refused as it must be: no sandbox here ({isolation_problem()})")
    return run_python(source, **limits)


@pytest.fixture
def listener():  # noqa: ANN201
    """A loopback TCP server on this machine that records whether anything connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connected = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            connected.set()
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    stop.set()
    thread.join()
    server.close()


def test_working_program_passes_and_failing_one_fails() -> None:
    assert attack("print(sum(range(10)))").output.strip() == "45"
    result = attack("assert 1 == 2")
    assert not result.passed and result.reason == "failed" and "AssertionError" in result.output


@pytest.mark.parametrize(
    "connect",
    [
        "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', PORT))",
        "import importlib, socket\nimportlib.reload(socket)\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
        "import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
        "\"import socket; socket.create_connection(('127.0.0.1', PORT), timeout=2)\"], check=True)",
    ],
    ids=["_socket", "reload", "child-python"],
)
def test_no_network_even_to_loopback(listener, connect: str) -> None:  # noqa: ANN001
    port, connected = listener
    result = attack(connect.replace("PORT", str(port)))
    time.sleep(0.3)
    assert not connected.is_set(), "the sandboxed program reached a server on this machine"
    assert not result.passed


def test_cannot_write_outside_its_scratch_folder(tmp_path: Path) -> None:
    target = tmp_path / f"written-{uuid.uuid4().hex}"
    result = attack(f"open({str(target)!r}, 'w').write('pwned')")
    assert not target.exists(), "the sandboxed program wrote into the caller's file system"
    assert not result.passed
    for path in ("/etc/hybrid-peft-test", "/usr/hybrid-peft-test"):
        assert not attack(f"open({path!r}, 'w')").passed
    assert attack("open('scratch.txt', 'w').write('fine')\nprint(open('scratch.txt').read())").output.strip() == "fine"


def test_cannot_read_the_callers_environment_or_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("HYBRID_PEFT_TEST_SECRET", secret)
    (tmp_path / "secret.txt").write_text(secret)
    program = f"""
import glob, os
found = [k for k, v in os.environ.items() if {secret!r} in v]
for path in glob.glob('/proc/*/environ'):
    try:
        if {secret!r}.encode() in open(path, 'rb').read():
            found.append(path)
    except OSError:
        pass
for path in ['/proc/{os.getpid()}/environ', {str(tmp_path / "secret.txt")!r}]:
    try:
        if {secret!r}.encode() in open(path, 'rb').read():
            found.append(path)
    except OSError:
        pass
print('FOUND' if found else 'CLEAN', found)
"""
    result = attack(program)
    assert result.output.startswith("CLEAN"), result.output


def test_cannot_signal_the_caller() -> None:
    caller = os.getpid()
    result = attack(f"import os, signal\nos.kill({caller}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)")
    assert not result.passed  # no such process in its namespace; and we are still here to check
    assert os.getpid() == caller


def _alive_with(marker: str) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    alive.append(int(entry.name))
            except OSError:
                pass
    return alive


def test_daemons_die_with_the_program() -> None:
    marker = f"hybrid-peft-daemon-{uuid.uuid4().hex}"
    program = f"""
import os, sys
for _ in range(20):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])
        os._exit(0)
print('spawned')
"""
    attack(program, timeout=10)
    time.sleep(0.5)
    assert _alive_with(marker) == [], "processes of the sandboxed program outlived it"


def test_timeout_kills_the_whole_tree() -> None:
    marker = f"hybrid-peft-sleeper-{uuid.uuid4().hex}"
    program = f"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}], start_new_session=True)
time.sleep(60)
"""
    started = time.monotonic()
    result = attack(program, timeout=2)
    assert result.reason == "timed out" and time.monotonic() - started < 10
    time.sleep(0.5)
    assert _alive_with(marker) == []


def test_process_count_is_limited() -> None:
    program = """
import os, time
children = 0
try:
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children += 1
except OSError:
    pass
print(children)
"""
    result = attack(program, timeout=15, max_processes=32)
    assert int(result.output.strip().splitlines()[-1]) < 32


def test_memory_is_limited_for_the_whole_tree() -> None:
    # Four children of 200 MB each: every one stays under a 256 MB per-process limit, together they do not.
    program = """
import os, sys
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(200 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.read(os.open('/dev/zero', os.O_RDONLY), 1)
        import time; time.sleep(3)
        os._exit(0)
    pids.append(pid)
codes = [os.waitpid(pid, 0)[1] for pid in pids]
sys.exit(0 if all(code == 0 for code in codes) else 1)
"""
    result = attack(program, timeout=30, memory_mb=256)
    assert not result.passed, "four 200 MB children ran under a 256 MB limit"


def test_output_is_capped() -> None:
    result = attack("import sys\nfor _ in range(400):\n    sys.stdout.write('x' * (1 << 20))\n", max_output=1 << 16)
    assert result.reason == "output limit" and not result.passed
    assert len(result.output) <= 1 << 16


def test_refuses_without_isolation_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "`unshare` (util-linux) is not installed")
    with pytest.raises(SandboxUnavailableError, match=r"unshare.*--unsafe-unsandboxed"):
        run_python("print(1)")
    result = run_python("print(1)", allow_unsandboxed=True)
    assert result.passed and result.output.strip() == "1"


def test_no_new_namespaces_or_mounts_inside() -> None:
    program = """
import ctypes, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
refused = [
    libc.unshare(0x10000000) != 0,                                      # a new user namespace
    libc.unshare(0x00020000) != 0,                                      # a new mount namespace
    libc.mount(b"none", b"/sandbox", b"tmpfs", 0, None) != 0,            # a mount
    subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0,
]
print(refused)
sys.exit(0 if all(refused) else 1)
"""
    result = attack(program, timeout=15)
    assert result.passed, result.output


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "no-cgroup"])
def test_a_first_process_that_leaves_the_group_still_dies(cgroup: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The program (the namespace's first process) calls setsid, so a kill of the caller's process group misses it;
    without a cgroup nothing else knows its processes."""
    if not cgroup:
        monkeypatch.setattr(sandbox._TreeLimits, "__init__", lambda self, *a: setattr(self, "folders", []))
    marker = f"hybrid-peft-leaver-{uuid.uuid4().hex}"
    program = f"""
import os, subprocess, sys, time
os.setsid()
subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])
time.sleep(60)
"""
    started = time.monotonic()
    result = attack(program, timeout=2)
    assert result.reason == "timed out" and time.monotonic() - started < 10, "the kill missed the first process"
    time.sleep(0.5)
    assert _alive_with(marker) == [], "a process outlived the sandbox"


def test_process_count_is_limited_without_a_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox._TreeLimits, "__init__", lambda self, *a: setattr(self, "folders", []))
    test_process_count_is_limited()


def test_the_sandbox_cgroup_sits_under_the_callers_own() -> None:
    """Created at a hierarchy's root, the sandbox's cgroup would escape the limits the caller itself runs under."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    limits = sandbox._TreeLimits(256, 16)
    try:
        if not limits.active:
            pytest.skip("this machine gives this process no cgroup it may create children in")
        for folder in limits.folders:
            controller = "" if (Path("/sys/fs/cgroup") / "cgroup.controllers").is_file() else folder.parts[4]
            expected = Path("/sys/fs/cgroup", controller, own[controller].lstrip("/"))
            assert folder.parent == expected, (folder, own)
    finally:
        limits.remove()
