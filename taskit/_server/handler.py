"""What a BackEnd does with one request: sans-I/O, no socket, no thread of its own.

:meth:`RequestHandler.handle` takes one received message (the routing id and
its one frame, wire protocol v2: doc/protocol.md) and decides, for each item
of it: drop it (counted), answer it now (a reply item: refusals, PONG,
WELCOME, CANCELLED), or run it (a :class:`Call` out, marked inline or pool).
Whoever ran the call turns its outcome into a reply item with
:meth:`RequestHandler.result_item` / :meth:`RequestHandler.error_item`; the
I/O loop (:mod:`taskit._server.loop`) packs reply items into frames when it
sends them (:meth:`RequestHandler.pack`: the load fields and, with a key, the
connection's seal are filled in then, in send order).
``tests/test_server_handler.py`` drives this module without sockets.

A reply item is a tuple ``(kind, codec_id, call_id, body)``. A complete frame
(``bytes``) is sent as it is: the WELCOME of a keyed backend (sealed with the
handshake's session) and the unsigned ``Unauthenticated`` answers.

The handler's counters (:class:`~taskit._server.accounting.Accounting`, the
peer ledger) are shared with the loop under one lock, the loop's (it also
guards the socket); the handler takes it briefly to count, never around a send.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol, final

from taskit import __version__ as _version
from taskit import _tracing, protocol
from taskit._server.accounting import QUALIFY, Accounting, PeerLedger, TracebackLimiter
from taskit._server.options import split_entry
from taskit._wire import ZERO_COPY
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer, as_body
from taskit.errors import (
    DecodeError,
    ProtocolError,
    RemoteTaskError,
    RemoteTraceback,
    SignatureError,
)
from taskit.log import ERROR, IMPORTANT, INFO
from taskit.protocol import KILL, STATS, STATUS, STOP, TASKS, Kind, ReplayError, Session

__all__ = [
    "Call",
    "RequestHandler",
    "Server",
    "STOPPING",
    "QUEUED",
    "RUNNING",
    "CANCELLED",
    "MAX_SESSIONS",
    "expired_message",
]

_log = logging.getLogger("taskit.backend")

_CALL = int(Kind.CALL)
_ERROR = int(Kind.ERROR)
_RESULT = int(Kind.RESULT)
_PING = int(Kind.PING)
_HELLO = int(Kind.HELLO)
_CANCEL = int(Kind.CANCEL)
_JSON_ID = JSONCodec.wire_id
_REPLY_KINDS = frozenset(
    int(k)
    for k in (Kind.RESULT, Kind.ERROR, Kind.PONG, Kind.WELCOME, Kind.CANCELLED, Kind.NOT_CANCELLED)
)
_HEAD_SIZE = protocol.HEAD_SIZE
_ITEM_SIZE = protocol.ITEM_SIZE
_unpack_head = protocol.HEAD.unpack_from
_pack_one = protocol.pack_one
_pack_items = protocol.pack_items
_pack_item = protocol.ITEM.pack
_UNSIGNED = protocol.PREAMBLE + b"\x00"  # an unsigned message's preamble
_monotonic = time.monotonic
# Clients remembered per generation for the stop notice (two generations are kept).
_PEER_GENERATION = 10_000
# Keyed backend: the sessions kept (one per connection that said HELLO); past this
# many the oldest is forgotten (its client is answered NO_SESSION and says HELLO again).
MAX_SESSIONS = 65_536
_READ_ONLY_SIGNALS = frozenset((STATUS, STATS, TASKS))
STOPPING = "this backend is stopping and accepts no new calls; use another backend"
STOPPED = "this backend has stopped: a call it did not answer never ran there"
_AGENT = f"taskit/{_version} python"

# A pool call's state (Call.state): a worker's QUEUED -> RUNNING and a CANCEL's
# QUEUED -> CANCELLED are both made under the lock, so exactly one of them wins.
QUEUED, RUNNING, CANCELLED = 0, 1, 2


def expired_message(budget_ms: int) -> str:
    """The text of the ``Expired`` error for a call sent with ``budget_ms``."""
    return (
        f"the call's deadline passed before it could start (budget {budget_ms} ms); it did not run"
    )


class Server(Protocol):
    """What the handler asks of the BackEnd it serves (admin signals, logs)."""

    @property
    def task_count(self) -> int: ...

    @property
    def endpoint(self) -> str: ...

    def stats(self) -> dict[str, Any]: ...


def _safe_repr(obj: Any) -> str:
    """repr() that never raises (a task's exception arguments are arbitrary objects)."""
    try:
        return repr(obj)
    except Exception:
        return f"<{type(obj).__name__} object (repr failed)>"


@final
class Call:
    """One accepted call, from its request to its reply: the record the I/O loop
    moves to the thread that runs it (as ``concurrent.futures`` moves a
    ``_WorkItem``).

    ``ident``: the caller's routing id; ``codec``: the request's (the reply's too);
    ``size``: the request's bytes (charged to the caller's ledger); ``t0``: when it
    was handed to the pool (``time.perf_counter()``; set by the loop); ``fn``,
    ``args``, ``kwargs``: what to run; ``inline``: run it on the I/O thread;
    ``pass_backend``: the task wants the BackEnd as its first argument;
    ``budget``: the CALL's time budget in ms (0: none) and ``expires`` the
    ``time.monotonic()`` past which it must not start (0.0: never); ``state``:
    QUEUED, RUNNING or CANCELLED (pool calls; changed under the lock); ``fut``:
    a process pool's future for it.
    """

    __slots__ = (
        "ident",
        "codec",
        "call_id",
        "name",
        "size",
        "t0",
        "fn",
        "args",
        "kwargs",
        "inline",
        "pass_backend",
        "budget",
        "expires",
        "state",
        "meta",
        "fut",
    )

    def __init__(
        self,
        ident: bytes,
        codec: Any,
        call_id: int,
        name: str,
        size: int,
        fn: Callable[..., Any],
        args: list,
        kwargs: dict,
        inline: bool,
        pass_backend: bool,
        budget: int = 0,
        expires: float = 0.0,
    ) -> None:
        self.ident = ident
        self.codec = codec
        self.call_id = call_id
        self.name = name
        self.size = size
        self.t0 = 0.0
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.inline = inline
        self.pass_backend = pass_backend
        self.budget = budget
        self.expires = expires
        self.state = QUEUED
        self.meta: dict[str, str] | None = None  # its trace context, or None
        self.fut: Any = None

    def __repr__(self) -> str:
        return f"<Call {self.call_id} {self.name!r} from {self.ident!r}>"


class RequestHandler:
    """Turns requests into decisions and outcomes into reply items (see the module).

    ``owner`` is the BackEnd (what admin tasks and ``<stats>`` are asked about:
    its ``task_count``, ``stats()``, ``endpoint``); ``admin`` the admin task
    functions ``(stop, kill, count)`` answered at once, whatever the tasks dict
    maps them to; ``lock`` the lock guarding the counters. Thread-safe as the
    BackEnd uses it: :meth:`handle` from the thread reading the socket,
    :meth:`result_item`, :meth:`error_item` and :meth:`pack` from any thread
    (:meth:`pack` with the lock held).
    """

    def __init__(
        self,
        owner: Server,
        tasks: dict[str, Any],
        lock: Any,
        *,
        codecs: Mapping[int, Any],
        signer: Signer | None,
        admin: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]],
        request_limit: int,
        reply_limit: int,
        max_message_size: int | None,
        max_pending: int | None,
        peers: PeerLedger | None,
        tracebacks: bool = True,
        inline_auto: bool = False,
        inline_names: frozenset[str] = frozenset(),
        note: Callable[[str, str], None] | None = None,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.owner = owner
        self.tasks = tasks
        self.lock = lock
        self.codecs = codecs
        self.signer = signer
        self.admin = admin
        self.request_limit = request_limit
        self.reply_limit = reply_limit
        self.max_message_size = max_message_size
        self.max_pending = max_pending
        self.peers = peers
        self.tracebacks = tracebacks
        self.inline_auto = inline_auto
        self.inline_names = inline_names
        self.verbose = note is not None
        self.note: Callable[[str, str], None] = note or (lambda importance, msg: None)
        self.acct = Accounting()  # counters, under lock
        self.tb_limit = TracebackLimiter()  # tracebacks logged per task and error type
        # OBS HOOKS. Metrics on: called with each decoded call's task name (on the
        # reading thread). A call's trace context: its task runs in a span on the
        # thread running it, unless the tasks run in processes (then the I/O loop
        # keeps the span, see ServerLoop._submit).
        self.on_received: Callable[[str], None] | None = None
        self.trace_in_thread = True
        # A graceful stop has begun: new calls are refused (Stopping).
        self.stopping = False
        # Clients heard from lately (routing ids; two generations bound the memory):
        # told when a graceful stop begins. Written by the reading thread only.
        self.heard: set[bytes] = set()
        self.heard_old: set[bytes] = set()
        # Clients known to be gone (a reply to them was unroutable): their calls still
        # queued are not started. Written under the lock, read without it.
        self.gone: set[bytes] = set()
        # Pool calls accepted and not started, by (routing id, call id): what CANCEL
        # finds. Under the lock.
        self.queued: dict[tuple[bytes, int], Call] = {}
        # Keyed backend: each connection's session, oldest first (insertion order).
        # Written by the reading thread (new) and under the lock (forgotten).
        self.sessions: dict[bytes, Session] = {}
        self.max_sessions = max_sessions
        # The client nonces of the latest HELLOs (2 * max_sessions, oldest forgotten): a
        # HELLO replayed on another connection would open a session no one can use,
        # and evict a real one.
        self.hello_nonces: dict[bytes, None] = {}
        self.started = protocol.new_nonce()  # this BackEnd's start, in every WELCOME
        # The pool's size now, for the WELCOME (set by the loop: a pool may be resized).
        self.workers: Callable[[], int] = lambda: 0
        self.pid = os.getpid()

    # -- from a request to decisions -------------------------------------------------

    def handle(self, ident: bytes, frame: Any) -> Any:
        """Decide what to do with one message: ``frame`` is its one frame (a
        ``zmq.Frame`` or bytes). Never raises for input.

        Returns None (nothing to send: dropped and counted), a reply item to
        send to ``ident``, a complete frame (bytes) to send as it is, a
        :class:`Call` to run (a pool call already counted in flight, charged to
        its peer's ledger and findable by a CANCEL; an inline call is neither:
        it is answered before the next message is read), or for a batch a list
        of those. A frame over ``max_message_size`` is dropped and counted
        before it is copied; a big one is read in place (a memoryview)."""
        n = len(frame)
        if n > self.request_limit:
            self._drop("oversized")
            return None
        if type(frame) is bytes:
            data = frame
        else:
            # A big body stays in ZeroMQ's buffer, for a codec that reads any buffer
            # (a copy of a fresh MiB costs more in page faults than in copying).
            data = frame.bytes if n < ZERO_COPY else frame.buffer
        if self.signer is None and n >= _HEAD_SIZE:
            # The usual request: one unsigned CALL, read with one struct unpack.
            magic, ver, flags, kind, codec_id, _, call_id, a, _b, blen = _unpack_head(data)
            if (
                kind == _CALL
                and call_id
                and _HEAD_SIZE + blen == n
                and flags == 0
                and ver == 2
                and magic == b"TK"
            ):
                if ident not in self.heard:  # a client to tell of a stop
                    self._see_peer(ident)
                body = data[_HEAD_SIZE:]
                codec = self.codecs.get(codec_id)
                if codec is MsgpackCodec or codec is JSONCodec:
                    # The usual body, checked here; anything else (and every error)
                    # takes the general path, which says what is wrong.
                    try:
                        # json is promised bytes; msgpack reads a big body in place
                        value = codec.decode(
                            bytes(body) if codec is JSONCodec and type(body) is not bytes else body
                        )
                    except Exception:
                        value = None
                    if type(value) is list and len(value) == 3:
                        name, args, kwargs = value
                        if (
                            type(name) is str
                            and type(args) is list
                            and type(kwargs) is dict
                            and (not kwargs or all(type(k) is str for k in kwargs))
                        ):
                            expires = _monotonic() + a / 1000 if a else 0.0
                            return self.dispatch(
                                ident, codec, call_id, name, args, kwargs, n, a, expires
                            )
                return self.call(ident, codec_id, call_id, a, body, n)
        return self._items(ident, data)

    def handle_frames(self, ident: bytes, frames: list[Any], count: int) -> list[bytes] | None:
        """A message of ``count`` frames (``frames``: its first two; no v2 message has
        more than one): a v1 CALL gets the v1 ERROR telling its client to upgrade
        (counted refused ProtocolError); anything else is dropped, counted
        malformed. Only the first two frames are read, and copied only when they
        are as short as a v1 magic and header."""
        out = None
        if count >= 3 and len(frames[0]) == len(protocol.V1_MAGIC) and len(frames[1]) == 10:
            out = protocol.v1_refusal([bytes(frames[0]), bytes(frames[1]), b""])
        with self.lock:
            if out is None:
                self.acct.drop("malformed")
            else:
                self.acct.refuse("ProtocolError")
        return out

    def _items(self, ident: bytes, data: Any) -> Any:
        """The general path: any message (signed, a batch, not a CALL)."""
        session = None
        if self.signer is not None:
            session = self.sessions.get(ident)
            if session is None:
                return self._no_session(ident, data)
            first = protocol.peek(data)
            if first is not None and first[0] == _HELLO:
                self._drop("replayed")  # a connection says HELLO once
                return None
        try:
            items = protocol.parse(data, session)
        except ReplayError:
            self._drop("replayed")
            return None
        except SignatureError:
            return self._unauthenticated(data)
        except ProtocolError as e:
            # Answered when it names a request (never a reply kind: two backends
            # must not answer each other's answers).
            first = protocol.peek(data)
            if first is None or first[0] in _REPLY_KINDS or first[2] == 0:
                self._drop("malformed")
                return None
            return self.refusal(JSONCodec, first[2], "ProtocolError", str(e))
        if ident not in self.heard:  # a client (signed, when a key is set) to tell of a stop
            self._see_peer(ident)
        if len(items) == 1:
            return self._item(ident, items[0])
        out: list[Any] = []
        for item in items:
            if item.kind == _CANCEL and item.call_id:
                o = self._cancel_in_batch(out, item.call_id) or self.cancel(ident, item.call_id)
            else:
                o = self._item(ident, item)
            if o is not None:
                out.append(o)
        return out or None

    def _cancel_in_batch(self, out: list[Any], call_id: int) -> tuple | None:
        """A CANCEL of a call earlier in the same batch, not started yet (inline
        calls run only once the batch is read): withdrawn, CANCELLED."""
        for o in out:
            if type(o) is Call and o.call_id == call_id and o.inline and o.state == QUEUED:
                with self.lock:
                    o.state = CANCELLED
                    self.unaccept(o)
                    self.acct.cancelled += 1
                return (int(Kind.CANCELLED), 0, call_id, b"")
        return None

    def _item(self, ident: bytes, item: protocol.Item) -> Any:
        kind, codec_id, call_id, a, _b, body = item
        if call_id == 0:  # reserved for notices: an answer would read as one
            self._drop("malformed")
            return None
        if kind == _CALL:
            return self.call(ident, codec_id, call_id, a, body, len(body) + _ITEM_SIZE)
        if kind == _PING:
            return (int(Kind.PONG), codec_id, call_id, b"")
        if kind == _CANCEL:
            return self.cancel(ident, call_id)
        if kind == _HELLO:  # keyless (a keyed backend answers HELLO in _no_session)
            if self.signer is not None:  # a connection says HELLO once
                self._drop("replayed")
                return None
            try:
                hello = protocol.parse_handshake(body, _HELLO)
            except ProtocolError as e:
                return self.refusal(JSONCodec, call_id, "ProtocolError", str(e))
            return (int(Kind.WELCOME), _JSON_ID, call_id, self.welcome(hello, protocol.new_nonce()))
        return self.refusal(
            JSONCodec,
            call_id,
            "ProtocolError",
            f"a backend accepts CALL, PING, HELLO and CANCEL messages, not {Kind(kind).name}",
        )

    def call(
        self, ident: bytes, codec_id: int, call_id: int, budget: int, body: Any, size: int
    ) -> Any:
        """Decide on one CALL item (``size``: its bytes, the peer ledger's charge)."""
        expires = _monotonic() + budget / 1000 if budget else 0.0
        codec = self.codecs.get(codec_id)
        if codec is None:
            accepted = ", ".join(sorted(c.name for c in self.codecs.values()))
            return self.refusal(
                JSONCodec,
                call_id,
                "CodecNotAllowed",
                f"codec id {codec_id} is not accepted here; this backend accepts {accepted}",
            )
        if type(body) is not bytes and codec is not MsgpackCodec and codec is not PickleCodec:
            body = bytes(body)  # other codecs (json, users') are promised bytes
        try:
            name, args, kwargs, meta = protocol.decode_call(codec, body)
        except DecodeError as e:
            return self.refusal(codec, call_id, "DecodeError", str(e))
        except ProtocolError as e:
            return self.refusal(codec, call_id, "ProtocolError", str(e))
        except Exception as e:  # a user codec that raises something else than DecodeError
            return self.refusal(codec, call_id, "DecodeError", f"{type(e).__name__}: {e}")
        return self.dispatch(ident, codec, call_id, name, args, kwargs, size, budget, expires, meta)

    def dispatch(
        self,
        ident: bytes,
        codec: Any,
        call_id: int,
        name: str,
        args: list,
        kwargs: dict,
        size: int = 0,
        budget: int = 0,
        expires: float = 0.0,
        meta: dict[str, str] | None = None,
    ) -> Any:
        """Decide on one decoded call (as :meth:`handle` returns); ``size``: its
        request's bytes (the peer ledger's charge); ``meta``: its metadata."""
        if self.gone and ident in self.gone:  # read before its connection closed
            self._drop("client_gone")
            return None
        if self.on_received is not None:  # OBS HOOK: metrics on
            self.on_received(name)
        entry = self.tasks.get(name)
        if entry is None:
            if name in _READ_ONLY_SIGNALS:
                return self._admin_reply(codec, call_id, name, None)
            if name in (STOP, KILL):
                return self.refusal(
                    codec,
                    call_id,
                    "UnknownTask",
                    f"admin signal {name!r} is not enabled on this backend "
                    "(serve ADMIN_TASKS from taskit.backend to enable it)",
                )
            return self.refusal(
                codec,
                call_id,
                "UnknownTask",
                f"no task named {name!r} on this backend (ask '<tasks>' for the list)",
            )
        if type(entry) is tuple:
            fn, pass_backend = split_entry(entry)
        else:
            fn, pass_backend = entry, False
        stop, kill, count = self.admin
        if fn is stop or fn is kill or fn is count:  # identity: fn may not hash
            return self._admin_reply(codec, call_id, name, fn)
        if self.stopping:
            return self.refusal(codec, call_id, "Stopping", STOPPING)
        acct = self.acct
        limit = self.max_pending
        if limit is not None and acct.in_flight >= limit:
            return self.refusal(
                codec,
                call_id,
                "Busy",
                f"this backend has {limit} calls pending (max_pending); retry later or elsewhere",
            )
        peers = self.peers
        if peers is not None and ident in peers.held and peers.over(ident, size):
            return self.refusal(
                codec,
                call_id,
                "Busy",
                f"this client holds {peers.held_by(ident)} bytes of calls and unread replies "
                f"on this backend (peer_budget {peers.budget}); read the replies, then retry",
            )
        if self.verbose:
            self.note(INFO, f"Fulfilling task {name!r}")
        inline = not pass_backend and (
            (self.inline_auto and acct.speed.get(name, 0) >= QUALIFY) or name in self.inline_names
        )
        call = Call(ident, codec, call_id, name, size, fn, args, kwargs, inline, pass_backend)
        if budget:
            call.budget, call.expires = budget, expires
        if meta is not None:  # OBS HOOK: run the task in a span continuing the caller's trace
            call.meta = meta
            if self.trace_in_thread:
                call.fn = _tracing.traced(fn, name, meta)
        if inline:
            # Answered by this thread before the next request is read: not counted in
            # flight, nor charged (the standby thread counts it if it takes over).
            return call
        with self.lock:
            acct.in_flight += 1
            if peers is not None:
                peers.charge(ident, size)
            key = (ident, call_id)
            if key not in self.queued:  # a CANCEL finds it here until it starts
                self.queued[key] = call
        return call

    def cancel(self, ident: bytes, call_id: int) -> tuple[int, int, int, bytes]:
        """Withdraw the pool call ``call_id`` of ``ident`` if it has not started:
        CANCELLED (it never runs, no other reply follows; counted ``cancelled``),
        else NOT_CANCELLED (it started, was answered, or is unknown here)."""
        key = (ident, call_id)
        with self.lock:
            call = self.queued.pop(key, None)
            if call is not None and call.state == QUEUED and call.fut is None:
                call.state = CANCELLED  # the worker that picks it up skips it
                self.unaccept(call)
                self.acct.cancelled += 1
                return (int(Kind.CANCELLED), 0, call_id, b"")
        # A process pool's call: its future says whether a child has it yet. Cancelled
        # outside the lock: Future.cancel runs the done callbacks, which take it.
        if call is not None and call.state == QUEUED and call.fut.cancel():
            with self.lock:
                call.state = CANCELLED
                self.unaccept(call)
                self.acct.cancelled += 1
            return (int(Kind.CANCELLED), 0, call_id, b"")
        return (int(Kind.NOT_CANCELLED), 0, call_id, b"")

    def refusal(self, codec: Any, call_id: int, type_name: str, msg: str) -> tuple:
        """The ERROR item refusing a call with the backend's ``type_name`` (counted)."""
        item = self.encode_error(codec, call_id, type_name, [msg], "")
        with self.lock:
            self.acct.refuse(type_name)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "refused call %d: %s: %s", call_id, type_name, msg, extra={"call_id": call_id}
            )
        return item

    def expired(self, call: Call) -> tuple:
        """The ``Expired`` ERROR item of a call whose deadline passed before it
        started (counted refused; the caller has un-accepted it)."""
        return self.refusal(call.codec, call.call_id, "Expired", expired_message(call.budget))

    def unaccept(self, call: Call) -> None:
        """Undo the counting of a call that will not run (lock held; an inline call
        was never counted)."""
        if call.inline:
            return
        self.acct.in_flight -= 1
        if self.peers is not None:
            self.peers.settle(call.ident, call.size)

    def _drop(self, reason: str) -> None:
        with self.lock:
            self.acct.drop(reason)

    def _admin_reply(
        self, codec: Any, call_id: int, name: str, fn: Callable[..., Any] | None
    ) -> tuple:
        stop, kill, count = self.admin
        if fn is count or (fn is None and name == STATUS):
            value: Any = str(self.owner.task_count)
        elif name == STATS and fn is None:
            value = self.owner.stats()
        elif name == TASKS and fn is None:
            value = sorted(self.tasks)
        else:
            value = None
        try:
            item = self._result(codec, call_id, value)
        except Exception as e:  # EncodeError, or a user codec failing oddly
            item = self.encode_error(codec, call_id, "EncodeError", [str(e)], "")
        with self.lock:
            self.acct.admin += 1
        if fn is stop or fn is kill:
            # Asked before the reply is sent, by the thread that sends it next: the
            # I/O loop acts on the flag only after sending.
            fn(self.owner)
            what = "stop" if fn is stop else "kill"
            _log.info("backend on %s received %s", self.owner.endpoint, name)
            self.note(IMPORTANT, f"Received {what} signal")
        return item

    # -- handshake and keys ----------------------------------------------------------

    def welcome(self, hello: dict[str, Any], server_nonce: bytes) -> bytes:
        """The WELCOME body answering ``hello`` (its nonce echoed)."""
        return protocol.welcome_body(
            client_nonce=hello["nonce"],
            server_nonce=server_nonce,
            name=self.owner.endpoint,
            pid=self.pid,
            started=self.started,
            codec_ids=sorted(self.codecs),
            signed=self.signer is not None,
            workers=int(self.workers()),
            max_pending=self.max_pending,
            max_message_size=self.max_message_size,
        )

    def _no_session(self, ident: bytes, data: Any) -> Any:
        """Keyed backend, a message on a connection with no session: its HELLO
        opens one; a CALL is told NO_SESSION (unsigned); anything else dropped."""
        first = protocol.peek(data)
        if first is None:
            self._drop("malformed")
            return None
        kind, _codec_id, call_id = first
        if kind == _HELLO:
            return self._hello(ident, data, call_id)
        if kind == _CALL and call_id:
            with self.lock:
                self.acct.drop("no_session")
            return self._unauthenticated_frame(call_id, protocol.NO_SESSION)
        self._drop("no_session")
        return None

    def _hello(self, ident: bytes, data: Any, call_id: int) -> Any:
        """Keyed backend: check a HELLO (sealed with the zero-nonce session), open
        the connection's session, and return the WELCOME sealed the same way."""
        assert self.signer is not None
        zero = Session(self.signer, outgoing=b"B")
        try:
            items = protocol.parse(data, zero)
        except SignatureError:  # not a replay: a fresh session has seen nothing
            return self._unauthenticated(data)
        except ProtocolError:
            self._drop("malformed")
            return None
        if len(items) != 1:
            self._drop("malformed")
            return None
        try:
            hello = protocol.parse_handshake(items[0].body, _HELLO)
        except ProtocolError as e:
            item = self.refusal(JSONCodec, call_id, "ProtocolError", str(e))
            return self.pack([item], zero)
        nonce = bytes.fromhex(hello["nonce"])
        seen = self.hello_nonces
        if nonce in seen:  # a HELLO replayed (on another connection): opens nothing
            self._drop("replayed")
            return None
        seen[nonce] = None
        if len(seen) > 2 * self.max_sessions:
            del seen[next(iter(seen))]
        server_nonce = protocol.new_nonce()
        sessions = self.sessions
        if len(sessions) >= self.max_sessions:
            with self.lock:  # forget the oldest (its client is told NO_SESSION, says HELLO)
                sessions.pop(next(iter(sessions)), None)
                self.acct.sessions_evicted += 1
        sessions[ident] = Session(self.signer, nonce, server_nonce, outgoing=b"B")
        if ident not in self.heard:
            self._see_peer(ident)
        body = self.welcome(hello, server_nonce)
        return self.pack([(int(Kind.WELCOME), _JSON_ID, call_id, body)], zero)

    def _unauthenticated(self, data: Any) -> bytes | None:
        """A message whose signature this backend cannot check (it has a key and the
        signature is missing, wrong, or of another connection; or it has none and
        the message is signed): never read further nor run. A CALL or HELLO is
        answered with the fixed, unsigned JSON ERROR ``Unauthenticated`` (its text
        says which side lacks the key), so its caller gets an AuthenticationError
        rather than waiting; counted ``dropped["bad_signature"]``."""
        with self.lock:
            self.acct.drop("bad_signature")
        first = protocol.peek(data)
        if first is None or first[0] not in (_CALL, _HELLO) or first[2] == 0:
            return None
        why = protocol.KEY_DIFFERS if self.signer is not None else protocol.NO_KEY_HERE
        return self._unauthenticated_frame(first[2], why)

    def _unauthenticated_frame(self, call_id: int, why: str) -> bytes:
        _, body = protocol.encode_error(JSONCodec, protocol.UNAUTHENTICATED, [why], "")
        queued, running = self.load()
        return _pack_one(_ERROR, _JSON_ID, call_id, queued, running, body)

    def forget(self, ident: bytes) -> None:
        """Forget the session of a client known gone (lock held)."""
        self.sessions.pop(ident, None)

    # -- the clients, for the stop notice --------------------------------------------

    def _see_peer(self, ident: bytes) -> None:
        """Remember a client to tell it of a graceful stop; a new generation starts
        every _PEER_GENERATION clients, so clients long gone are forgotten."""
        heard = self.heard
        if len(heard) >= _PEER_GENERATION:
            self.heard_old, self.heard = heard, {ident}
        else:
            heard.add(ident)

    def client_gone(self, ident: bytes) -> None:
        """Remember that ``ident``'s connection is closed (lock held): a routing id
        names one connection and is never reused, so its calls still queued here
        have no caller left (it failed them, or re-sent them elsewhere)."""
        gone = self.gone
        if len(gone) >= _PEER_GENERATION:
            gone.clear()  # bounded; an id forgotten only costs running its calls
        gone.add(ident)
        self.sessions.pop(ident, None)

    def stopping_notice(self) -> tuple[tuple, set[bytes]]:
        """The notice that a graceful stop has begun (an ERROR ``Stopping`` with call
        id 0, which no call has; doc/protocol.md), and the clients to send it to:
        those heard from lately."""
        item = self.encode_error(JSONCodec, 0, "Stopping", [STOPPING], "")
        return item, self.heard | self.heard_old

    def stopped_notice(self) -> tuple:
        """The last word of a graceful stop (an ERROR ``Stopped`` with call id 0): every
        call read from this connection has been answered before it, and nothing more
        is read, so a call still unanswered on it never ran (doc/protocol.md)."""
        return self.encode_error(JSONCodec, 0, "Stopped", [STOPPED], "")

    # -- from items to a frame -------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """(calls queued, calls running): the load every reply carries. Running:
        calls a thread-pool worker runs now (a process pool's calls count as queued
        until answered; an inline call is answered before the next read)."""
        acct = self.acct
        running = acct.running
        queued = acct.in_flight - running
        return (queued if queued > 0 else 0), running

    def pack(self, items: list[tuple], session: Session | None = None) -> bytes:
        """One frame of reply ``items`` with the load filled in, sealed by
        ``session`` (lock held: the seal's sequence must follow the send order)."""
        acct = self.acct
        running = acct.running
        queued = acct.in_flight - running
        if queued < 0:
            queued = 0
        if session is not None:
            return _pack_items([(k, c, i, queued, running, b) for k, c, i, b in items], session)
        if len(items) == 1:
            kind, codec_id, call_id, body = items[0]
            return _pack_one(kind, codec_id, call_id, queued, running, body)
        # protocol.pack_items for an unsigned batch, in one pass (a batch is made of
        # many small replies: this loop is per reply)
        parts = [_UNSIGNED]
        append, pack_item = parts.append, _pack_item
        for kind, codec_id, call_id, body in items:
            append(pack_item(kind, codec_id, 0, call_id, queued, running, len(body)))
            append(body)
        return b"".join(parts)

    # -- from an outcome to a reply item ---------------------------------------------

    def encode_error(self, codec: Any, call_id: int, type_name: str, args: Any, tb: str) -> tuple:
        """The ERROR item; never raises (protocol.encode_error falls back to reprs and
        JSON, but a repr may raise too: then reprs that cannot)."""
        try:
            codec_id, body = protocol.encode_error(codec, type_name, args, tb)
        except Exception:
            args = [_safe_repr(a) for a in args]
            codec_id, body = protocol.encode_error(JSONCodec, type_name, args, tb)
        return (_ERROR, codec_id, call_id, body)

    def _result(self, codec: Any, call_id: int, value: Any) -> tuple:
        body = codec.encode(value)
        if type(body) is not bytes:
            body = as_body(codec, body)
        return (_RESULT, codec.wire_id, call_id, body)

    def result_item(self, call: Call, value: Any) -> tuple[tuple, bool]:
        """The reply carrying ``value``, and True; or an EncodeError reply and False
        when it cannot be encoded or exceeds ``max_message_size``."""
        codec = call.codec
        try:
            item = self._result(codec, call.call_id, value)
        except Exception as e:
            msg = f"the result of task {call.name!r} cannot be sent with {codec.name}: {e}"
            if self.verbose:
                self.note(ERROR, msg)
            return self.encode_error(codec, call.call_id, "EncodeError", [msg], ""), False
        if len(item[3]) > self.reply_limit:
            return self.oversized(call, len(item[3])), False
        return item, True

    def oversized(self, call: Call, size: int) -> tuple:
        """The EncodeError answering a result over ``max_message_size``: a client with
        the same limit would drop the connection (and every call on it) on it."""
        msg = (
            f"the result of task {call.name!r} is {size} bytes, over this backend's "
            f"max_message_size ({self.max_message_size} bytes); return less, or raise "
            "max_message_size on both sides"
        )
        if self.verbose:
            self.note(ERROR, msg)
        return self.encode_error(call.codec, call.call_id, "EncodeError", [msg], "")

    def error_item(self, call: Call, e: BaseException, local_traceback: bool = True) -> tuple:
        """The ERROR reply for a call that raised ``e`` (logged; its traceback sent
        when ``tracebacks``). ``local_traceback=False``: ``e`` was raised by a pool,
        not the task; its frames here are not worth sending."""
        name = call.name
        if isinstance(e, RemoteTaskError):
            type_name, args, tb = e.type, [str(e).split("\n\n", 1)[0]], e.remote_traceback
        else:
            type_name, args = type(e).__name__, list(e.args)
            if not self.tracebacks:
                tb = ""
            elif isinstance(e.__cause__, RemoteTraceback):
                # Raised in a process worker: its traceback there, once (formatting e
                # would add the cause's text and then this thread's frames).
                tb = e.__cause__.tb
            else:
                tb = "".join(traceback.format_exception(e)) if local_traceback else ""
        if self.verbose:
            shown = ", ".join(map(_safe_repr, args))
            self.note(ERROR, f"Error while fulfilling task {name!r}: {type_name}({shown})")
        if tb and (self.verbose or _log.isEnabledFor(logging.INFO)):
            self._log_traceback(name, type_name, tb, call)
        return self.encode_error(call.codec, call.call_id, type_name, args, tb)

    def _log_traceback(self, name: str, type_name: str, tb: str, call: Call) -> None:
        """Log a failing call's traceback, at most once per task and exception type
        per TRACEBACK_INTERVAL; the next one logged says how many were skipped."""
        skipped = self.tb_limit.admit((name, type_name))
        # for structured logs (taskit backend --log-format json)
        extra = {"task": name, "call_id": call.call_id, "peer": call.ident.hex()}
        if skipped is None:
            _log.debug(
                "task %r failed again with %s (traceback not logged)", name, type_name, extra=extra
            )
            return
        if skipped:
            tb = (
                f"{tb.rstrip()}\n(and {skipped} more failures of task {name!r} with "
                f"{type_name} since the last traceback logged, not logged in full)"
            )
        if self.verbose:
            self.note(ERROR, tb)
        if _log.isEnabledFor(logging.INFO):
            _log.info("task %r failed: %s", name, tb.rstrip(), extra=extra)
