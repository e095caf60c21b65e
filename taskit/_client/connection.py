"""A client's connection to one backend: a DEALER socket set up for taskit, plus
its socket monitor, and the client defaults that FrontEnd (threads) and
AsyncFrontEnd (asyncio) share. Usable by any other driver of
:class:`taskit._client.core.ClientCore`.

Interface::

    settings = DealerSettings(connect_timeout=2.0, max_message_size=64 << 20,
                              curve=curve_keys(server_public, None, None))
    sock, monitor = open_dealer(ctx, "tcp://host:port", settings)  # ValueError if unusable
    ... poll ``monitor``; for each message: ev = monitor_event(monitor.recv_multipart())
        ev & UP_EVENT -> connected; ev & DOWN_EVENTS -> disconnected / cannot connect
    ... a connection that ended before UP_EVENT (HANDSHAKE_FAILED, or DISCONNECTED):
        why = refusal(ev, curve); replace the socket, connect it after a backoff
    close_dealer(sock, monitor)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from taskit._curve import check_pair, curve_key

__all__ = [
    "DealerSettings",
    "DEFAULT_BUSY_RETRIES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "open_dealer",
    "refusal",
    "close_dealer",
    "curve_keys",
    "monitor_event",
    "UP_EVENT",
    "DISCONNECTED",
    "CONNECT_RETRIED",
    "HANDSHAKE_FAILED",
    "MONITOR_EVENTS",
]

# Client defaults, shared by FrontEnd and AsyncFrontEnd (seconds; bytes).
DEFAULT_BUSY_RETRIES = 50  # re-sends after Busy answers (with backoff) before BusyError
DEFAULT_CONNECT_TIMEOUT = 2.0  # a call waits this long for some backend to be reachable
# Liveness of backends, checked by ClientCore with taskit PINGs (wire protocol), not
# ZMTP heartbeats: libzmq 4.3.5 can abort a backend that gets ZMTP PINGs from a client
# whose connection then fails (doc/upstream/libzmq-io-error-abort.py, "ping" mode).
DEFAULT_HEARTBEAT_INTERVAL = 0.5  # a busy backend silent this long is pinged
DEFAULT_HEARTBEAT_TIMEOUT = 2.0  # a backend silent this long, its PING unanswered, is lost
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# "Up" is the end of the ZMTP handshake (where libzmq has it), not the TCP connect:
# only then does a sent message go to the backend rather than wait in a queue.
UP_EVENT = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
DISCONNECTED = zmq.EVENT_DISCONNECTED
CONNECT_RETRIED = zmq.EVENT_CONNECT_RETRIED
HANDSHAKE_FAILED = (
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0)
    | getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0)
    | getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)
)
MONITOR_EVENTS = UP_EVENT | DISCONNECTED | CONNECT_RETRIED | HANDSHAKE_FAILED


@dataclass(frozen=True)
class DealerSettings:
    """Socket options of every DEALER a client opens (seconds; None disables)."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE
    curve: tuple[bytes, bytes, bytes] | None = None  # (server public, our public, our secret)


def curve_keys(server: Any, public: Any, secret: Any) -> tuple[bytes, bytes, bytes] | None:
    """Check and normalise CurveZMQ client keys (each 40 Z85 characters or 32 raw
    bytes; returned as Z85): None without a server key; a client keypair is
    generated when none is given. Raises ``ValueError`` for a malformed key, a
    public key that is not the secret key's half or an incomplete set, and
    ``NotImplementedError`` when libzmq lacks CURVE."""
    if server is None:
        if public is not None or secret is not None:
            raise ValueError("curve_publickey/curve_secretkey need curve_serverkey too")
        return None
    if not zmq.has("curve"):
        raise NotImplementedError(
            "this libzmq was built without CURVE; install a pyzmq wheel with libsodium "
            "or drop curve_serverkey"
        )
    server = curve_key("curve_serverkey", server)
    if secret is None:
        if public is not None:
            raise ValueError("curve_publickey needs its curve_secretkey")
        public, secret = zmq.curve_keypair()
        return server, public, secret
    secret = curve_key("curve_secretkey", secret, secret=True)
    if public is None:
        return server, zmq.curve_public(secret), secret
    public = curve_key("curve_publickey", public)
    check_pair(public, secret, "curve_publickey", "curve_secretkey")
    return server, public, secret


def open_dealer(
    ctx: zmq.Context, endpoint: str, settings: DealerSettings, connect: bool = True
) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER for ``endpoint`` and its monitor socket (PAIR); connected unless
    ``connect`` is false (then the caller connects it later: ``sock.connect(endpoint)``).

    Raises ``ValueError`` when libzmq refuses the endpoint (nothing is left open).
    """
    sock = ctx.socket(zmq.DEALER)
    try:
        return sock, _setup(sock, endpoint, settings, connect)
    except BaseException:
        sock.close(0)  # an open socket would block Context.term() for ever
        raise


def refusal(event: int, curve: bool) -> str:
    """Why a connection ended before it came up, from the monitor ``event`` that
    ended it (a HANDSHAKE_FAILED_* event, or DISCONNECTED) and whether this
    client uses CURVE: the text a BackendNotAvailableError and the log show."""
    if curve:
        if event & getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0):
            return (
                "refused the CURVE handshake: its curve_clients list does not admit this "
                "client's public key"
            )
        return (
            "refused the CURVE handshake: check curve_serverkey (the backend's public "
            "key), and that the backend uses CURVE"
        )
    return (
        "closed the connection during the ZeroMQ handshake: not a taskit backend, or "
        "one that requires CURVE keys (curve_serverkey=)"
    )


def _setup(sock: zmq.Socket, endpoint: str, settings: DealerSettings, connect: bool) -> zmq.Socket:
    """Set ``sock``'s options, start its monitor and connect it; the monitor socket.
    On failure nothing but ``sock`` is left open (the caller closes it)."""
    sock.setsockopt(zmq.LINGER, 0)
    # Not IMMEDIATE: with it, libzmq drops a dead connection's pipe at once and
    # can abort (fq.cpp "!_more") when that happens between two parts of a reply
    # being read. Calls are routed only to connected backends anyway, and drivers
    # replace the socket on disconnect so nothing queued runs after a restart.
    sock.setsockopt(zmq.SNDHWM, 0)  # the caller bounds what is in flight
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # a restarted backend rejoins within ~1 s
    sock.setsockopt(zmq.CONNECT_TIMEOUT, max(1, int(settings.connect_timeout * 1000)))
    size = settings.max_message_size
    sock.setsockopt(zmq.MAXMSGSIZE, int(size) if size else -1)
    # No ZMTP heartbeats (HEARTBEAT_IVL/TIMEOUT/TTL stay 0): our PINGs could abort a
    # backend whose input from us is stopped when our connection fails (libzmq 4.3.5),
    # and a TTL would arm a timer on the backend's side. ClientCore pings instead.
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    if settings.curve is not None:
        server, public, secret = settings.curve
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    monitor = sock.get_monitor_socket(MONITOR_EVENTS)
    if not connect:
        return monitor
    try:
        sock.connect(endpoint)
    except BaseException as e:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(0)
        if isinstance(e, zmq.ZMQError):
            raise ValueError(f"cannot connect to backend {endpoint}: {e}") from e
        raise
    return monitor


def close_dealer(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stop the monitor and close both sockets at once (nothing lingers)."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(0)
    sock.close(0)


def monitor_event(frames: list[bytes]) -> int:
    """The event number of one monitor message."""
    return int(parse_monitor_message(frames)["event"])
