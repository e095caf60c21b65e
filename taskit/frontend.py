"""The taskit front end: call functions of remote backends by name.

A :class:`FrontEnd` keeps one ZeroMQ DEALER connection per backend and
pipelines every call on it (many in flight, replies matched by call id). The
routing, retry and reply logic lives in :mod:`taskit._client` (pure, shared
with the asyncio front end); this module only moves frames and wakes waiters.

How the sockets are driven (measured, see ``bench/rpc.py``): ZeroMQ sockets
are not thread-safe, so whoever touches them holds the *I/O lock*. A thread
that makes a blocking call and finds the lock free becomes the *leader*: it
sends its own call and polls the sockets itself until its reply arrives,
resolving any other replies on the way -- a synchronous call costs no thread
hand-off at all (a hand-off costs as much as a loopback round trip on a busy
machine). A thread that finds the lock taken queues its call and wakes the
leader through a pipe. When a leader leaves with calls still in flight, the
background thread ``taskit-frontend-io`` takes over until none remain; it
also watches the socket monitors (connected / disconnected) while idle.

Failure detection: ZMTP heartbeats (``HEARTBEAT_IVL/TIMEOUT/TTL``) make
libzmq drop a silent connection; the socket monitor reports connects and
disconnects. Calls in flight on a dropped connection fail with
:class:`BackendLostError` (at-most-once, the default) or are re-sent with
``retries=N`` (at-least-once). A restarted backend is reconnected by libzmq
and rejoins by itself.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq
from zmq.backend import zmq_poll as _zmq_poll

from taskit._client import DOWN, ClientCore, PendingCall, parse_backend
from taskit._dealer import (
    CONNECT_RETRIED,
    DISCONNECTED,
    HANDSHAKE_FAILED,
    UP_EVENT,
    DealerSettings,
    close_dealer,
    curve_keys,
    monitor_event,
    open_dealer,
)
from taskit.codecs import JSONCodec, Signer
from taskit.errors import (
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    CallTimeoutError,
    FrontEndClosedError,
)
from taskit.log import ERROR, INFO, null_logger
from taskit.progress import progress_bar
from taskit.protocol import DEFAULT_PORT, KILL, STATS, STATUS, STOP, TASKS

__all__ = [
    "FrontEnd",
    "DEFAULT_PORT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "BackendNotAvailableError",
    "BackendProcessingError",
]

_log = logging.getLogger("taskit.frontend")

DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds a call waits for some backend to be reachable
DEFAULT_HEARTBEAT_INTERVAL = 0.5  # seconds between ZMTP PINGs
DEFAULT_HEARTBEAT_TIMEOUT = 2.0  # a backend silent this long is declared lost
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_IDLE_CHECK = 0.25  # seconds between monitor checks while no call is in flight
_LONGEST_POLL = 1000  # ms: a leader re-checks the closed flag at least this often
_MAP_WINDOW = 1000  # calls map() keeps in flight
_DRAIN_ALL = 1 << 62
_ZERO_COPY = 64 * 1024  # bodies from this size on are read without a copy


_MORE = zmq.SNDMORE | zmq.NOBLOCK


def _send(send: Callable[..., Any], frames: list[bytes]) -> None:
    """Send one message's frames (3, or 4 when signed) without blocking.

    Direct ``send`` calls cost half of ``send_multipart``'s loop on the hot path.
    Raises ``zmq.Again`` before anything is sent when there is no connected peer.
    Frames above pyzmq's copy threshold (64 KiB) go out without a copy.
    """
    send(frames[0], _MORE)
    send(frames[1], _MORE)
    if len(frames) == 3:
        send(frames[2], zmq.NOBLOCK)
    else:
        send(frames[2], _MORE)
        send(frames[3], zmq.NOBLOCK)


class _Waiter:
    """A blocking call's slot: ``ok`` is None until resolved; ``latch`` is released then.

    Lighter than a Future (one lock, no condition): the hot path of ``work``.
    """

    __slots__ = ("latch", "ok", "value")

    def __init__(self) -> None:
        self.latch = threading.Lock()
        self.latch.acquire()
        self.ok: bool | None = None
        self.value: Any = None


class _Op:
    """Work only the I/O leader may do (it touches sockets), queued like a call."""

    __slots__ = ("fn", "done", "error")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Link:
    """One backend's DEALER socket and its monitor socket."""

    __slots__ = ("endpoint", "sock", "monitor")

    def __init__(self, endpoint: str, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.monitor = monitor


class FrontEnd:
    """A client of one or more taskit backends (TaskIt 4.0 compatible).

    ``backends``: ``"host"`` (``default_port``), ``"host:port"``, ``("host", port)``,
    ``"tcp://host:port"`` or ``"ipc://path"``. ``logger``: a TaskIt logger
    (``logger(importance, msg)``); stdlib logging under ``taskit.frontend`` is
    always used too. ``codec``: the codec of every call (``JSONCodec`` as in
    4.0; ``MsgpackCodec`` is faster and carries bytes).

    Keyword-only options:

    - ``timeout``: default seconds a call may take (None: no limit); a call
      that runs out raises :class:`CallTimeoutError` (a ``TimeoutError``).
    - ``retries``: re-sends of a call whose backend was lost. 0 (default) is
      *at-most-once*: a lost call fails with :class:`BackendLostError` and never
      runs twice. N > 0 is *at-least-once*: it may run twice, so only for
      idempotent tasks.
    - ``busy_retries``: re-sends after a ``Busy`` answer (backend queue full),
      with exponential backoff, before :class:`BusyError` is raised.
    - ``connect_timeout``: how long a call waits for a reachable backend
      before :class:`BackendNotAvailableError`.
    - ``heartbeat_interval`` / ``heartbeat_timeout``: ZMTP heartbeats; a
      backend silent for ``heartbeat_timeout`` is lost.
    - ``key``: shared secret; every message is signed (HMAC-SHA256) and
      replies not signed with it are dropped.
    - ``curve_serverkey`` (the backend's public key) and optionally
      ``curve_publickey``/``curve_secretkey`` (this client's keypair, generated
      when omitted): CurveZMQ encryption.
    - ``max_message_size``: largest reply accepted (bytes; None: no limit).

    Thread-safety: every method may be called from any number of threads.
    """

    def __init__(
        self,
        backends: Iterable[Any] = (),
        default_port: int = DEFAULT_PORT,
        logger: Callable[[str, Any], Any] = null_logger,
        codec: Any = JSONCodec,
        *,
        timeout: float | None = None,
        retries: int = 0,
        busy_retries: int = 20,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        key: bytes | str | None = None,
        curve_serverkey: bytes | str | None = None,
        curve_publickey: bytes | str | None = None,
        curve_secretkey: bytes | str | None = None,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if isinstance(backends, (str, bytes)):
            backends = (backends,)  # a lone "host" would otherwise be split into letters
        endpoints = [parse_backend(spec, default_port) for spec in backends]  # ValueError
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, not {timeout!r}")
        self.default_port = default_port
        self.logger = logger
        self.timeout = timeout
        self.connect_timeout = float(connect_timeout)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size
        self._settings = DealerSettings(
            connect_timeout=self.connect_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            max_message_size=max_message_size,
            curve=curve_keys(curve_serverkey, curve_publickey, curve_secretkey),
        )
        self._core = ClientCore(
            codec=codec,
            signer=Signer(key) if key is not None else None,
            retries=retries,
            busy_retries=busy_retries,
            connect_timeout=self.connect_timeout,
        )
        self.codec = self._core.codec
        self._ctx = zmq.Context()
        self._links: dict[str, _Link] = {}
        self._by_sock: dict[Any, _Link] = {}  # DEALER -> link
        self._by_monitor: dict[Any, _Link] = {}  # monitor PAIR -> link
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # zmq_poll items: (socket or fd, POLLIN); built by the leader only
        self._poll_items: list[tuple[Any, int]] = [(self._wake_r, zmq.POLLIN)]
        self._wake_armed = False  # a wake byte is in the pipe, not yet drained
        self._fds_closed = False
        self._inbox: collections.deque[PendingCall | _Op] = collections.deque()
        self._io_lock = threading.Lock()
        self._leader: int | None = None  # thread ident holding _io_lock
        self._closed = False
        self._cb_pool: ThreadPoolExecutor | None = None
        self._cb_pool_lock = threading.Lock()
        self._bg_wake = threading.Event()
        # Built before the thread starts, so no other thread can race us here.
        try:
            for endpoint in endpoints:
                self._connect(endpoint)
        except BaseException:
            self._closed = True
            self._shutdown()
            raise
        self._bg = threading.Thread(target=self._bg_loop, name="taskit-frontend-io", daemon=True)
        self._bg.start()

    # -- TaskIt 4.0 API ------------------------------------------------------------

    def work(self, task: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``task`` on a backend and return its result (blocks).

        Raises :class:`BackendProcessingError` (or a subclass such as
        :class:`UnknownTaskError`) when the task raised remotely,
        :class:`BackendNotAvailableError` when no backend is reachable,
        :class:`BackendLostError` when the backend died meanwhile,
        :class:`CallTimeoutError` past the FrontEnd's ``timeout`` and
        :class:`EncodeError` when the arguments cannot be encoded.
        """
        return self.call(task, args, kwargs)

    def callback(
        self,
        task: str,
        cb: Callable[[Any], Any],
        error_cb: Callable[[BaseException], Any] | None | bool = None,
        *args: Any,
        **kwargs: Any,
    ) -> Future:
        """Run ``task`` in the background; call ``cb(result)`` when it succeeds.

        As in 4.0, a :class:`BackendProcessingError` goes to ``error_cb(exc)``
        (``None``: log its traceback; ``False``: ignore it). Any other failure
        (backend lost or unreachable, timeout) is logged at ERROR, not given to
        ``error_cb``. Callbacks run on a small thread pool (``taskit-frontend-cb``),
        so they may call this FrontEnd again. Returns a Future that completes,
        with the call's result or exception, *after* the callback has run.
        Raises :class:`EncodeError` at once for unencodable arguments.
        """
        outer: Future = Future()
        outer.set_running_or_notify_cancel()
        fut = self.submit(task, *args, **kwargs)
        fut.add_done_callback(
            lambda f: self._callbacks().submit(self._run_cb, task, f, cb, error_cb, outer)
        )
        return outer

    def ignore(self, task: str, *args: Any, **kwargs: Any) -> Future:
        """Run ``task`` in the background and ignore its outcome (returns the Future)."""
        return self.submit(task, *args, **kwargs)

    def send_signal(self, backend: Any, signal: str, timeout: float | None = None) -> Any:
        """Send an admin signal (``STOP``, ``KILL``, ``STATUS``, ``<stats>``, ``<tasks>``)
        to one backend of this FrontEnd and return its answer (blocks).

        Raises ``ValueError('No such backend!')`` when ``backend`` was not added,
        :class:`BackendNotAvailableError` when it cannot be reached within the
        connect timeout, :class:`BackendProcessingError` when it refuses.
        """
        endpoint = self._known(backend)
        return self._call(signal, (), None, timeout, target=endpoint)

    def send_stop(self, backend: Any) -> Any:
        """Ask ``backend`` to stop gracefully (it answers every accepted call first).

        Returns its answer, or None when it closed the connection before
        answering (it did what was asked). Raises as :meth:`send_signal`.
        """
        try:
            return self.send_signal(backend, STOP)
        except BackendLostError:
            return None

    def send_kill(self, backend: Any) -> Any:
        """Ask ``backend`` to terminate now; returns as :meth:`send_stop`."""
        try:
            return self.send_signal(backend, KILL)
        except BackendLostError:
            return None

    def get_tasks(self, backend: Any) -> str:
        """The backend's count of queued and running tasks, as a string, or ``'down'``.

        Answers ``'down'`` at once for a backend known to be down, else within
        ``connect_timeout`` at most. Raises ``ValueError`` for an unknown backend.
        """
        endpoint = self._known(backend)
        state = self._core.backends[endpoint].state
        if state == DOWN:
            return "down"
        try:
            return str(self._call(STATUS, (), None, self.connect_timeout, target=endpoint))
        except (BackendNotAvailableError, BackendLostError, CallTimeoutError):
            return "down"

    def add_backends(self, *backends: Any) -> None:
        """Connect to more backends (same forms as the constructor). Blocks until done."""
        endpoints = [parse_backend(b, self.default_port) for b in backends]
        self._as_leader(lambda: [self._connect(ep) for ep in endpoints])

    # -- modern API ----------------------------------------------------------------

    def call(
        self,
        task: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`work`, with the arguments spelled out, so per-call options
        (``timeout``, seconds; default: the FrontEnd's) never clash with the
        task's own keyword arguments."""
        return self._call(task, args, kwargs, timeout)

    def submit(self, task: str, *args: Any, **kwargs: Any) -> Future:
        """Start ``task`` and return a :class:`concurrent.futures.Future` of its result.

        Does not block on the network. The Future is already *running*, so
        ``cancel()`` returns False: a call on the wire cannot be taken back.
        Its callbacks run in the thread that receives the reply; keep them short.
        Raises :class:`EncodeError` at once for unencodable arguments.
        """
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        call = self._core.new_call(task, args, kwargs, fut, self.timeout)
        self._start(call)
        return fut

    def map(
        self,
        task: str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Call ``task(*args)`` for each tuple of arguments drawn from ``iterables``
        (like the builtin ``map``) with many calls in flight; yield results in
        input order. The first failed call raises its exception when its result
        is reached. ``progress=True`` draws a progress bar (tqdm, on a terminal).
        Input is consumed lazily, at most a window of calls ahead.
        """
        total = None
        if progress:
            try:
                total = min(len(it) for it in iterables)  # type: ignore[arg-type]
            except TypeError:
                total = None
        bar = progress_bar(total=total, enabled=progress, desc=task)
        timeout = self.timeout if timeout is None else timeout
        window: collections.deque[tuple[PendingCall, _Waiter]] = collections.deque()
        source = zip(*iterables, strict=False)  # stops at the shortest, like map()
        exhausted = False
        try:
            while True:
                # refill when half the window is free: fewer, larger batches
                if not exhausted and len(window) <= _MAP_WINDOW // 2:
                    want = _MAP_WINDOW - len(window)
                    batch = []
                    for args in itertools.islice(source, want):
                        w = _Waiter()
                        call = self._core.new_call(task, args, None, w, timeout)
                        window.append((call, w))
                        batch.append(call)
                    exhausted = len(batch) < want
                    if batch:
                        self._start_many(batch, len(window))
                if not window:
                    return
                call, w = window.popleft()
                value = self._wait(call, w, timeout, len(window))
                bar.update()
                yield value
        finally:
            bar.close()
            if window and not self._closed:  # abandoned by the consumer: forget them
                calls = [c for c, _ in window]
                self._as_leader(lambda: [self._core.cancel(c) for c in calls], wait=False)

    def backends_status(self) -> dict[str, dict[str, Any]]:
        """``{endpoint: {"state": "up"|"down"|"connecting"|"stopping", "for": seconds,
        "in_flight", "sent", "answered", "failed", "lost", "busy", "connects",
        "disconnects", "last_error"}}`` as this FrontEnd sees each backend now."""
        return self._core.snapshot()

    def stats(self, backend: Any) -> dict[str, Any]:
        """The ``<stats>`` of one backend (uptime, in flight, per-task counts...)."""
        return self.send_signal(backend, STATS)

    def tasks(self, backend: Any) -> list[str]:
        """The task names one backend serves (``<tasks>``)."""
        return self.send_signal(backend, TASKS)

    @property
    def task_count(self) -> int:
        """Calls of this FrontEnd not yet answered (its own count, as in 4.0)."""
        return self._core.pending

    @property
    def dropped(self) -> dict[str, int]:
        """Replies dropped: ``late_replies`` (after a timeout), ``bad_replies``,
        ``bad_signatures`` (wrong or missing HMAC)."""
        return dict(self._core.stats)

    def close(self) -> None:
        """Fail every pending call with :class:`FrontEndClosedError`, close the sockets
        and stop the I/O thread. Idempotent; blocks briefly."""
        if self._closed:
            return
        self._closed = True
        self._bg_wake.set()
        self._wake()
        if threading.current_thread() is not self._bg:
            self._bg.join(5.0)
        if self._leader == threading.get_ident():
            self._shutdown()
        else:
            with self._io_lock:
                self._shutdown()
        with self._cb_pool_lock:
            if self._cb_pool is not None:
                self._cb_pool.shutdown(wait=False)

    def __enter__(self) -> FrontEnd:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._links)} backends"
        return f"<FrontEnd {state}, {self._core.pending} pending>"

    # -- calls ---------------------------------------------------------------------

    def _known(self, backend: Any) -> str:
        try:
            endpoint = parse_backend(backend, self.default_port)
        except ValueError:
            raise ValueError("No such backend!") from None
        if endpoint not in self._core.backends:
            raise ValueError("No such backend!")
        return endpoint

    def _call(
        self,
        task: str,
        args: Iterable[Any],
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        target: str | None = None,
    ) -> Any:
        if timeout is None:
            timeout = self.timeout
        w = _Waiter()
        call = self._core.new_call(task, tuple(args), kwargs, w, timeout, target)
        if self._closed:
            raise self._closed_error()
        me = threading.get_ident()
        if self._io_lock.acquire(False):
            # Fast path: nobody drives the sockets, so this thread does.
            self._leader = me
            try:
                self._core.submit(call)
                self._drive(w)
            finally:
                self._release()
            if w.ok is not None:
                return self._outcome(w)
        elif self._leader == me:  # called from a callback run by the leader itself
            self._core.submit(call)
            self._drive(w)
            if w.ok is not None:
                return self._outcome(w)
        else:
            self._enqueue(call)
        return self._wait(call, w, timeout)

    def _wait(self, call: PendingCall, w: _Waiter, timeout: float | None, own: int = 0) -> Any:
        """Block until ``w`` is resolved: drive the sockets when nobody else does.
        ``own``: calls this thread keeps in flight and will wait for next (``map``)."""
        me = threading.get_ident()
        while w.ok is None:
            if self._io_lock.acquire(False):
                self._leader = me
                try:
                    self._drive(w)
                finally:
                    self._release(own)
                if w.ok is None and self._closed:
                    break
            elif self._leader == me:
                self._drive(w)
                if w.ok is None:
                    break
            else:
                # The leader resolves us (it enforces call deadlines); the wait's own
                # limit is only a guard against a leader that died.
                limit = None if timeout is None else timeout + 1.0
                if w.latch.acquire(timeout=-1 if limit is None else limit):
                    break
                self._as_leader(lambda: self._core.cancel(call), wait=False)
                raise CallTimeoutError(f"task {call.task!r} got no answer within {timeout:g} s")
        if w.ok is None:
            raise self._closed_error()
        return self._outcome(w)

    @staticmethod
    def _outcome(w: _Waiter) -> Any:
        if w.ok:
            return w.value
        raise w.value

    def _start(self, call: PendingCall) -> None:
        """Register and send ``call`` without waiting for its reply."""
        if self._closed:
            raise self._closed_error()
        if self._io_lock.acquire(False):
            self._leader = threading.get_ident()
            try:
                self._core.submit(call)
                self._flush()
            finally:
                self._release()
        elif self._leader == threading.get_ident():
            self._core.submit(call)
            self._flush()
        else:
            self._enqueue(call)

    def _start_many(self, calls: list[PendingCall], own: int = 0) -> None:
        if self._closed:
            raise self._closed_error()
        if self._io_lock.acquire(False):
            self._leader = threading.get_ident()
            try:
                for call in calls:
                    self._core.submit(call)
                self._flush()
            finally:
                self._release(own)
        elif self._leader == threading.get_ident():
            for call in calls:
                self._core.submit(call)
            self._flush()
        else:
            self._inbox.extend(calls)
            self._wake()
            self._try_lead()

    def _enqueue(self, item: PendingCall | _Op) -> None:
        self._inbox.append(item)
        self._wake()
        self._try_lead()

    def _try_lead(self) -> None:
        # The leader may have released the lock between our failed acquire and the
        # append; then it may not have seen the item, so take over (or let bg do it).
        if self._io_lock.acquire(False):
            self._leader = threading.get_ident()
            try:
                self._drain_inbox()
                self._flush()
            finally:
                self._release()

    def _as_leader(self, fn: Callable[[], Any], wait: bool = True) -> None:
        """Run ``fn`` holding the I/O lock (directly, or queued for the leader)."""
        if self._leader == threading.get_ident():
            fn()
            return
        op = _Op(fn)
        self._enqueue(op)
        if wait:
            if not op.done.wait(10.0):
                raise FrontEndClosedError("the FrontEnd's I/O thread did not respond")
            if op.error is not None:
                raise op.error

    def _release(self, own: int = 0) -> None:
        """Give up the I/O lock; wake the background thread if calls other than the
        ``own`` ones this thread will come back for (``map``) are left behind."""
        self._leader = None
        self._io_lock.release()
        if self._inbox or self._core.pending > own:
            self._bg_wake.set()  # work remains: the background thread drives it

    def _wake(self) -> None:
        """Interrupt the leader's poll (at most one byte in the pipe at a time)."""
        if not self._wake_armed and not self._fds_closed:
            self._wake_armed = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _closed_error(self) -> FrontEndClosedError:
        return FrontEndClosedError("this FrontEnd is closed; create a new one to make calls")

    # -- the I/O loop (only with the I/O lock held) --------------------------------

    def _drive(self, until: _Waiter | None) -> None:
        """Move frames until ``until`` is resolved, or (None) until no call is pending."""
        core = self._core
        by_sock = self._by_sock
        wake_r = self._wake_r
        while True:
            if self._closed:
                return
            if self._inbox:
                self._drain_inbox()
            if core.outbox:
                self._flush()
            if core.timers:
                self._resolve(core.tick())
            if until is not None:
                if until.ok is not None:
                    return
            elif not core.calls and not self._inbox:
                return
            wake_at = core.next_wakeup() if core.timers else None
            if wake_at is None:
                ms = _LONGEST_POLL
            else:
                ms = min(_LONGEST_POLL, max(0, int((wake_at - time.monotonic()) * 1000) + 1))
            for sock, _ in _zmq_poll(self._poll_items, ms):
                link = by_sock.get(sock)
                if link is not None:
                    self._receive(link, until)
                elif sock == wake_r:
                    self._wake_armed = False  # before draining: a later wake writes again
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    mlink = self._by_monitor.get(sock)
                    if mlink is not None:  # None: replaced earlier in this loop turn
                        self._monitor_events(mlink)

    def _receive(self, link: _Link, until: _Waiter | None, limit: int = 256) -> None:
        """Read what ``link`` has (poll said it is readable). Stops as soon as ``until``
        is resolved, so a synchronous call never pays for a failed non-blocking read."""
        recv, core, endpoint = link.sock.recv, self._core, link.endpoint
        for _ in range(limit):  # bounded, so timers and sends get a turn
            try:
                # Frame objects tell whether more parts follow without a getsockopt
                # call per part (measurably cheaper than recv_multipart).
                f = recv(zmq.NOBLOCK, copy=False)
                frames = [f.bytes]
                while f.more:
                    f = recv(zmq.NOBLOCK, copy=False)
                    # a large body is decoded straight from libzmq's buffer: no copy
                    frames.append(f.bytes if len(f) < _ZERO_COPY else f.buffer)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                _log.warning("receive from %s failed: %s", endpoint, e)
                return
            done = core.on_message(endpoint, frames)
            if done:
                self._resolve(done)
                if until is not None and until.ok is not None:
                    return

    def _flush(self) -> None:
        core, links = self._core, self._links
        for call in core.drain_outbox():
            link = links[call.backend]  # type: ignore[index]
            try:
                _send(link.sock.send, core.frames_for(call))
            except zmq.Again:
                # IMMEDIATE: no connected peer, the connection just dropped; keep
                # the replies it delivered before failing what is left on it
                self._receive(link, None, _DRAIN_ALL)
                self._resolve(core.send_failed(call))
            except zmq.ZMQError as e:
                self._resolve(core.send_failed(call))
                _log.warning("send to %s failed: %s", link.endpoint, e)
        if core.outbox:  # send_failed may have re-routed calls
            self._flush()

    def _drain_inbox(self) -> None:
        inbox, core = self._inbox, self._core
        while inbox:
            item = inbox.popleft()
            if type(item) is _Op:
                try:
                    item.fn()
                except BaseException as e:  # handed back to the thread that asked
                    item.error = e
                item.done.set()
            else:
                core.submit(item)

    def _resolve(self, done: list) -> None:
        for call, ok, value in done:
            w = call.waiter
            if type(w) is _Waiter:
                w.ok, w.value = ok, value
                w.latch.release()
            elif w is not None:
                try:
                    if ok:
                        w.set_result(value)
                    else:
                        w.set_exception(value)
                except Exception:  # noqa: BLE001 - a Future resolved elsewhere
                    _log.debug("future of call %s was already resolved", call.id)

    def _monitor_events(self, link: _Link) -> None:
        while True:
            try:
                msg = link.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            event = monitor_event(msg)
            if event & UP_EVENT:
                self._note(INFO, f"backend {link.endpoint} is up")
                self._core.backend_up(link.endpoint)
            elif event & DISCONNECTED:
                # Replies that arrived before the disconnect are still queued on the
                # socket; read them first, so only truly unanswered calls are lost.
                self._receive(link, None, _DRAIN_ALL)
                self._note(ERROR, f"backend {link.endpoint} disconnected", logging.INFO)
                self._resolve(self._core.backend_down(link.endpoint, "disconnected"))
                if link.sock in self._by_sock:  # not already replaced meanwhile
                    self._renew(link)
                return  # the old monitor socket is closed
            elif event & CONNECT_RETRIED:
                self._resolve(self._core.backend_down(link.endpoint, "cannot connect"))
            elif event & HANDSHAKE_FAILED:
                self._note(
                    ERROR,
                    f"handshake with {link.endpoint} failed (check CURVE keys)",
                    logging.WARNING,
                )
                self._resolve(self._core.backend_down(link.endpoint, "handshake failed"))

    def _connect(self, endpoint: str) -> None:
        if endpoint in self._core.backends:
            return
        link = self._open(endpoint)  # first, so a bad endpoint leaves no trace
        self._core.add_backend(endpoint)
        self._install(link)

    def _open(self, endpoint: str) -> _Link:
        """A connected DEALER (and its monitor) for ``endpoint``; ValueError if unusable."""
        return _Link(endpoint, *open_dealer(self._ctx, endpoint, self._settings))

    def _install(self, link: _Link) -> None:
        self._links[link.endpoint] = link
        self._by_sock[link.sock] = link
        self._by_monitor[link.monitor] = link
        # a new list, so a poll in progress elsewhere never sees it half-built
        self._poll_items = [
            (link.sock, zmq.POLLIN),
            *self._poll_items,
            (link.monitor, zmq.POLLIN),
        ]

    def _discard(self, link: _Link) -> None:
        self._by_sock.pop(link.sock, None)
        self._by_monitor.pop(link.monitor, None)
        self._poll_items = [
            item
            for item in self._poll_items
            if item[0] is not link.sock and item[0] is not link.monitor
        ]
        close_dealer(link.sock, link.monitor)

    def _renew(self, link: _Link) -> None:
        """Replace a disconnected backend's socket: whatever it still queued for the
        old connection is dropped, never delivered to a restarted backend."""
        self._discard(link)
        self._install(self._open(link.endpoint))

    # -- background thread ---------------------------------------------------------

    def _bg_loop(self) -> None:
        """Drive the sockets when a leader left calls behind (it sets ``_bg_wake``);
        otherwise, every ``_IDLE_CHECK`` seconds, take one look at the monitors,
        timers and replies already received."""
        me = threading.get_ident()
        while not self._closed:
            asked = self._bg_wake.wait(_IDLE_CHECK)
            self._bg_wake.clear()
            if self._closed:
                break
            if not self._io_lock.acquire(False):
                continue  # a leader is active; it wakes us when it leaves work behind
            self._leader = me
            try:
                if asked:
                    self._drive(None)
                else:
                    self._housekeep()
            except Exception:  # keep serving other calls; this is a bug if it happens
                _log.exception("taskit FrontEnd I/O thread error")
            finally:
                self._leader = None
                self._io_lock.release()
            if self._inbox or (asked and self._core.calls):
                self._bg_wake.set()  # arrived while we were leaving

    def _housekeep(self) -> None:
        """One non-blocking pass: monitor events, replies waiting, due timers, sends."""
        for link in list(self._links.values()):
            self._monitor_events(link)
        for link in list(self._links.values()):
            if link.sock in self._by_sock:
                self._receive(link, None)
        core = self._core
        if core.timers:
            self._resolve(core.tick())
        if self._inbox:
            self._drain_inbox()
        if core.outbox:
            self._flush()

    def _shutdown(self) -> None:
        """Fail what is pending and close every socket (with the I/O lock held)."""
        self._drain_inbox_on_close()
        self._resolve(self._core.fail_all(self._closed_error()))
        for link in list(self._links.values()):
            self._discard(link)
        self._links.clear()
        self._by_sock.clear()
        self._by_monitor.clear()
        self._ctx.term()
        self._fds_closed = True
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise

    def _drain_inbox_on_close(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if type(item) is _Op:
                item.error = self._closed_error()
                item.done.set()
            else:
                self._core.submit(item)  # registered, so fail_all resolves it

    # -- callbacks and logging -----------------------------------------------------

    def _callbacks(self) -> ThreadPoolExecutor:
        with self._cb_pool_lock:
            if self._cb_pool is None:
                self._cb_pool = ThreadPoolExecutor(8, thread_name_prefix="taskit-frontend-cb")
            return self._cb_pool

    def _run_cb(self, task: str, fut: Future, cb: Callable, error_cb: Any, outer: Future) -> None:
        exc = fut.exception()
        try:
            if exc is None:
                cb(fut.result())
            elif isinstance(exc, BackendProcessingError):
                if error_cb is None:
                    self._note(ERROR, f"task {task!r} failed on the backend:\n{exc}")
                elif error_cb is not False:
                    error_cb(exc)
            else:
                self._note(ERROR, f"task {task!r} failed: {type(exc).__name__}: {exc}")
        except Exception:  # a user callback raised: report it, keep the pool alive
            _log.exception("callback of task %r raised", task)
        finally:
            if exc is None:
                outer.set_result(fut.result())
            else:
                outer.set_exception(exc)

    def _note(self, importance: str, msg: str, level: int | None = None) -> None:
        if level is None:
            level = logging.ERROR if importance == ERROR else logging.INFO
        _log.log(level, msg)
        if self.logger is not null_logger:
            try:
                self.logger(importance, msg)
            except Exception:  # a broken user logger must not break the I/O loop
                _log.exception("TaskIt logger raised")
