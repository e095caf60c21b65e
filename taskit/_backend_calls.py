"""How a BackEnd answers one message: parse, refuse, run (inline or on the pool), reply.

:class:`CallHandler` is the half of :class:`taskit.backend.BackEnd` that turns a
request into a reply; the BackEnd itself owns the socket, the threads and the
life cycle. Split out only to keep each file readable: the two share state
(the BackEnd's lock, socket and counters) and are not used apart.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from taskit import protocol
from taskit._backend_parts import QUALIFY, TracebackLimiter, split_entry
from taskit._wire import (
    DONTWAIT,
    EVENTS,
    MORE,
    NOBLOCK,
    POLLIN,
    ZERO_COPY,
    base_get,
    base_recv,
    base_send,
)
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec
from taskit.errors import (
    DecodeError,
    PoolShutdownError,
    ProtocolError,
    RemoteTaskError,
    RemoteTraceback,
    SignatureError,
)
from taskit.log import ERROR, IMPORTANT, INFO
from taskit.protocol import KILL, STATS, STATUS, STOP, TASKS, Kind

if TYPE_CHECKING:
    from taskit._backend_parts import Accounting, PeerLedger
    from taskit.backend import BackEnd
    from taskit.codecs import Signer

__all__ = ["ADMIN_TASKS", "task_stop", "task_kill", "task_count", "CallHandler", "in_task"]

_log = logging.getLogger("taskit.backend")

# The hot path's socket calls and flags (see taskit._wire).
_send, _recv, _get = base_send, base_recv, base_get
_EVENTS, _POLLIN, _NOBLOCK, _DONTWAIT, _MORE = EVENTS, POLLIN, NOBLOCK, DONTWAIT, MORE
_CALL = int(Kind.CALL)
# Clients remembered per generation for the stop notice (two generations are kept).
_PEER_GENERATION = 10_000


# --- admin tasks (TaskIt 4.0 names and semantics) --------------------------------------


def task_stop(backend: BackEnd) -> None:
    """Admin task: stop ``backend`` gracefully (answer what it accepted, then exit)."""
    backend.stop_server(wait=False)


def task_kill(backend: BackEnd) -> None:
    """Admin task: end ``backend`` now; calls still running are not answered."""
    backend.terminate_server()


def task_count(backend: BackEnd) -> str:
    """Admin task: the backend's task count, as a string (what 4.0 clients expect)."""
    return str(backend.task_count)


#: Add to a backend's tasks (``tasks.update(ADMIN_TASKS)``) to enable the
#: ``<stop>`` and ``<kill>`` signals; ``<status>``, ``<stats>`` and ``<tasks>``
#: are always answered.
ADMIN_TASKS: dict[str, tuple[Callable[..., Any], bool]] = {
    STOP: (task_stop, True),
    KILL: (task_kill, True),
    STATUS: (task_count, True),
}

_READ_ONLY_SIGNALS = frozenset((STATUS, STATS, TASKS))


def _safe_repr(obj: Any) -> str:
    """repr() that never raises (a task's exception arguments are arbitrary objects)."""
    try:
        return repr(obj)
    except Exception:
        return f"<{type(obj).__name__} object (repr failed)>"


in_task = threading.local()  # .backend: the BackEnd whose task this thread runs


