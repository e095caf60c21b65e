"""Helpers for the integration tests of the taskit command and daemonizing scripts:
run commands as subprocesses with the repo on PYTHONPATH, find free port ranges,
and clean up every process they start."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKIT = [sys.executable, "-m", "taskit.cli"]

TASKS_SOURCE = '''\
import os
import threading

_release = threading.Event()


def add(a, b):
    return a + b


def shout(text):
    return text.upper()


def fail(message):
    raise ValueError(message)


def pid():
    return os.getpid()


def hold(seconds):
    """Block until release() (or the bound passes): keeps a job in flight."""
    _release.wait(seconds)
    return "held"


def release():
    """End every hold() now and from now on."""
    _release.set()
'''


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), e.get("PYTHONPATH", "")] if p)
    e.pop("PYTHONSTARTUP", None)
    return e


def run(args, timeout=60, **kw) -> subprocess.CompletedProcess:
    """Run ``taskit ARGS`` to completion and return it (text output)."""
    return subprocess.run(
        [*TASKIT, *args], capture_output=True, text=True, timeout=timeout, env=env(), **kw
    )


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(n: int) -> int:
    """First port of ``n`` consecutive ports that were free a moment ago."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range found")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def wait_until(predicate, timeout=30.0, what="condition"):
    """Poll external process/network state (no event exists for it) within a bound."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its children (cleanup after a failed test)."""
    for child in children(pid) if alive(pid) else []:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
