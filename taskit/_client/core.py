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
    for call in core.drain_outbox():          # calls ready to go on the wire
        ok = try_send(call.backend, core.frames_for(call))
        if not ok: done = core.send_failed(call)   # zmq.Again: the peer is gone
    ... when frames arrive from backend `ep`:
        done = core.on_message(ep, frames)    # -> list of (call, ok, value)
    ... socket monitor:   core.backend_up(ep) / done = core.backend_down(ep, why)
    ... a connection closed before it came up (handshake refused, not taskit):
                          done, delay, line = core.connect_refused(ep, why)
                          -> connect again after ``delay`` s; log ``line`` if any
    ... every loop turn:  done = core.tick()  # timeouts, connect waits, backoff,
                                              # liveness checks
                          core.next_wakeup()  # monotonic time to poll until, or None
    ... after a tick:     for ep in core.take_pings(): send core.ping_frames() to ep
                          for ep in core.take_suspects():
                              read what ep's socket holds (core.on_message), then
                              done = core.check_suspect(ep)  # None: it spoke meanwhile
                              if done is not None: replace ep's socket (it is lost)
    ... a waiter gave up: core.cancel(call)
    for call, ok, value in done: resolve call.waiter (value is the result, or the
                                 exception instance to raise when ok is False)

Every returned ``(call, ok, value)`` has left the core: it is resolved exactly
once. Calls put back for a re-send (``retries``, ``Busy``) show up again in
:meth:`ClientCore.drain_outbox`.

Semantics decided here:

- **Routing**: a call goes to the ``up`` backend with the fewest calls in flight
  from this client; ties go round-robin. Backends that answered ``Busy`` recently
  are avoided while another is available. No backend up: the call waits up to
  ``connect_timeout`` for one, then fails with :class:`BackendNotAvailableError`.
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
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

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
    MessageTooLargeError,
    ProtocolError,
    SignatureError,
    StoppingError,
    TaskItError,
    UnknownTaskError,
)
from taskit.protocol import (
    DEFAULT_PORT,
    HEADER,
    MAGIC,
    NO_KEY_HERE,
    UNAUTHENTICATED,
    Kind,
    decode_error,
    pack,
    peek_call_id,
    unpack,
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
    "STOPPING",
]

CONNECTING = "connecting"  # never connected yet, no evidence of failure
UP = "up"  # connected (handshake done): calls may be sent
DOWN = "down"  # disconnected, or connecting failed; libzmq keeps retrying
STOPPING = "stopping"  # answered Stopping: connected but takes no new calls

# A connected backend with no call in flight is pinged after this many times
# heartbeat_timeout of silence: rarely (idle traffic stays low), yet often enough
# that a backend frozen while idle is found before long.
IDLE_PING_FACTOR = 4

_SCHEMES = ("tcp://", "ipc://", "inproc://")
_HEADER_UNPACK = HEADER.unpack
_HEADER_PACK = HEADER.pack
_RESULT, _ERROR, _CALL = int(Kind.RESULT), int(Kind.ERROR), int(Kind.CALL)
_JSON_ID = get_codec("json").wire_id
_REFUSAL_MAX = 1024  # bytes: a backend's Unauthenticated body is ~100; unverified, never more
_PING, _PONG = int(Kind.PING), int(Kind.PONG)
_BUFFER_CODECS = frozenset((2, 3))  # msgpack and pickle decode from a memoryview

