"""Helpers for the integration tests of the taskit command and daemonizing scripts:
run commands as subprocesses with the repo on PYTHONPATH, find free port ranges,
and clean up every process they start."""

from __future__ import annotations

import os
import random
import re
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


# the command's own start-up line, one per backend process (the BackEnd logs another)
SERVING = re.compile(r"taskit\.cli\[\d+\]: serving \d+ tasks? \(.*\) on tcp://127\.0\.0\.1:(\d+)")


class Backend:
    """A `taskit backend` subprocess; its log goes to a file we can read."""

    def __init__(self, workdir, *args):
        self.log_path = workdir / f"backend-{len(list(workdir.glob('backend-*.log')))}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*TASKIT, "backend", *args],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env(),
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, count=1) -> list[int]:
        """Ports announced in the log once `count` backends are bound."""

        def ports():
            if self.proc.poll() is not None:
                raise AssertionError(f"backend exited {self.proc.returncode}:\n{self.log()}")
            found = sorted({int(p) for p in SERVING.findall(self.log())})
            return found if len(found) >= count else None

        return wait_until(ports, 60, "backend serving")

    def stop(self):
        if self.proc.poll() is None:
            kids = children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
            for k in kids:
                if alive(k):
                    kill_tree(k)
        self.log_file.close()
