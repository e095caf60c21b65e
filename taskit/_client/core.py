"""The sans-I/O core of a taskit client: pure logic, no sockets, no threads.

:class:`taskit.frontend.FrontEnd` (threads) and :class:`taskit.aio.AsyncFrontEnd`
(asyncio) both drive one :class:`ClientCore`; they only move bytes and wake
waiters. The core is *not* thread-safe: exactly one driver at a time may call
it (the FrontEnd guarantees this with its I/O lock).

Interface (what a driver does)::

    core = ClientCore(codec=MsgpackCodec, signer=None, retries=0)
    core.add_backend(parse_backend("host", DEFAULT_PORT))   # -> endpoint str

    call = core.new_call("add", (1, 2), {}, waiter=w, timeout=None)  # encodes now;
                                                  # raises EncodeError
    core.submit(call)             # routes it (or parks it until a backend is up)
    if core.outbox or core.control:           # something to send
        for ep, frame, calls in core.messages():   # in this order, at once (sealed)
            ok = try_send(ep, frame)
            if not ok: done = core.send_failed(calls)  # zmq.Again: the peer is gone
    ... when a message arrives from backend `ep`:
        done = core.on_message(ep, frame)     # -> list of (call, ok, value)
        (several frames: done = core.on_frames(ep, frames) -- a v1 peer)
        for ep in core.take_resets(): replace ep's socket (it lost our handshake)
    ... socket monitor:   core.backend_up(ep)   # connected: queues the HELLO; the
                                                # backend is up once its WELCOME is in
                          done = core.backend_down(ep, why)
    ... a connection closed before it came up (handshake refused, not taskit):
                          done, delay, line = core.connect_refused(ep, why)
                          -> connect again after ``delay`` s; log ``line`` if any
    ... every loop turn:  done = core.tick()  # timeouts, connect waits, backoff,
                                              # liveness checks
                          core.next_wakeup()  # monotonic time to poll until, or None
    ... after a tick:     for ep in core.take_pings(): core.ping(ep)  # then send
                          for ep in core.take_suspects():
                              read what ep's socket holds (core.on_message), then
                              done = core.check_suspect(ep)  # None: it spoke meanwhile
                              if done is not None: replace ep's socket (it is lost)
    ... a waiter gave up: core.cancel(call)   # forgets it; CANCEL if on the wire
    ... cancel() asked:   core.withdraw(call) # "local" | "sent" (await the answer:
                                              # call.cancel_hook) | "done"
    ... closing:          core.cancel_on_wire(); send; done = core.fail_all(exc)
    for call, ok, value in done: resolve call.waiter (value is the result, or the
                                 exception instance to raise when ok is False; a
                                 ``concurrent.futures.CancelledError`` when its
                                 backend confirmed a CANCEL)

Every returned ``(call, ok, value)`` has left the core: it is resolved exactly
once. Calls put back for a re-send (``retries``, ``Busy``) show up again in
:meth:`ClientCore.messages`.

Semantics decided here:

- **Routing** (credit, :mod:`taskit._client.dispatch`): a call goes to the ``up``
  backend expected to finish it soonest (its workers, the load it reports, the
  service time measured here), within that backend's credit of this client's
  calls; past every credit it waits here (``_waiting``), in order, for the first
  backend to free some. After ``Busy`` a call goes to another backend with room.
  No backend up: the call waits up to ``connect_timeout`` for one, then fails with
  :class:`BackendNotAvailableError`. A backend being drained
  (:meth:`ClientCore.drain_backend`) takes no new call and is forgotten once its
  calls in flight are over.
- **Lost calls**: when a backend's connection drops, every call sent on it is
  lost (the backend cannot route a reply to a new connection). With
  ``retries=0`` (the default: **at-most-once**, a call never runs twice) each
  fails with :class:`BackendLostError` -- it may or may not have run. With
  ``retries=N`` each is re-sent up to N times (**at-least-once**: it may run
  twice, so only use it for idempotent tasks).
- **Busy / Stopping**: the backend refused the call without running it, so it
  is always safe to re-send: after ``Busy`` the call goes to another backend
  with room if there is one, else waits for the next answer from any backend
  (a slot was freed: the oldest waiting call is re-sent) or for a jittered
  exponential backoff, up to ``busy_retries`` times, then raises
  :class:`BusyError`; ``Stopping`` re-routes to another backend once per
  backend, else raises :class:`StoppingError`. A backend that sends the
  ``Stopping`` notice (call id 0: a graceful stop began) gets no new calls until
  it is reconnected; calls already sent there are answered or refused by it.
- **Liveness** (``heartbeat_interval`` set): every ``heartbeat_interval`` the
  core looks at each connected backend. Anything received from it since the
  last look (a result, an error, a PONG) proves it alive -- counted on the
  reply path, so replies that keep flowing cost nothing more. A backend
  silent for ``heartbeat_interval`` with calls in flight, or for
  ``IDLE_PING_FACTOR`` x ``heartbeat_timeout`` without, gets a PING (wire
  protocol); one still silent ``heartbeat_timeout`` after it was last heard,
  its PING unanswered for at least ``max(heartbeat_interval, heartbeat_timeout
  - heartbeat_interval)``, is lost: as when its connection drops, and the
  driver replaces the connection. Defaults 0.5 s / 2 s: a frozen backend is
  lost 2-2.5 s after it last spoke. ZMTP heartbeats are not used (libzmq
  4.3.5 can abort a peer on them, see doc/security.md).
- **Replies are trusted only in the client's own codec or JSON** (the backend's
  fallback for errors): a pickle reply to a JSON client is refused, never
  unpickled.
- **Handshake** (wire protocol v2): on each new connection the core says HELLO
  (its codec, whether it signs, a fresh nonce); the backend is ``up`` only once
  its WELCOME echoes that nonce. A WELCOME of another version, without this
  client's codec, or with the other signing mode -- or an ``Unauthenticated``
  answer to the HELLO, or a v1 reply -- makes the backend ``rejected``: calls
  that only it could serve fail at once with the typed error
  (:class:`ProtocolVersionError`, :class:`CodecNotAllowedError`,
  :class:`AuthenticationError`). No WELCOME: calls wait ``connect_timeout``, then
  :class:`BackendNotAvailableError` says the handshake went unanswered.
- **Sessions** (a key set): each connection signs with its own
  :class:`taskit.protocol.Session` (zero nonces for HELLO/WELCOME, then both);
  a replayed reply is dropped and counted (``stats["replayed"]``). A backend
  that holds no session for us (``NO_SESSION``) did not run the call: the calls
  on that connection are put back unsent and the driver replaces it.
- **Deadlines**: a CALL carries its remaining time (``protocol.budget_ms``) when
  it is sent; the backend answers ``Expired`` (:class:`ExpiredError`) rather than
  start it late.
- **Batches**: calls drained together for one backend go in one message (at most
  ``BATCH_ITEMS`` items, ``BATCH_BYTES`` of bodies; a 64 KiB body alone); each
  item of a reply is handled as a single reply would be.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError
from typing import Any

from taskit._client.dispatch import DEFAULT_PREFETCH, Dispatcher
from taskit._tracing import outgoing as _trace_context
from taskit.codecs import Signer, as_body, get_codec
from taskit.errors import (
    AuthenticationError,
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    BusyError,
    CallTimeoutError,
    CodecNotAllowedError,
    DecodeError,
    ExpiredError,
    MessageTooLargeError,
    ProtocolError,
    ProtocolVersionError,
    SignatureError,
    StoppingError,
    TaskItError,
    UnknownTaskError,
)
from taskit.protocol import (
    DEFAULT_PORT,
    HEAD,
    HEAD_SIZE,
    NO_KEY_HERE,
    NO_SESSION,
    UNAUTHENTICATED,
    V1_MAGIC,
    VERSION,
    Kind,
    ReplayError,
    Session,
    budget_ms,
    decode_error,
    hello_body,
    is_v1,
    new_nonce,
    pack_items,
    pack_one,
    parse,
    parse_handshake,
    peek,
)

__all__ = [
    "ClientCore",
    "IDLE_PING_FACTOR",
    "PendingCall",
    "BackendState",
    "parse_backend",
    "backoff_delay",
    "reconnect_delay",
    "RECONNECT_FIRST",
    "RECONNECT_CAP",
    "error_from_reply",
    "UP",
    "DOWN",
    "CONNECTING",
    "HANDSHAKE",
    "REJECTED",
    "STOPPING",
    "DRAINING",
    "BATCH_ITEMS",
    "BATCH_BYTES",
]

CONNECTING = "connecting"  # never connected yet, no evidence of failure
UP = "up"  # connected (handshake done): calls may be sent
DOWN = "down"  # disconnected, or connecting failed; libzmq keeps retrying
STOPPING = "stopping"  # answered Stopping: connected but takes no new calls
HANDSHAKE = "handshake"  # connected, HELLO sent, its WELCOME not yet in
REJECTED = "rejected"  # its WELCOME (or refusal) rules it out: calls to it fail at once
DRAINING = "draining"  # being removed: no new calls; closed once its calls in flight end

# A batch (one frame of several CALL items) holds at most this many items and this
# many bytes of bodies; a body of ZERO_COPY bytes or more goes alone.
BATCH_ITEMS = 256
BATCH_BYTES = 256 * 1024
_ALONE = 64 * 1024

_HANDSHAKE_SILENT = (
    "connected but did not answer the taskit handshake (HELLO): an older taskit "
    "(wire protocol v1), or not a taskit backend"
)

# A connected backend with no call in flight is pinged after this many times
# heartbeat_timeout of silence: rarely (idle traffic stays low), yet often enough
# that a backend frozen while idle is found before long.
IDLE_PING_FACTOR = 4

_SCHEMES = ("tcp://", "ipc://", "inproc://")
_unpack_head = HEAD.unpack_from
_RESULT, _ERROR, _CALL = int(Kind.RESULT), int(Kind.ERROR), int(Kind.CALL)
_PING, _PONG = int(Kind.PING), int(Kind.PONG)
_HELLO, _WELCOME = int(Kind.HELLO), int(Kind.WELCOME)
_CANCEL, _CANCELLED, _NOT_CANCELLED = int(Kind.CANCEL), int(Kind.CANCELLED), int(Kind.NOT_CANCELLED)
_JSON_ID = get_codec("json").wire_id
_REFUSAL_MAX = 1024  # bytes: a backend's Unauthenticated body is ~100; unverified, never more
_BUFFER_CODECS = frozenset((2, 3))  # msgpack and pickle decode from a memoryview
_MAGIC = b"TK"

# PendingCall.cancel_state
CANCEL_ASKED, CANCEL_REFUSED = 1, 2

# Remote error type names the backend raises itself -> the exception class.
_ERROR_CLASSES: dict[str, type[BackendProcessingError]] = {
    "UnknownTask": UnknownTaskError,
    "CodecNotAllowed": CodecNotAllowedError,
    "Busy": BusyError,
    "Stopping": StoppingError,
    "Expired": ExpiredError,
}


def _codec_name(wire_id: Any) -> str:
    try:
        return repr(get_codec(int(wire_id)).name)
    except Exception:  # a codec this process does not know: its id says enough
        return f"id {wire_id}"


def parse_backend(spec: Any, default_port: int = DEFAULT_PORT) -> str:
    """The ZeroMQ endpoint of a backend given as ``"host"``, ``"host:port"``,
    ``("host", port)``, ``"tcp://host:port"``, ``"ipc://path"`` or ``"inproc://name"``.

    Raises ``ValueError`` for anything else.
    """
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        host, port = spec
        if isinstance(host, str) and host:
            try:
                port = int(port)
            except (TypeError, ValueError):
                port = -1
            if 0 < port < 65536:
                return _tcp(host, port)
    elif isinstance(spec, str) and spec:
        if spec.startswith(_SCHEMES):
            if len(spec.split("://", 1)[1]) == 0:
                raise ValueError(f"backend endpoint {spec!r} has no address")
            if spec.startswith("tcp://"):
                rest = spec[6:]
                host, sep, port = rest.rpartition(":")
                if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"backend endpoint {spec!r} needs tcp://host:port")
            return spec
        if "://" not in spec:
            host, sep, port = spec.rpartition(":")
            bracketed = host.startswith("[") and host.endswith("]")
            if sep and port.isdigit() and host and (bracketed or ":" not in host):
                return _tcp(host, int(port))
            return _tcp(spec, int(default_port))
    raise ValueError(
        "a backend is 'host', 'host:port', ('host', port), 'tcp://host:port' or "
        f"'ipc://path'; got {spec!r}"
    )


def _tcp(host: str, port: int) -> str:
    host = host.strip("[]")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def backoff_delay(attempt: int, base: float = 0.001, cap: float = 0.05) -> float:
    """Seconds to wait before re-sending after ``attempt`` refusals (exponential, capped)."""
    return min(cap, base * (1 << min(attempt, 20)))


RECONNECT_FIRST = 0.1  # s: wait after a connection that was refused before coming up
RECONNECT_CAP = 5.0  # s: the longest wait between such connections


def reconnect_delay(refusals: int) -> float:
    """Seconds to wait before connecting again after ``refusals`` connections in a row
    ended before coming up: RECONNECT_FIRST doubling up to RECONNECT_CAP."""
    return min(RECONNECT_CAP, RECONNECT_FIRST * (1 << min(max(refusals, 1) - 1, 16)))


def error_from_reply(
    type_name: str, args: Sequence[Any], remote_tb: str, task: str | None, backend: str | None
) -> BackendProcessingError:
    """The exception for an ERROR reply: a named subclass for the backend's own refusals
    (``UnknownTask`` -> :class:`UnknownTaskError` ...), else :class:`BackendProcessingError`."""
    cls = _ERROR_CLASSES.get(type_name, BackendProcessingError)
    return cls(type_name, args, remote_tb, task, backend)


class PendingCall:
    """One call from creation to resolution. Drivers read ``id``, ``task``,
    ``backend`` (endpoint it is assigned to, or None) and ``waiter`` (theirs)."""

    __slots__ = (
        "id",
        "task",
        "body",
        "codec",
        "waiter",
        "backend",
        "target",
        "deadline",
        "wait_until",
        "attempts",
        "busy_tries",
        "refused_by",
        "done",
        "on_wire",
        "cancel_state",
        "cancel_hook",
        "sent_at",
        "ahead",
    )

    def __init__(
        self,
        call_id: int,
        task: str,
        body: bytes,
        codec: Any,
        waiter: Any,
        deadline: float | None,
        target: str | None,
    ) -> None:
        self.id = call_id
        self.task = task
        self.body = body
        self.codec = codec
        self.waiter = waiter
        self.backend: str | None = None
        self.target = target  # pinned backend (admin signals), else None
        self.deadline = deadline  # absolute monotonic time, or None
        self.wait_until: float | None = None  # while parked waiting for a backend
        self.attempts = 0  # times sent on the wire
        self.busy_tries = 0
        self.refused_by: set[str] | None = None  # backends that answered Stopping
        self.done = False
        self.on_wire = False  # sent to its current backend (not just assigned)
        self.cancel_state = 0  # CANCEL_ASKED: a CANCEL is out; CANCEL_REFUSED: NOT_CANCELLED
        self.cancel_hook: Callable[[], None] | None = None  # called when a CANCEL is answered
        self.sent_at = 0.0  # when it last went on the wire (the service-time sample)
        self.ahead = 0  # calls in flight on its backend when it was assigned there

    def __repr__(self) -> str:
        return f"<PendingCall {self.id} {self.task!r} on {self.backend}>"


class BackendState:
    """What this client knows about one backend; :meth:`snapshot` is the public view."""

    __slots__ = (
        "endpoint",
        "state",
        "since",
        "calls",
        "busy_until",
        "busy_streak",
        "sent",
        "answered",
        "failed",
        "lost",
        "retried",
        "busy",
        "connects",
        "disconnects",
        "last_error",
        "refusals",
        "reported",
        "heard",
        "seen",
        "heard_at",
        "ping_at",
        "pings",
        "session",
        "nonce",
        "hello_id",
        "fatal",
        "info",
        "queued",
        "running",
        "load_at",
        "cancelled",
        "slot",
        "draining",
    )

    def __init__(self, endpoint: str, now: float) -> None:
        self.endpoint = endpoint
        self.state = CONNECTING
        self.since = now
        self.calls: dict[int, PendingCall] = {}  # assigned here, sent or about to be
        self.busy_until = 0.0
        self.busy_streak = 0
        self.sent = self.answered = self.failed = self.lost = self.busy = 0
        self.retried = 0  # lost calls re-sent (retries)
        self.connects = self.disconnects = 0
        self.last_error: str | None = None
        self.refusals = 0  # connections in a row that ended before coming up
        self.reported: str | None = None  # the refusal last logged (once per cause)
        # Liveness: ``answered + heard`` counts every message from the backend (results
        # on the hot path, anything else in ``heard``); ``seen`` is that sum at the last
        # liveness check, ``heard_at`` the time of the check that saw it change.
        self.heard = self.seen = 0
        self.heard_at = now
        self.ping_at: float | None = None  # a PING unanswered since then
        self.pings = 0
        # The handshake of the current connection: its signing state (None without a
        # key), this client's nonce and the HELLO's call id; what the WELCOME said.
        self.session: Session | None = None
        self.nonce = b""
        self.hello_id = -1
        # Why calls to it fail at once (a WELCOME or refusal ruled it out): a function
        # of the task name giving the exception, or None.
        self.fatal: Callable[[str | None], TaskItError] | None = None
        self.info: dict[str, Any] = {}
        # The load it reported last (every item it sends carries it) and when.
        self.queued = self.running = 0
        self.load_at: float | None = None
        self.cancelled = 0  # calls it withdrew unrun on our CANCEL
        self.slot: Any = None  # its Dispatcher slot: credit, others' load, service time
        self.draining = False  # remove_backends() or a re-resolution dropped it

    def snapshot(self, now: float) -> dict[str, Any]:
        info = self.info
        return {
            "state": self.state,
            "name": info.get("name"),
            "pid": info.get("pid"),
            "started": info.get("started"),
            "capacity": {
                "workers": info.get("workers"),
                "max_pending": info.get("max_pending"),
                "max_message_size": info.get("max_message_size"),
            },
            "queued": self.queued,
            "running": self.running,
            "credit": {"limit": self.slot.limit, "in_use": len(self.calls)}
            if self.slot is not None
            else None,
            "service_time": None
            if self.slot is None or self.slot.samples < 2
            else round(self.slot.service, 6),
            "load_age": None if self.load_at is None else round(now - self.load_at, 3),
            "for": round(now - self.since, 3),
            "in_flight": len(self.calls),
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "lost": self.lost,
            "retried": self.retried,
            "busy": self.busy,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "pings": self.pings,
            "cancelled": self.cancelled,
            "last_error": self.last_error,
        }


Done = list  # list[tuple[PendingCall, bool, Any]]


class ClientCore:
    """Call table, routing and retry decisions of one client (see the module docstring).

    ``retries``: re-sends of a call whose backend was lost (0 = at-most-once).
    ``busy_retries``: re-sends after ``Busy`` before raising :class:`BusyError`.
    ``connect_timeout``: how long a call waits for some backend to be up.
    ``heartbeat_interval`` (None: no liveness checks) and ``heartbeat_timeout``:
    see *Liveness* in the module docstring.
    Not thread-safe; never blocks.
    """

    def __init__(
        self,
        codec: Any = "json",
        signer: Signer | None = None,
        retries: int = 0,
        busy_retries: int = 50,
        connect_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_body: int | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float = 2.0,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        self.codec = get_codec(codec)
        # Credit: at most capacity x prefetch of this client's calls on one backend;
        # the rest wait here, in order (_waiting), for the backend expected to finish
        # them soonest (taskit._client.dispatch).
        self.dispatch = Dispatcher(prefetch)
        self._waiting: collections.deque[PendingCall] = collections.deque()
        # A call whose body is larger is refused: a backend with this limit would drop
        # the connection, failing every call in flight on it (None: no limit).
        self.max_body = max_body
        self.signer = signer
        self.retries = max(0, int(retries))
        self.busy_retries = max(0, int(busy_retries))
        self.connect_timeout = float(connect_timeout)
        self.clock = clock
        self.backends: dict[str, BackendState] = {}
        self._blist: list[BackendState] = []  # backends in order, for routing
        self.calls: dict[int, PendingCall] = {}
        self._ids = itertools.count(1)
        # Read-only for drivers (a cheap "anything to do?" test): calls to send, other
        # items to send (HELLO, PING, CANCEL: (endpoint, item)), timers.
        self.outbox: list[PendingCall] = []
        self.control: list[tuple[str, tuple[int, int, int, int, int, bytes]]] = []
        self._parked: dict[int, PendingCall] = {}  # waiting for a backend to be up
        self.timers: list[tuple[float, int, int, str]] = []  # (when, seq, call id, what)
        self._seq = itertools.count()
        self._rr = 0
        self._busy_waiting: collections.deque[PendingCall] = collections.deque()
        self._jitter = random.Random().random
        # Replies are decoded only in codecs we chose to trust (never pickle unasked).
        json = get_codec("json")
        self._reply_codecs = {self.codec.wire_id: self.codec, json.wire_id: json}
        self._wire_id = self.codec.wire_id
        # Replies dropped unread (late, malformed, badly signed), and calls the backend
        # refused for their signature (failed with AuthenticationError).
        self.stats = {
            "late_replies": 0,
            "bad_replies": 0,
            "bad_signatures": 0,
            "refused_signatures": 0,
            "replayed": 0,
        }
        # Read-only for drivers: endpoints whose connection must be replaced (the backend
        # holds no handshake for it); see take_resets().
        self.resets: list[str] = []
        # Read-only for drivers: endpoints drained and forgotten, whose connection the
        # driver closes now; see take_retired().
        self.retired: list[str] = []
        from taskit import __version__  # here: taskit's __init__ imports the faces

        self._agent = f"taskit/{__version__} python"
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = float(heartbeat_timeout)
        self._liveness_armed = False  # a "liveness" timer is in self.timers
        # Read-only for drivers, filled by tick(): backends to PING, backends to
        # check (and drop) -- see take_pings() and take_suspects().
        self.pings: list[str] = []
        self.suspects: list[str] = []
        # OBS HOOK, set when metrics are on: observe(endpoint, seconds) for each call
        # answered (result or task error), timed from its last send.
        self.observe: Callable[[str, float], None] | None = None

    # -- backends ---------------------------------------------------------------

    def add_backend(self, endpoint: str) -> bool:
        """Start tracking ``endpoint``; False when it is already known."""
        if endpoint in self.backends:
            return False
        b = self.backends[endpoint] = BackendState(endpoint, self.clock())
        b.slot = self.dispatch.add(endpoint)
        self._blist.append(b)
        return True

    def known(self, spec: Any, default_port: int = DEFAULT_PORT) -> str:
        """The endpoint of ``spec`` (any form :func:`parse_backend` takes) when it is one
        of this client's backends. Raises ``ValueError('No such backend!')`` otherwise
        (TaskIt 4.0's message, malformed specs included)."""
        try:
            endpoint = parse_backend(spec, default_port)
        except ValueError:
            raise ValueError("No such backend!") from None
        if endpoint not in self.backends:
            raise ValueError("No such backend!")
        return endpoint

    def backend_up(self, endpoint: str) -> None:
        """A connection to ``endpoint`` is ready: say HELLO on it (queued in
        :attr:`control`). The backend counts as up -- parked calls go out -- only when
        its WELCOME arrives (:meth:`on_message`)."""
        b = self.backends.get(endpoint)
        if b is None:
            return
        self._set_state(b, HANDSHAKE)
        b.nonce = new_nonce()
        b.hello_id = next(self._ids)
        signer = self.signer
        b.session = Session(signer) if signer is not None else None  # zero nonces: HELLO
        body = hello_body([self._wire_id], signer is not None, b.nonce, self._agent)
        self.control.append((endpoint, (_HELLO, _JSON_ID, b.hello_id, 0, 0, body)))

    def _welcome(self, b: BackendState, call_id: int, body: Any) -> Done:
        """The WELCOME of ``b``: check it and, if it fits, mark ``b`` up (parked calls
        go out); a mismatch rules ``b`` out with a typed error (:meth:`_reject`)."""
        done: Done = []
        if b.state != HANDSHAKE or call_id != b.hello_id:
            self.stats["late_replies"] += 1  # not the answer to this connection's HELLO
            return done
        try:
            info = parse_handshake(body, _WELCOME)
        except ProtocolError as e:
            self.stats["bad_replies"] += 1
            why = f"backend {b.endpoint} answered the handshake with a malformed WELCOME: {e}"
            return self._reject(b, lambda task: ProtocolError(why))
        ep = b.endpoint
        if info["nonce"] != b.nonce.hex():
            self.stats["replayed"] += 1  # a WELCOME to another HELLO: not ours
            return done
        if info["version"] != VERSION:
            v = info["version"]
            return self._reject(
                b,
                lambda task: ProtocolVersionError(
                    f"backend {ep} speaks taskit wire protocol version {v}; this client speaks "
                    f"{VERSION}: run the same taskit version on both sides"
                ),
            )
        if info["signed"] != (self.signer is not None):
            mine = "has a key" if self.signer is not None else "has no key"
            theirs = "has one" if info["signed"] else "has none"
            return self._reject(
                b,
                lambda task: AuthenticationError(
                    f"backend {ep} refused the handshake: this client {mine} and the backend "
                    f"{theirs}; give both sides the same key"
                ),
            )
        if self._wire_id not in info["codecs"]:
            names = [_codec_name(c) for c in info["codecs"]]
            mine = self.codec.name
            return self._reject(
                b,
                lambda task: CodecNotAllowedError(
                    "CodecNotAllowed",
                    [
                        f"backend accepts codecs {', '.join(names)}, not {mine!r}; create the "
                        f"client with codec= one of those"
                    ],
                    "",
                    task,
                    ep,
                ),
            )
        if self.signer is not None:
            b.session = Session(self.signer, b.nonce, bytes.fromhex(info["session"]), outgoing=b"C")
        b.info = {
            "name": info.get("name"),
            "pid": info.get("pid"),
            "started": info.get("started"),
            "codecs": info["codecs"],
            "workers": info["workers"],
            "max_pending": info.get("max_pending"),
            "max_message_size": info.get("max_message_size"),
        }
        b.fatal = None
        self._set_state(b, UP)
        b.connects += 1
        b.busy_until, b.busy_streak = 0.0, 0
        b.refusals, b.reported = 0, None
        b.seen, b.heard_at, b.ping_at = b.answered + b.heard, b.since, None
        if self.heartbeat_interval and not self._liveness_armed:
            self._arm_liveness(b.since)
        if self._parked:
            parked = sorted(self._parked.values(), key=lambda c: c.id)
            self._parked.clear()
            for call in parked:
                call.wait_until = None
                self._route(call)
        return done

    def _reject(self, b: BackendState, fatal: Callable[[str | None], TaskItError]) -> Done:
        """``b`` cannot serve this client (its WELCOME or a refusal said why): calls to
        it fail at once with ``fatal(task)`` -- those on it now, and those waiting for a
        backend when no other can take them -- until a new connection's handshake fits."""
        self._set_state(b, REJECTED)
        b.fatal = fatal
        b.last_error = str(fatal(None))
        done: Done = []
        for call in sorted(b.calls.values(), key=lambda c: c.id):
            self._finish(call, False, fatal(call.task), done)
        now = self.clock()
        for call in list(self._parked.values()):
            if self._fatal_for(call) is not None and call.wait_until != now:
                call.wait_until = now  # the "park" timer fails it on the next tick
                self._timer(now, call, "park")
        return done

    def _fatal_for(self, call: PendingCall) -> Callable[[str | None], TaskItError] | None:
        """Why ``call`` cannot be served at all: its target, or every backend, rejected."""
        if call.target is not None:
            b = self.backends.get(call.target)
            return b.fatal if b is not None and b.state == REJECTED else None
        blist = self._blist
        if blist and all(b.state == REJECTED for b in blist):
            return blist[0].fatal
        return None

    def connect_refused(self, endpoint: str, reason: str) -> tuple[Done, float, str | None]:
        """A connection to ``endpoint`` ended before it came up: the peer closed it or
        refused the handshake (not a taskit backend, CURVE keys refused). The backend
        is down for ``reason`` (which a call that finds no backend names).

        Returns the calls resolved now, the seconds to wait before connecting again
        (:func:`reconnect_delay` of the refusals in a row, jittered: libzmq's own
        backoff does not apply to a connection that was made and then closed), and
        a line to log, or None when this cause was already reported (once per
        cause; a refusal in a row of one may be a backend starting or stopping).
        """
        b = self.backends.get(endpoint)
        if b is None:
            return [], reconnect_delay(1), None
        done = self.backend_down(endpoint, reason)
        b.refusals += 1
        delay = reconnect_delay(b.refusals) * (0.75 + 0.5 * self._jitter())
        report = None
        if b.refusals >= 2 and b.reported != reason:
            b.reported = reason
            report = f"backend {endpoint} {reason}; retrying, at most every {RECONNECT_CAP:g} s"
        return done, delay, report

    def backend_down(self, endpoint: str, reason: str = "disconnected") -> Done:
        """The connection to ``endpoint`` dropped (or cannot be made).

        Calls sent on it are lost: re-sent when ``retries`` allow, else failed with
        :class:`BackendLostError`. Calls assigned but not yet sent are re-routed.
        Returns the calls that are resolved now.
        """
        b = self.backends.get(endpoint)
        if b is None:
            return []
        was_up = b.state in (UP, STOPPING, DRAINING)
        b.ping_at = None
        b.session, b.hello_id = None, -1
        if b.state != DOWN:
            self._set_state(b, DOWN)
            if was_up:
                b.disconnects += 1
        b.last_error = reason
        if not b.calls:
            return []
        victims = sorted(b.calls.values(), key=lambda c: c.id)
        for _ in victims:
            self.dispatch.answered(b.slot)
        b.calls.clear()
        if b.draining:
            self._retire(b)
        done: Done = []
        for call in victims:
            call.backend = None
            if not call.on_wire or call.attempts <= self.retries:
                if call.on_wire:
                    b.lost += 1
                    b.retried += 1
                self._route(call)  # never sent, or retries left: re-send
                continue
            b.lost += 1
            self._finish(
                call,
                False,
                BackendLostError(
                    f"backend {endpoint} was lost ({reason}) while running task "
                    f"{call.task!r}; the call may or may not have run there. Pass "
                    "retries=N to the FrontEnd to re-send such calls (at-least-once)."
                ),
                done,
            )
        return done

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{endpoint: {state, for, in_flight, sent, answered, ...}}`` for every backend."""
        now = self.clock()
        return {ep: b.snapshot(now) for ep, b in list(self.backends.items())}

    # -- calls ------------------------------------------------------------------

    def new_call(
        self,
        task: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        waiter: Any = None,
        timeout: float | None = None,
        target: str | None = None,
    ) -> PendingCall:
        """A call, its body encoded now. Raises :class:`EncodeError`, or
        :class:`MessageTooLargeError` over ``max_body`` (nothing registered).

        ``target`` pins it to one backend endpoint (no load balancing, no re-sends).
        Does not touch the table, so it may run outside the driver's lock.
        """
        meta = _trace_context()  # OBS HOOK: the caller's trace context, mostly None
        if meta is None:
            body = self.codec.encode([task, list(args), kwargs or {}])
        else:
            body = self.codec.encode([task, list(args), kwargs or {}, meta])
        if type(body) is not bytes:
            body = as_body(self.codec, body)
        limit = self.max_body
        if limit is not None and len(body) > limit:
            raise MessageTooLargeError(
                f"the arguments of task {task!r} encode to {len(body)} bytes, over "
                f"max_message_size ({limit} bytes): a backend with that limit would drop "
                "the connection and every call on it; send less, or raise "
                "max_message_size on both sides"
            )
        deadline = None if timeout is None else self.clock() + timeout
        return PendingCall(next(self._ids), task, body, self.codec, waiter, deadline, target)

    def submit(self, call: PendingCall) -> None:
        """Register ``call`` and route it: to the outbox, or parked until a backend is up."""
        self.calls[call.id] = call
        if call.deadline is not None:
            self._timer(call.deadline, call, "deadline")
        self._route(call)

    def drain_outbox(self) -> list[PendingCall]:
        """Calls to put on the wire now, each to ``call.backend``."""
        out = self.outbox
        if not out:
            return out
        self.outbox = []
        if len(out) == 1:  # the hot path
            return out if not out[0].done and out[0].backend is not None else []
        # A call re-routed before it was sent (its backend went down, or answered
        # Busy meanwhile) is in the outbox twice: keep it once, for its new backend.
        return list({c.id: c for c in out if not c.done and c.backend is not None}.values())

    def messages(self) -> list[tuple[str, bytes, Sequence[PendingCall]]]:
        """The messages to send now, in this order, each ``(endpoint, frame, calls)``:
        :attr:`control` items (HELLO, PING, CANCEL; no calls) first, then the routed
        calls, those for one backend packed into batches (at most ``BATCH_ITEMS`` items
        and ``BATCH_BYTES`` of bodies; a body of 64 KiB or more alone). Counts each
        call's attempt and carries its remaining time budget. With a key each frame is
        sealed here, so the driver must send them in this order, at once (sealing in
        send order: the receiver's replay window)."""
        out: list[tuple[str, bytes, Sequence[PendingCall]]] = []
        if self.control:
            control, self.control = self.control, []
            for endpoint, item in control:
                b = self.backends.get(endpoint)
                if b is None:
                    continue
                if self.signer is None:
                    out.append((endpoint, pack_one(*item), ()))
                elif b.session is not None:
                    out.append((endpoint, pack_items((item,), b.session), ()))
        calls = self.drain_outbox()
        if not calls:
            return out
        if len(calls) == 1 and self.signer is None:  # the hot path: one call, unsigned
            call = calls[0]
            b = self.backends.get(call.backend)  # type: ignore[arg-type]
            if b is not None:
                b.sent += 1
            call.attempts += 1
            call.on_wire = True
            call.sent_at = now = self.clock()
            deadline = call.deadline
            a = 0 if deadline is None else budget_ms(deadline - now)
            out.append(
                (call.backend, pack_one(_CALL, call.codec.wire_id, call.id, a, 0, call.body), calls)  # type: ignore[arg-type]
            )
            return out
        now = self.clock()
        groups: dict[str, list[PendingCall]] = {}
        for call in calls:
            groups.setdefault(call.backend, []).append(call)  # type: ignore[arg-type]
        for endpoint, group in groups.items():
            b = self.backends.get(endpoint)
            session = None if b is None else b.session
            if self.signer is not None and session is None:
                # its connection went since these were routed: route them again
                for call in group:
                    if b is not None:
                        self._settle(b, call)
                    call.backend = None
                    self._route(call)
                continue
            batch: list[PendingCall] = []
            items: list[tuple[int, int, int, int, int, bytes]] = []
            size = 0
            for call in group:
                n = len(call.body)
                if batch and (n >= _ALONE or len(batch) >= BATCH_ITEMS or size + n > BATCH_BYTES):
                    out.append((endpoint, self._pack(items, session), batch))
                    batch, items, size = [], [], 0
                call.attempts += 1
                call.on_wire = True
                call.sent_at = now
                deadline = call.deadline
                a = 0 if deadline is None else budget_ms(deadline - now)
                batch.append(call)
                items.append((_CALL, call.codec.wire_id, call.id, a, 0, call.body))
                size += n
                if n >= _ALONE:
                    out.append((endpoint, self._pack(items, session), batch))
                    batch, items, size = [], [], 0
            if batch:
                out.append((endpoint, self._pack(items, session), batch))
            if b is not None:
                b.sent += len(group)
        return out

    @staticmethod
    def _pack(items: list[tuple[int, int, int, int, int, bytes]], session: Session | None) -> bytes:
        if session is None and len(items) == 1:
            return pack_one(*items[0])
        return pack_items(items, session)

    def send_failed(self, calls: Sequence[PendingCall]) -> Done:
        """The driver could not hand a message of ``calls`` to its backend's socket (no
        connected peer, so its connection just dropped): undo their attempts and treat
        the backend as down until the socket monitor reports it connected again.
        Returns the calls resolved now."""
        done: Done = []
        for call in calls:
            if call.done or not call.on_wire:
                continue  # settled meanwhile (an earlier failure re-routed it)
            call.attempts -= 1
            call.on_wire = False
            b = self.backends.get(call.backend or "")
            if b is None:
                call.backend = None
                self._route(call)
                continue
            b.sent -= 1
            done += self.backend_down(b.endpoint, "no connection")
        return done

    def cancel(self, call: PendingCall) -> None:
        """Forget ``call`` (its waiter gave up, or its ``map`` was abandoned); a late
        reply is ignored. A call on the wire is also withdrawn on its backend: a
        CANCEL goes out (its answer is not awaited)."""
        if call.done:
            return
        if call.on_wire and call.backend is not None:
            self.control.append((call.backend, (_CANCEL, 0, call.id, 0, 0, b"")))
        call.done = True
        self._detach(call)

    def withdraw(self, call: PendingCall) -> str:
        """Ask for ``call`` to be cancelled: ``"done"`` when it is resolved already,
        ``"local"`` when it was not on the wire (it is forgotten: resolve it as
        cancelled), ``"sent"`` when a CANCEL is queued for its backend: the call
        stays pending until the backend answers CANCELLED (the call resolves with a
        ``concurrent.futures.CancelledError`` value) or NOT_CANCELLED
        (``call.cancel_state`` becomes CANCEL_REFUSED), or its own reply comes.
        ``call.cancel_hook`` is called on either answer."""
        if call.done:
            return "done"
        if not call.on_wire or call.backend is None:
            call.done = True
            self._detach(call)
            return "local"
        if call.cancel_state != CANCEL_ASKED:
            call.cancel_state = CANCEL_ASKED
            self.control.append((call.backend, (_CANCEL, 0, call.id, 0, 0, b"")))
        return "sent"

    def cancel_on_wire(self) -> int:
        """Queue a CANCEL for every call on the wire (closing: nothing waits for the
        answers); the number queued."""
        n = 0
        for call in self.calls.values():
            if call.on_wire and call.backend is not None and not call.done:
                self.control.append((call.backend, (_CANCEL, 0, call.id, 0, 0, b"")))
                n += 1
        return n

    def drain_backend(self, endpoint: str) -> None:
        """Take ``endpoint`` out of service: it gets no new call from now on; calls
        routed there but not sent go elsewhere; calls on the wire finish there (or
        are lost with it, as any). Once none is left it is forgotten and listed in
        :attr:`retired` for the driver to close. Unknown endpoints are ignored."""
        b = self.backends.get(endpoint)
        if b is None or b.draining:
            return
        b.draining = True
        self._set_state(b, b.state)
        for call in sorted(b.calls.values(), key=lambda c: c.id):
            if not call.on_wire:
                self._settle(b, call)
                call.backend = None
                self._route(call)
        if not b.calls:
            self._retire(b)

    def _retire(self, b: BackendState) -> None:
        """Forget a drained backend (no call left on it); the driver closes it."""
        if self.backends.get(b.endpoint) is not b:
            return
        del self.backends[b.endpoint]
        self._blist.remove(b)
        self.dispatch.remove(b.endpoint)
        self.retired.append(b.endpoint)

    def take_retired(self) -> list[str]:
        """Endpoints drained and forgotten (close their connections); empties the list."""
        retired, self.retired = self.retired, []
        return retired

    def take_resets(self) -> list[str]:
        """Endpoints whose connection the driver must replace now; empties the list."""
        resets, self.resets = self.resets, []
        return resets

    def fail_all(self, exc: BaseException) -> Done:
        """Resolve every pending call with ``exc`` (closing)."""
        done: Done = []
        for call in sorted(self.calls.values(), key=lambda c: c.id):
            self._finish(call, False, exc, done)
        return done

    @property
    def pending(self) -> int:
        """Calls registered and not yet resolved."""
        return len(self.calls)

    def on_message(self, endpoint: str, frame: Any) -> Done:
        """Handle one message (frame) received from ``endpoint``; returns the calls
        resolved by it. ``frame`` may be a ``memoryview`` (a driver's zero-copy
        receive). Every item's load fields are recorded for the backend.

        Malformed, badly signed, replayed or unknown-id replies are dropped and
        counted in :attr:`stats`; they never raise.
        """
        b = self.backends.get(endpoint)
        if b is None:
            return []
        if self.signer is None and len(frame) >= HEAD_SIZE:
            magic, ver, flags, kind, codec_id, _, call_id, qa, qb, blen = _unpack_head(frame)
            if magic == _MAGIC and ver == 2 and not flags and HEAD_SIZE + blen == len(frame):
                # the hot path: one unsigned item (what _item does, for a result)
                b.queued, b.running, b.load_at = qa, qb, self.clock()
                call = self.calls.get(call_id)
                if (
                    kind == _RESULT
                    and codec_id == self._wire_id
                    and call is not None
                    and call.backend == endpoint
                ):
                    body = frame[HEAD_SIZE:]
                    codec = self.codec
                    if type(body) is memoryview and codec_id not in _BUFFER_CODECS:
                        body = bytes(body)
                    try:
                        value = codec.decode(body)
                    except DecodeError as e:
                        b.heard += 1
                        done: Done = []
                        self._finish(call, False, e, done)
                        return done
                    b.answered += 1
                    b.busy_streak = 0
                    if self.observe is not None:  # OBS HOOK: metrics on
                        self.observe(endpoint, b.load_at - call.sent_at)
                    call.done = True
                    del self.calls[call_id]
                    if b.calls.pop(call_id, None) is not None:  # _settle, inlined
                        # (admin signals, answered on the I/O thread, say nothing of it)
                        measured = call.on_wire and call.target is None
                        latency = b.load_at - call.sent_at if measured else None
                        self.dispatch.answered(b.slot, latency, call.ahead, qa + qb)
                        if b.draining and not b.calls:
                            self._retire(b)
                        if self._waiting:
                            self._release()
                    if self._busy_waiting:
                        self._slot_freed()
                    if call.cancel_hook is not None:
                        call.cancel_hook()
                    return [(call, True, value)]
                done = []
                self._item(b, kind, codec_id, call_id, frame[HEAD_SIZE:], done)
                return done
        session = b.session
        if session is None and self.signer is not None:
            # no handshake on this connection (down, or not connected yet): nothing
            # from it can be verified, so nothing is read (not even a refusal)
            self.stats["bad_signatures"] += 1
            return []
        try:
            items = parse(frame, session)
        except ReplayError:
            self.stats["replayed"] += 1
            return []
        except SignatureError:
            return self._unverified(b, frame)
        except ProtocolError:
            if len(frame) >= 3 and frame[:2] == _MAGIC and frame[2] != VERSION:
                return self._other_version(b, f"version {frame[2]}")
            if bytes(frame[:5]) == V1_MAGIC:
                return self._other_version(b, "version 1")
            self.stats["bad_replies"] += 1
            return []
        done = []
        now = self.clock()
        for kind, codec_id, call_id, qa, qb, body in items:
            b.queued, b.running, b.load_at = qa, qb, now
            self._item(b, kind, codec_id, call_id, body, done)
        return done

    def on_frames(self, endpoint: str, frames: Sequence[Any]) -> Done:
        """Handle a message of several frames: no version-2 message has them. One of
        protocol version 1 (``'TKIT\\x01'`` first) rules the backend out with
        :class:`ProtocolVersionError`; anything else is dropped and counted."""
        b = self.backends.get(endpoint)
        if b is not None and is_v1(frames):
            return self._other_version(b, "version 1")
        self.stats["bad_replies"] += 1
        return []

    def _other_version(self, b: BackendState, theirs: str) -> Done:
        ep = b.endpoint
        return self._reject(
            b,
            lambda task: ProtocolVersionError(
                f"backend {ep} speaks taskit wire protocol {theirs}; this client speaks "
                f"version {VERSION}: run the same taskit version on both sides"
            ),
        )

    def _item(
        self, b: BackendState, kind: int, codec_id: int, call_id: int, body: Any, done: Done
    ) -> None:
        """One verified item from backend ``b``: resolve what it answers into ``done``."""
        endpoint = b.endpoint
        call = self.calls.get(call_id)
        if call is None or call.backend != endpoint:
            # A PONG, a notice, the handshake, or a reply to a call given up on: it lives
            b.heard += 1
            if kind == _PONG:
                return
            if kind == _WELCOME:
                done += self._welcome(b, call_id, body)
            elif call_id == 0 and kind == _ERROR:
                done += self._notice(endpoint, codec_id, body)
            elif kind == _ERROR and call_id == b.hello_id and b.state == HANDSHAKE:
                self._hello_refused(b, codec_id, body, done)
            elif kind != _CANCELLED and kind != _NOT_CANCELLED:
                self.stats["late_replies"] += 1
            return
        b.heard += 1
        if kind == _RESULT:
            codec = self._reply_codecs.get(codec_id)
            if codec is None:
                self._bad_codec(call, codec_id, endpoint, done)
                return
            if type(body) is memoryview and codec.wire_id not in _BUFFER_CODECS:
                body = bytes(body)  # a driver's zero-copy buffer; this codec wants bytes
            try:
                value = codec.decode(body)
            except DecodeError as e:
                self._finish(call, False, e, done)
                return
            b.heard -= 1
            b.answered += 1
            b.busy_streak = 0
            if self.observe is not None:  # OBS HOOK: metrics on
                self.observe(endpoint, self.clock() - call.sent_at)
            self._finish(call, True, value, done, measured=True)
            if self._busy_waiting:
                self._slot_freed()
        elif kind == _ERROR:
            codec = self._reply_codecs.get(codec_id)
            if codec is None:
                self._bad_codec(call, codec_id, endpoint, done)
                return
            if type(body) is memoryview:
                body = bytes(body)
            try:
                type_name, args, tb = decode_error(codec, body)
            except (DecodeError, ProtocolError) as e:
                self._finish(call, False, e, done)
                return
            if type_name == UNAUTHENTICATED:
                self._refused_signature(call, endpoint, args, done)
            elif type_name == "Busy" and call.target is None:
                self._busy(call, b, args, tb, done)
            elif type_name == "Stopping" and call.target is None:
                self._stopping(call, b, args, tb, done)
            else:
                b.failed += 1
                if self.observe is not None:  # OBS HOOK: metrics on
                    self.observe(endpoint, self.clock() - call.sent_at)
                self._finish(
                    call,
                    False,
                    error_from_reply(type_name, args, tb, call.task, endpoint),
                    done,
                    measured=True,
                )
                if self._busy_waiting:
                    self._slot_freed()
        elif kind == _CANCELLED:
            if call.cancel_state == CANCEL_ASKED:  # it never runs: no other reply follows
                b.cancelled += 1
                self._finish(call, False, CancelledError(), done)
                if self._busy_waiting:
                    self._slot_freed()
            else:
                self.stats["bad_replies"] += 1
        elif kind == _NOT_CANCELLED:
            if call.cancel_state == CANCEL_ASKED:
                call.cancel_state = CANCEL_REFUSED
                if call.cancel_hook is not None:
                    call.cancel_hook()
        else:
            self.stats["bad_replies"] += 1

    def _hello_refused(self, b: BackendState, codec_id: int, body: Any, done: Done) -> None:
        """An ERROR answering ``b``'s HELLO: the backend will not talk to this client."""
        codec = self._reply_codecs.get(codec_id)
        try:
            type_name, args, _ = decode_error(codec, bytes(body)) if codec else ("?", [], "")
        except (DecodeError, ProtocolError):
            type_name, args = "?", []
        ep = b.endpoint
        if type_name == UNAUTHENTICATED:
            why = self._why_keys(args)
            self.stats["refused_signatures"] += 1
            done += self._reject(
                b,
                lambda task: AuthenticationError(
                    f"backend {ep} refused the handshake: the keys differ, or one side has none "
                    f"({why}); give both sides the same key"
                ),
            )
        else:
            text = ", ".join(map(str, args)) or type_name
            done += self._reject(
                b,
                lambda task: ProtocolError(
                    f"backend {ep} refused the handshake: {type_name}: {text}"
                ),
            )

    def _why_keys(self, args: Any) -> str:
        if self.signer is None:
            return "this client has no key"
        if args and args[0] == NO_KEY_HERE:
            return "the backend has none"
        return "the backend's key is not this client's"

    def tick(self) -> Done:
        """Fire due timers: call deadlines, connect waits, Busy back-offs, and the
        liveness check (which may fill :attr:`pings` and :attr:`suspects`)."""
        timers = self.timers
        if not timers:
            return []
        now = self.clock()
        done: Done = []
        while timers and timers[0][0] <= now:
            when, _, call_id, what = heapq.heappop(timers)
            if not call_id:  # 0: the liveness check, not a call's timer
                self._check_liveness(now)
                continue
            call = self.calls.get(call_id)
            if call is None:
                continue
            if what == "deadline":
                if call.deadline == when:
                    self._finish(
                        call,
                        False,
                        CallTimeoutError(
                            f"task {call.task!r} got no answer within its timeout; it may "
                            "still run on the backend. Pass a larger timeout= if it is slow."
                        ),
                        done,
                    )
            elif what == "park":
                if call.wait_until == when and call.id in self._parked:
                    del self._parked[call.id]
                    call.wait_until = None
                    self._finish(call, False, self._not_available(call), done)
            elif what == "resend":
                if call.backend is None and call.id not in self._parked:
                    self._route(call)
        return done

    def next_wakeup(self) -> float | None:
        """Monotonic time of the next timer, or None."""
        timers = self.timers
        while timers and timers[0][2] and timers[0][2] not in self.calls:
            heapq.heappop(timers)  # the timer of a call already resolved
        return timers[0][0] if timers else None

    # -- liveness ---------------------------------------------------------------

    def take_pings(self) -> list[str]:
        """Endpoints to send a PING to now (:meth:`ping` queues it); empties the list."""
        pings, self.pings = self.pings, []
        return pings

    def take_suspects(self) -> list[str]:
        """Endpoints silent for too long; empties the list. For each, the driver
        reads what its socket already holds, then calls :meth:`check_suspect`."""
        suspects, self.suspects = self.suspects, []
        return suspects

    def ping(self, endpoint: str) -> None:
        """Queue a PING for ``endpoint`` (sent with :meth:`messages`). Its call id is a
        fresh one, never a call's, so its PONG is told apart from replies."""
        self.control.append((endpoint, (_PING, self._wire_id, next(self._ids), 0, 0, b"")))

    def check_suspect(self, endpoint: str) -> Done | None:
        """Decide on a backend :meth:`take_suspects` listed, once the driver has read
        what its socket held: None when it was heard from meanwhile (or is no longer
        connected); else it is lost -- as :meth:`backend_down`, whose resolved calls
        are returned -- and the driver must replace its connection."""
        b = self.backends.get(endpoint)
        if b is None or b.state not in (UP, STOPPING, DRAINING) or b.ping_at is None:
            return None
        if b.answered + b.heard != b.seen:
            b.seen, b.heard_at, b.ping_at = b.answered + b.heard, self.clock(), None
            return None
        return self.backend_down(
            endpoint, f"no answer to PING: silent for over {self.heartbeat_timeout:g} s"
        )

    def _arm_liveness(self, now: float) -> None:
        self._liveness_armed = True
        heapq.heappush(
            self.timers, (now + (self.heartbeat_interval or 0.0), next(self._seq), 0, "liveness")
        )

    def _check_liveness(self, now: float) -> None:
        """One look at every connected backend (see *Liveness* in the module docstring)."""
        self._liveness_armed = False
        interval = self.heartbeat_interval
        if not interval:
            return
        timeout = self.heartbeat_timeout
        grace = max(interval, timeout - interval)
        idle = IDLE_PING_FACTOR * timeout
        connected = False
        for b in self._blist:
            if b.state not in (UP, STOPPING, DRAINING):
                continue
            connected = True
            heard = b.answered + b.heard
            if heard != b.seen:
                b.seen, b.heard_at, b.ping_at = heard, now, None
                continue
            quiet = now - b.heard_at
            if b.ping_at is None:
                if quiet >= interval and (b.calls or quiet >= idle):
                    b.ping_at = now
                    b.pings += 1
                    self.pings.append(b.endpoint)
            elif quiet >= timeout and now - b.ping_at >= grace:
                self.suspects.append(b.endpoint)
        if connected:  # else backend_up arms it again
            self._arm_liveness(now)

    # -- internals --------------------------------------------------------------

    def _timer(self, when: float, call: PendingCall, what: str) -> None:
        heapq.heappush(self.timers, (when, next(self._seq), call.id, what))

    def _route(self, call: PendingCall) -> None:
        call.on_wire = False
        if call.target is not None:
            b = self.backends.get(call.target)
            if b is not None and b.state not in (UP, STOPPING, DRAINING):  # a stopping one still
                b = None  # answers admin signals
        else:
            slot = self.dispatch.pick(len(self._waiting))
            if slot is None:
                if self.dispatch.up_count:  # out of credit: wait here for the best one
                    call.backend = None
                    self._waiting.append(call)
                    return
                b = None
            else:
                b = self._slot_backend(slot, call)
        if b is None:
            self._park(call)
            return
        self._assign(b, call)

    def _slot_backend(self, slot: Any, call: PendingCall) -> BackendState | None:
        """The backend of the dispatcher's ``slot`` for ``call``; another when that one
        refused it with Stopping (None: no other is up)."""
        b = self.backends[slot.key]
        if call.refused_by and b.endpoint in call.refused_by:
            return self._other_backend(call.refused_by)
        return b

    def _assign(self, b: BackendState, call: PendingCall) -> None:
        """``call`` goes to ``b`` (charged to its credit) and to the outbox."""
        call.backend = b.endpoint
        b.calls[call.id] = call
        slot = b.slot
        call.ahead = slot.in_flight + slot.others
        self.dispatch.sent(slot)
        self.outbox.append(call)

    def _settle(self, b: BackendState, call: PendingCall, measured: bool = False) -> None:
        """``call`` leaves ``b`` (answered, refused, lost, withdrawn): its credit comes
        back, and with ``measured`` (it ran there and this is its reply) its latency
        and the load in the reply teach the dispatcher. Waiting calls may go now."""
        if b.calls.pop(call.id, None) is None:
            return
        if b.draining and not b.calls:
            self._retire(b)
        if measured and call.on_wire and call.target is None and b.load_at is not None:
            latency = b.load_at - call.sent_at
            self.dispatch.answered(b.slot, latency, call.ahead, b.queued + b.running)
        else:
            self.dispatch.answered(b.slot)
        if self._waiting:
            self._release()

    def _release(self) -> None:
        """Send waiting calls, oldest first, while a backend has credit for them."""
        waiting = self._waiting
        while waiting:
            call = waiting[0]
            if call.done or call.backend is not None:
                waiting.popleft()
                continue
            slot = self.dispatch.pick(len(waiting) - 1)
            if slot is None:
                return
            waiting.popleft()
            b = self._slot_backend(slot, call)
            if b is None:
                self._park(call)
                continue
            call.on_wire = False
            self._assign(b, call)

    def _set_state(self, b: BackendState, state: str) -> None:
        """``b`` is in ``state`` now: only an UP backend takes new calls. When none is
        left, the calls waiting for credit wait for a backend instead (parked)."""
        if b.draining and state in (UP, STOPPING):
            state = DRAINING
        if b.state != state:
            b.state, b.since = state, self.clock()
        if state == UP:
            self.dispatch.up(b.endpoint, int(b.info.get("workers") or 1))
            if self._waiting:
                self._release()
            return
        self.dispatch.down(b.endpoint)
        if self._waiting and not self.dispatch.up_count:
            waiting, self._waiting = self._waiting, collections.deque()
            for call in waiting:
                if not call.done and call.backend is None:
                    self._park(call)

    def _other_backend(self, excluded: Iterable[str], room: bool = False) -> BackendState | None:
        """The up backend not in ``excluded`` expected to finish a call soonest, or None.
        ``room``: only one with credit left that has not answered Busy lately. O(N):
        for the Busy and Stopping paths, not the dispatcher's."""
        now = self.clock() if room else 0.0
        best: BackendState | None = None
        for b in self._blist:
            if b.state != UP or b.endpoint in excluded:
                continue
            if room and (b.busy_until > now or b.slot.credit <= 0):
                continue
            if best is None or b.slot.expected() < best.slot.expected():
                best = b
        return best

    def _park(self, call: PendingCall) -> None:
        if call.wait_until is None:
            # A call no backend could ever serve (each ruled itself out) fails on the
            # next tick, else it waits up to connect_timeout.
            now = self.clock()
            wait = 0.0 if self._fatal_for(call) is not None else self.connect_timeout
            call.wait_until = now + wait
            self._timer(call.wait_until, call, "park")
        self._parked[call.id] = call

    def _not_available(self, call: PendingCall) -> TaskItError:
        """The error of a call that found no backend up within ``connect_timeout``;
        it names each backend's last connection error (a refused handshake says so).
        When no backend can serve it at all, the typed error of that (e.g.
        :class:`CodecNotAllowedError`, :class:`ProtocolVersionError`)."""
        fatal = self._fatal_for(call)
        if fatal is not None:
            return fatal(call.task)
        if call.target is not None:
            where = f"backend {call.target} is not reachable"
            named = [b for b in self._blist if b.endpoint == call.target]
        elif len(self._blist) == 1:
            where = f"backend {self._blist[0].endpoint} is not reachable"
            named = self._blist
        elif self.backends:
            where = f"none of the backends ({', '.join(self.backends)}) is reachable"
            named = self._blist
        else:
            return BackendNotAvailableError(
                "this FrontEnd has no backends; pass backends= or call add_backends()"
            )

        def error(b: BackendState) -> str | None:
            return _HANDSHAKE_SILENT if b.state == HANDSHAKE else b.last_error

        errors = [b for b in named if error(b)]
        if len(errors) == 1 and len(named) == 1:
            why = f"; last error: {error(errors[0])}"
        else:
            why = "".join(f"; {b.endpoint}: {error(b)}" for b in errors)
        return BackendNotAvailableError(
            f"{where} (waited {self.connect_timeout:g} s for task {call.task!r}{why}); "
            "start a backend there or check host, port and keys"
        )

    def _detach(self, call: PendingCall, measured: bool = False) -> None:
        self.calls.pop(call.id, None)
        self._parked.pop(call.id, None)
        b = self.backends.get(call.backend or "")
        if b is not None:
            self._settle(b, call, measured)

    def _finish(
        self, call: PendingCall, ok: bool, value: Any, done: Done, measured: bool = False
    ) -> None:
        """Resolve ``call`` into ``done`` (once); ``measured``: by its backend's reply
        to it having run (a service-time sample, see :meth:`_settle`)."""
        if call.done:
            return
        call.done = True
        self._detach(call, measured)
        done.append((call, ok, value))
        if call.cancel_hook is not None:
            call.cancel_hook()

    def _bad_codec(self, call: PendingCall, codec_id: int, endpoint: str, done: Done) -> None:
        self.stats["bad_replies"] += 1
        self._finish(
            call,
            False,
            DecodeError(
                f"backend {endpoint} answered task {call.task!r} in codec id {codec_id}, "
                f"which this client does not accept (it sent {self.codec.name!r})"
            ),
            done,
        )

    def _unverified(self, b: BackendState, frame: Any) -> Done:
        """A reply whose signature does not check out (missing, wrong, or present where
        this client has no key): never decoded for a value, dropped and counted. One
        exception, so that a key mismatch is an error rather than a hang: the
        backend's refusal (an unsigned JSON ERROR ``Unauthenticated``, see
        protocol.UNAUTHENTICATED) of our HELLO rules the backend out with
        :class:`AuthenticationError`; of one of our calls on that backend fails that
        call so -- or, when it says the backend holds no handshake for this
        connection (protocol.NO_SESSION), puts the calls on it back as never run
        and has the driver replace the connection (:meth:`take_resets`). A forger
        can do no more with it than by cutting the connection: fail a call, never
        complete one."""
        self.stats["bad_signatures"] += 1
        head = peek(frame)
        if head is None or head[0] != _ERROR or head[1] != _JSON_ID or len(frame) > _REFUSAL_MAX:
            return []
        call_id = head[2]
        call = self.calls.get(call_id)
        hello = call_id == b.hello_id and b.state == HANDSHAKE
        if not hello and (call is None or call.backend != b.endpoint):
            return []
        try:
            items = parse(frame)  # unsigned, or SignatureError
            if len(items) != 1:
                return []
            type_name, args, _ = decode_error(self._reply_codecs[_JSON_ID], bytes(items[0].body))
        except (DecodeError, ProtocolError):  # SignatureError included
            return []
        if type_name != UNAUTHENTICATED:
            return []
        done: Done = []
        if hello:
            self._hello_refused(b, _JSON_ID, items[0].body, done)
        elif args and args[0] == NO_SESSION:
            self._no_session(b, done)
        else:
            self._refused_signature(call, b.endpoint, args, done)  # type: ignore[arg-type]
        return done

    def _no_session(self, b: BackendState, done: Done) -> None:
        """The backend holds no handshake for this connection (it forgot it, or never
        saw the HELLO): the calls on it did not run -- put them back, unsent -- and
        the connection must be replaced (a new one says HELLO)."""
        ep = b.endpoint
        if ep not in self.resets:
            self.resets.append(ep)
        for call in b.calls.values():
            if call.on_wire:
                call.attempts -= 1  # refused unrun: does not use up a retry
                call.on_wire = False
        done += self.backend_down(ep, "lost its handshake with this client (no session)")

    def _refused_signature(self, call: PendingCall, endpoint: str, args: Any, done: Done) -> None:
        """The backend at ``endpoint`` refused ``call``'s signature (it did not run)."""
        # In no interface's words (key=, --key-file): the CLI shows this line as it is.
        self.stats["refused_signatures"] += 1
        why = self._why_keys(args)
        b = self.backends.get(endpoint)
        if b is not None:
            b.failed += 1
            b.last_error = "refused the signature: the keys differ, or one side has none"
        self._finish(
            call,
            False,
            AuthenticationError(
                f"backend {endpoint} refused the signature of task {call.task!r}: the keys "
                f"differ, or one side has none ({why}); give both sides the same key"
            ),
            done,
        )

    def _busy(
        self, call: PendingCall, b: BackendState | None, args: Any, tb: str, done: Done
    ) -> None:
        if b is not None:
            b.busy += 1
            self._settle(b, call)
            b.busy_until = self.clock() + backoff_delay(b.busy_streak)
            b.busy_streak += 1
        call.attempts -= 1  # refused unrun: does not use up a retry
        call.backend = None
        call.busy_tries += 1
        if call.busy_tries > self.busy_retries:
            self._finish(
                call,
                False,
                BusyError("Busy", args, tb, call.task, b and b.endpoint),  # type: ignore[arg-type]
                done,
            )
            return
        excluded = {b.endpoint} if b is not None else set()
        other = self._other_backend(excluded | (call.refused_by or set()), room=True)
        if other is not None:
            call.on_wire = False
            self._assign(other, call)  # another backend has room: go now
            return
        # Wait for room: the next answer from a backend frees a slot and sends the
        # oldest waiting call (_slot_freed); a jittered backoff timer is the fallback
        # when no answer comes (the queue is full of other clients' calls). Re-sending
        # every refused call on a timer alone makes them all collide again.
        self._busy_waiting.append(call)
        delay = backoff_delay(call.busy_tries - 1) * (0.5 + self._jitter())
        self._timer(self.clock() + delay, call, "resend")

    def _slot_freed(self) -> None:
        """A backend answered a call: re-send the oldest call waiting after Busy."""
        waiting = self._busy_waiting
        while waiting:
            call = waiting.popleft()
            if not call.done and call.backend is None and call.id not in self._parked:
                self._route(call)
                return

    def _notice(self, endpoint: str, codec_id: int, body: Any) -> Done:
        """An ERROR with call id 0 is the backend's word about itself. ``Stopping`` (a
        graceful stop began) makes it take no new call from this client, as a
        ``Stopping`` reply would, until it is reconnected (a new process). ``Stopped``
        (the stop is over: it answered every call it read and reads no more) means
        the calls still unanswered on it never ran: they are re-routed as if refused
        with ``Stopping``. Returns the calls that are resolved now."""
        codec = self._reply_codecs.get(codec_id)
        b = self.backends.get(endpoint)
        try:
            error = decode_error(codec, bytes(body)) if codec is not None else None
        except (DecodeError, ProtocolError):
            error = None
        type_name = error[0] if error is not None else None
        if type_name not in ("Stopping", "Stopped") or b is None or error is None:
            self.stats["bad_replies"] += 1
            return []
        if b.state == UP:
            self._set_state(b, STOPPING)
        done: Done = []
        if type_name == "Stopped":
            # Calls not on the wire yet are re-routed when the connection drops.
            sent = [c for c in b.calls.values() if c.on_wire]
            for call in sorted(sent, key=lambda c: c.id):
                self._stopping(call, b, error[1], error[2], done)
        return done

    def _stopping(
        self, call: PendingCall, b: BackendState | None, args: Any, tb: str, done: Done
    ) -> None:
        call.attempts -= 1  # refused unrun
        call.backend = None
        if b is not None:
            self._settle(b, call)
            if b.state == UP:
                self._set_state(b, STOPPING)
            if call.refused_by is None:
                call.refused_by = set()
            call.refused_by.add(b.endpoint)
        if self._other_backend(call.refused_by or ()) is None:
            self._finish(
                call,
                False,
                StoppingError("Stopping", args, tb, call.task, b and b.endpoint),  # type: ignore[arg-type]
                done,
            )
        else:
            self._route(call)
