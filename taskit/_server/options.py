"""A BackEnd's options: their defaults and checks, and the ROUTER's socket options.

Plain functions and constants; nothing here owns a socket or a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq

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

# Bytes a one-item message has beyond its body: preamble 4 + item header 24 + the
# trailer of a signed one 40. max_message_size bounds a whole message (one frame; a
# peer's ZeroMQ drops the connection on a longer one), so a reply body has that less.
ENVELOPE = 68


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
