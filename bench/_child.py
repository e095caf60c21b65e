"""Bench servers in child processes: the child announces its port and lives until
its stdin closes; the parent starts it, reads the port, and always ends it.

While it runs, the parent may ask the child for its own resource use (and, for a
child that offers one, a report: :meth:`ChildServer.report`): a line
``usage`` on the child's stdin is answered with one line ``USAGE cpu_ns minflt
csw`` on its stdout -- the child's process CPU time (every thread, user +
system, ``time.process_time_ns()``), its minor page faults and its context
switches (voluntary + involuntary) so far (:meth:`ChildServer.usage`). The
bench divides the difference over a run by the calls made: CPU per call on the
server's side, steadier than wall time on a shared machine.

Shared by ``rpc.py`` and ``peers.py`` (a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import resource
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

__all__ = ["BenchError", "ChildServer", "READY_TIMEOUT", "Usage", "announce", "wait_eof", "usage"]

READY_TIMEOUT = 30.0  # seconds a child server has to report its port
USAGE_TIMEOUT = 10.0  # seconds a child has to answer a usage query
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_eof = threading.Event()
_report: list = [None]  # a child's answer to a "report" query: a callable returning one line


class BenchError(Exception):
    """A side could not be measured; the message says why."""


class Usage(NamedTuple):
    """A process's resource use so far: CPU seconds (all threads, user + system),
    minor page faults, context switches."""

    cpu: float
    minflt: int
    csw: int

    def __sub__(self, other: object) -> Usage:  # type: ignore[override]
        assert isinstance(other, Usage)
        return Usage(self.cpu - other.cpu, self.minflt - other.minflt, self.csw - other.csw)


def usage() -> Usage:
    """This process's :class:`Usage` so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(time.process_time_ns() / 1e9, r.ru_minflt, r.ru_nvcsw + r.ru_nivcsw)


def _serve_stdin(exit_on_eof: bool) -> None:
    """In the child: answer usage queries until stdin ends (or the parent dies)."""
    out = sys.stdout
    for line in sys.stdin.buffer:
        if line.strip() == b"usage":
            u = usage()
            out.write(f"USAGE {round(u.cpu * 1e9)} {u.minflt} {u.csw}\n")
            out.flush()
        elif line.strip() == b"report":
            text = _report[0]() if _report[0] is not None else ""
            out.write(f"REPORT {text}\n")
            out.flush()
    if exit_on_eof:
        os._exit(0)
    _eof.set()


def announce(port: int, exit_on_eof: bool = True, report: Any = None) -> None:
    """In the child, once listening: tell the parent the port, and answer its usage
    queries from a thread. With ``exit_on_eof``, exit when the parent closes our
    stdin (or dies); else the caller waits for that with :func:`wait_eof` (to stop
    gracefully). ``report``: a callable returning one line of text, the answer to
    :meth:`ChildServer.report`."""
    _report[0] = report
    threading.Thread(
        target=_serve_stdin, args=(exit_on_eof,), name="bench-stdin-watch", daemon=True
    ).start()
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def wait_eof() -> None:
    """In the child (after ``announce(port, exit_on_eof=False)``): block until the
    parent closes our stdin."""
    _eof.wait()


class ChildServer:
    """``python SCRIPT --serve KIND`` in a child process with this checkout on its
    ``PYTHONPATH``; ``port`` is what it announced. :meth:`stop` always ends it, by
    pid. Raises :class:`BenchError` (with the child's last stderr lines) when it
    does not come up."""

    def __init__(self, script: str, kind: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.kind = kind
        self._stderr = tempfile.TemporaryFile()  # never a pipe that could fill up
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._sel = selectors.DefaultSelector()
        try:
            assert self.proc.stdout is not None
            self._sel.register(self.proc.stdout, selectors.EVENT_READ)
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise

    def _line(self, timeout: float, what: str) -> str:
        assert self.proc.stdout is not None
        if not self._sel.select(timeout):
            raise BenchError(f"server {self.kind} did not {what} in {timeout:.0f}s")
        return self.proc.stdout.readline().decode(errors="replace").strip()

    def _read_port(self) -> int:
        line = self._line(READY_TIMEOUT, "report a port")
        if not line.startswith("PORT "):
            self.proc.wait(5)
            raise BenchError(f"server failed to start: {self._tail() or line or 'no output'}")
        return int(line.split()[1])

    def usage(self) -> Usage:
        """The child's :class:`Usage` so far (it answers from a thread of its own)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"usage\n")
        self.proc.stdin.flush()
        line = self._line(USAGE_TIMEOUT, "answer a usage query")
        if not line.startswith("USAGE "):
            raise BenchError(f"server {self.kind} answered {line!r} to a usage query")
        cpu_ns, minflt, csw = (int(x) for x in line.split()[1:4])
        return Usage(cpu_ns / 1e9, minflt, csw)

    def report(self) -> str:
        """The child's answer to a report query (what its ``announce(report=...)`` returns)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"report\n")
        self.proc.stdin.flush()
        line = self._line(USAGE_TIMEOUT, "answer a report query")
        if not line.startswith("REPORT"):
            raise BenchError(f"server {self.kind} answered {line!r} to a report query")
        return line[len("REPORT ") :]

    def _tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return " | ".join(text[-400:].splitlines()[-3:])

    def stop(self) -> None:
        """Close stdin (the server exits on EOF), then terminate, then kill, by pid."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        for step in (None, self.proc.terminate, self.proc.kill):
            if step is not None:
                step()
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.proc.stdout:
            self.proc.stdout.close()
        self._sel.close()
        self._stderr.close()
