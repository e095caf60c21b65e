"""The FrontEnd's I/O engine: one DEALER per backend, driven by whichever thread
needs it (leader/follower), with ``taskit-frontend-io`` as the fallback driver.

ZeroMQ sockets are not thread-safe, so whoever touches them holds the *I/O
lock*. A thread that makes a blocking call and finds the lock free becomes the
*leader*: it sends its own call and polls the sockets itself until its reply
arrives, resolving any other replies on the way -- a synchronous call costs no
thread hand-off (a hand-off costs as much as a loopback round trip on a busy
machine; ``bench/rpc.py`` measures the result). A thread that finds the lock
taken queues its call and wakes the leader through a pipe. A leader that leaves
calls of other threads behind wakes the background thread, which drives them
until none remain; while idle, that thread takes a non-blocking look at the
socket monitors, timers and replies every ``_IDLE_CHECK`` seconds. User threads
come first: a thread waiting on a submitted call's Future makes the background
thread step down and drives itself (reading replies in batches rather than
waiting for a hand-off per reply), and the background thread stays away while
a user thread has waited on Futures within the last ``_USER_GRACE`` seconds.

All routing, retry and reply decisions are the :class:`ClientCore`'s; this
module only moves frames and wakes waiters. Private to :mod:`taskit.frontend`.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FuturesTimeout
from typing import Any

import zmq

from taskit._client.connection import (
    CONNECT_RETRIED,
    DISCONNECTED,
    HANDSHAKE_FAILED,
    UP_EVENT,
    DealerSettings,
    close_dealer,
    monitor_event,
    open_dealer,
    refusal,
)
from taskit._client.core import ClientCore, PendingCall
from taskit._wire import (
    FUTURE_RUNNING,
    MORE,
    NOBLOCK,
    ZERO_COPY,
    base_send,
    send_frames,
    zmq_poll,
)
from taskit.errors import CallTimeoutError, FrontEndClosedError, WaitTimeoutError
from taskit.log import ERROR, INFO

__all__ = ["ThreadedIO", "Waiter", "CallFuture"]

_log = logging.getLogger("taskit.frontend")

_IDLE_CHECK = 0.25  # seconds between monitor checks while no call is in flight
_USER_GRACE = 0.001  # s: the background thread leaves the sockets to a busy user thread
_LONGEST_POLL = 1000  # ms: a leader re-checks the closed flag at least this often
_DRAIN_ALL = 1 << 62


class Waiter:
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

    __slots__ = ("endpoint", "sock", "monitor", "send", "up")

    def __init__(self, endpoint: str, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.monitor = monitor
        self.send = base_send.__get__(sock)  # see taskit._wire
        self.up = False  # this socket's connection came up (handshake done)


class CallFuture(Future):
    """The :class:`concurrent.futures.Future` of a submitted call. ``result()`` and
    ``exception()`` let the waiting thread drive the sockets itself when nobody
    else does -- ``submit(...).result()`` then costs no thread hand-off."""

    def __init__(self, io: ThreadedIO) -> None:
        super().__init__()
        # Running from the start: a call on the wire cannot be taken back. Set directly,
        # as set_running_or_notify_cancel() would on a new Future (no lock needed: no
        # other thread sees this one yet).
        self._state = FUTURE_RUNNING
        self._io = io
        self.ok: bool | None = None

    def result(self, timeout: float | None = None) -> Any:
        """The call's value, or its exception raised; :class:`WaitTimeoutError` (a
        builtin ``TimeoutError`` on every Python) when ``timeout`` passes first: it
        waits at most ``timeout`` seconds in all (driving the sockets included)."""
        wait = timeout
        if self.ok is None:
            wait = self._drive(timeout)
        try:
            return super().result(wait)
        except _FuturesTimeout as e:
            if self._raised(e):
                raise
            raise self._wait_timeout(timeout) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's exception or ``None``; :class:`WaitTimeoutError` as :meth:`result`."""
        wait = timeout
        if self.ok is None:
            wait = self._drive(timeout)
        try:
            return super().exception(wait)
        except _FuturesTimeout:
            raise self._wait_timeout(timeout) from None

    def _raised(self, e: BaseException) -> bool:
        """Whether ``e`` is the call's own exception (e.g. its CallTimeoutError)."""
        return self.done() and not self.cancelled() and super().exception() is e

    @staticmethod
    def _wait_timeout(timeout: float | None) -> WaitTimeoutError:
        # Before 3.11 Future raises concurrent.futures.TimeoutError, which
        # `except TimeoutError` misses.
        return WaitTimeoutError(f"the call's result did not arrive within {timeout:g} s")

    def _drive(self, timeout: float | None) -> float | None:
        """Drive the sockets for up to ``timeout``; the part of it left to wait for
        another driver (one deadline for both waits, not ``timeout`` each)."""
        if timeout is None:
            self._io.drive_for(self, None)
            return None
        deadline = time.monotonic() + timeout
        self._io.drive_for(self, timeout)
        return max(0.0, deadline - time.monotonic())