class CallHandler:
    """Mixin of :class:`~taskit.backend.BackEnd`: from a received message to its reply."""

    # The BackEnd's state this half uses (set in BackEnd.__init__; declared for type
    # checkers only: bare annotations create no class attributes).
    tasks: dict[str, Any]
    tracebacks: bool
    max_pending: int | None
    max_message_size: int | None
    _reply_limit: int
    _request_limit: int
    _peers: PeerLedger | None
    _lock: threading.Lock
    _router: zmq.Socket | None
    _acct: Accounting
    _signer: Signer | None
    _codecs: dict[int, Any]
    _endpoint: str
    _pool_kind: str
    _pool: Any
    _inline_auto: bool
    _inline_names: frozenset[str]
    _inline_since: float
    _inline_seen: float
    _io_owner: int | None
    _stopping: bool
    _terminating: bool
    _verbose: bool
    _heard: set[bytes]
    _tb_limit: TracebackLimiter
    _gone: set[bytes]
    _heard_old: set[bytes]
    _told: bool

    if TYPE_CHECKING:  # BackEnd's methods and properties this half calls

        @property
        def task_count(self) -> int: ...

        @property
        def codecs(self) -> list[str]: ...

        def stats(self) -> dict[str, Any]: ...

        def _note(self, importance: str, msg: str) -> None: ...

        def _wake_locked(self) -> None: ...

    def _send(self, ident: bytes, frames: list[bytes]) -> None:
        """Send one reply from the I/O thread (lock taken here)."""
        with self._lock:
            self._send_locked(ident, frames)

    def _send_locked(self, ident: bytes, frames: list[bytes]) -> None:
        router = self._router
        if router is None:
            return  # terminated meanwhile: nobody left to answer
        try:
            # The backend's send with int flags: pyzmq's send_multipart does enum
            # arithmetic per frame, a measurable share of a loopback round trip.
            _send(router, ident, _MORE)
            # A big body goes zero-copy: ZeroMQ keeps a reference to the bytes object
            # until it is sent, rather than a copy in a freshly faulted-in buffer.
            if len(frames) == 3:  # unsigned: unrolled, the loop costs as much as a send
                _send(router, frames[0], _MORE)
                _send(router, frames[1], _MORE)
                body = frames[2]
                _send(router, body, _DONTWAIT, len(body) < ZERO_COPY)
            else:
                last = len(frames) - 1
                for i, frame in enumerate(frames):
                    _send(router, frame, _MORE if i < last else _DONTWAIT, len(frame) < ZERO_COPY)
        except zmq.Again:  # the peer's queue is full: it is not reading (see PeerLedger)
            peers = self._peers
            if peers is None:
                self._acct.drop("reply_hwm")
            else:
                idle = not peers.backlog
                if not peers.defer(ident, frames):
                    self._acct.drop("reply_over_budget")
                elif idle:  # the I/O loop retries a backlog often, once it knows of one
                    self._wake_locked()
        except zmq.ZMQError as e:
            # EHOSTUNREACH: the client went away first. Anything else is unexpected,
            # but must not leave the call counted in flight forever.
            self._acct.drop("reply_unroutable")
            if e.errno == errno.EHOSTUNREACH:
                self._client_gone_locked(ident)
            else:
                _log.error("backend could not send a reply: %s", e)

    def _flush_backlog_locked(self) -> None:
        """Hand ZeroMQ the replies waiting for peers whose queue was full, oldest first,
        until a queue is full again; forget (and count) those of peers that left."""
        router, peers = self._router, self._peers
        if router is None or peers is None:
            return
        for ident, queue in list(peers.backlog.items()):
            while queue:
                frames = queue[0][0]
                try:
                    _send(router, ident, _MORE)  # a full queue or a gone peer fails here
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    self._acct.drop("reply_unroutable", peers.forget(ident))
                    self._client_gone_locked(ident)
                    break
                last = len(frames) - 1
                for i, frame in enumerate(frames):
                    _send(router, frame, _MORE if i < last else _DONTWAIT, len(frame) < ZERO_COPY)
                peers.sent(ident)

    def _drop_oversized(self) -> None:
        with self._lock:
            self._acct.drop("oversized")

    def _client_gone_locked(self, ident: bytes) -> None:
        """Remember that ``ident``'s connection is closed (lock held): a routing id
        names one connection and is never reused, so its calls still queued here
        have no caller left (it failed them, or re-sent them elsewhere)."""
        gone = self._gone
        if len(gone) >= _PEER_GENERATION:
            gone.clear()  # bounded; an id forgotten only costs running its calls
        gone.add(ident)

    def _skip_for_gone_client(self, ident: bytes, size: int) -> bool:
        """True (and counted) when ``ident``'s connection is known closed: a call of
        it that has not started is not run. Called by the thread that would run it."""
        if not self._gone or ident not in self._gone:
            return False
        with self._lock:
            self._acct.in_flight -= 1
            self._acct.drop("client_gone")
            if self._peers is not None:
                self._peers.settle(ident, size)  # charged when it was accepted
            if threading.get_ident() != self._io_owner:
                self._wake_if_needed_locked()
        return True

    def _encode_error(
        self, codec: Any, call_id: int, type_name: str, args: Any, tb: str, signer: Any
    ) -> list[bytes]:
        """protocol.encode_error, falling back to JSON when a user codec raises oddly."""
        try:
            return protocol.encode_error(codec, call_id, type_name, args, tb, signer)
        except Exception:
            args = [_safe_repr(a) for a in args]
            return protocol.encode_error(JSONCodec, call_id, type_name, args, tb, signer)

    def _refuse(self, ident: bytes, codec: Any, call_id: int, type_name: str, msg: str) -> None:
        frames = self._encode_error(codec, call_id, type_name, [msg], "", self._signer)
        with self._lock:
            self._acct.refuse(type_name)
            self._send_locked(ident, frames)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("refused call %d: %s: %s", call_id, type_name, msg)

    def _unauthenticated(self, ident: bytes, frames: list[Any]) -> None:
        """A message whose signature this backend cannot check (it has a key and the
        signature is missing or wrong, or it has none and the message is signed):
        never read further nor run; counted as ``dropped["bad_signature"]``. A CALL
        is answered with the fixed, unsigned JSON ERROR ``Unauthenticated`` (its text
        says which side lacks the key, nothing depends on the key), so the caller
        gets an AuthenticationError rather than waiting forever."""
        call_id = protocol.peek_call_id(frames)
        frames_out = None
        if call_id is not None and frames[1][0] == _CALL:
            why = protocol.KEY_DIFFERS if self._signer is not None else protocol.NO_KEY_HERE
            frames_out = protocol.encode_error(
                JSONCodec, call_id, protocol.UNAUTHENTICATED, [why], "", None
            )
        with self._lock:
            self._acct.drop("bad_signature")
            if frames_out is not None:
                self._send_locked(ident, frames_out)

    def _handle(self, msg: list[Any]) -> None:
        """Parse one request (the routing id as bytes, then at most four ``zmq.Frame``
        objects) and answer it, or hand it to the pool. Never raises for input.

        A message whose frames total more than ``max_message_size`` (plus the
        envelope) is dropped and counted before any frame is copied."""
        ident = msg[0]
        if len(msg) == 4:  # the usual unsigned request: no list comprehension
            body = msg[3]
            blen = len(body)
            size = blen + len(msg[1]) + len(msg[2])
            if size > self._request_limit:
                self._drop_oversized()
                return
            # A big body stays in ZeroMQ's buffer, for a codec that reads any buffer
            # (a copy of a fresh MiB costs more in page faults than in copying).
            body = body.bytes if blen < ZERO_COPY else body.buffer
            frames = [msg[1].bytes, msg[2].bytes, body]
        else:
            size = sum(map(len, msg[1:]))
            if size > self._request_limit:
                self._drop_oversized()
                return
            frames = [f.bytes for f in msg[1:]]
        try:
            m = protocol._unpack(frames, self._signer, False)
        except SignatureError:
            self._unauthenticated(ident, frames)
            return
        except ProtocolError as e:
            call_id = protocol.peek_call_id(frames)
            if call_id is None:
                with self._lock:
                    self._acct.drop("malformed")
            else:
                self._refuse(ident, JSONCodec, call_id, "ProtocolError", str(e))
            return
        if ident not in self._heard:  # a client (signed, when a key is set) to tell of a stop
            self._see_peer(ident)
        call_id = m.call_id
        if m.kind != _CALL:
            if m.kind == Kind.PING:
                self._send(ident, protocol.pack(Kind.PONG, m.codec_id, call_id, b"", self._signer))
            else:
                self._refuse(
                    ident,
                    JSONCodec,
                    call_id,
                    "ProtocolError",
                    f"a backend accepts CALL and PING messages, not {Kind(m.kind).name}",
                )
            return
        codec = self._codecs.get(m.codec_id)
        if codec is None:
            self._refuse(
                ident,
                JSONCodec,
                call_id,
                "CodecNotAllowed",
                f"codec id {m.codec_id} is not accepted here; this backend accepts "
                + ", ".join(self.codecs),
            )
            return
        body = m.body
        if type(body) is not bytes and codec is not MsgpackCodec and codec is not PickleCodec:
            body = bytes(body)  # other codecs (json, users') are promised bytes
        try:
            name, args, kwargs = protocol.decode_call(codec, body)
        except DecodeError as e:
            self._refuse(ident, codec, call_id, "DecodeError", str(e))
            return
        except ProtocolError as e:
            self._refuse(ident, codec, call_id, "ProtocolError", str(e))
            return
        except Exception as e:  # a user codec that raises something else than DecodeError
            self._refuse(ident, codec, call_id, "DecodeError", f"{type(e).__name__}: {e}")
            return
        self._dispatch(ident, codec, call_id, name, args, kwargs, size)

    def _see_peer(self, ident: bytes) -> None:
        """Remember a client to tell it of a graceful stop; a new generation starts
        every _PEER_GENERATION clients, so clients long gone are forgotten."""
        heard = self._heard
        if len(heard) >= _PEER_GENERATION:
            self._heard_old, self._heard = heard, {ident}
        else:
            heard.add(ident)

    def _tell_stopping(self) -> None:
        """Tell every client heard from lately that a graceful stop has begun: an
        ERROR ``Stopping`` with call id 0 (no call has it; doc/protocol.md §5), so its
        FrontEnd sends no new call here, even one that has none in flight now.
        Clients gone meanwhile, or not reading, are skipped silently."""
        self._told = True
        frames = self._encode_error(
            JSONCodec,
            0,
            "Stopping",
            ["this backend is stopping and accepts no new calls; use another backend"],
            "",
            self._signer,
        )
        last = len(frames) - 1
        with self._lock:
            router = self._router
            if router is None:
                return
            for ident in self._heard | self._heard_old:
                try:
                    _send(router, ident, _MORE)
                    for i, frame in enumerate(frames):
                        _send(router, frame, _MORE if i < last else _DONTWAIT)
                except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
                    pass

    def _dispatch(
        self,
        ident: bytes,
        codec: Any,
        call_id: int,
        name: str,
        args: list,
        kwargs: dict,
        size: int = 0,
    ) -> None:
        """Run or refuse one decoded call; ``size``: its request's bytes (PeerLedger)."""
        if self._gone and ident in self._gone:  # read before its connection closed
            with self._lock:
                self._acct.drop("client_gone")
            return
        entry = self.tasks.get(name)
        if entry is None:
            if name in _READ_ONLY_SIGNALS:
                self._admin_reply(ident, codec, call_id, name, None)
            elif name in (STOP, KILL):
                self._refuse(
                    ident,
                    codec,
                    call_id,
                    "UnknownTask",
                    f"admin signal {name!r} is not enabled on this backend "
                    "(serve ADMIN_TASKS from taskit.backend to enable it)",
                )
            else:
                self._refuse(
                    ident,
                    codec,
                    call_id,
                    "UnknownTask",
                    f"no task named {name!r} on this backend (ask '<tasks>' for the list)",
                )
            return
        if type(entry) is tuple:
            fn, pass_backend = split_entry(entry)
        else:
            fn, pass_backend = entry, False
        if fn is task_stop or fn is task_kill or fn is task_count:  # identity: fn may not hash
            self._admin_reply(ident, codec, call_id, name, fn)
            return
        if self._stopping:
            self._refuse(
                ident,
                codec,
                call_id,
                "Stopping",
                "this backend is stopping and accepts no new calls; use another backend",
            )
            return
        limit = self.max_pending
        if limit is not None and self._acct.in_flight >= limit:
            self._refuse(
                ident,
                codec,
                call_id,
                "Busy",
                f"this backend has {limit} calls pending (max_pending); retry later or elsewhere",
            )
            return
        peers = self._peers
        if peers is not None and ident in peers.held and peers.over(ident, size):
            self._refuse_over_budget(ident, codec, call_id)
            return
        if self._verbose:
            self._note(INFO, f"Fulfilling task {name!r}")
        if not pass_backend and (
            (self._inline_auto and self._acct.speed.get(name, 0) >= QUALIFY)
            or name in self._inline_names
        ):
            self._run_inline(ident, codec, call_id, name, fn, args, kwargs)
            return
        with self._lock:
            self._acct.in_flight += 1
            if peers is not None:
                peers.charge(ident, size)
        t0 = time.perf_counter()
        try:
            if self._pool_kind == "process":
                if pass_backend:
                    raise TypeError(f"task {name!r} wants the backend, which needs pool='thread'")
                fut = self._pool.submit(fn, *args, **kwargs)
                fut.add_done_callback(
                    lambda f: self._finish(ident, codec, call_id, name, t0, f, size)
                )
            else:
                if pass_backend:
                    args = [self, *args]
                self._pool.submit(
                    self._run, ident, codec, call_id, name, fn, args, kwargs, t0, size
                )
        except PoolShutdownError:
            with self._lock:
                self._acct.in_flight -= 1
                if peers is not None:
                    peers.settle(ident, size)
            self._refuse(ident, codec, call_id, "Stopping", "this backend's pool is shut down")
        except BaseException as e:  # e.g. the pool cannot take it: answer, keep serving
            frames = self._error_frames(codec, call_id, name, e)
            self._reply(ident, frames, name, False, t0, None, size)

    def _refuse_over_budget(self, ident: bytes, codec: Any, call_id: int) -> None:
        peers = self._peers
        assert peers is not None
        self._refuse(
            ident,
            codec,
            call_id,
            "Busy",
            f"this client holds {peers.held_by(ident)} bytes of calls and unread replies on "
            f"this backend (peer_budget {peers.budget}); read the replies, then retry",
        )

    def _admin_reply(
        self, ident: bytes, codec: Any, call_id: int, name: str, fn: Callable | None
    ) -> None:
        if fn is task_count or (fn is None and name == STATUS):
            value: Any = str(self.task_count)
        elif name == STATS and fn is None:
            value = self.stats()
        elif name == TASKS and fn is None:
            value = sorted(self.tasks)
        else:
            value = None
        try:
            frames = protocol.encode_result(codec, call_id, value, self._signer)
        except Exception as e:  # EncodeError, or a user codec failing oddly
            frames = self._encode_error(codec, call_id, "EncodeError", [str(e)], "", self._signer)
        with self._lock:
            self._acct.admin += 1
            self._send_locked(ident, frames)
            if fn is task_stop:
                self._stopping = True
            elif fn is task_kill:
                self._terminating = True
        if fn is task_stop or fn is task_kill:
            what = "stop" if fn is task_stop else "kill"
            _log.info("backend on %s received %s", self._endpoint, name)
            self._note(IMPORTANT, f"Received {what} signal")

    # -- internals: running tasks ----------------------------------------------------

    def _run_inline(
        self,
        ident: bytes,
        codec: Any,
        call_id: int,
        name: str,
        fn: Callable,
        args: list,
        kwargs: dict,
    ) -> None:
        """Run a quick task on the I/O thread and reply: :meth:`_run` + :meth:`_reply`
        with one clock read and one lock round fewer (this is the per-message hot path)."""
        clock = time.perf_counter
        lock = self._lock
        with lock:
            self._acct.in_flight += 1
        # The standby thread compares these with time.perf_counter() (see _standby).
        # No in_task mark: this thread is one of the backend's own (_inside() knows it).
        self._inline_seen = self._inline_since = start = clock()
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # anything a task raises, even SystemExit, is the caller's
            run_time = clock() - start
            frames = self._error_frames(codec, call_id, name, e)
            ok = False
        else:
            run_time = clock() - start
            try:
                frames, ok = protocol.encode_result(codec, call_id, value, self._signer), True
            except Exception:
                frames, ok = self._result_frames(codec, call_id, name, value)
            else:
                if len(frames[2]) > self._reply_limit:
                    frames, ok = self._oversized(codec, call_id, name, len(frames[2])), False
        elapsed = clock() - start
        with lock:
            self._inline_since = 0.0
            self._acct.finished(name, ok, elapsed, run_time)  # counted out before sent: see _reply
            self._send_locked(ident, frames)
            if self._io_owner != threading.get_ident():
                # The standby took the socket over meanwhile: keep this task off the
                # I/O thread, and wake the new owner if this send ate its edge.
                self._acct.bar(name)
                self._wake_if_needed_locked()
        if self._verbose and ok:
            self._note(INFO, f"Finished fulfilling task {name!r}")

    def _run(
        self,
        ident: bytes,
        codec: Any,
        call_id: int,
        name: str,
        fn: Callable,
        args: list,
        kwargs: dict,
        t0: float,
        size: int = 0,
    ) -> None:
        # Kept apart from _run_inline on purpose: a shared helper would add a call per
        # message on the inline hot path, and the two differ in marks, locking and reply.
        if self._gone and self._skip_for_gone_client(ident, size):
            return
        in_task.backend = self
        start = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # anything a task raises, even SystemExit, is the caller's
            run_time = time.perf_counter() - start
            frames = self._error_frames(codec, call_id, name, e)
            ok = False
        else:
            run_time = time.perf_counter() - start
            frames, ok = self._result_frames(codec, call_id, name, value)
        finally:
            in_task.backend = None
        self._reply(ident, frames, name, ok, t0, run_time, size)

    def _finish(
        self, ident: bytes, codec: Any, call_id: int, name: str, t0: float, fut: Any, size: int
    ) -> None:
        try:
            value = fut.result()
        except BaseException as e:
            # Process pool: the task's own traceback comes from the worker; any other
            # error was raised here by the pool (WorkerLostError, WorkerStartError, ...),
            # whose message says it all and whose frames are the pool's, not the task's.
            frames = self._error_frames(codec, call_id, name, e, local_traceback=False)
            ok = False
        else:
            frames, ok = self._result_frames(codec, call_id, name, value)
        self._reply(ident, frames, name, ok, t0, None, size)

    def _result_frames(self, codec: Any, call_id: int, name: str, value: Any) -> tuple[list, bool]:
        try:
            frames = protocol.encode_result(codec, call_id, value, self._signer)
        except Exception as e:
            msg = f"the result of task {name!r} cannot be sent with {codec.name}: {e}"
            if self._verbose:
                self._note(ERROR, msg)
            return self._encode_error(codec, call_id, "EncodeError", [msg], "", self._signer), False
        if len(frames[2]) > self._reply_limit:
            return self._oversized(codec, call_id, name, len(frames[2])), False
        return frames, True

    def _oversized(self, codec: Any, call_id: int, name: str, size: int) -> list[bytes]:
        """The EncodeError answering a result over ``max_message_size``: a client with
        the same limit would drop the connection (and every call on it) on it."""
        msg = (
            f"the result of task {name!r} is {size} bytes, over this backend's "
            f"max_message_size ({self.max_message_size} bytes); return less, or raise "
            "max_message_size on both sides"
        )
        if self._verbose:
            self._note(ERROR, msg)
        return self._encode_error(codec, call_id, "EncodeError", [msg], "", self._signer)

    def _error_frames(
        self, codec: Any, call_id: int, name: str, e: BaseException, local_traceback: bool = True
    ) -> list[bytes]:
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
        if self._verbose:
            shown = ", ".join(map(_safe_repr, args))
            self._note(ERROR, f"Error while fulfilling task {name!r}: {type_name}({shown})")
        if tb and (self._verbose or _log.isEnabledFor(logging.INFO)):
            self._log_traceback(name, type_name, tb)
        return self._encode_error(codec, call_id, type_name, args, tb, self._signer)

    def _log_traceback(self, name: str, type_name: str, tb: str) -> None:
        """Log a failing call's traceback, at most once per task and exception type
        per TRACEBACK_INTERVAL; the next one logged says how many were skipped."""
        skipped = self._tb_limit.admit((name, type_name))
        if skipped is None:
            _log.debug("task %r failed again with %s (traceback not logged)", name, type_name)
            return
        if skipped:
            tb = (
                f"{tb.rstrip()}\n(and {skipped} more failures of task {name!r} with "
                f"{type_name} since the last traceback logged, not logged in full)"
            )
        if self._verbose:
            self._note(ERROR, tb)
        if _log.isEnabledFor(logging.INFO):
            _log.info("task %r failed: %s", name, tb.rstrip())

    def _reply(
        self,
        ident: bytes,
        frames: list[bytes],
        name: str,
        ok: bool,
        t0: float,
        run_time: float | None = None,
        size: int = 0,
    ) -> None:
        """Account for a task's reply, then send it, from the thread that ran it
        (``size``: the request's bytes, charged to the peer's ledger at acceptance).

        In that order, in one hold of the lock: a caller that has its reply reads
        a :attr:`task_count` without its call (the I/O loop relies only on both
        happening in one hold)."""
        elapsed = time.perf_counter() - t0
        with self._lock:
            if self._peers is not None:
                self._peers.settle(ident, size)  # first: the reply may need the room
            self._acct.finished(name, ok, elapsed, run_time)
            self._send_locked(ident, frames)
            # A worker's send may have eaten the edge that would wake the I/O thread
            # (the I/O thread itself, after an inline task, checks EVENTS anyway).
            if threading.get_ident() != self._io_owner:
                self._wake_if_needed_locked()
        if self._verbose and ok:
            self._note(INFO, f"Finished fulfilling task {name!r}")

    def _wake_if_needed_locked(self) -> None:
        """Wake the I/O thread when a request waits or a graceful stop may end (lock held)."""
        router = self._router
        if router is not None and (
            _get(router, _EVENTS) & _POLLIN or (self._stopping and self._acct.in_flight == 0)
        ):
            self._wake_locked()
