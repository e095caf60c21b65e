"""The threaded driver of FrontEnd: the client's sockets
(:class:`~taskit._client.connection.Connections`, one DEALER per backend) driven
by whichever thread needs them (leader/follower, the hand-off in
:meth:`ThreadedIO._lead`), with ``taskit-frontend-io`` as the fallback driver.

ZeroMQ sockets are not thread-safe, so whoever touches them holds the *I/O
lock*. A thread that makes a blocking call and finds the lock free becomes the
*leader*: it sends its own call and polls the sockets itself until its reply
arrives, resolving any other replies on the way -- a synchronous call costs no
thread hand-off (a hand-off costs as much as a loopback round trip on a busy
machine; ``bench/rpc.py`` measures the result). A thread that finds the lock
taken queues its call and wakes the leader through a pipe. A leader that leaves
calls of other threads behind wakes the background thread, which drives them
until none remain; while idle, that thread takes a non-blocking look at the
socket monitors, timers and replies every ``_IDLE_CHECK`` seconds. The leader
waits on every socket's ZMQ_FD descriptor (and the wake pipe) with one ``poll``
system call, each socket looked at with ZMQ_EVENTS just before (see ``_drive``). User threads
come first: a thread waiting on a submitted call's Future makes the background
thread step down and drives itself (reading replies in batches rather than
waiting for a hand-off per reply), and the background thread stays away while
a user thread has waited on Futures within the last ``_USER_GRACE`` seconds.

All routing, retry and reply decisions are the :class:`ClientCore`'s and all
socket handling is :class:`Connections`'; this module only decides who drives
and wakes waiters. Private to :mod:`taskit.frontend`.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as _FuturesTimeout
from concurrent.futures import wait as _futures_wait
from typing import Any

import zmq

from taskit._client.connection import (
    Connections,
    DealerSettings,
    Link,
    monitor_event,
)
from taskit._client.core import ClientCore, PendingCall
from taskit._wire import (
    EVENTS,
    FUTURE_FINISHED,
    FUTURE_OVER,
    FUTURE_PENDING,
    FUTURE_RUNNING,
    POLLIN,
    base_get,
)
from taskit.errors import CallTimeoutError, FrontEndClosedError, WaitTimeoutError

__all__ = ["ThreadedIO", "Waiter", "CallFuture"]

_log = logging.getLogger("taskit.frontend")

_IDLE_CHECK = 0.25  # seconds between monitor checks while no call is in flight
_USER_GRACE = 0.001  # s: the background thread leaves the sockets to a busy user thread
_LONGEST_POLL = 1000  # ms: a leader re-checks the closed flag at least this often
_FOLLOW, _LEAD, _INSIDE = 0, 1, 2  # ThreadedIO._lead(): this thread's role
_BURST = 64  # calls submitted while others are out: sent together once this many wait


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


_CANCEL_WAIT = 2.0  # s: the longest a cancel() waits for its backend's answer


class _Answered:
    """What a cancel() drives the sockets for: ``ok`` turns true once its CANCEL is
    answered (or the call resolved)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    @property
    def ok(self) -> bool | None:
        return True if self.event.is_set() else None


_MAKE_LOCK = threading.Lock()  # CallFuture: makes a Condition, or settles without one