# Remote error type names the backend raises itself -> the exception class.
_ERROR_CLASSES: dict[str, type[BackendProcessingError]] = {
    "UnknownTask": UnknownTaskError,
    "CodecNotAllowed": CodecNotAllowedError,
    "Busy": BusyError,
    "Stopping": StoppingError,
}


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
        "sent_at",
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
        self.sent_at = 0.0  # when last sent, kept only when latency is observed

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

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
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
    ) -> None:
        self.codec = get_codec(codec)
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
        # Read-only for drivers (a cheap "anything to do?" test): calls to send, timers.
        self.outbox: list[PendingCall] = []
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
        }
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
        """The connection to ``endpoint`` is ready: parked calls may go out."""
        b = self.backends.get(endpoint)
        if b is None:
            return
        if b.state != UP:
            b.state, b.since = UP, self.clock()
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
        was_up = b.state in (UP, STOPPING)
        b.ping_at = None
        if b.state != DOWN:
            b.state, b.since = DOWN, self.clock()
            if was_up:
                b.disconnects += 1
        b.last_error = reason
        if not b.calls:
            return []
        victims = sorted(b.calls.values(), key=lambda c: c.id)
        b.calls.clear()
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

    def choose(self) -> BackendState | None:
        """The backend for the next call (fewest in flight, ties round-robin), or None."""
        backends = self._blist
        n = len(backends)
        if n == 1:  # the common case, on the hot path
            b = backends[0]
            return b if b.state == UP else None
        now = self.clock()
        best: BackendState | None = None
        best_key: tuple[bool, int] | None = None
        best_i = 0
        rr = self._rr
        for i in range(n):
            j = (rr + i) % n
            b = backends[j]
            if b.state != UP:
                continue
            key = (b.busy_until > now, len(b.calls))  # not-busy first, then load
            if best_key is None or key < best_key:
                best, best_key, best_i = b, key, j
        if best is not None:
            self._rr = (best_i + 1) % n
        return best

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
        return [c for c in out if not c.done and c.backend is not None]

    def frames_for(self, call: PendingCall) -> list[bytes]:
        """The CALL frames of ``call`` (signed when a key is set); counts the attempt."""
        call.attempts += 1
        call.on_wire = True
        b = self.backends.get(call.backend or "")
        if b is not None:
            b.sent += 1
        if self.observe is not None:  # OBS HOOK: metrics on
            call.sent_at = self.clock()
        if self.signer is None:  # pack() inlined: the hot path
            return [MAGIC, _HEADER_PACK(_CALL, call.codec.wire_id, call.id), call.body]
        return pack(Kind.CALL, call.codec.wire_id, call.id, call.body, self.signer)

    def send_failed(self, call: PendingCall) -> Done:
        """The driver could not hand ``call`` to its backend's socket (no connected peer,
        so its connection just dropped): undo the attempt and treat the backend as down
        until the socket monitor reports it connected again. Returns calls resolved now."""
        call.attempts -= 1
        call.on_wire = False
        b = self.backends.get(call.backend or "")
        if b is None:
            if not call.done:
                call.backend = None
                self._route(call)
            return []
        b.sent -= 1
        return self.backend_down(b.endpoint, "no connection")

    def cancel(self, call: PendingCall) -> None:
        """Forget ``call`` (its waiter gave up); a late reply is ignored."""
        if call.done:
            return
        call.done = True
        self._detach(call)

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

    def on_message(self, endpoint: str, frames: Sequence[bytes]) -> Done:
        """Handle frames received from ``endpoint``; returns the calls resolved by them.

        The body frame may be a ``memoryview`` (a driver's zero-copy receive).

        Malformed, badly signed or unknown-id replies are dropped and counted in
        :attr:`stats`; they never raise.
        """
        if self.signer is None and len(frames) == 3 and frames[0] == MAGIC and len(frames[1]) == 10:
            kind, codec_id, call_id = _HEADER_UNPACK(frames[1])  # the hot path, pre-checked
            body = frames[2]
        else:
            try:
                kind, codec_id, call_id, body = unpack(frames, self.signer)
            except SignatureError:
                return self._unverified(endpoint, frames)
            except ProtocolError:
                self.stats["bad_replies"] += 1
                return []
        call = self.calls.get(call_id)
        if call is None:  # a PONG, a notice, or a reply to a call given up on: it lives
            b = self.backends.get(endpoint)
            if b is not None:
                b.heard += 1
            if call_id == 0 and kind == _ERROR:
                return self._notice(endpoint, codec_id, body)
            if kind != _PONG:
                self.stats["late_replies"] += 1
            return []
        b = self.backends.get(call.backend or "")
        if kind == _RESULT and codec_id == self._wire_id and b is not None and not call.done:
            # the hot path: a result in our own codec for a call on a known backend
            # (what _finish and _detach do, inlined)
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
                self.observe(b.endpoint, self.clock() - call.sent_at)
            call.done = True
            del self.calls[call_id]
            b.calls.pop(call_id, None)
            if self._parked:
                self._parked.pop(call_id, None)
            if self._busy_waiting:
                self._slot_freed()
            return [(call, True, value)]
        done = []
        if b is not None:
            b.heard += 1
        if kind == _RESULT:
            codec = self._reply_codecs.get(codec_id)
            if codec is None:
                self._bad_codec(call, codec_id, endpoint, done)
                return done
            if type(body) is memoryview and codec.wire_id not in _BUFFER_CODECS:
                body = bytes(body)  # a driver's zero-copy buffer; this codec wants bytes
            try:
                value = codec.decode(body)
            except DecodeError as e:
                self._finish(call, False, e, done)
                return done
            if b is not None:
                b.answered += 1
                b.busy_streak = 0
                if self.observe is not None:  # OBS HOOK: metrics on
                    self.observe(b.endpoint, self.clock() - call.sent_at)
            self._finish(call, True, value, done)
            if self._busy_waiting:
                self._slot_freed()
        elif kind == _ERROR:
            codec = self._reply_codecs.get(codec_id)
            if codec is None:
                self._bad_codec(call, codec_id, endpoint, done)
                return done
            if type(body) is memoryview:
                body = bytes(body)
            try:
                type_name, args, tb = decode_error(codec, body)
            except (DecodeError, ProtocolError) as e:
                self._finish(call, False, e, done)
                return done
            if type_name == UNAUTHENTICATED:
                self._refused_signature(call, endpoint, args, done)
            elif type_name == "Busy" and call.target is None:
                self._busy(call, b, args, tb, done)
            elif type_name == "Stopping" and call.target is None:
                self._stopping(call, b, args, tb, done)
            else:
                if b is not None:
                    b.failed += 1
                    if self.observe is not None:  # OBS HOOK: metrics on
                        self.observe(b.endpoint, self.clock() - call.sent_at)
                self._finish(
                    call, False, error_from_reply(type_name, args, tb, call.task, endpoint), done
                )
                if self._busy_waiting:
                    self._slot_freed()
        else:
            self.stats["bad_replies"] += 1
        return done

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
        """Endpoints to send a PING to now (:meth:`ping_frames`); empties the list."""
        pings, self.pings = self.pings, []
        return pings

    def take_suspects(self) -> list[str]:
        """Endpoints silent for too long; empties the list. For each, the driver
        reads what its socket already holds, then calls :meth:`check_suspect`."""
        suspects, self.suspects = self.suspects, []
        return suspects

    def ping_frames(self) -> list[bytes]:
        """The frames of one PING (signed when a key is set). Its call id is a fresh
        one, never a call's, so its PONG is told apart from replies."""
        return pack(_PING, self._wire_id, next(self._ids), b"", self.signer)

    def check_suspect(self, endpoint: str) -> Done | None:
        """Decide on a backend :meth:`take_suspects` listed, once the driver has read
        what its socket held: None when it was heard from meanwhile (or is no longer
        connected); else it is lost -- as :meth:`backend_down`, whose resolved calls
        are returned -- and the driver must replace its connection."""
        b = self.backends.get(endpoint)
        if b is None or b.state not in (UP, STOPPING) or b.ping_at is None:
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
            if b.state != UP and b.state != STOPPING:
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
            if b is not None and b.state not in (UP, STOPPING):  # a stopping one still
                b = None  # answers admin signals
        elif len(self._blist) == 1 and not call.refused_by:  # the hot path: choose() inlined
            b = self._blist[0]
            if b.state != UP:
                b = None
        else:
            b = self.choose()
            if b is not None and call.refused_by and b.endpoint in call.refused_by:
                b = self._choose_excluding(call.refused_by)
        if b is None:
            self._park(call)
            return
        call.backend = b.endpoint
        b.calls[call.id] = call
        self.outbox.append(call)

    def _choose_excluding(self, refused: set[str]) -> BackendState | None:
        best = None
        for b in self.backends.values():
            if b.state == UP and b.endpoint not in refused:
                if best is None or len(b.calls) < len(best.calls):
                    best = b
        return best

    def _park(self, call: PendingCall) -> None:
        if call.wait_until is None:
            call.wait_until = self.clock() + self.connect_timeout
            self._timer(call.wait_until, call, "park")
        self._parked[call.id] = call

    def _not_available(self, call: PendingCall) -> TaskItError:
        """The error of a call that found no backend up within ``connect_timeout``;
        it names each backend's last connection error (a refused handshake says so)."""
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
        errors = [b for b in named if b.last_error]
        if len(errors) == 1 and len(named) == 1:
            why = f"; last error: {errors[0].last_error}"
        else:
            why = "".join(f"; {b.endpoint}: {b.last_error}" for b in errors)
        return BackendNotAvailableError(
            f"{where} (waited {self.connect_timeout:g} s for task {call.task!r}{why}); "
            "start a backend there or check host, port and keys"
        )

    def _detach(self, call: PendingCall) -> None:
        self.calls.pop(call.id, None)
        self._parked.pop(call.id, None)
        b = self.backends.get(call.backend or "")
        if b is not None:
            b.calls.pop(call.id, None)

    def _finish(self, call: PendingCall, ok: bool, value: Any, done: Done) -> None:
        if call.done:
            return
        call.done = True
        self._detach(call)
        done.append((call, ok, value))

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

    def _unverified(self, endpoint: str, frames: Sequence[Any]) -> Done:
        """A reply whose signature does not check out (missing, wrong, or present where
        this client has no key): never decoded for a value, dropped and counted. One
        exception, so that a key mismatch is an error rather than a hang: the
        backend's refusal of our signature (an unsigned JSON ERROR ``Unauthenticated``
        for one of our calls on that backend, see protocol.UNAUTHENTICATED) fails that
        call with :class:`AuthenticationError`. A forger can do no more with it than
        by cutting the connection: fail a call, never complete one."""
        self.stats["bad_signatures"] += 1
        call_id = peek_call_id(frames)
        call = None if call_id is None else self.calls.get(call_id)
        if call is None or call.backend != endpoint or len(frames) != 3:
            return []
        kind, codec_id, _ = _HEADER_UNPACK(frames[1])
        json = self._reply_codecs.get(_JSON_ID)
        if kind != _ERROR or codec_id != _JSON_ID or json is None or len(frames[2]) > _REFUSAL_MAX:
            return []
        try:
            type_name, args, _ = decode_error(json, bytes(frames[2]))
        except (DecodeError, ProtocolError):
            return []
        if type_name != UNAUTHENTICATED:
            return []
        done: Done = []
        self._refused_signature(call, endpoint, args, done)
        return done

    def _refused_signature(self, call: PendingCall, endpoint: str, args: Any, done: Done) -> None:
        """The backend at ``endpoint`` refused ``call``'s signature (it did not run)."""
        # In no interface's words (key=, --key-file): the CLI shows this line as it is.
        if self.signer is None:
            why = "this client has no key"
        elif args and args[0] == NO_KEY_HERE:
            why = "the backend has none"
        else:
            why = "the backend's key is not this client's"
        self.stats["refused_signatures"] += 1
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
            b.calls.pop(call.id, None)
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
        other = self.choose()
        if other is not None and other.busy_until <= self.clock():
            self._route(call)  # another backend has room: go now
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
            b.state, b.since = STOPPING, self.clock()
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
            b.calls.pop(call.id, None)
            if b.state == UP:
                b.state, b.since = STOPPING, self.clock()
            if call.refused_by is None:
                call.refused_by = set()
            call.refused_by.add(b.endpoint)
        if self._choose_excluding(call.refused_by or set()) is None:
            self._finish(
                call,
                False,
                StoppingError("Stopping", args, tb, call.task, b and b.endpoint),  # type: ignore[arg-type]
                done,
            )
        else:
            self._route(call)
