"""A BackEnd's I/O loop: the ROUTER socket, the threads, and the calls they run.

One message's way through the server (wire protocol v2: one frame a message,
one or more items in it)::

    ROUTER --recv--> ServerLoop._loop --(ident, frame)--> RequestHandler.handle
                                                 |  (per item of a batch)
           +------------------+------------------+---------------------+
           | None             | reply item       | Call                |
           v (dropped,        v                  v                     v
             counted)     pending (this      inline: _run_inline    pool: _submit
                          thread's replies,   (this thread)          -> _run (a worker)
                          by peer)  <--- reply item                     |
                              |                                      reply item
                              v                                         |
    ROUTER <--send-- _send_locked: one frame per peer <--- _reply (the worker, locked)
                     (load filled in, sealed with the peer's session when keyed)

Replies made on the I/O thread wait in ``pending`` until a read finds no
request waiting, another client's request is read, or 256 are waiting: then
each peer's go in one frame (up to REPLY_FRAME_BYTES). A worker sends its own
reply as soon as it has it. Every frame is packed, and sealed, in the hold of
the lock that sends it, so a session's sequence numbers follow the send order
(a reply deferred to the peer ledger's backlog is packed when it is sent).

Threads and the socket. ZeroMQ sockets are not thread-safe, but one may be
used from several threads when every use is serialised by a lock (a lock is
the full memory barrier libzmq asks for). The I/O thread reads requests under
that lock and, between reads, sleeps in ``poll()`` on the socket's file
descriptor *without* holding it. A pool worker that finishes a task takes the
lock and sends its reply itself, so the I/O thread is never woken for a
reply. Because any use of the socket may consume the descriptor's edge,
whoever used it last checks ``EVENTS`` (the I/O thread: or reads until
EAGAIN) and a worker wakes the I/O thread through a pipe when a request is
waiting. While no call is in a worker's hands, no other thread needs the
socket: then the I/O thread waits in a plain blocking ``recv`` under the lock
(bounded by ``RCVTIMEO``), which wakes sooner and costs less per request than
``poll()``.

Quick tasks run inline. A thread wake-up costs about as much as a whole
loopback round trip on a busy machine, and a pool hand-off costs one. So a
task whose recent runs were all very short (see ``accounting.QUALIFY``) runs
on the I/O thread itself (``inline="auto"``). If such a task blocks after
all, a standby thread notices within ``_TAKEOVER`` seconds and takes over
reading the socket; the task is sent back to the pool for a long while.

The hot-path socket calls and flags come from :mod:`taskit._wire`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from taskit import _tracing
from taskit._server.access import CurveAllowList
from taskit._server.handler import (
    CANCELLED,
    QUEUED,
    Call,
    RequestHandler,
    expired_message,
)
from taskit._server.handler import RUNNING as CALL_RUNNING
from taskit._wire import DONTWAIT, EVENTS, MORE, NOBLOCK, POLLIN, ZERO_COPY, base_get, base_recv
from taskit._wire import base_send as _send
from taskit.errors import BackendBindError, PoolShutdownError
from taskit.log import IMPORTANT, INFO
from taskit.protocol import Kind

__all__ = [
    "ServerLoop",
    "in_task",
    "NEW",
    "BINDING",
    "RUNNING",
    "STOPPED",
    "CallExpired",
    "run_unless_expired",
    "REPLY_FRAME_ITEMS",
    "REPLY_FRAME_BYTES",
]

_log = logging.getLogger("taskit.backend")

_recv, _get = base_recv, base_get
_EVENTS, _POLLIN, _NOBLOCK, _DONTWAIT, _MORE = EVENTS, POLLIN, NOBLOCK, DONTWAIT, MORE

_BATCH = 64  # requests read per wake-up before flags are checked again
# A message of several frames is not v2: the I/O loop keeps this many of its frames
# (a v1 CALL's magic and header) to answer a v1 client, and frees the rest one by one.
_MAX_PARTS = 2
# Replies to one peer packed in one frame: at most this many items, this many bytes
# of items (a larger reply goes alone). Batching pays for small replies (256 of 30
# bytes fit); the byte cap keeps it from multiplying what the ZeroMQ queue towards a
# client that stops reading holds: peer_queue counts messages, not bytes.
REPLY_FRAME_ITEMS = 256
REPLY_FRAME_BYTES = 8 * 1024
_RESULT = int(Kind.RESULT)
_ERROR = int(Kind.ERROR)

# A standby thread takes the socket over from an inline task running longer
# than this, so a task that blocks unexpectedly never stalls the backend.
_TAKEOVER = 0.01
_DONE, _DEMOTED = "done", "demoted"

# How the I/O loop reads the next request (see _loop).
_TRY, _CHECK, _BACKLOG, _WAIT = 0, 1, 2, 3
# The longest blocking read of the I/O loop (the socket's RCVTIMEO): after this
# long without a request it sleeps in poll() again, where a stop or a worker's
# wake-up reaches it at once. Also the longest a stop, or any other thread
# wanting the backend's lock, waits on a busy socket.
_WAIT_MS = 10

# A graceful stop, once every accepted call is answered, keeps answering new ones
# with Stopping until none came for end_resp * _QUIET seconds (a call its client
# sent before it heard of the stop then still gets an answer), but for at most
# end_resp * _DRAIN seconds (a client that ignores Stopping cannot hold it open).
_QUIET = 0.5
_DRAIN = 10
# Clients that lost a reply, remembered so they are not told "never ran" at the end
# of a graceful stop; past this many, nobody is told (see _tell_stopped_locked).
_LOSSY_MAX = 10_000
_CALL_KIND = bytes([Kind.CALL])  # the byte after a CALL message's preamble

# Life cycle of a BackEnd.
NEW, BINDING, RUNNING, STOPPED = "new", "binding", "running", "stopped"

in_task = threading.local()  # .backend: the BackEnd whose task this thread runs


def bind_hint(err: int | None) -> str:
    """What to do when bind() failed with ``err`` (an errno)."""
    if err == zmq.EADDRINUSE:
        return "is another server using it? Choose another port, or port=0 for any free port"
    if err == zmq.EADDRNOTAVAIL:
        return (
            "that address is not one of this machine's; bind one of its addresses, "
            "127.0.0.1, or 0.0.0.0 for every interface"
        )
    if err == errno.ENODEV:
        return "no such host or interface here; give an IP address of this machine"
    if err == errno.EACCES:
        return "ports below 1024 need privileges; choose a port from 1024 up, or port=0"
    return "check the host and port"


class ServerLoop:
    """Owns a BackEnd's ROUTER, wake-up pipe, threads (I/O, standby) and pool, and
    feeds its :class:`~taskit._server.handler.RequestHandler` (see the module).

    ``owner``: the BackEnd (a ``pass_backend`` task's first argument, the
    ``in_task`` mark); ``configure``: sets the ROUTER's options before it binds;
    ``pool``: a ready pool (then ``owns_pool`` is False) or None (one of
    ``pool_kind`` with ``workers`` is made at :meth:`open`); ``standby``: run the
    standby thread (inline runs are on). ``lock`` guards the socket, the life
    cycle flags and the handler's counters.
    """

    def __init__(
        self,
        owner: Any,
        handler: RequestHandler,
        endpoint: str,
        *,
        end_resp: float,
        configure: Callable[[zmq.Socket], None],
        allow: CurveAllowList | None,
        pool: Any,
        pool_kind: str,
        owns_pool: bool,
        workers: int | None,
        standby: bool,
        note: Callable[[str, str], None],
    ) -> None:
        self.owner = owner
        self.handler = handler
        self.lock = handler.lock
        self.endpoint = endpoint
        self.end_resp = end_resp
        self._configure = configure
        self.allow = allow
        self.pool = pool
        self.pool_kind = pool_kind
        self.owns_pool = owns_pool
        self.workers = workers
        self.standby = standby
        self._note = note
        self.state = NEW
        self.terminating = False
        self.stopped = threading.Event()
        self.ctx: zmq.Context | None = None
        self.router: zmq.Socket | None = None
        self.wake_r = self.wake_w = -1
        self.thread: threading.Thread | None = None
        self.io_owner: int | None = None  # the thread now reading the socket
        self.role_idents: set[int] = set()  # the I/O and standby threads
        self.standby_thread: threading.Thread | None = None
        self.inline_since = 0.0  # perf_counter() start of the inline task running, else 0
        self.inline_seen = 0.0  # start of the latest inline task
        self.started_at = 0.0
        self.told = False  # the clients were told of the stop
        # Clients that lost a reply (see _tell_stopped_locked); None: too many to track.
        self.lossy: set[bytes] | None = set()
        # OBS HOOKS, set when metrics are on (taskit._metering.ServerMeter): a call
        # answered with its reply item (under the lock); the bytes of each message
        # read (reading thread) and of each reply frame sent (under the lock).
        self.observe: Callable[[Call, bool, float | None, tuple], None] | None = None
        self.observe_read: Callable[[int], None] | None = None
        self.observe_sent: Callable[[int], None] | None = None

    # -- life cycle ------------------------------------------------------------------

    def bind(self) -> str:
        """Make the context and ROUTER and bind it; return the bound endpoint.

        Raises ``RuntimeError`` when this loop already served and
        :class:`BackendBindError` (everything released) when binding fails."""
        with self.lock:
            if self.state != NEW:
                raise RuntimeError("this BackEnd has already served; create a new one")
            self.state = BINDING  # running only once bound: port is read from it
        ctx = zmq.Context()
        if self.allow is not None:
            self.allow.start(ctx)  # ZAP must be served before the ROUTER binds
        sock = ctx.socket(zmq.ROUTER)
        try:
            self._configure(sock)
            sock.setsockopt(zmq.RCVTIMEO, _WAIT_MS)  # bounds the I/O loop's blocking reads
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._release(ctx, sock)
            with self.lock:
                self.state = STOPPED
                self.stopped.set()
            raise BackendBindError(
                f"cannot bind {self.endpoint}: {e.strerror}; {bind_hint(e.errno)}"
            ) from e
        self.ctx, self.router = ctx, sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def open(self, pool_name: str) -> None:
        """After :meth:`bind`: make the wake-up pipe and the pool (when not given),
        then mark the loop running. On failure, releases everything and raises."""
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        if self.pool is None:
            from taskit.pool import WorkerPool

            try:
                self.pool = WorkerPool(self.workers, kind=self.pool_kind, name=pool_name)
            except BaseException:
                assert self.ctx is not None
                self._release(self.ctx, self.router)
                self.ctx = self.router = None
                for fd in (self.wake_r, self.wake_w):
                    os.close(fd)
                self.wake_r = self.wake_w = -1
                with self.lock:
                    self.state = STOPPED
                    self.stopped.set()
                raise
        size = getattr(self.pool, "size", None)
        if callable(size):
            self.handler.workers = size
        self.started_at = time.monotonic()
        with self.lock:
            self.state = RUNNING

    def stop(self) -> bool:
        """Begin a graceful stop (see BackEnd.stop_server); True when it never started."""
        with self.lock:
            if self.end_unstarted_locked():
                return True
            self.handler.stopping = True
            self.wake_locked()
        return False

    def terminate(self) -> None:
        """End now (see BackEnd.terminate_server)."""
        with self.lock:
            if self.end_unstarted_locked():
                return
            self.terminating = True
            self.wake_locked()

    def end_unstarted_locked(self) -> bool:
        """Mark a loop that never bound as stopped; True if it was one. Holds the lock."""
        if self.state != NEW:
            return False
        self.state = STOPPED
        self.stopped.set()
        return True

    def inside(self) -> bool:
        """True on this loop's I/O or standby thread or while running one of its tasks."""
        return (
            threading.get_ident() in self.role_idents
            or getattr(in_task, "backend", None) is self.owner
        )

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: stop gracefully; a second one ends at once."""
        # Runs between bytecodes of the main thread, maybe while it holds the lock:
        # only set flags and poke the pipe.
        if self.handler.stopping:
            self.terminating = True
        self.handler.stopping = True
        fd = self.wake_w
        if fd >= 0:
            try:
                os.write(fd, b"\0")
            except OSError:
                pass

    def wake_locked(self) -> None:
        """Wake the I/O thread from its poll() (lock held, or from a signal)."""
        fd = self.wake_w
        if fd >= 0:
            try:
                os.write(fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the I/O thread has wake-ups pending anyway

    # -- the threads -----------------------------------------------------------------

    def serve(self) -> None:
        """Body of the I/O thread (start()) or of main(): serve, then release everything."""
        me = threading.get_ident()
        self.role_idents.add(me)
        self.io_owner = me
        if self.standby:
            self.standby_thread = threading.Thread(
                target=self._roles,
                args=(False,),
                daemon=True,
                name=f"taskit-backend-standby:{self.owner.port or self.endpoint}",
            )
            self.standby_thread.start()
        self._roles(True)

    def _roles(self, reading: bool) -> None:
        """Alternate between reading the socket and standing by, until serving ends.

        The thread that finds serving over while reading tears everything down.
        """
        me = threading.get_ident()
        self.role_idents.add(me)
        try:
            self._alternate(reading)
        finally:
            self.role_idents.discard(me)  # thread idents are reused after a thread ends

    def _alternate(self, reading: bool) -> None:
        while True:
            if reading:
                try:
                    outcome = self._loop()
                except BaseException:  # a bug in the loop itself: say so, release everything
                    _log.exception("backend I/O loop crashed on %s", self.endpoint)
                    self.terminating = True
                    outcome = _DONE
                if outcome == _DONE:
                    if not self.terminating:
                        self._drain()
                    self._teardown()
                    return
                reading = False
            else:
                if not self._standby():
                    return
                reading = True

    def _standby(self) -> bool:
        """Watch inline tasks; take the socket over from one that runs too long.

        Returns True once this thread owns the socket, False when serving ended.
        """
        me = threading.get_ident()
        while True:
            # Check often only while inline tasks are running; an idle backend sleeps.
            # inline_seen and inline_since are time.perf_counter() values.
            recent = time.perf_counter() - self.inline_seen < 1.0
            if self.stopped.wait(_TAKEOVER / 2 if recent else 0.5):
                return False
            since = self.inline_since
            if since and time.perf_counter() - since > _TAKEOVER:
                with self.lock:
                    if self.inline_since != since or self.state != RUNNING:
                        continue
                    self.io_owner = me
                    acct = self.handler.acct
                    acct.takeovers += 1
                    # The inline call still running is in flight now: a graceful stop
                    # must wait for its reply (_run_inline counts it out).
                    acct.in_flight += 1
                _log.debug("standby thread took the socket over from a long inline task")
                return True

    def _teardown(self) -> None:
        graceful = not self.terminating
        with self.lock:
            if graceful:
                self._tell_stopped_locked()
            sock, self.router = self.router, None
            wake_r, wake_w = self.wake_r, self.wake_w
            self.wake_r = self.wake_w = -1
            if sock is not None:
                sock.close()  # lingers end_resp seconds to flush the last replies
        for fd in (wake_r, wake_w):
            if fd >= 0:
                os.close(fd)
        if self.ctx is not None:
            self._release(self.ctx)
            self.ctx = None
        if self.owns_pool and self.pool is not None:
            self.pool.shutdown(wait=graceful, cancel_pending=not graceful)
        with self.lock:
            self.state = STOPPED
        how = "stopped" if graceful else "terminated"
        _log.info("backend on %s %s", self.endpoint, how)
        self._note(IMPORTANT, f"Server {how}")
        self.stopped.set()

    def _release(self, ctx: zmq.Context, sock: zmq.Socket | None = None) -> None:
        """Close ``sock`` at once (if given), stop the ZAP handler, end ``ctx``."""
        if sock is not None:
            sock.close(0)
        if self.allow is not None:
            self.allow.stop()
        ctx.term()

    def _drain(self) -> None:
        """Graceful stop, every accepted call answered: answer what still arrives
        (``Stopping``, admin signals, PONGs) until the socket has been quiet for
        ``end_resp * _QUIET`` seconds, at most ``end_resp * _DRAIN`` seconds.

        A call its client sent before hearing of the stop (from a ``Stopping``
        reply or the notice of :meth:`_tell_stopping`) still reaches us after the
        last accepted call was answered; closing then would leave it unanswered,
        and its caller could not know that it never ran.
        """
        router = self.router
        if router is None or self.end_resp <= 0:
            return
        if not self.told:
            self._tell_stopping()
        handler = self.handler
        with self.lock:
            if not (handler.heard or handler.heard_old or _get(router, _EVENTS) & _POLLIN):
                return  # no client was ever heard from, none is waiting: none to wait for
        lock = self.lock
        poller = select.poll()
        poller.register(router.getsockopt(zmq.FD), select.POLLIN)  # type: ignore[arg-type]
        poller.register(self.wake_r, select.POLLIN)
        now = time.monotonic()
        give_up = now + self.end_resp * _DRAIN
        quiet_until = now + self.end_resp * _QUIET
        while not self.terminating:
            with lock:
                # Reading EVENTS also re-arms the edge-triggered descriptor polled below.
                if _get(router, _EVENTS) & _POLLIN:
                    ident, *frames = router.recv_multipart(_NOBLOCK, copy=False)
                    msg: list[Any] | None = [ident.bytes, *frames]
                else:
                    msg = None
            if msg is not None:
                try:
                    self._answer(msg)
                except Exception:  # as in _loop: never let one message end the stop early
                    _log.exception("backend on %s could not handle a message", self.endpoint)
                # Only a CALL says more may be on their way: a client's periodic PING
                # (or a peer sending junk) must not hold the stop open until the cap.
                if len(msg) == 2 and msg[1].bytes[4:5] == _CALL_KIND:
                    quiet_until = time.monotonic() + self.end_resp * _QUIET
                continue
            left = min(quiet_until, give_up) - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                if fd == self.wake_r:
                    try:
                        os.read(fd, 4096)
                    except BlockingIOError:
                        pass

    def _answer(self, msg: list[Any]) -> None:
        """Handle one message (the routing id, then its frames) and act on the
        handler's decisions (off the hot path: :meth:`_loop` spells this out)."""
        ident = msg[0]
        if self.observe_read is not None:  # OBS HOOK: metrics on
            self.observe_read(sum(map(len, msg[1:])))
        if len(msg) != 2:
            out = self.handler.handle_frames(ident, msg[1:3], len(msg) - 1)
            if out is not None:
                with self.lock:
                    self._send_raw_locked(ident, out)
            return
        pending: dict[bytes, list[tuple]] = {}
        self._act(ident, self.handler.handle(ident, msg[1]), pending)
        if pending:
            with self.lock:
                self._flush_pending_locked(pending)

    def _act(self, ident: bytes, out: Any, pending: dict[bytes, list[tuple]]) -> int:
        """Act on the handler's decision ``out`` about a message of ``ident``: run or
        submit its calls, add reply items to ``pending`` (sent by the caller, one
        frame per peer), send a complete frame now. Returns the items added."""
        t = type(out)
        if t is Call:
            if out.state == CANCELLED:  # withdrawn by a CANCEL later in its batch
                return 0
            if not out.inline:
                self._submit(out)
                return 0
            out = self._run_inline(out)
            t = tuple
        if t is tuple:
            queue = pending.get(ident)
            if queue is None:
                pending[ident] = [out]
            else:
                queue.append(out)
            return 1
        if t is bytes:
            with self.lock:
                self._send_raw_locked(ident, [out])
            return 0
        if t is list:
            n = 0
            for o in out:
                n += self._act(ident, o, pending)
            return n
        return 0

    # -- the I/O loop ----------------------------------------------------------------

    def _loop(self) -> str:
        router = self.router
        assert router is not None
        lock = self.lock
        poller = select.poll()
        zmq_fd = router.getsockopt(zmq.FD)
        poller.register(zmq_fd, select.POLLIN)  # type: ignore[arg-type]  # FD is an int
        poller.register(self.wake_r, select.POLLIN)
        wake_r = self.wake_r
        sleep_ms = max(1, int(self.end_resp * 1000))  # a safety net: wake-ups are explicit
        handler = self.handler
        handle = handler.handle
        acct = handler.acct
        run_inline, submit, act = self._run_inline, self._submit, self._act
        flush_pending = self._flush_pending_locked
        peers = handler.peers
        me = threading.get_ident()
        observe_read = self.observe_read  # OBS HOOK: metrics on (set before serving)
        # Replies made on this thread (refusals, inline results, PONGs...), by peer,
        # sent together once no request is waiting (one frame per peer, capped).
        pending: dict[bytes, list[tuple]] = {}
        npending = 0
        last = b""  # the routing id of the request read last
        # How to read next. An empty recv raises, which costs more than checking
        # EVENTS first, but EVENTS costs more than a recv that finds a request. So:
        # _TRY when a request is likely (the socket's descriptor woke us, or many
        # are queued), _CHECK right after the first one of a wake-up (sync callers
        # send one at a time), _BACKLOG (try) once a second one was there. Either
        # way, before sleeping the descriptor is left armed for the next request.
        # And _WAIT while no call is in a worker's hands: no other thread needs the
        # socket then, so this one waits in a plain blocking recv (bounded by RCVTIMEO,
        # _WAIT_MS) holding the lock -- much cheaper per request than poll() + EVENTS
        # + a non-blocking recv, and it wakes sooner.
        state = _CHECK
        while True:
            more = False
            for _ in range(_BATCH):
                with lock:
                    if self.terminating:  # a <kill>'s own answer still goes out
                        if npending:
                            flush_pending(pending)
                        return _DONE
                    if npending >= REPLY_FRAME_ITEMS:
                        flush_pending(pending)
                        npending = 0
                    # The routing id as bytes: a ROUTER always has a frame after it.
                    # Replies made here wait to go out together until no request is
                    # there to be answered with them (a failed read, or before waiting).
                    if state == _WAIT:
                        try:
                            if npending:
                                try:
                                    ident = _recv(router, _NOBLOCK)
                                except zmq.Again:
                                    flush_pending(pending)
                                    npending = 0
                                    ident = _recv(router, 0)
                            else:
                                ident = _recv(router, 0)
                        except zmq.Again:  # idle for _WAIT_MS: sleep in poll() from now on
                            state = _CHECK
                            break
                    elif state == _CHECK:
                        if not _get(router, _EVENTS) & _POLLIN:
                            break
                        ident = _recv(router, _NOBLOCK)
                        state = _BACKLOG
                    else:
                        try:
                            ident = _recv(router, _NOBLOCK)
                        except zmq.Again:
                            break
                        if state == _TRY:
                            state = _CHECK
                    # The frame as a Frame, not bytes: it carries its RCVMORE flag,
                    # read in C, and a big one is read in place.
                    frame = _recv(router, _NOBLOCK, False)
                    if frame.more:  # not a v2 message: keep two frames, free the rest
                        frames = [frame]
                        nframes = 1
                        while frame.more:
                            frame = _recv(router, _NOBLOCK, False)  # frees the one before
                            nframes += 1
                            if nframes <= _MAX_PARTS:
                                frames.append(frame)
                        frame = None
                if npending and ident != last:
                    # Another client's turn (ZeroMQ reads clients in turn): what waits
                    # for the others goes now, so batching adds them no latency.
                    with lock:
                        flush_pending(pending)
                    npending = 0
                last = ident
                try:
                    if frame is not None:
                        if observe_read is not None:  # OBS HOOK: metrics on
                            observe_read(len(frame))
                        out = handle(ident, frame)
                        frame = None  # hold no frame of this message past its handling
                        t = type(out)
                        if t is Call:
                            if out.inline:
                                out = run_inline(out)
                                t = tuple
                            else:
                                submit(out)
                        if t is tuple:
                            queue = pending.get(ident)
                            if queue is None:
                                pending[ident] = [out]
                            else:
                                queue.append(out)
                            npending += 1
                        elif out is not None and t is not Call:
                            npending += act(ident, out, pending)
                    else:
                        raw = handler.handle_frames(ident, frames, nframes)
                        frames = []
                        if raw is not None:
                            with lock:
                                self._send_raw_locked(ident, raw)
                except Exception:  # a bug, or a user codec raising oddly: keep serving
                    _log.exception("backend on %s could not handle a message", self.endpoint)
                    with lock:
                        acct.drop("malformed")
                out = None
                if self.io_owner != me:  # the standby took over during an inline task
                    with lock:
                        if npending:
                            flush_pending(pending)
                        self._wake_if_needed_locked()
                    return _DEMOTED
                # Read without the lock: a worker's reply and its in_flight decrement
                # happen in one hold of it, so 0 means no worker will want the lock
                # (one in that hold now is waited for by the next read's).
                if acct.in_flight == 0 and not (handler.stopping or self.terminating):
                    state = _WAIT
                elif state == _WAIT:
                    state = _BACKLOG
            else:
                more = True
            if npending:
                with lock:
                    flush_pending(pending)
                npending = 0
            if peers is not None and peers.backlog:
                with lock:
                    self._flush_backlog_locked()
            if self.terminating:
                return _DONE
            if handler.stopping:
                if not self.told:
                    self._tell_stopping()
                if acct.in_flight == 0 and acct.subtasks == 0:
                    return _DONE
            if more:
                state = _BACKLOG
                continue
            state = _CHECK
            # Replies wait for a full peer queue: look again soon (ZeroMQ tells no one
            # when a peer's queue has room).
            backlog = peers is not None and peers.backlog
            for fd, _ in poller.poll(_WAIT_MS if backlog else sleep_ms):
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd == zmq_fd:
                    state = _TRY

    # -- running calls ---------------------------------------------------------------

    def _run_inline(self, call: Call) -> tuple:
        """Run a quick task on the I/O thread; return its reply item (the caller
        sends it). :meth:`_run` + :meth:`_reply` with fewer clock reads and lock
        rounds (this is the per-message hot path): the call was not counted in
        flight, unless the standby thread took the socket over meanwhile."""
        clock = time.perf_counter
        handler = self.handler
        if call.expires and time.monotonic() > call.expires:
            return handler.expired(call)
        # The standby thread compares these with time.perf_counter() (see _standby).
        # No in_task mark: this thread is one of the backend's own (inside() knows it).
        self.inline_seen = self.inline_since = start = clock()
        try:
            value = call.fn(*call.args, **call.kwargs)
        except BaseException as e:  # anything a task raises, even SystemExit, is the caller's
            item = handler.error_item(call, e)
            ok = False
        else:
            codec = call.codec
            try:
                body = codec.encode(value)
            except Exception:
                body = None
            if type(body) is bytes and len(body) <= handler.reply_limit:
                item = (_RESULT, codec.wire_id, call.call_id, body)
                ok = True
            else:
                item, ok = handler.result_item(call, value)
        elapsed = clock() - start  # the task and its encoding: what qualifies it inline
        with self.lock:
            self.inline_since = 0.0
            if self.observe is not None:  # OBS HOOK: metrics on
                self.observe(call, ok, elapsed, item)
            if self.io_owner == threading.get_ident():
                handler.acct.finished(call.name, ok, elapsed, elapsed, False)
            else:
                # The standby took the socket over meanwhile (and counted this call in
                # flight): keep this task off the I/O thread.
                handler.acct.finished(call.name, ok, elapsed, elapsed)
                handler.acct.bar(call.name)
        if handler.verbose and ok:
            handler.note(INFO, f"Finished fulfilling task {call.name!r}")
        return item

    def _submit(self, call: Call) -> None:
        """Hand an accepted call to the pool; answer it at once when the pool cannot."""
        call.t0 = time.perf_counter()
        try:
            if self.pool_kind == "process":
                if call.pass_backend:
                    raise TypeError(
                        f"task {call.name!r} wants the backend, which needs pool='thread'"
                    )
                if call.expires:  # checked again by the child that is handed it
                    fut = self.pool.submit(
                        run_unless_expired, call.expires, call.fn, *call.args, **call.kwargs
                    )
                else:
                    fut = self.pool.submit(call.fn, *call.args, **call.kwargs)
                call.fut = fut
                if call.meta is not None:  # OBS HOOK: a span for the call's time in the pool
                    end_span = _tracing.span_until_done(call.name, call.meta)
                    if end_span is not None:
                        fut.add_done_callback(end_span)
                fut.add_done_callback(lambda f: self._finish(call, f))
            else:
                if call.pass_backend:
                    call.args = [self.owner, *call.args]
                self.pool.submit(self._run, call)
        except PoolShutdownError:
            with self.lock:
                self._forget_queued_locked(call)
                self.handler.unaccept(call)
            item = self.handler.refusal(
                call.codec, call.call_id, "Stopping", "this backend's pool is shut down"
            )
            with self.lock:
                self._send_locked(call.ident, [item])
        except BaseException as e:  # e.g. the pool cannot take it: answer, keep serving
            with self.lock:
                self._forget_queued_locked(call)
            self._reply(call, self.handler.error_item(call, e), False, None)

    def _forget_queued_locked(self, call: Call) -> None:
        queued = self.handler.queued
        key = (call.ident, call.call_id)
        if queued.get(key) is call:
            del queued[key]

    def _start_locked(self, call: Call) -> tuple | None:
        """A pool call is about to start (lock held): None when it may run (now
        RUNNING); else why not: it was cancelled (an empty tuple: nothing to send),
        its client is gone (counted; nothing to send) or its deadline passed (the
        Expired reply item)."""
        if call.state != QUEUED:
            return ()
        self._forget_queued_locked(call)
        handler = self.handler
        if call.ident in handler.gone:
            call.state = CANCELLED
            handler.unaccept(call)  # settles its ledger charge too
            handler.acct.drop("client_gone")
            self._wake_if_needed_locked()
            return ()
        if call.expires and time.monotonic() > call.expires:
            call.state = CANCELLED
            handler.unaccept(call)
            handler.acct.refuse("Expired")
            msg = expired_message(call.budget)
            return handler.encode_error(call.codec, call.call_id, "Expired", [msg], "")
        call.state = CALL_RUNNING
        return None

    def _run(self, call: Call) -> None:
        """Run ``call`` on a pool thread and reply from there."""
        # Kept apart from _run_inline on purpose: a shared helper would add a call per
        # message on the inline hot path, and the two differ in marks, locking and reply.
        handler = self.handler
        with self.lock:
            why = self._start_locked(call)
            if why is None:
                handler.acct.running += 1
            elif why:
                self._send_locked(call.ident, [why])
                if threading.get_ident() != self.io_owner:
                    self._wake_if_needed_locked()
        if why is not None:
            return
        in_task.backend = self.owner
        start = time.perf_counter()
        try:
            value = call.fn(*call.args, **call.kwargs)
        except BaseException as e:  # anything a task raises, even SystemExit, is the caller's
            run_time = time.perf_counter() - start
            item = handler.error_item(call, e)
            ok = False
        else:
            run_time = time.perf_counter() - start
            item, ok = handler.result_item(call, value)
        finally:
            in_task.backend = None
        self._reply(call, item, ok, run_time, ran=True)

    def _finish(self, call: Call, fut: Any) -> None:
        """Reply to a call a process pool ran (``fut``: its future)."""
        if fut.cancelled():
            return  # withdrawn by a CANCEL (handler.cancel settled it)
        with self.lock:
            self._forget_queued_locked(call)
            call.state = CALL_RUNNING
        try:
            value = fut.result()
        except CallExpired:
            with self.lock:
                self.handler.unaccept(call)
            item = self.handler.expired(call)
            with self.lock:
                self._send_locked(call.ident, [item])
                self._wake_if_needed_locked()
            return
        except BaseException as e:
            # Process pool: the task's own traceback comes from the worker; any other
            # error was raised here by the pool (WorkerLostError, WorkerStartError, ...),
            # whose message says it all and whose frames are the pool's, not the task's.
            item = self.handler.error_item(call, e, local_traceback=False)
            ok = False
        else:
            item, ok = self.handler.result_item(call, value)
        self._reply(call, item, ok, None)

    def _reply(
        self, call: Call, item: tuple, ok: bool, run_time: float | None, ran: bool = False
    ) -> None:
        """Account for a call's reply, then send it, from the thread that ran it.

        In that order, in one hold of the lock: a caller that has its reply reads
        a ``task_count`` without its call (the I/O loop relies only on both
        happening in one hold). ``ran``: counted running by :meth:`_run`."""
        handler = self.handler
        elapsed = time.perf_counter() - call.t0
        with self.lock:
            if handler.peers is not None:
                handler.peers.settle(call.ident, call.size)  # first: the reply may need room
            handler.acct.finished(call.name, ok, elapsed, run_time)
            if ran:
                handler.acct.running -= 1
            if self.observe is not None:  # OBS HOOK: metrics on
                self.observe(call, ok, run_time, item)
            self._send_locked(call.ident, [item])
            # A worker's send may have eaten the edge that would wake the I/O thread
            # (the I/O thread itself, after an inline task, checks EVENTS anyway).
            if threading.get_ident() != self.io_owner:
                self._wake_if_needed_locked()
        if handler.verbose and ok:
            handler.note(INFO, f"Finished fulfilling task {call.name!r}")

    def _wake_if_needed_locked(self) -> None:
        """Wake the I/O thread when a request waits or a graceful stop may end (lock held)."""
        router = self.router
        if router is not None and (
            _get(router, _EVENTS) & _POLLIN
            or (self.handler.stopping and self.handler.acct.in_flight == 0)
        ):
            self.wake_locked()

    # -- sending ---------------------------------------------------------------------

    def _flush_pending_locked(self, pending: dict[bytes, list[tuple]]) -> None:
        """Send the replies the I/O thread made, one frame per peer (lock held)."""
        send = self._send_locked
        for ident, items in pending.items():
            send(ident, items)
        pending.clear()

    def _send_locked(self, ident: bytes, items: list[tuple]) -> None:
        """Send reply items to ``ident`` (lock held): one frame, or several past the
        caps (REPLY_FRAME_ITEMS items, REPLY_FRAME_BYTES of items; a larger reply goes
        alone). A full peer queue defers a frame's items to the ledger."""
        if len(items) == 1:
            self._send_frame_locked(ident, items)
            return
        chunk: list[tuple] = []
        size = 0
        cap = min(REPLY_FRAME_BYTES, self.handler.reply_limit)  # a frame within max_message_size
        for item in items:
            n = len(item[3]) + 24  # its header too
            if chunk and (len(chunk) >= REPLY_FRAME_ITEMS or size + n > cap):
                self._send_frame_locked(ident, chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += n
            if n >= cap:
                self._send_frame_locked(ident, chunk)
                chunk, size = [], 0
        if chunk:
            self._send_frame_locked(ident, chunk)

    def _send_frame_locked(self, ident: bytes, items: list[tuple]) -> None:
        router = self.router
        if router is None:
            return  # terminated meanwhile: nobody left to answer
        handler = self.handler
        session = None
        if handler.signer is not None:
            session = handler.sessions.get(ident)
            if session is None:  # forgotten (evicted, or its client is gone)
                handler.acct.drop("no_session", len(items))
                return
        try:
            # The routing id first: a full queue or a gone peer fails here, before
            # anything is sealed (a seal's sequence must match the send order).
            _send(router, ident, _MORE)
        except zmq.Again:  # the peer's queue is full: it is not reading (see PeerLedger)
            acct, peers = handler.acct, handler.peers
            if peers is None:
                acct.drop("reply_hwm", len(items))
                self._reply_dropped_locked(ident)
            else:
                idle = not peers.backlog
                if not peers.defer(ident, items):
                    acct.drop("reply_over_budget", len(items))
                    self._reply_dropped_locked(ident)
                elif idle:  # the I/O loop retries a backlog often, once it knows of one
                    self.wake_locked()
            return
        except zmq.ZMQError as e:
            # EHOSTUNREACH: the client went away first. Anything else is unexpected,
            # but must not leave the call counted in flight forever.
            handler.acct.drop("reply_unroutable", len(items))
            if e.errno == errno.EHOSTUNREACH:
                handler.client_gone(ident)
            else:
                _log.error("backend could not send a reply: %s", e)
            return
        frame = handler.pack(items, session)
        # A big frame goes zero-copy: ZeroMQ keeps a reference to the bytes object
        # until it is sent, rather than a copy in a freshly faulted-in buffer.
        _send(router, frame, _DONTWAIT, len(frame) < ZERO_COPY)
        if self.observe_sent is not None:  # OBS HOOK: metrics on
            self.observe_sent(len(frame))

    def _send_raw_locked(self, ident: bytes, frames: list[bytes]) -> None:
        """Send a complete message (lock held): a WELCOME, an unsigned refusal, a
        v1 refusal. Nothing is deferred: a peer not reading misses it."""
        router = self.router
        if router is None:
            return
        try:
            _send(router, ident, _MORE)
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                _send(router, frame, _MORE if i < last else _DONTWAIT, len(frame) < ZERO_COPY)
        except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
            self.handler.acct.drop("reply_unroutable")
            return
        if self.observe_sent is not None:  # OBS HOOK: metrics on
            self.observe_sent(sum(map(len, frames)))

    def _flush_backlog_locked(self) -> None:
        """Hand ZeroMQ the replies waiting for peers whose queue was full, oldest first,
        until a queue is full again; forget (and count) those of peers that left.
        Each is packed (and sealed) now, when it goes onto the socket."""
        router, handler = self.router, self.handler
        peers = handler.peers
        if router is None or peers is None:
            return
        for ident, queue in list(peers.backlog.items()):
            session = None
            if handler.signer is not None:
                session = handler.sessions.get(ident)
                if session is None:
                    handler.acct.drop("no_session", peers.forget(ident))
                    continue
            while queue:
                items = queue[0][0]
                try:
                    _send(router, ident, _MORE)  # a full queue or a gone peer fails here
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    handler.acct.drop("reply_unroutable", peers.forget(ident))
                    handler.client_gone(ident)
                    break
                frame = handler.pack(items, session)
                _send(router, frame, _DONTWAIT, len(frame) < ZERO_COPY)
                peers.sent(ident)
                if self.observe_sent is not None:  # OBS HOOK: metrics on
                    self.observe_sent(len(frame))

    def _notify_locked(self, ident: bytes, item: tuple) -> None:
        """Send a notice (call id 0) to ``ident``, sealed with its session when keyed;
        a client gone or not reading is skipped silently (lock held)."""
        router, handler = self.router, self.handler
        if router is None:
            return
        session = None
        if handler.signer is not None:
            session = handler.sessions.get(ident)
            if session is None:
                return
        try:
            _send(router, ident, _MORE)
        except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
            return
        frame = handler.pack([item], session)
        _send(router, frame, _DONTWAIT)
        if self.observe_sent is not None:  # OBS HOOK: metrics on
            self.observe_sent(len(frame))

    def _tell_stopped_locked(self) -> None:
        """Tell each client heard from lately that this graceful stop is over (lock
        held; nothing is read after it): its calls still unanswered here never ran,
        so its FrontEnd re-sends them elsewhere instead of failing them as lost.

        Not told: a client with replies still waiting in the ledger (the notice would
        overtake them) or one whose reply was ever dropped (a call of it ran
        unanswered); and no one once too many such clients were seen to remember.
        They learn of the stop from the closed connection, as before."""
        handler, router = self.handler, self.router
        if router is None or self.lossy is None:
            return
        item = handler.stopped_notice()
        backlog = handler.peers.backlog if handler.peers is not None else {}
        for ident in handler.heard | handler.heard_old:
            if ident in backlog or ident in self.lossy:
                continue
            self._notify_locked(ident, item)

    def _reply_dropped_locked(self, ident: bytes) -> None:
        """Remember a client that lost a reply (lock held): it must not be told that its
        unanswered calls never ran. Past _LOSSY_MAX such clients, no one is told."""
        lossy = self.lossy
        if lossy is not None:
            lossy.add(ident)
            if len(lossy) > _LOSSY_MAX:
                self.lossy = None

    def _tell_stopping(self) -> None:
        """Tell every client heard from lately that a graceful stop has begun, so its
        FrontEnd sends no new call here, even one that has none in flight now.
        Clients gone meanwhile, or not reading, are skipped silently."""
        self.told = True
        item, idents = self.handler.stopping_notice()
        with self.lock:
            for ident in idents:
                self._notify_locked(ident, item)


class CallExpired(Exception):
    """Raised in a process worker by :func:`run_unless_expired`: the call's
    deadline passed before the child could start it (it did not run)."""


def run_unless_expired(expires: float, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
    """Run ``fn`` in a process worker unless ``time.monotonic()`` (one clock for
    every process of the machine) is past ``expires``: the check when the parent
    hands a call with a deadline to a child."""
    if time.monotonic() > expires:
        raise CallExpired()
    return fn(*args, **kw)