class CallFuture(Future):
    """The :class:`concurrent.futures.Future` of a submitted call. ``result()`` and
    ``exception()`` let the waiting thread drive the sockets itself when nobody
    else does -- ``submit(...).result()`` then costs no thread hand-off.
    ``cancel()`` withdraws the call from its backend when it has not started there."""

    def __init__(self, io: ThreadedIO) -> None:
        # Future.__init__ without its threading.Condition (over half the cost of a
        # submit): made on first use by __getattr__, i.e. only when a thread waits,
        # adds a callback or looks under the lock. Until then nobody can be waiting,
        # so _settle resolves the future without it. Running from the start (the call
        # goes out at once); cancel() is ours.
        self._state = FUTURE_RUNNING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._io = io
        self._call: PendingCall | None = None
        self.ok: bool | None = None

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not set: the Condition, made once (under _MAKE_LOCK, so
        # two threads never make two) and then found as a plain attribute.
        if name != "_condition":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with _MAKE_LOCK:
            cond = self.__dict__.get("_condition")
            if cond is None:
                cond = self.__dict__["_condition"] = threading.Condition()
        return cond

    def _settle(self, ok: bool, value: Any) -> bool:
        """Resolve a future nobody has waited on yet without making its Condition:
        True when done; False when it has one (resolve it the usual way)."""
        with _MAKE_LOCK:  # against a thread making the Condition to wait on it now
            if "_condition" in self.__dict__ or self._state != FUTURE_RUNNING:
                return False
            if ok:
                self._result = value
            else:
                self._exception = value
            self._state = FUTURE_FINISHED
        return True

    def done(self) -> bool:
        return self._state in FUTURE_OVER  # a plain read: a state once over never changes

    def cancel(self) -> bool:
        """Withdraw the call: True when it will never run -- it was not sent yet, or
        its backend confirmed (CANCELLED) that it removed it before it started; then
        ``result()`` raises ``concurrent.futures.CancelledError``. False when it is
        done, running or answered (NOT_CANCELLED), or no answer came within
        ``min(heartbeat_timeout, 2 s)``; the call then goes on as usual. Blocks for
        at most about that long (one round trip to the backend)."""
        call, io = self._call, self._io
        if call is None or self.ok is not None or self.done():
            return self.cancelled()
        answered = _Answered()
        outcome: list[str] = []

        def withdraw() -> None:
            call.cancel_hook = answered.event.set
            outcome.append(io._core.withdraw(call))
            if outcome[0] == "local":
                self._cancelled_here()
            elif outcome[0] == "sent":
                io.flush()

        try:
            io.as_leader(withdraw)
        except FrontEndClosedError:
            return self.cancelled()
        if not outcome or outcome[0] != "sent":
            return self.cancelled()
        if io._leader == threading.get_ident():
            return False  # a callback run by the driver: nobody could read the answer
        bound = min(io._core.heartbeat_timeout, _CANCEL_WAIT)
        deadline = time.monotonic() + bound
        while not answered.event.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or io.closed:
                break
            io.drive_for(answered, left)  # type: ignore[arg-type]  # returns at once when another thread drives
            answered.event.wait(max(0.0, min(left, deadline - time.monotonic())))
        if call.done:  # CANCELLED, or the call's own reply: its resolution is under way
            _futures_wait([self], timeout=bound)
        return self.cancelled()

    def _cancelled_here(self) -> None:
        """Mark this (running) future cancelled: its call will never run."""
        with self._condition:
            self._state = FUTURE_PENDING  # what Future.cancel() accepts
        self.ok = False
        Future.cancel(self)

    def result(self, timeout: float | None = None) -> Any:
        """The call's value, or its exception raised; :class:`WaitTimeoutError` (a
        builtin ``TimeoutError`` on every Python) when ``timeout`` passes first: it
        waits at most ``timeout`` seconds in all (driving the sockets included)."""
        if self._state != FUTURE_FINISHED:
            wait = timeout
            if self.ok is None:
                wait = self._drive(timeout)
            if self._state != FUTURE_FINISHED:  # still out, or cancelled
                try:
                    return super().result(wait)
                except _FuturesTimeout as e:
                    if self._raised(e):
                        raise
                    raise self._wait_timeout(timeout) from None
        # finished (a state that never changes again): no lock needed to read it
        if self._exception is None:
            return self._result
        raise self._exception

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's exception or ``None``; :class:`WaitTimeoutError` as :meth:`result`."""
        if self._state != FUTURE_FINISHED:
            wait = timeout
            if self.ok is None:
                wait = self._drive(timeout)
            if self._state != FUTURE_FINISHED:
                try:
                    return super().exception(wait)
                except _FuturesTimeout:
                    raise self._wait_timeout(timeout) from None
        return self._exception

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


class ThreadedIO(Connections):
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
        super().__init__(core, settings, note)
        self._ctx = zmq.Context()
        self._by_sock: dict[Any, Link] = {}  # DEALER -> link
        self._by_fd: dict[int, Link] = {}  # a DEALER's ZMQ_FD -> link
        self._by_monitor: dict[int, Link] = {}  # a monitor's ZMQ_FD -> link
        self._unread: set[Link] = set()  # links whose monitor had events when watched
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Every socket is waited on by its ZMQ_FD, a plain descriptor, with one poll
        # system call (see _drive); used by the leader only.
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
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
        # backoff after connections refused before coming up (Connections._refused)
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

    def call(self, call: PendingCall, w: Waiter, timeout: float | None) -> Any:
        """Send ``call`` and block until its waiter ``w`` is resolved; its result or raise."""
        if self._closed:
            raise self._closed_error()
        role = self._lead()
        if role:  # the fast path: nobody else drives the sockets, so this thread does
            try:
                self._core.submit(call)
                self._drive(w)
            finally:
                if role == _LEAD:
                    self._release()
            if w.ok is not None:
                return self._outcome(w)
        else:
            self._enqueue(call)
        return self.wait(call, w, timeout)

    def drive_for(self, fut: CallFuture, timeout: float | None) -> None:
        """Drive the sockets until ``fut`` is resolved or ``timeout`` passes, if no other
        thread is driving them (else return at once: the driver resolves ``fut``)."""
        self._defer_until = time.monotonic() + _USER_GRACE
        role = self._lead()
        if role == _INSIDE:
            return  # inside a callback run by the driver: Future.result waits (documented)
        if role == _FOLLOW:
            if self._leader != self._bg_ident or self._bg_ident is None:
                return  # a user thread drives: it resolves fut
            # The background thread drives: ask it to step down (it checks between
            # polls) and take over, so a run of result() calls reads replies in batches
            # instead of waiting for a hand-off per reply. Else wait as usual.
            self._yield = True
            self._wake()
            if not self._io_lock.acquire(timeout=0.05):
                return
            self._leader = threading.get_ident()
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
        while w.ok is None:
            role = self._lead()
            if role:
                try:
                    self._drive(w)
                finally:
                    if role == _LEAD:
                        self._release(own)
                if w.ok is None and (role == _INSIDE or self._closed):
                    break  # closed, or a callback of the leader whose call is not in yet
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
        """Register and send ``call`` without waiting for its reply. In a burst (other
        calls already out, fewer than ``_BURST`` routed and unsent) it is routed and
        left for the next send, which packs the burst into one message: the caller's
        ``result()``, its next submit, or the background thread (woken on release)."""
        if self._closed:
            raise self._closed_error()
        if self._lead() != _LEAD:
            self.start_many((call,))
            return
        try:
            if self._inbox:  # queued while bg was stepping down
                self._drain_inbox()
            core = self._core
            core.submit(call)
            waiting = len(core.outbox)
            if waiting >= _BURST or core.pending <= waiting:
                self.flush()
        finally:
            self._release()

    def start_many(self, calls: Sequence[PendingCall], own: int = 0) -> None:
        """Register and send ``calls`` without waiting; ``own`` as in :meth:`wait`."""
        if self._closed:
            raise self._closed_error()
        role = self._lead()
        if role:
            try:
                if role == _LEAD and self._inbox:  # queued while bg was stepping down
                    self._drain_inbox()
                submit = self._core.submit
                for call in calls:
                    submit(call)
                self.flush()
            finally:
                if role == _LEAD:
                    self._release(own)
        else:
            self._enqueue(*calls)

    def _lead(self) -> int:
        """The leader/follower hand-off, in one place: take the I/O lock if it is free
        (``_LEAD``: this thread drives now and must :meth:`_release`); ``_INSIDE`` when
        this thread already leads (a callback run by the leader); else ``_FOLLOW``:
        another thread drives (queue work with :meth:`_enqueue`)."""
        if self._io_lock.acquire(False):
            self._leader = threading.get_ident()
            return _LEAD
        return _INSIDE if self._leader == threading.get_ident() else _FOLLOW

    def _enqueue(self, *items: PendingCall | _Op) -> None:
        """Hand ``items`` to the leader (a follower's part): queue them and wake it."""
        self._inbox.extend(items)
        self._wake()
        # The leader may have released the lock between our failed acquire and the
        # append; then it may not have seen the items, so take over (or let bg do it).
        if self._lead() == _LEAD:
            try:
                self._drain_inbox()
                self.flush()
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
        if (self._inbox or self._core.pending > own) and not self._bg_wake.is_set():
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
            if core.resets or core.retired:
                self.between_turns()
            if self._inbox:
                self._drain_inbox()
            if core.outbox or core.control:
                self.flush()
            timers = core.timers
            if timers and timers[0][0] <= time.monotonic():  # one is due (the core's clock)
                self.tick()
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
            # A socket's ZMQ_FD turns readable when something reaches a socket that was
            # found empty, so each is looked at (ZMQ_EVENTS) before the wait: what is
            # queued is read now; else the descriptor will signal what comes next. Then
            # one poll system call, where zmq_poll makes one with a zero timeout first
            # and asks every socket for ZMQ_EVENTS again after the wait.
            ready = False
            by_fd = self._by_fd
            for link in tuple(by_fd.values()):
                if by_fd.get(link.sock_fd) is link and base_get(link.raw, EVENTS) & POLLIN:
                    ready = True
                    self.receive(link, until)
            if self._unread:
                ready = True
                for link in list(self._unread):
                    self._monitor_events(link)
            if not ready:
                self._handle(self._poller.poll(ms), until)

    def _handle(self, events: list, until: Any) -> None:
        """Serve what one poll found readable."""
        by_fd = self._by_fd
        for fd, _ in events:
            link = by_fd.get(fd)
            if link is not None:
                self.receive(link, until)
            elif fd == self._wake_r:
                self._wake_armed = False  # before draining: a later wake writes again
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            else:
                mlink = self._by_monitor.get(fd)
                if mlink is not None:  # None: replaced earlier in this loop turn
                    self._monitor_events(mlink)

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

    def resolve(self, done: list) -> None:
        """Wake the waiters of finished calls: a Waiter's latch, a CallFuture's result."""
        for call, ok, value in done:
            w = call.waiter
            if type(w) is Waiter:
                w.ok, w.value = ok, value
                w.latch.release()
            elif w is not None:
                w.ok = ok  # CallFuture: lets a driving waiter see it without a lock
                if type(value) is not CancelledError and w._settle(ok, value):
                    continue
                try:
                    if ok:
                        w.set_result(value)
                    elif type(value) is CancelledError:  # its backend withdrew it unrun
                        w._cancelled_here()
                    else:
                        w.set_exception(value)
                except Exception:  # noqa: BLE001 - a Future resolved elsewhere
                    _log.debug("future of call %s was already resolved", call.id)

    def _monitor_events(self, link: Link) -> None:
        """Act on every event queued on ``link``'s monitor: read it until empty (so its
        descriptor signals the next one: see _watch)."""
        while True:
            try:
                msg = link.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._unread.discard(link)
                return
            except zmq.ZMQError:  # closed
                return
            if self.on_event(link, monitor_event(msg)):
                return  # replaced: the old monitor socket is closed

    def _redial_later(self, link: Link, delay: float) -> None:
        self._redial[link.endpoint] = time.monotonic() + delay

    def _redial_due(self) -> float | None:
        """Connect the sockets whose backoff is over; the time of the next one, or None."""
        now = time.monotonic()
        for endpoint, when in list(self._redial.items()):
            if when <= now:
                del self._redial[endpoint]
                link = self.links.get(endpoint)
                if link is not None:
                    self.dial(link)
        return min(self._redial.values()) if self._redial else None

    def connect(self, endpoint: str) -> None:
        if endpoint in self._core.backends:
            return
        self.open(endpoint)  # first, so a bad endpoint leaves no trace
        self._core.add_backend(endpoint)

    def _watch(self, link: Link) -> None:
        # Waited on by their ZMQ_FD descriptors (see _drive). A monitor's turns
        # readable when a message reaches it after it was read empty, which
        # _monitor_events always does; one found not empty now (ZMQ_EVENTS looks and,
        # when it is empty, makes its descriptor signal the next message) is read
        # before the next wait.
        sock, monitor = link.sock, link.monitor
        fd = link.sock_fd = sock.getsockopt(zmq.FD)
        mfd = link.monitor_fd = monitor.getsockopt(zmq.FD)
        self._by_sock[sock] = link
        self._by_fd[fd] = link
        self._by_monitor[mfd] = link
        if monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._unread.add(link)
        self._poller.register(fd, select.POLLIN)
        self._poller.register(mfd, select.POLLIN)

    def _unwatch(self, link: Link) -> None:
        self._by_sock.pop(link.sock, None)
        self._unread.discard(link)
        for table, fd in ((self._by_fd, link.sock_fd), (self._by_monitor, link.monitor_fd)):
            if table.get(fd) is link:
                del table[fd]
                self._poller.unregister(fd)
        self._redial.pop(link.endpoint, None)

    # -- background thread ---------------------------------------------------------

    def _bg_loop(self) -> None:
        """Drive the sockets when a leader left calls behind (it sets ``_bg_wake``);
        otherwise, every ``_IDLE_CHECK`` seconds, take one look at the monitors,
        timers and replies already received."""
        self._bg_ident = threading.get_ident()
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
            if self._lead() != _LEAD:
                continue  # a leader is active; it wakes us when it leaves work behind
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
        for link in list(self.links.values()):
            self._monitor_events(link)
        for link in list(self.links.values()):
            if link.sock in self._by_sock:
                self.receive(link, None)
        core = self._core
        if self._redial:
            self._redial_due()
        if core.timers:
            self.tick()
        if self._inbox:
            self._drain_inbox()
        if core.resets or core.retired:
            self.between_turns()
        if core.outbox or core.control:
            self.flush()

    def _shutdown(self) -> None:
        """Fail what is pending and close every socket (with the I/O lock held)."""
        self._drain_inbox_on_close()
        # Calls still on the wire are withdrawn where they wait (CANCEL, no answer
        # awaited; the sockets then close with a short linger to deliver them).
        self.withdraw_all()
        self.resolve(self._core.fail_all(self._closed_error()))
        self._by_sock.clear()
        self._by_fd.clear()
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