class ThreadedIO:
    """Sockets and threads of one FrontEnd. ``call``/``wait``/``start``/``start_many``
    /``as_leader`` may be called from any thread; ``note(importance, msg, level)``
    reports connection events."""

    def __init__(
        self,
        core: ClientCore,
        settings: DealerSettings,
        endpoints: list[str],
        note: Callable[..., None],
    ) -> None:
        self._core = core
        self._settings = settings
        self._note = note
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
        self._bg_wake = threading.Event()
        self._stopped = threading.Event()  # set on close: ends the background thread's pauses
        # User threads drive the sockets more cheaply than a hand-off to the background
        # thread: while one submits in a burst or waits for results, the background
        # thread stays away (``_defer_until``) or steps down (``_yield``).
        self._defer_until = 0.0
        self._yield = False
        self._bg_ident: int | None = None
        # endpoint -> monotonic time to connect its (new, unconnected) socket: the
        # backoff after connections refused before coming up (see _refused)
        self._redial: dict[str, float] = {}
        # Connected before the thread starts, so no other thread can race us here.
        try:
            for endpoint in endpoints:
                self.connect(endpoint)
        except BaseException:
            self._closed = True
            self._shutdown()
            raise
        self._bg = threading.Thread(target=self._bg_loop, name="taskit-frontend-io", daemon=True)
        self._bg.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def links(self) -> int:
        return len(self._links)

    def call(self, call: PendingCall, w: Waiter, timeout: float | None) -> Any:
        """Send ``call`` and block until its waiter ``w`` is resolved; its result or raise."""
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
        return self.wait(call, w, timeout)

    def drive_for(self, fut: CallFuture, timeout: float | None) -> None:
        """Drive the sockets until ``fut`` is resolved or ``timeout`` passes, if no other
        thread is driving them (else return at once: the driver resolves ``fut``)."""
        me = threading.get_ident()
        if self._leader == me:
            return  # inside a callback run by the driver: Future.result waits (documented)
        self._defer_until = time.monotonic() + _USER_GRACE
        if not self._io_lock.acquire(False):
            if self._leader != self._bg_ident or self._bg_ident is None:
                return  # a user thread drives: it resolves fut
            # The background thread drives: ask it to step down (it checks between
            # polls) and take over, so a run of result() calls reads replies in batches
            # instead of waiting for a hand-off per reply. Else wait as usual.
            self._yield = True
            self._wake()
            if not self._io_lock.acquire(timeout=0.05):
                return
        self._leader = me
        try:
            self._drive(fut, None if timeout is None else time.monotonic() + timeout)
        finally:
            self._release()

    def close(self) -> None:
        """Fail what is pending, close every socket, stop the I/O thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stopped.set()
        self._bg_wake.set()
        self._wake()
        if threading.current_thread() is not self._bg:
            self._bg.join(5.0)
        if self._leader == threading.get_ident():
            self._shutdown()
        else:
            with self._io_lock:
                self._shutdown()

    def wait(self, call: PendingCall, w: Waiter, timeout: float | None, own: int = 0) -> Any:
        """Block until ``w`` is resolved: drive the sockets when nobody else does.
        ``own``: calls this thread keeps in flight and will wait for next (``map``)."""
        ok = w.ok
        if ok is not None:  # already resolved (map's calls usually are): no lock, no drive
            if ok:
                return w.value
            raise w.value
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
                self.as_leader(lambda: self._core.cancel(call), wait=False)
                raise CallTimeoutError(f"task {call.task!r} got no answer within {timeout:g} s")
        if w.ok is None:
            raise self._closed_error()
        return self._outcome(w)

    @staticmethod
    def _outcome(w: Waiter) -> Any:
        if w.ok:
            return w.value
        raise w.value

    def start(self, call: PendingCall) -> None:
        """Register and send ``call`` without waiting for its reply."""
        if self._closed:
            raise self._closed_error()
        if self._io_lock.acquire(False):
            self._leader = threading.get_ident()
            try:
                if self._inbox:  # queued while the background thread was stepping down
                    self._drain_inbox()
                self._core.submit(call)
                self._flush()
            finally:
                self._release()
        elif self._leader == threading.get_ident():
            self._core.submit(call)
            self._flush()
        else:
            self._enqueue(call)

    def start_many(self, calls: list[PendingCall], own: int = 0) -> None:
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

    def as_leader(self, fn: Callable[[], Any], wait: bool = True) -> None:
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

    def _drive(self, until: Any, deadline: float | None = None) -> None:
        """Move frames until ``until`` (a Waiter or CallFuture) is resolved or, when it
        is None, until no call is pending; in any case no later than ``deadline``."""
        core = self._core
        while True:
            if self._closed:
                return
            if self._yield:  # a user thread wants to drive (drive_for)
                self._yield = False
                if self._leader == self._bg_ident:
                    return
            if self._inbox:
                self._drain_inbox()
            if core.outbox:
                self._flush()
            timers = core.timers
            if timers and timers[0][0] <= time.monotonic():  # one is due (the core's clock)
                self._resolve(core.tick())
                if core.pings or core.suspects:
                    self._liveness()
            if until is not None:
                if until.ok is not None:
                    return
            elif not core.calls and not self._inbox:
                return
            wake_at = core.next_wakeup() if core.timers else None
            if self._redial:
                redial_at = self._redial_due()
                if redial_at is not None:
                    wake_at = redial_at if wake_at is None else min(wake_at, redial_at)
            if deadline is not None:
                if time.monotonic() >= deadline:
                    return
                wake_at = deadline if wake_at is None else min(wake_at, deadline)
            if wake_at is None:
                ms = _LONGEST_POLL
            else:
                ms = min(_LONGEST_POLL, max(0, int((wake_at - time.monotonic()) * 1000) + 1))
            self._handle(zmq_poll(self._poll_items, ms), until)

    def _handle(self, events: list, until: Any) -> None:
        """Serve what one poll found readable."""
        by_sock = self._by_sock
        for sock, _ in events:
            link = by_sock.get(sock)
            if link is not None:
                self._receive(link, until)
            elif sock == self._wake_r:
                self._wake_armed = False  # before draining: a later wake writes again
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            else:
                mlink = self._by_monitor.get(sock)
                if mlink is not None:  # None: replaced earlier in this loop turn
                    self._monitor_events(mlink)

    def _receive(self, link: _Link, until: Waiter | None, limit: int = 256) -> None:
        """Read what ``link`` has (poll said it is readable), at most ``limit`` messages."""
        recv, core, endpoint = link.sock.recv, self._core, link.endpoint
        on_message = core.on_message
        for _ in range(limit):  # bounded, so timers and sends get a turn
            try:
                # Frame objects tell whether more parts follow without a getsockopt
                # call per part (measurably cheaper than recv_multipart).
                f = recv(NOBLOCK, copy=False)
                frames = [f.bytes]
                while f.more:
                    f = recv(NOBLOCK, copy=False)
                    # a large body is decoded straight from libzmq's buffer: no copy
                    frames.append(f.bytes if len(f) < ZERO_COPY else f.buffer)  # type: ignore[arg-type]
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                _log.warning("receive from %s failed: %s", endpoint, e)
                return
            done = on_message(endpoint, frames)
            if done:
                if len(done) == 1 and type(done[0][0].waiter) is Waiter:  # _resolve inlined
                    call, ok, value = done[0]
                    w = call.waiter
                    w.ok, w.value = ok, value
                    w.latch.release()
                else:
                    self._resolve(done)
                # Our reply is in: stop if nothing else is awaited (a lone sync call
                # saves a failed read); else read on while replies are queued, so a
                # pipelined caller gets them in batches, not one poll per reply.
                if until is not None and until.ok is not None and not core.calls:
                    return

    def _flush(self) -> None:
        core, links = self._core, self._links
        frames_for = core.frames_for
        failed = False
        for call in core.drain_outbox():
            if failed and (
                call.done or call.backend is None or any(c is call for c in core.outbox)
            ):
                continue  # a send_failed above settled, parked or re-routed it
            link = links[call.backend]  # type: ignore[index]
            try:
                frames = frames_for(call)
                if len(frames) == 3 and len(frames[2]) < ZERO_COPY:
                    send = link.send  # _send inlined: the hot path (small, unsigned)
                    send(frames[0], MORE)
                    send(frames[1], MORE)
                    send(frames[2], NOBLOCK)
                else:
                    send_frames(link.send, frames)
            except zmq.Again:
                # not expected (unbounded queue, no IMMEDIATE); if it happens, keep
                # the replies the socket holds before failing what is left on it
                failed = True
                self._receive(link, None, _DRAIN_ALL)
                self._resolve(core.send_failed(call))
            except zmq.ZMQError as e:
                failed = True
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
                core.submit(item)  # type: ignore[arg-type]  # not an _Op: a PendingCall

    def _resolve(self, done: list) -> None:
        for call, ok, value in done:
            w = call.waiter
            if type(w) is Waiter:
                w.ok, w.value = ok, value
                w.latch.release()
            elif w is not None:
                w.ok = ok  # CallFuture: lets a driving waiter see it without a lock
                try:
                    if ok:
                        w.set_result(value)
                    else:
                        w.set_exception(value)
                except Exception:  # noqa: BLE001 - a Future resolved elsewhere
                    _log.debug("future of call %s was already resolved", call.id)

    def _liveness(self) -> None:
        """Send the PINGs the core asked for; drop the connections it finds silent
        (after reading what they still hold: the core decides on everything heard)."""
        core = self._core
        for endpoint in core.take_pings():
            link = self._links.get(endpoint)
            if link is not None:
                try:
                    send_frames(link.send, core.ping_frames())
                except zmq.ZMQError:  # a dead connection: the monitor reports it
                    pass
        for endpoint in core.take_suspects():
            link = self._links.get(endpoint)
            if link is None:
                continue
            self._receive(link, None, _DRAIN_ALL)
            done = core.check_suspect(endpoint)
            if done is not None:
                why = f"backend {endpoint} stopped answering (PING unanswered)"
                self._note(ERROR, why, logging.INFO)  # as a disconnect; the calls raise
                self._resolve(done)
                self._renew(link)

    def _monitor_events(self, link: _Link) -> None:
        while True:
            try:
                msg = link.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again (nothing queued) included, or closed
                return
            event = monitor_event(msg)
            if event & UP_EVENT:
                link.up = True
                self._note(INFO, f"backend {link.endpoint} is up")
                self._core.backend_up(link.endpoint)
            elif not link.up and event & (DISCONNECTED | HANDSHAKE_FAILED):
                self._refused(link, event)
                return  # the old monitor socket is closed
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

    def _refused(self, link: _Link, event: int) -> None:
        """``link``'s connection ended before it came up (the peer refused the handshake
        or closed it): replace the socket and connect the new one after a growing
        backoff. Renewing at once would bypass libzmq's reconnect interval, and a
        peer that refuses every connection would see thousands a second."""
        endpoint = link.endpoint
        why = refusal(event, self._settings.curve is not None)
        done, delay, report = self._core.connect_refused(endpoint, why)
        if report is not None:
            self._note(ERROR, report, logging.WARNING)
        self._resolve(done)
        if link.sock in self._by_sock:  # not already replaced meanwhile
            self._discard(link)
            self._install(
                _Link(endpoint, *open_dealer(self._ctx, endpoint, self._settings, connect=False))
            )
            self._redial[endpoint] = time.monotonic() + delay

    def _redial_due(self) -> float | None:
        """Connect the sockets whose backoff is over; the time of the next one, or None."""
        now = time.monotonic()
        for endpoint, when in list(self._redial.items()):
            if when <= now:
                del self._redial[endpoint]
                link = self._links.get(endpoint)
                if link is not None:
                    try:
                        link.sock.connect(endpoint)
                    except zmq.ZMQError as e:  # it connected before: not expected
                        _log.warning("cannot connect to %s again: %s", endpoint, e)
        return min(self._redial.values()) if self._redial else None

    def connect(self, endpoint: str) -> None:
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
        self._redial.pop(link.endpoint, None)
        self._install(self._open(link.endpoint))

    # -- background thread ---------------------------------------------------------

    def _bg_loop(self) -> None:
        """Drive the sockets when a leader left calls behind (it sets ``_bg_wake``);
        otherwise, every ``_IDLE_CHECK`` seconds, take one look at the monitors,
        timers and replies already received."""
        me = self._bg_ident = threading.get_ident()
        while not self._closed:
            asked = self._bg_wake.wait(_IDLE_CHECK)
            self._bg_wake.clear()
            # A user thread busy submitting or collecting results drives the sockets
            # itself, in batches; taking over would cost a thread hand-off per reply.
            # Not a synchronisation wait: stay away until it has been idle a moment.
            while not self._closed:
                left = self._defer_until - time.monotonic()
                if left <= 0:
                    break
                self._stopped.wait(left)
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
        if self._redial:
            self._redial_due()
        if core.timers:
            self._resolve(core.tick())
            if core.pings or core.suspects:
                self._liveness()
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
        # destroy, not term: a socket left open by any path would block term() for ever
        self._ctx.destroy(linger=0)
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
                self._core.submit(item)  # type: ignore[arg-type]  # registered, so fail_all resolves it
