"""Keep a set of child processes running: the backend side of ``taskit backend --ports``.

:class:`Supervisor` starts one child per command, restarts a child that
*dies* (non-zero exit or killed by a signal) with a growing back-off, leaves
alone a child that *exits cleanly* (status 0: it was stopped on purpose, e.g.
by ``taskit ctl stop``), and on SIGTERM/SIGINT stops every child gracefully
(SIGTERM, then SIGKILL after a grace period). It returns when every child has
ended. A child that cannot start at all (it dies young a few times in a row
and never stayed up, e.g. its port is taken) is an error: the supervisor
stops every child and returns 1. Only the standard library; nothing here
knows about taskit's protocol.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Supervisor"]

log = logging.getLogger("taskit.supervisor")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this child when the supervisor dies, even by SIGKILL,
    so a killed supervisor never leaves orphan backends holding their ports."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class _Child:
    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 0.0
        self.restart_at: float | None = None
        self.done = False
        self.ever_up = False  # stayed up min_uptime at least once
        self.start_failures = 0  # young deaths in a row before it was ever up


class Supervisor:
    """Run ``commands`` (name -> argv) as child processes and keep them alive.

    ``grace``: seconds a child gets to stop after SIGTERM before SIGKILL.
    ``min_uptime``: a child that dies sooner than this after starting is
    restarted after a back-off that doubles each time (from ``first_backoff``
    up to ``max_backoff``), so a backend that cannot bind its port does not
    spin. A child that has never stayed up ``min_uptime`` and dies young
    ``start_tries`` times in a row cannot start (its port is taken, its
    configuration is wrong): :meth:`run` then logs an error, stops every
    child and returns 1. :meth:`run` blocks; :meth:`stop` may be called from
    any thread or a signal handler.
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        grace: float = 30.0,
        min_uptime: float = 5.0,
        first_backoff: float = 0.5,
        max_backoff: float = 30.0,
        start_tries: int = 5,
    ) -> None:
        if not commands:
            raise ValueError("a Supervisor needs at least one command")
        self._children = [_Child(name, argv) for name, argv in commands.items()]
        self._env = dict(env) if env is not None else None
        self._grace = grace
        self._min_uptime = min_uptime
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._start_tries = start_tries
        self._failed = False  # a child could not start: run() stops every child, returns 1
        self._stop = threading.Event()
        self._wake = threading.Event()

    @property
    def pids(self) -> dict[str, int | None]:
        """name -> pid of the running child (None while it is down)."""
        return {
            c.name: c.proc.pid if c.proc is not None and c.proc.poll() is None else None
            for c in self._children
        }

    def stop(self) -> None:
        """Ask :meth:`run` to stop every child and return (thread- and signal-safe)."""
        self._stop.set()
        self._wake.set()

    def _spawn(self, child: _Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=self._env, preexec_fn=_die_with_parent)
        child.started = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _reap(self, child: _Child, status: int) -> None:
        now = time.monotonic()
        child.proc = None
        if status == 0:
            log.info("%s stopped cleanly; not restarting it", child.name)
            child.done = True
            return
        how = f"signal {-status}" if status < 0 else f"status {status}"
        if now - child.started >= self._min_uptime:
            child.ever_up = True
            child.backoff = 0.0  # it ran a while: a fresh failure, restart at once
        else:
            if not child.ever_up:
                child.start_failures += 1
                if child.start_failures >= self._start_tries:
                    log.error(
                        "%s cannot start: it died %d times in a row (last: %s) without "
                        "staying up; see its error above. Stopping every backend",
                        child.name,
                        child.start_failures,
                        how,
                    )
                    child.done = True
                    self._failed = True
                    return
            child.backoff = min(self._max_backoff, max(self._first_backoff, child.backoff * 2))
        child.restart_at = now + child.backoff
        log.warning("%s died (%s); restarting in %.1f s", child.name, how, child.backoff)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGCHLD:
            self._wake.set()
        else:
            log.info("signal %d: stopping all backends", signum)
            self.stop()

    def run(self) -> int:
        """Start the children and supervise them until :meth:`stop` or until all
        exited cleanly, and return 0; return 1 (every child stopped) as soon as
        one child cannot start (see the class docstring). Installs
        SIGTERM/SIGINT/SIGCHLD handlers when called from the main thread
        (restoring the old ones on return)."""
        old: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                old[signum] = signal.signal(signum, self._on_signal)
        try:
            for child in self._children:
                self._spawn(child)
            while not self._stop.is_set():
                self._wake.clear()
                now = time.monotonic()
                next_due = now + 1.0  # fallback poll, in case a SIGCHLD is missed
                for child in self._children:
                    if child.proc is not None:
                        status = child.proc.poll()
                        if status is not None:
                            self._reap(child, status)
                    if child.restart_at is not None:
                        if child.restart_at <= now:
                            self._spawn(child)
                        else:
                            next_due = min(next_due, child.restart_at)
                if self._failed:
                    self._terminate_all()
                    return 1
                if all(c.done for c in self._children):
                    log.info("every backend stopped cleanly; supervisor exits")
                    return 0
                self._wake.wait(max(0.0, next_due - time.monotonic()))
            self._terminate_all()
            return 0
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)

    def _terminate_all(self) -> None:
        running = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            try:
                child.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self._grace
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, self._grace)
                child.proc.kill()
                child.proc.wait()
        for child in self._children:
            if child.proc is not None:
                child.proc.wait()
                child.proc = None
