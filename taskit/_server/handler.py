"""What a BackEnd does with one request: sans-I/O, no socket, no thread of its own.

:meth:`RequestHandler.handle` takes one received message (the routing id, then
the frames) and decides: drop it (counted), answer it now (reply frames out:
refusals, PONG, admin signals), or run it (a :class:`Call` out, marked inline or
pool). Whoever ran the call turns its outcome into reply frames with
:meth:`RequestHandler.result_frames` / :meth:`RequestHandler.error_frames`. The
I/O loop (:mod:`taskit._server.loop`) moves the bytes and runs the calls;
``tests/test_server_handler.py`` drives this module without sockets.

The handler's counters (:class:`~taskit._server.accounting.Accounting`, the
peer ledger) are shared with the loop under one lock, the loop's (it also
guards the socket); the handler takes it briefly to count, never around a send.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol, final

from taskit import _tracing, protocol
from taskit._server.access import unauthenticated_reply
from taskit._server.accounting import QUALIFY, Accounting, PeerLedger, TracebackLimiter
from taskit._server.options import split_entry
from taskit._wire import ZERO_COPY
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer
from taskit.errors import (
    DecodeError,
    ProtocolError,
    RemoteTaskError,
    RemoteTraceback,
    SignatureError,
)
from taskit.log import ERROR, IMPORTANT, INFO
from taskit.protocol import KILL, STATS, STATUS, STOP, TASKS, Kind

__all__ = ["Call", "RequestHandler", "Server", "STOPPING"]

_log = logging.getLogger("taskit.backend")

_CALL = int(Kind.CALL)
# Clients remembered per generation for the stop notice (two generations are kept).
_PEER_GENERATION = 10_000
_READ_ONLY_SIGNALS = frozenset((STATUS, STATS, TASKS))
STOPPING = "this backend is stopping and accepts no new calls; use another backend"
STOPPED = "this backend has stopped: a call it did not answer never ran there"


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
    ``pass_backend``: the task wants the BackEnd as its first argument; ``meta``:
    the call's metadata (its trace context), or None.
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
        "meta",
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
        self.meta: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"<Call {self.call_id} {self.name!r} from {self.ident!r}>"


class RequestHandler:
    """Turns requests into decisions and outcomes into reply frames (see the module).

    ``owner`` is the BackEnd (what admin tasks and ``<stats>`` are asked about:
    its ``task_count``, ``stats()``, ``endpoint``); ``admin`` the admin task
    functions ``(stop, kill, count)`` answered at once, whatever the tasks dict
    maps them to; ``lock`` the lock guarding the counters. Thread-safe as the
    BackEnd uses it: :meth:`handle` from the thread reading the socket,
    :meth:`result_frames` and :meth:`error_frames` from any thread.
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

    # -- from a request to a decision ------------------------------------------------

    def handle(self, msg: list[Any]) -> Call | list[bytes] | None:
        """Decide what to do with one request: ``msg`` is the routing id as bytes,
        then at most four ``zmq.Frame`` objects. Never raises for input.

        Returns None (nothing to send: dropped and counted), reply frames for
        ``msg[0]`` to send now, or a :class:`Call` to run (already counted in
        flight; a pool call also charged to its peer's ledger). A message whose
        frames total more than ``max_message_size`` (plus the envelope) is dropped
        and counted before any frame is copied."""
        ident = msg[0]
        if len(msg) == 4:  # the usual unsigned request: no list comprehension
            body = msg[3]
            blen = len(body)
            size = blen + len(msg[1]) + len(msg[2])
            if size > self.request_limit:
                self._drop("oversized")
                return None
            # A big body stays in ZeroMQ's buffer, for a codec that reads any buffer
            # (a copy of a fresh MiB costs more in page faults than in copying).
            body = body.bytes if blen < ZERO_COPY else body.buffer
            frames = [msg[1].bytes, msg[2].bytes, body]
        else:
            size = sum(map(len, msg[1:]))
            if size > self.request_limit:
                self._drop("oversized")
                return None
            frames = [f.bytes for f in msg[1:]]
        try:
            m = protocol._unpack(frames, self.signer, False)
        except SignatureError:
            out = unauthenticated_reply(frames, self.signer)
            with self.lock:
                self.acct.drop("bad_signature")
            return out
        except ProtocolError as e:
            call_id = protocol.peek_call_id(frames)
            if call_id is None:
                self._drop("malformed")
                return None
            return self.refusal(JSONCodec, call_id, "ProtocolError", str(e))
        if ident not in self.heard:  # a client (signed, when a key is set) to tell of a stop
            self._see_peer(ident)
        call_id = m.call_id
        if m.kind != _CALL:
            if m.kind == Kind.PING:
                return protocol.pack(Kind.PONG, m.codec_id, call_id, b"", self.signer)
            return self.refusal(
                JSONCodec,
                call_id,
                "ProtocolError",
                f"a backend accepts CALL and PING messages, not {Kind(m.kind).name}",
            )
        codec = self.codecs.get(m.codec_id)
        if codec is None:
            accepted = ", ".join(sorted(c.name for c in self.codecs.values()))
            return self.refusal(
                JSONCodec,
                call_id,
                "CodecNotAllowed",
                f"codec id {m.codec_id} is not accepted here; this backend accepts {accepted}",
            )
        body = m.body
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
        return self.dispatch(ident, codec, call_id, name, args, kwargs, size, meta)

    def dispatch(
        self,
        ident: bytes,
        codec: Any,
        call_id: int,
        name: str,
        args: list,
        kwargs: dict,
        size: int = 0,
        meta: dict[str, str] | None = None,
    ) -> Call | list[bytes] | None:
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
        with self.lock:
            acct.in_flight += 1
            if peers is not None and not inline:  # an inline call is answered before the next
                peers.charge(ident, size)
        call = Call(ident, codec, call_id, name, size, fn, args, kwargs, inline, pass_backend)
        if meta is not None:  # OBS HOOK: run the task in a span continuing the caller's trace
            call.meta = meta
            if self.trace_in_thread:
                call.fn = _tracing.traced(fn, name, meta)
        return call

    def refusal(self, codec: Any, call_id: int, type_name: str, msg: str) -> list[bytes]:
        """The ERROR frames refusing a call with the backend's ``type_name`` (counted)."""
        frames = self.encode_error(codec, call_id, type_name, [msg], "")
        with self.lock:
            self.acct.refuse(type_name)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "refused call %d: %s: %s", call_id, type_name, msg, extra={"call_id": call_id}
            )
        return frames

    def unaccept(self, call: Call) -> None:
        """Undo the counting of a call that could not be handed over (lock held)."""
        self.acct.in_flight -= 1
        if self.peers is not None and not call.inline:
            self.peers.settle(call.ident, call.size)

    def _drop(self, reason: str) -> None:
        with self.lock:
            self.acct.drop(reason)

    def _admin_reply(
        self, codec: Any, call_id: int, name: str, fn: Callable[..., Any] | None
    ) -> list[bytes]:
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
            frames = protocol.encode_result(codec, call_id, value, self.signer)
        except Exception as e:  # EncodeError, or a user codec failing oddly
            frames = self.encode_error(codec, call_id, "EncodeError", [str(e)], "")
        with self.lock:
            self.acct.admin += 1
        if fn is stop or fn is kill:
            # Asked before the reply is sent, by the thread that sends it next: the
            # I/O loop acts on the flag only after sending.
            fn(self.owner)
            what = "stop" if fn is stop else "kill"
            _log.info("backend on %s received %s", self.owner.endpoint, name)
            self.note(IMPORTANT, f"Received {what} signal")
        return frames

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

    def stopping_notice(self) -> tuple[list[bytes], set[bytes]]:
        """The notice that a graceful stop has begun (an ERROR ``Stopping`` with call
        id 0, which no call has; doc/protocol.md §5), and the clients to send it to:
        those heard from lately."""
        frames = self.encode_error(JSONCodec, 0, "Stopping", [STOPPING], "")
        return frames, self.heard | self.heard_old

    def stopped_notice(self) -> list[bytes]:
        """The last word of a graceful stop (an ERROR ``Stopped`` with call id 0): every
        call read from this connection has been answered before it, and nothing more
        is read, so a call still unanswered on it never ran (doc/protocol.md §5)."""
        return self.encode_error(JSONCodec, 0, "Stopped", [STOPPED], "")

    # -- from an outcome to reply frames ---------------------------------------------

    def encode_error(
        self, codec: Any, call_id: int, type_name: str, args: Any, tb: str
    ) -> list[bytes]:
        """protocol.encode_error, falling back to JSON when a user codec raises oddly."""
        try:
            return protocol.encode_error(codec, call_id, type_name, args, tb, self.signer)
        except Exception:
            args = [_safe_repr(a) for a in args]
            return protocol.encode_error(JSONCodec, call_id, type_name, args, tb, self.signer)

    def result_frames(self, call: Call, value: Any) -> tuple[list[bytes], bool]:
        """The reply carrying ``value``, and True; or an EncodeError reply and False
        when it cannot be encoded or exceeds ``max_message_size``."""
        codec = call.codec
        try:
            frames = protocol.encode_result(codec, call.call_id, value, self.signer)
        except Exception as e:
            msg = f"the result of task {call.name!r} cannot be sent with {codec.name}: {e}"
            if self.verbose:
                self.note(ERROR, msg)
            return self.encode_error(codec, call.call_id, "EncodeError", [msg], ""), False
        if len(frames[2]) > self.reply_limit:
            return self.oversized(call, len(frames[2])), False
        return frames, True

    def oversized(self, call: Call, size: int) -> list[bytes]:
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

    def error_frames(
        self, call: Call, e: BaseException, local_traceback: bool = True
    ) -> list[bytes]:
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
