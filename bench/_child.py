"""Bench servers in child processes: the child announces its port and lives until
its stdin closes; the parent starts it, reads the port, and always ends it.

Shared by ``rpc.py`` and ``peers.py`` (a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import threading

__all__ = ["BenchError", "ChildServer", "READY_TIMEOUT", "announce"]

READY_TIMEOUT = 30.0  # seconds a child server has to report its port
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchError(Exception):
    """A side could not be measured; the message says why."""


def announce(port: int, exit_on_eof: bool = True) -> None:
    """In the child, once listening: tell the parent the port. With ``exit_on_eof``,
    exit when the parent closes our stdin (or dies); else the caller waits for that
    itself (to stop gracefully)."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    if exit_on_eof:
        threading.Thread(target=watch, name="bench-stdin-watch", daemon=True).start()
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


class ChildServer:
    """``python SCRIPT --serve KIND`` in a child process with this checkout on its
    ``PYTHONPATH``; ``port`` is what it announced. :meth:`stop` always ends it, by
    pid. Raises :class:`BenchError` (with the child's last stderr lines) when it
    does not come up."""

    def __init__(self, script: str, kind: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self._stderr = tempfile.TemporaryFile()  # never a pipe that could fill up
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(READY_TIMEOUT):
                raise BenchError(f"server did not report a port in {READY_TIMEOUT:.0f}s")
            line = self.proc.stdout.readline().decode(errors="replace").strip()
        if not line.startswith("PORT "):
            self.proc.wait(5)
            raise BenchError(f"server failed to start: {self._tail() or line or 'no output'}")
        return int(line.split()[1])

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
        self._stderr.close()
