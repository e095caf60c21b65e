"""What a BackEnd counts: its calls (the counters behind ``<stats>`` and which
tasks run inline), the bytes each peer makes it hold, and which tracebacks get logged.

Pure bookkeeping, no socket, no thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = [
    "Accounting",
    "PeerLedger",
    "TracebackLimiter",
    "CALL_COST",
    "REPLY_COST",
    "TRACEBACK_INTERVAL",
    "QUALIFY",
]

# What one accepted call costs beyond its body, in the ledger: the pool's work
# item, the decoded call's list/dict, the closure and the future (tracemalloc: 2.2
# KiB per queued call on CPython 3.12, thread pool), rounded up.
CALL_COST = 3072
# What one reply waiting in the backlog costs beyond its bodies' bytes: its item
# tuples, a list, a tuple and a deque slot (~250 bytes), rounded up.
REPLY_COST = 512

# A failing task's traceback is logged in full at most once per this many seconds
# per (task, exception type); the others are counted (one client calling with the
# wrong arity must not write megabytes of log per second).
TRACEBACK_INTERVAL = 10.0

# Inline running ("auto"): a task whose last QUALIFY runs each took under FAST
# seconds runs on the I/O thread itself, which saves the two thread wake-ups of
# a pool hand-off (most of a loopback round trip). A run over FAST sends it
# back to the pool until it qualifies again; a run over SLOW, or one that the
# standby thread had to take over from, bars it for PENALTY more runs.
QUALIFY = 8
FAST = 0.0002
SLOW = 0.002
PENALTY = 1000


class Accounting:
    """The counters of one BackEnd, and which tasks are quick enough to run inline.

    Not thread-safe by itself: the BackEnd calls it under its lock.
    """

    def __init__(self) -> None:
        # calls accepted, not yet answered (but an inline call, which the I/O thread
        # answers before it reads the next request: unless the standby took over)
        self.in_flight = 0
        self.running = 0  # of those, calls a pool worker is running now
        self.cancelled = 0  # calls withdrawn by a CANCEL before they started
        self.sessions_evicted = 0  # keyed: sessions forgotten to bound the table
        self.subtasks = 0
        self.done = 0
        self.failed = 0
        self.admin = 0
        self.takeovers = 0
        self.per_task: dict[str, list[float]] = {}  # name -> [calls, failed, total seconds]
        self.refused: dict[str, int] = {}  # backend-raised error type -> count
        self.dropped = {
            "bad_signature": 0,
            "malformed": 0,
            "oversized": 0,
            "reply_unroutable": 0,
            "reply_hwm": 0,
            "reply_over_budget": 0,
            "client_gone": 0,  # calls not started: their client's connection had closed
            "replayed": 0,  # keyed: a message seen before (or a second HELLO), not run
            "no_session": 0,  # keyed: a message on a connection that said no HELLO
        }
        self.speed: dict[str, int] = {}  # name -> consecutive fast runs (< 0: barred)

    def finished(
        self, name: str, ok: bool, elapsed: float, run_time: float | None, counted: bool = True
    ) -> None:
        """Account for a call answered after running (``run_time``: the task alone;
        ``counted``: it was counted in flight, as every call but an inline one is)."""
        if counted:
            self.in_flight -= 1
        counts = self.per_task.get(name)
        if counts is None:
            counts = self.per_task[name] = [0, 0, 0.0]
        counts[0] += 1
        counts[2] += elapsed
        if ok:
            self.done += 1
        else:
            self.failed += 1
            counts[1] += 1
        if run_time is not None:
            fast = self.speed.get(name, 0)
            if run_time < FAST:
                if fast < QUALIFY:
                    self.speed[name] = fast + 1
            elif run_time < SLOW:
                self.speed[name] = min(fast, 0)
            else:
                self.speed[name] = -PENALTY

    def quick(self, name: str) -> bool:
        """True when ``name`` has earned running on the I/O thread."""
        return self.speed.get(name, 0) >= QUALIFY

    def bar(self, name: str) -> None:
        """Keep ``name`` off the I/O thread for a long while (it blocked it)."""
        self.speed[name] = -PENALTY

    def refuse(self, type_name: str) -> None:
        self.refused[type_name] = self.refused.get(type_name, 0) + 1

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def snapshot(self) -> dict[str, Any]:
        """The plain-data part of ``<stats>``."""
        return {
            "in_flight": self.in_flight,
            "subtasks": self.subtasks,
            "done": self.done,
            "failed": self.failed,
            "admin": self.admin,
            "cancelled": self.cancelled,
            "refused": dict(self.refused),
            "dropped": dict(self.dropped),
            "tasks": {
                name: {
                    "calls": int(c[0]),
                    "failed": int(c[1]),
                    "mean_latency": (c[2] / c[0]) if c[0] else 0.0,
                }
                for name, c in self.per_task.items()
            },
            "takeovers": self.takeovers,
        }


class PeerLedger:
    """The bytes each peer makes the backend hold, and the replies waiting for a peer
    whose ZeroMQ queue is full.

    A peer's ``held`` bytes are its accepted, unanswered calls (request bytes plus
    :data:`CALL_COST` each, charged by :meth:`charge`, settled by :meth:`settle`)
    plus its backlog (reply bytes plus :data:`REPLY_COST` each): replies ZeroMQ
    refused (EAGAIN: the peer's queue of ``peer_queue`` messages is full because
    the peer is not reading), kept in order to be sent when it has room.
    :meth:`over` says a new call from the peer must be refused (``Busy``): it
    already holds something and this call would pass ``budget``. :meth:`defer`
    refuses a reply past ``budget`` (the caller drops and counts it). So a peer
    holds at most ``budget`` plus one call's bytes. A peer
    with nothing held has no entry: a peer that left is forgotten once its backlog
    finds it gone (:meth:`forget`).

    Pure bookkeeping, no socket; not thread-safe: the BackEnd calls it under its lock.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held: dict[bytes, int] = {}
        self.backlog: dict[bytes, deque[tuple[list[tuple], int]]] = {}
        self.deferred = 0  # replies that ever waited in a backlog

    def over(self, ident: bytes, size: int) -> bool:
        """True when a call of ``size`` bytes from ``ident`` must be refused."""
        held = self.held.get(ident, 0)
        return held > 0 and held + size + CALL_COST > self.budget

    def charge(self, ident: bytes, size: int) -> None:
        """Count an accepted call of ``size`` request bytes (settle it with the same size)."""
        held = self.held
        held[ident] = held.get(ident, 0) + size + CALL_COST

    def settle(self, ident: bytes, size: int) -> None:
        """The call charged with ``size`` is answered (or its answer dropped)."""
        self._release(ident, size + CALL_COST)

    def _release(self, ident: bytes, nbytes: int) -> None:
        held = self.held
        left = held.get(ident, 0) - nbytes
        if left > 0:
            held[ident] = left
        else:
            held.pop(ident, None)

    def defer(self, ident: bytes, items: list[tuple]) -> bool:
        """Keep a reply ZeroMQ refused for ``ident`` (its items ``(kind, codec_id,
        call_id, body)``, packed and sealed when sent); False (not kept) past the budget."""
        size = sum(len(item[3]) for item in items) + 24 * len(items) + REPLY_COST
        held = self.held.get(ident, 0)
        if held + size > self.budget:
            return False
        self.held[ident] = held + size
        queue = self.backlog.get(ident)
        if queue is None:
            queue = self.backlog[ident] = deque()
        queue.append((items, size))
        self.deferred += 1
        return True

    def sent(self, ident: bytes) -> None:
        """The oldest reply in ``ident``'s backlog was handed to ZeroMQ."""
        queue = self.backlog[ident]
        _items, size = queue.popleft()
        self._release(ident, size)
        if not queue:
            del self.backlog[ident]

    def forget(self, ident: bytes) -> int:
        """Drop ``ident``'s backlog (it left); return how many replies were dropped."""
        queue = self.backlog.pop(ident, None)
        if not queue:
            return 0
        for _items, size in queue:
            self._release(ident, size)
        return len(queue)

    def held_by(self, ident: bytes) -> int:
        return self.held.get(ident, 0)


class TracebackLimiter:
    """Which failing calls get their traceback logged: the first of each key (task,
    exception type) per ``interval`` seconds (default :data:`TRACEBACK_INTERVAL`).
    Thread-safe (pool workers report failures)."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = TRACEBACK_INTERVAL if interval is None else float(interval)
        self._lock = threading.Lock()
        self._quiet_until: dict[Any, float] = {}
        self._skipped: dict[Any, int] = {}

    def admit(self, key: Any) -> int | None:
        """None when this traceback is to be skipped (it is counted); else how many
        of ``key`` were skipped since the last one admitted."""
        now = time.monotonic()
        with self._lock:
            if now < self._quiet_until.get(key, 0.0):
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return None
            self._quiet_until[key] = now + self.interval
            return self._skipped.pop(key, 0)
