"""A client's connections to its backends, handled once for both drivers: a
DEALER socket set up for taskit and its socket monitor per backend, what each
monitor event means, and :class:`Connections`, which acts on them (replacing
sockets, backing off from refusals, liveness PINGs) and moves frames without
waiting. Also the client defaults that FrontEnd (threads) and AsyncFrontEnd
(asyncio) share. Usable by any other driver of :class:`taskit._client.core.ClientCore`.

Interface::

    settings = DealerSettings(connect_timeout=2.0, max_message_size=64 << 20,
                              curve=curve_keys(server_public, None, None))
    sock, monitor = open_dealer(ctx, "tcp://host:port", settings)  # ValueError if unusable
    ... poll ``monitor``; for each message: ev = monitor_event(monitor.recv_multipart())
        ev & UP_EVENT -> connected; ev & DOWN_EVENTS -> disconnected / cannot connect
    ... a connection that ended before UP_EVENT (HANDSHAKE_FAILED, or DISCONNECTED):
        why = refusal(ev, curve); replace the socket, connect it after a backoff
    close_dealer(sock, monitor)

A driver subclasses :class:`Connections` with its way of waiting (see its
docstring): :mod:`taskit._client.threaded`, :mod:`taskit._client.aio_driver`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from taskit._client.core import DOWN, ClientCore
from taskit._curve import check_pair, curve_key
from taskit._wire import NOBLOCK, ZERO_COPY, base_send
from taskit.log import ERROR, INFO

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
    "Link",
    "Connections",
]

_DRAIN_ALL = 1 << 62  # receive(): no limit (read until the socket is empty)
CLOSE_LINGER_MS = 200  # closing: how long a socket's last CANCELs may take to leave

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


def close_dealer(sock: zmq.Socket, monitor: zmq.Socket, linger_ms: int = 0) -> None:
    """Stop the monitor and close both sockets at once; messages still queued on
    ``sock`` get up to ``linger_ms`` to leave (when the context terminates), else
    nothing lingers."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(0)
    sock.close(linger_ms)


def monitor_event(frames: list[bytes]) -> int:
    """The event number of one monitor message."""
    return int(parse_monitor_message(frames)["event"])


class Link:
    """One backend's DEALER socket and its monitor socket, as a driver holds them.

    ``sock`` is what the driver waits on (a plain socket, or a ``zmq.asyncio`` one);
    ``raw`` is a plain view of the same socket for the non-blocking sends and reads
    of :class:`Connections`, and ``send`` its unwrapped send (see taskit._wire).
    """

    __slots__ = (
        "endpoint",
        "sock",
        "raw",
        "send",
        "monitor",
        "sock_fd",
        "monitor_fd",
        "up",
        "tasks",
        "redial",
    )

    def __init__(self, endpoint: str, sock: Any, monitor: Any, raw: zmq.Socket | None = None):
        self.endpoint = endpoint
        self.sock = sock
        self.raw = sock if raw is None else raw
        self.send = base_send.__get__(self.raw)
        self.monitor = monitor
        self.sock_fd = -1  # the threaded driver's: the descriptors (ZMQ_FD) it waits on
        self.monitor_fd = -1
        self.up = False  # this socket's connection came up (handshake done)
        self.tasks: list[Any] = []  # the asyncio driver's reader tasks
        self.redial: Any = None  # the asyncio driver's delayed connect


