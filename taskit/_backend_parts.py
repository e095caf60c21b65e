"""Parts of the BackEnd: option checking, socket options, accounting, and the
CurveZMQ client allow-list.

Nothing here owns a socket or runs the backend's threads; :mod:`taskit.backend`
does (the allow-list's ZAP thread is pyzmq's).
"""

from __future__ import annotations

import logging
import threading
import time
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
    "check_tasks",
    "split_entry",
    "make_endpoint",
    "accepted_codecs",
    "parse_inline",
    "configure_router",
    "CurveAllowList",
    "Accounting",
    "TracebackLimiter",
]

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# Calls queued or running before new ones are answered Busy. A pending call of a
# few small arguments costs the backend about 2.4 KB (measured: +122 MB RSS for
# 50,000), so this bounds a flood of small calls to about 120 MB. One client
# pipelining 20,000 calls of a slow task (bench/rpc.py's size) is never refused
# (at 10,000, 53,000 Busy answers cost a 1 ms task 20% of its throughput).
DEFAULT_MAX_PENDING = 50_000
DEFAULT_HEARTBEAT = 2.0  # seconds between ZMTP heartbeats; peers silent 3x that are dropped

# Replies queued towards one peer before further replies to it are dropped (and
# counted): a client that sends but never reads must not grow our memory forever.
REPLY_HWM = 100_000

# Requests queued from one peer before ZeroMQ stops reading its connection. The
# default (1000) stalls a client that submits a burst of calls at once: it waits
# on TCP backpressure between chunks (20,000 submits: ~+30% calls/s at this bound).
# Like REPLY_HWM it still bounds what one peer can queue in our memory.
REQUEST_HWM = 100_000

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
) -> None:
    """Set a backend ROUTER's options (before bind). ``heartbeat``: (interval, timeout)."""
    sock.setsockopt(zmq.LINGER, int(linger * 1000))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # report unroutable replies instead of hiding them
    sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
    sock.setsockopt(zmq.RCVHWM, REQUEST_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_size) if max_message_size else -1)
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
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
            "reply_unroutable": 0,
            "reply_hwm": 0,
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

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

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
