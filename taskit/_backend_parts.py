"""Parts of the BackEnd: option checking, socket options, accounting, and the
CurveZMQ client allow-list.

Nothing here owns a socket or runs the backend's threads; :mod:`taskit.backend`
does (the allow-list's ZAP thread is pyzmq's).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq
import zmq.utils.z85

from taskit.codecs import get_codec
from taskit.errors import InsecureCodecError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_PEER_QUEUE",
    "DEFAULT_PEER_BUDGET",
    "ENVELOPE",
    "check_tasks",
    "split_entry",
    "make_endpoint",
    "accepted_codecs",
    "parse_inline",
    "configure_router",
    "CurveAllowList",
    "Accounting",
    "PeerLedger",
    "TracebackLimiter",
]

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# Calls queued or running before new ones are answered Busy. A pending call of a
# few small arguments costs the backend about 2.4 KB (measured: +122 MB RSS for
# 50,000), so this bounds a flood of small calls to about 120 MB. One client
# pipelining 20,000 calls of a slow task (bench/rpc.py's size) is never refused
# (at 10,000, 53,000 Busy answers cost a 1 ms task 20% of its throughput).
DEFAULT_MAX_PENDING = 50_000
# ZMTP heartbeats are off by default: libzmq 4.3.5 aborts the whole process
# ("Assertion failed: !_io_error (src/stream_engine_base.cpp:310)") when the
# heartbeat timer fires on a connection whose input was stopped (its request
# queue full) and which then failed -- any client that floods, never reads and
# resets its connection could kill the backend. Dead peers are found by TCP
# keepalive instead (below); clients check the backend with taskit PINGs.
DEFAULT_HEARTBEAT = None

# TCP keepalive on every accepted connection, so a client that vanished without
# closing (host down, cable cut, NAT state lost) is dropped and its queued requests
# and unsent replies freed. Probes are sent by the kernel, nothing by this process:
# a silent connection is probed after KEEPALIVE_IDLE s, then every
# KEEPALIVE_INTVL s; KEEPALIVE_CNT unanswered probes end it (~60 s in all).
# Keepalive is not probed while data is unacknowledged, which is exactly a dead
# client with replies pending: TCP_MAXRT (Linux: TCP_USER_TIMEOUT) ends those
# after MAX_RETRANSMIT_MS instead of the kernel's ~15 min of retransmissions.
# Living clients answer probes in their kernel and read promptly (taskit's
# DEALER never stops reading), so they are never dropped by these.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTVL = 10
KEEPALIVE_CNT = 3
MAX_RETRANSMIT_MS = 60_000

# Messages ZeroMQ queues per peer, each way (the ROUTER's SNDHWM and RCVHWM).
# libzmq counts these in whole messages (a multipart message is one), not bytes,
# so they are kept far below the former 100,000 (with which one client that never
# reads pinned ~0.5-0.9 GB with 4 KiB replies), and the bytes a peer can make us
# hold are bounded by PeerLedger below: a reply that finds its peer's queue full
# waits in the ledger's backlog, within the peer's byte budget, instead of being
# lost. Why 4096, not libzmq's 1000: a writer learns what its reader consumed only
# every LWM messages (HWM - 1024 above 2048, else HWM / 2), so a queue may look
# full with just HWM - LWM messages in it; above 2048 that is 1024, more than a
# FrontEnd's map() keeps in flight (1000). With 1000, map() ran ~8% slower.
DEFAULT_PEER_QUEUE = 4096

# Bytes one peer may make the backend hold itself: its accepted, unanswered calls
# (request bytes plus CALL_COST each) and its replies waiting in the backlog (reply
# bytes plus REPLY_COST each). 64 MiB keeps ~20,000 small calls of one client
# queued before it is told Busy (a FrontEnd may submit 20,000 at once).
DEFAULT_PEER_BUDGET = 64 * 1024 * 1024

# What one accepted call costs beyond its body, in the ledger: the pool's work
# item, the decoded call's list/dict, the closure and the future (tracemalloc: 2.2
# KiB per queued call on CPython 3.12, thread pool), rounded up.
CALL_COST = 3072
# What one reply waiting in the backlog costs beyond its frames' bytes: three
# bytes objects, a list, a tuple and a deque slot (~250 bytes), rounded up.
REPLY_COST = 512

# Bytes a valid request has beyond its body: magic 5 + header 10 + HMAC 32, rounded up.
ENVELOPE = 64

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


def check_tasks(tasks: Any) -> None:
    """Raise ``TypeError`` unless ``tasks`` maps str names to callables or (callable, flag)."""
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must be a mapping of name -> callable, not {type(tasks).__name__}")
    for name, entry in tasks.items():
        if not isinstance(name, str):
            raise TypeError(f"task names must be strings, got {name!r}")
        fn = entry[0] if isinstance(entry, tuple) and len(entry) == 2 else entry
        if not callable(fn):
            raise TypeError(
                f"task {name!r} must be a callable or a (callable, pass_backend) pair, "
                f"got {entry!r}"
            )


def split_entry(entry: Any) -> tuple[Callable[..., Any], bool]:
    """``(callable, pass_backend)`` of a tasks-dict value."""
    if type(entry) is tuple:
        return entry[0], bool(entry[1])
    return entry, False


def make_endpoint(endpoint: str | None, host: str, port: Any) -> str:
    """The ZeroMQ endpoint to bind (``port=0`` -> ``*``). Raises ``ValueError``."""
    if endpoint is not None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(
                f"endpoint must be 'tcp://host:port' or 'ipc:///path', not {endpoint!r}"
            )
        return endpoint
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535 (0 = any free port), not {port!r}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"tcp://{host}:{port or '*'}"


def accepted_codecs(
    codecs: Iterable[Any] | None, default: Any, keyed: bool, insecure_pickle: bool
) -> dict[int, Any]:
    """wire id -> codec a backend accepts. Raises :class:`InsecureCodecError` for
    pickle without a key or ``insecure_pickle``, ``ValueError`` for an empty set."""
    if codecs is None:
        chosen = [get_codec("json"), get_codec("msgpack"), default]
        if keyed or insecure_pickle:
            chosen.append(get_codec("pickle"))
    else:
        if isinstance(codecs, (str, bytes)):
            codecs = [codecs]
        chosen = [get_codec(c) for c in codecs]
        if not chosen:
            raise ValueError("codecs must name at least one codec")
    accepted = {c.wire_id: c for c in chosen}
    if get_codec("pickle").wire_id in accepted and not (keyed or insecure_pickle):
        raise InsecureCodecError(
            "pickle runs code chosen by the sender while decoding: pass key=... (the same "
            "on every FrontEnd) so only key holders are heard, or insecure_pickle=True on "
            "a network you trust"
        )
    return accepted


def parse_inline(inline: Any) -> tuple[bool, frozenset[str]]:
    """``(auto, names)`` from the ``inline`` option. Raises ``ValueError``."""
    if inline == "auto":
        return True, frozenset()
    if inline is False or inline is None:
        return False, frozenset()
    if isinstance(inline, Iterable) and not isinstance(inline, (str, bytes)):
        return False, frozenset(inline)
    raise ValueError(f"inline must be 'auto', False or a set of task names, not {inline!r}")


def configure_router(
    sock: zmq.Socket,
    endpoint: str,
    linger: float,
    max_message_size: int | None,
    heartbeat: tuple[float | None, float | None],
    curve: tuple[bytes | None, bytes | None],
    peer_queue: int = DEFAULT_PEER_QUEUE,
) -> None:
    """Set a backend ROUTER's options (before bind). ``heartbeat``: (interval, timeout)
    of ZMTP heartbeats, off when interval is None (the default: see DEFAULT_HEARTBEAT)."""
    sock.setsockopt(zmq.LINGER, int(linger * 1000))
    # Report unroutable replies (EHOSTUNREACH) and full peer queues (EAGAIN) instead
    # of dropping them silently: the backend's PeerLedger decides what then.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, peer_queue)
    sock.setsockopt(zmq.RCVHWM, peer_queue)
    sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_size) if max_message_size else -1)
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
    sock.setsockopt(zmq.TCP_MAXRT, MAX_RETRANSMIT_MS)
    interval, timeout = heartbeat
    if interval and zmq.zmq_version_info() >= (4, 2):
        ivl = max(1, int(interval * 1000))
        tmo = max(ivl, int(timeout * 1000)) if timeout else 3 * ivl
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, tmo)
        # TTL: how long peers may keep us without hearing from us (max 6553.5 s).
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(tmo, 6_553_500))
    secret, public = curve
    if secret is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public or zmq.curve_public(secret))


class CurveAllowList:
    """The CurveZMQ clients a backend admits: a ZAP handler (pyzmq's
    ``ThreadAuthenticator``, on the backend's own context) asks :meth:`callback`
    about each client's public key during the handshake; others never connect.

    ``keys``: the clients' public keys, Z85 (40 characters, bytes or str).
    Raises ``ValueError`` for a key that is not one.
    """

    def __init__(self, keys: Iterable[bytes | str]) -> None:
        self.keys = frozenset(self._z85(k) for k in keys)
        self.denied = 0  # handshakes refused (read by stats(); one writer thread)
        self._auth: Any = None

    @staticmethod
    def _z85(key: bytes | str) -> bytes:
        k = key.encode("ascii") if isinstance(key, str) else bytes(key)
        try:
            ok = len(k) == 40 and len(zmq.utils.z85.decode(k)) == 32
        except (ValueError, KeyError, UnicodeError):
            ok = False
        if not ok:
            raise ValueError(
                f"curve_clients takes Z85 public keys (40 characters, as "
                f"zmq.curve_keypair() returns), not {key!r}"
            )
        return k

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.denied += 1
        return False

    def start(self, ctx: zmq.Context) -> None:
        """Serve ZAP on ``ctx`` (before the ROUTER binds)."""
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("taskit.backend.zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class Accounting:
    """The counters of one BackEnd, and which tasks are quick enough to run inline.

    Not thread-safe by itself: the BackEnd calls it under its lock.
    """

    def __init__(self) -> None:
        self.in_flight = 0  # calls accepted, not yet answered
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
        }
        self.speed: dict[str, int] = {}  # name -> consecutive fast runs (< 0: barred)

    def finished(self, name: str, ok: bool, elapsed: float, run_time: float | None) -> None:
        """Account for a call answered after running (``run_time``: the task alone)."""
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
        self.backlog: dict[bytes, deque[tuple[list[bytes], int]]] = {}
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

    def defer(self, ident: bytes, frames: list[bytes]) -> bool:
        """Keep a reply ZeroMQ refused for ``ident``; False (not kept) past the budget."""
        size = sum(map(len, frames)) + REPLY_COST
        held = self.held.get(ident, 0)
        if held + size > self.budget:
            return False
        self.held[ident] = held + size
        queue = self.backlog.get(ident)
        if queue is None:
            queue = self.backlog[ident] = deque()
        queue.append((frames, size))
        self.deferred += 1
        return True

    def sent(self, ident: bytes) -> None:
        """The oldest reply in ``ident``'s backlog was handed to ZeroMQ."""
        queue = self.backlog[ident]
        _frames, size = queue.popleft()
        self._release(ident, size)
        if not queue:
            del self.backlog[ident]

    def forget(self, ident: bytes) -> int:
        """Drop ``ident``'s backlog (it left); return how many replies were dropped."""
        queue = self.backlog.pop(ident, None)
        if not queue:
            return 0
        for _frames, size in queue:
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