class Connections:
    """Every socket a client uses, handled once for both drivers: opening and
    replacing DEALERs, acting on their monitor events (up, disconnected, refused
    with a backoff before the next connect), liveness (PINGs, dropping silent
    backends), sending what the :class:`ClientCore` routed and reading replies
    without waiting.

    A driver subclasses it and adds only its way of waiting: ``_watch(link)`` /
    ``_unwatch(link)`` (start and stop waiting on a link's sockets),
    ``_redial_later(link, delay)`` (call :meth:`dial` after ``delay`` seconds),
    ``resolve(done)`` (wake the waiters of finished calls) and the ``_ctx`` it
    opens sockets in. Only one thread at a time may call its methods.
    """

    _ctx: Any
    _stdlog = logging.getLogger("taskit.frontend")  # each driver logs under its face's name

    def __init__(self, core: ClientCore, settings: DealerSettings, note: Callable[..., None]):
        self._core = core
        self._settings = settings
        self._note = note  # note(importance, msg, level=None): the face's logging
        self.links: dict[str, Link] = {}

    # -- the driver's part -----------------------------------------------------------

    def resolve(self, done: list) -> None:
        raise NotImplementedError

    def _watch(self, link: Link) -> None:
        raise NotImplementedError

    def _unwatch(self, link: Link) -> None:
        raise NotImplementedError

    def _redial_later(self, link: Link, delay: float) -> None:
        raise NotImplementedError

    def _link(self, endpoint: str, sock: Any, monitor: Any) -> Link:
        return Link(endpoint, sock, monitor)

    # -- sockets ---------------------------------------------------------------------

    def open(self, endpoint: str, connect: bool = True) -> Link:
        """A DEALER and its monitor for ``endpoint`` (ValueError if unusable, nothing
        left open), installed and watched; connected unless ``connect`` is false."""
        link = self._link(endpoint, *open_dealer(self._ctx, endpoint, self._settings, connect))
        self.links[endpoint] = link
        self._watch(link)
        return link

    def discard(self, link: Link, linger_ms: int = 0) -> None:
        """Stop watching ``link`` and close its sockets (``linger_ms``: see close_dealer)."""
        if self.links.get(link.endpoint) is link:
            del self.links[link.endpoint]
        self._unwatch(link)
        close_dealer(link.sock, link.monitor, linger_ms)

    def renew(self, link: Link) -> None:
        """Replace a disconnected backend's socket: whatever it still queued for the
        old connection is dropped, never delivered to a restarted backend."""
        self.discard(link)
        self.open(link.endpoint)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            self.discard(link)

    def withdraw_all(self) -> None:
        """Closing: send a CANCEL for every call still on the wire (no answer awaited)
        and close every socket, giving those that sent one ``CLOSE_LINGER_MS`` to
        deliver it (the context's termination waits that long at most)."""
        endpoints: set[str] = set()
        if self._core.cancel_on_wire():
            endpoints = {ep for ep, _ in self._core.control}
            try:
                self.flush()
            except Exception:  # closing regardless
                self._stdlog.debug("CANCEL on close failed", exc_info=True)
        for link in list(self.links.values()):
            self.discard(link, CLOSE_LINGER_MS if link.endpoint in endpoints else 0)

    def dial(self, link: Link) -> None:
        """Connect ``link``'s socket once its backoff is over (if it is still in use)."""
        link.redial = None
        if self.links.get(link.endpoint) is not link:
            return
        try:
            link.raw.connect(link.endpoint)
        except zmq.ZMQError as e:  # it connected before: not expected
            self._stdlog.warning("cannot connect to %s again: %s", link.endpoint, e)

    # -- monitor events ----------------------------------------------------------------

    def on_event(self, link: Link, event: int) -> bool:
        """Act on one monitor ``event`` of ``link``; True when ``link`` was replaced
        (its monitor is closed: stop reading it)."""
        core, endpoint = self._core, link.endpoint
        if event & UP_EVENT:
            link.up = True
            self._note(INFO, f"backend {endpoint} is up")
            core.backend_up(endpoint)  # says HELLO: calls go once its WELCOME is in
            self.flush()
        elif not link.up and event & (DISCONNECTED | HANDSHAKE_FAILED):
            self._refused(link, event)
            return True
        elif event & DISCONNECTED:
            # Replies that arrived before the disconnect are still queued on the
            # socket; read them first, so only truly unanswered calls are lost.
            self.drain(link)
            self._note(ERROR, f"backend {endpoint} disconnected", logging.INFO)
            self.resolve(core.backend_down(endpoint, "disconnected"))
            if self.links.get(endpoint) is link:  # not already replaced meanwhile
                self.renew(link)
            return True
        elif event & CONNECT_RETRIED and core.backends[endpoint].state != DOWN:
            self.resolve(core.backend_down(endpoint, "cannot connect"))
        return False

    def _refused(self, link: Link, event: int) -> None:
        """``link``'s connection ended before it came up (the peer refused the handshake
        or closed it): replace the socket and connect the new one after a growing
        backoff. Renewing at once would bypass libzmq's reconnect interval, and a
        peer that refuses every connection would see thousands a second."""
        endpoint = link.endpoint
        why = refusal(event, self._settings.curve is not None)
        done, delay, report = self._core.connect_refused(endpoint, why)
        if report is not None:
            self._note(ERROR, report, logging.WARNING)
        self.resolve(done)
        if self.links.get(endpoint) is link:  # not already replaced meanwhile
            self.discard(link)
            self._redial_later(self.open(endpoint, connect=False), delay)

    # -- liveness ----------------------------------------------------------------------

    def tick(self) -> None:
        """Fire the core's due timers: resolve what they settled, then act on the
        liveness check's PINGs and suspects, if it ran."""
        core = self._core
        self.resolve(core.tick())
        if core.pings or core.suspects:
            self.liveness()

    def liveness(self) -> None:
        """Send the PINGs the core asked for; drop the connections it finds silent
        (after reading what they still hold: the core decides on everything heard)."""
        core = self._core
        for endpoint in core.take_pings():
            if endpoint in self.links:
                core.ping(endpoint)
        if core.control:
            self.flush()
        for endpoint in core.take_suspects():
            link = self.links.get(endpoint)
            if link is None:
                continue
            self.drain(link)
            done = core.check_suspect(endpoint)
            if done is not None:
                why = f"backend {endpoint} stopped answering (PING unanswered)"
                self._note(ERROR, why, logging.INFO)  # as a disconnect; the calls raise
                self.resolve(done)
                self.renew(link)

    # -- frames ------------------------------------------------------------------------

    def receive(self, link: Link, until: Any, limit: int = 256) -> None:
        """Read what ``link`` holds, without waiting, at most ``limit`` messages; stop
        early once ``until`` (a waiter with ``ok``) is resolved and no call is left."""
        recv, core, endpoint = link.raw.recv, self._core, link.endpoint
        on_message, resolve = core.on_message, self.resolve
        for _ in range(limit):  # bounded, so timers and sends get a turn
            try:
                # A Frame object tells its size and whether more parts follow without
                # a getsockopt call; a large message is decoded straight from libzmq's
                # buffer (a memoryview), without a copy.
                f = recv(NOBLOCK, copy=False)
                if f.more:  # never in protocol v2: maybe a v1 peer; read it whole
                    frames = [f.bytes]
                    while f.more:
                        f = recv(NOBLOCK, copy=False)
                        frames.append(f.bytes)
                    done = core.on_frames(endpoint, frames)
                else:
                    done = on_message(endpoint, f.bytes if len(f) < ZERO_COPY else f.buffer)
            except zmq.Again:
                break
            except zmq.ZMQError as e:
                self._stdlog.warning("receive from %s failed: %s", endpoint, e)
                break
            if done:
                resolve(done)
                # Our reply is in: stop if nothing else is awaited (a lone sync call
                # saves a failed read); else read on while replies are queued, so a
                # pipelined caller gets them in batches, not one poll per reply.
                if until is not None and until.ok is not None and not core.calls:
                    break

    def between_turns(self) -> None:
        """Replace the connections the core asked for and close those it drained:
        the driver calls this where no link is being read (never inside
        :meth:`receive`, whose caller still holds the link it reads)."""
        if self._core.resets:
            self.reset()
        if self._core.retired:
            self.retire()

    def connect(self, endpoint: str) -> None:
        raise NotImplementedError  # each driver: start using one more backend

    def apply_members(self, joined: list[str], left: list[str]) -> None:
        """A re-resolution (or ``remove_backends``) changed the fleet: connect the
        backends that ``joined``; drain those that ``left`` (no new calls, those in
        flight finish) and close them once drained."""
        for endpoint in joined:
            try:
                self.connect(endpoint)
            except ValueError as e:  # a resolver that returned something unusable
                self._note(ERROR, f"cannot use backend {endpoint}: {e}", logging.WARNING)
                continue
            self._note(INFO, f"backend {endpoint} joined")
        for endpoint in left:
            if endpoint in self._core.backends:
                self._note(INFO, f"backend {endpoint} left: draining")
                self._core.drain_backend(endpoint)
        self.retire()
        if self._core.outbox or self._core.control:
            self.flush()

    def retire(self) -> None:
        """Close the connections of backends the core drained and forgot."""
        for endpoint in self._core.take_retired():
            link = self.links.get(endpoint)
            if link is not None:
                self._note(INFO, f"backend {endpoint} drained: closed")
                self.discard(link)

    def reset(self) -> None:
        """Replace the connections the core asked for (a backend lost our handshake):
        a new socket says HELLO again."""
        for endpoint in self._core.take_resets():
            link = self.links.get(endpoint)
            if link is not None:
                self._note(
                    ERROR, f"backend {endpoint} lost its handshake; reconnecting", logging.INFO
                )
                self.renew(link)
        if self._core.outbox or self._core.control:
            self.flush()

    def drain(self, link: Link) -> None:
        """Read every reply already queued on ``link``'s socket (no waiting)."""
        self.receive(link, None, _DRAIN_ALL)

    def flush(self) -> None:
        """Write every message the core has for its backends (HELLOs, PINGs, CANCELs,
        calls in batches), in the core's order: with a key they are sealed in it."""
        core, links = self._core, self.links
        for endpoint, frame, calls in core.messages():
            link = links.get(endpoint)
            try:
                if link is None:
                    raise zmq.Again()  # its socket is being replaced
                # a big frame goes without a copy (libzmq keeps a reference to it)
                link.send(frame, NOBLOCK, len(frame) < ZERO_COPY)
            except zmq.Again:
                # not expected (unbounded queue, no IMMEDIATE); if it happens, keep
                # the replies the socket holds before failing what is left on it
                if link is not None:
                    self.drain(link)
                self.resolve(core.send_failed(calls))
            except zmq.ZMQError as e:
                self.resolve(core.send_failed(calls))
                self._stdlog.warning("send to %s failed: %s", endpoint, e)
        if core.outbox or core.control:  # send_failed may have re-routed calls
            self.flush()
