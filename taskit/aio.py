"""The asyncio front end: call backend tasks with ``await``.

:class:`AsyncFrontEnd` has the same routing, retry and error semantics as
:class:`taskit.frontend.FrontEnd` because both drive the same sans-I/O core,
:class:`taskit._client.core.ClientCore`; this module only moves bytes between the
core and ``zmq.asyncio`` sockets and resolves asyncio futures::

    async with AsyncFrontEnd([("127.0.0.1", 54543)]) as fe:
        await fe.work("add", 1, 2)                       # 3
        fut = fe.submit("add", 2, 3)                     # an asyncio.Future
        await fe.call("add", (1, 2), timeout=5)          # explicit form
        async for r in fe.map("add", [1, 2], [3, 4]):    # 4, 6 (in order)
            ...

How it runs, all on the event loop's thread (so the core has one driver and
needs no lock): one DEALER per backend and a reader task per DEALER feeding
replies to the core; one task per backend reading the socket monitor
(connected / disconnected → ``backend_up`` / ``backend_down``); one
``loop.call_later`` timer for the core's next deadline (call timeouts,
connect waits, Busy back-off). Calls are written to the socket as soon as
the core routes them, without a hop through another task.

An AsyncFrontEnd belongs to the event loop that first uses it and is not
thread-safe; use :class:`~taskit.frontend.FrontEnd` from threads.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import zmq
import zmq.asyncio

from taskit._client.connection import (
    CONNECT_RETRIED,
    DISCONNECTED,
    HANDSHAKE_FAILED,
    UP_EVENT,
    close_dealer,
    monitor_event,
    open_dealer,
    refusal,
)
from taskit._client.core import DOWN, PendingCall, parse_backend
from taskit._client.face import ClientFace
from taskit._wire import EVENTS, NOBLOCK, POLLIN, send_frames
from taskit.errors import (
    BackendLostError,
    BackendNotAvailableError,
    CallTimeoutError,
    FrontEndClosedError,
)
from taskit.protocol import KILL, STATS, STATUS, STOP, TASKS

__all__ = ["AsyncFrontEnd"]

_log = logging.getLogger("taskit.aio")

_MAP_WINDOW = 1000  # calls map() keeps in flight

_NOBLOCK, _EVENTS, _POLLIN = NOBLOCK, EVENTS, POLLIN  # plain ints, see taskit._wire


class _Backend:
    """The sockets and tasks of one backend connection."""

    __slots__ = ("endpoint", "sock", "raw", "monitor", "tasks", "up", "redial")

    def __init__(self, endpoint: str, sock: Any, monitor: Any) -> None:
        self.endpoint = endpoint
        self.sock = sock  # the zmq.asyncio socket: the reader task awaits on it
        # A plain view of the same socket for non-blocking sends and drains, which
        # need no future. ZeroMQ's descriptor is edge-triggered and any use may
        # consume the edge, so every raw use ends by checking EVENTS and reading
        # what is there (_drain): the waiting reader can then never miss a reply.
        self.raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        self.monitor = monitor
        self.tasks: list[asyncio.Task[None]] = []
        self.up = False  # this socket's connection came up (handshake done)
        self.redial: asyncio.TimerHandle | None = None  # its delayed connect (_refused)


class AsyncFrontEnd(ClientFace):
    """Call tasks on backends from asyncio, with FrontEnd's semantics.

    Same arguments, with the same defaults, as :class:`taskit.frontend.FrontEnd`:
    ``backends`` as ``"host"`` (``default_port``), ``"host:port"``,
    ``("host", port)``, ``"tcp://host:port"`` or ``"ipc://path"``; ``logger`` (a TaskIt logger;
    stdlib logging under ``taskit.aio`` is always used too); ``codec``
    of the requests (JSON by default, as the original; ``"msgpack"`` is faster
    and carries bytes); keyword-only ``timeout`` (default per-call limit,
    seconds), ``retries`` (re-sends of calls lost with their backend; 0 =
    at-most-once), ``busy_retries``, ``connect_timeout`` (how long a call
    waits for a reachable backend), ``heartbeat_interval`` /
    ``heartbeat_timeout`` (liveness by taskit PINGs: a backend silent for
    ``heartbeat_timeout``, its PING unanswered, is lost), ``key`` (shared HMAC
    key), ``curve_serverkey`` / ``curve_publickey`` / ``curve_secretkey`` and
    ``max_message_size``.

    Sockets are created when a running event loop first uses the front end
    (``async with``, or the first call); from then on it belongs to that loop.
    """

    _stdlog = _log

    def _start_driver(self, endpoints: list[str]) -> None:
        self._ctx: zmq.asyncio.Context | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: dict[str, _Backend] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        for endpoint in endpoints:
            self._core.add_backend(endpoint)

    # -- backends -------------------------------------------------------------------

    def add_backends(self, *backends: Any) -> None:
        """Use more backends (same forms as the constructor). Raises ``ValueError``
        for a malformed one. Sockets connect when the loop first uses this front end."""
        self._check_open()
        for spec in backends:
            endpoint = parse_backend(spec, self.default_port)
            if self._core.add_backend(endpoint) and self._loop is not None:
                self._connect(endpoint)

    # -- calls ----------------------------------------------------------------------

    def submit(self, task: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Send a call of ``task``; return an :class:`asyncio.Future` of its result.

        Must run in the event loop's thread. Raises :class:`EncodeError` at once
        for unencodable arguments. The future raises what :meth:`work` raises;
        cancelling it forgets the call (a late reply is ignored).
        """
        return self._submit(task, args, kwargs, self.timeout, None)

    async def work(self, task: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``task(*args, **kwargs)`` on the least loaded backend and return its result.

        Raises :class:`BackendProcessingError` (or a subclass such as
        :class:`UnknownTaskError`) when the task raises there,
        :class:`BackendNotAvailableError` when no backend is reachable within
        ``connect_timeout``, :class:`BackendLostError` when its backend died
        (without ``retries``), :class:`CallTimeoutError` after ``timeout``.
        """
        return await self._submit(task, args, kwargs, self.timeout, None)

    async def call(
        self,
        task: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`work` with explicit ``args``/``kwargs``, so per-call options such
        as ``timeout`` (default: the front end's) never clash with task arguments."""
        t = self.timeout if timeout is None else timeout
        return await self._submit(task, args, kwargs, t, None)  # new_call copies args

    async def map(
        self,
        task: str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: bool = False,
    ) -> AsyncIterator[Any]:
        """Call ``task(*args)`` for each tuple of arguments drawn from ``iterables``
        with many calls in flight (a window of 1000, input consumed lazily); yield
        the results in input order (``async for``). A failed call raises its
        exception when its result is reached; calls not yet answered when the
        consumer stops are forgotten. ``progress=True`` draws a progress bar."""
        bar = self._map_bar(task, iterables, progress)
        t = self.timeout if timeout is None else timeout
        source = zip(*iterables, strict=False)  # like the builtin: stop at the shortest
        window: collections.deque[asyncio.Future[Any]] = collections.deque()
        try:
            while True:
                if len(window) <= _MAP_WINDOW // 2:  # refill in batches
                    for args in itertools.islice(source, _MAP_WINDOW - len(window)):
                        window.append(self._submit(task, args, {}, t, None))
                if not window:
                    return
                value = await window.popleft()
                bar.update()
                yield value
        finally:
            bar.close()
            for fut in window:
                fut.cancel()

    def callback(
        self,
        task: str,
        cb: Callable[[Any], Any],
        error_cb: Callable[[BaseException], Any] | None | bool = None,
        *args: Any,
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        """Call ``task``; then ``cb(result)`` on the loop. As in FrontEnd, a
        :class:`BackendProcessingError` goes to ``error_cb(exc)`` (``None``: log its
        traceback; ``False``: ignore it); any other failure is logged at ERROR, not
        given to ``error_cb``. Returns a future that completes, with the call's
        result or exception, *after* the callback has run (awaiting it is optional:
        an exception left on it is not reported again)."""
        inner = self._submit(task, args, kwargs, self.timeout, None)
        outer: asyncio.Future[Any] = inner.get_loop().create_future()

        def done(f: asyncio.Future[Any]) -> None:
            exc = None if f.cancelled() else f.exception()
            try:
                if not f.cancelled():
                    self._deliver(task, exc, None if exc is not None else f.result(), cb, error_cb)
            finally:
                if outer.done():
                    pass  # the caller cancelled it
                elif f.cancelled():
                    outer.cancel()
                elif exc is None:
                    outer.set_result(f.result())
                else:
                    outer.set_exception(exc)
                    outer.exception()  # reported above: no "never retrieved" warning

        inner.add_done_callback(done)
        return outer

    def ignore(self, task: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Call ``task`` and drop the outcome, errors included. Returns the future."""
        fut = self._submit(task, args, kwargs, self.timeout, None)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # mark retrieved
        return fut

    # -- admin signals ----------------------------------------------------------------

    async def send_signal(self, backend: Any, signal: str, timeout: float | None = None) -> Any:
        """Send an admin signal (``<stop> <kill> <status> <stats> <tasks>``) to one
        backend of this front end; return its answer. Raises
        ``ValueError('No such backend!')`` for a backend not added here,
        :class:`BackendNotAvailableError` when it cannot be reached within the
        connect timeout, :class:`BackendProcessingError` when it refuses."""
        endpoint = self._core.known(backend, self.default_port)
        t = self.timeout if timeout is None else timeout
        return await self._submit(signal, (), {}, t, endpoint)

    async def send_stop(self, backend: Any) -> Any:
        """Ask ``backend`` to stop gracefully (it answers every accepted call first).
        Returns its answer, or None when it closed the connection before answering
        (it did what was asked). Raises as :meth:`send_signal`."""
        try:
            return await self.send_signal(backend, STOP)
        except BackendLostError:
            return None

    async def send_kill(self, backend: Any) -> Any:
        """Ask ``backend`` to terminate now; returns as :meth:`send_stop`."""
        try:
            return await self.send_signal(backend, KILL)
        except BackendLostError:
            return None

    async def get_tasks(self, backend: Any) -> str:
        """The backend's count of queued and running tasks as a string, or ``'down'``
        (at once when known down, else within ``connect_timeout``)."""
        endpoint = self._status_target(backend)
        if endpoint is None:
            return "down"
        try:
            return str(await self._submit(STATUS, (), {}, self.connect_timeout, endpoint))
        except (BackendNotAvailableError, BackendLostError, CallTimeoutError):
            return "down"

    async def stats(self, backend: Any) -> dict[str, Any]:
        """The ``<stats>`` of one backend (uptime, in flight, per-task counts...)."""
        return await self.send_signal(backend, STATS)

    async def tasks(self, backend: Any) -> list[str]:
        """The task names one backend serves (``<tasks>``)."""
        return await self.send_signal(backend, TASKS)

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> AsyncFrontEnd:
        self._start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail the calls still pending with :class:`FrontEndClosedError`, stop the
        tasks and close the sockets. Idempotent."""
        tasks = self._shutdown()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._release()

    def close(self) -> None:
        """:meth:`aclose` without awaiting the tasks (they are cancelled)."""
        self._shutdown()
        self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._core.backends)} backends"
        return f"<AsyncFrontEnd {state}, {self._core.pending} pending>"

    # -- internals ----------------------------------------------------------------------

    def _closed_error(self) -> FrontEndClosedError:
        return FrontEndClosedError("this AsyncFrontEnd is closed; create a new one")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _start(self) -> None:
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._ctx = zmq.asyncio.Context()
            try:
                for endpoint in self._core.backends:
                    self._connect(endpoint)
            except BaseException:
                self._release()  # close what opened, so no term() can block
                self._loop = None
                raise
        elif self._loop is not loop:
            raise RuntimeError(
                "this AsyncFrontEnd belongs to another event loop; create one per loop"
            )

    def _connect(self, endpoint: str) -> None:
        self._install(self._open(endpoint))

    def _open(self, endpoint: str, connect: bool = True) -> _Backend:
        """A DEALER and its monitor for ``endpoint`` (ValueError if unusable), with
        FrontEnd's socket options (taskit._client.connection); connected unless ``connect`` is
        false."""
        assert self._ctx is not None
        sock, monitor = open_dealer(self._ctx, endpoint, self._settings, connect)
        return _Backend(endpoint, sock, monitor)

    def _install(self, b: _Backend) -> None:
        self._sockets[b.endpoint] = b
        for coro in (self._read(b), self._watch(b)):
            task = asyncio.ensure_future(coro)
            task.set_name(f"taskit-aio:{b.endpoint}")
            b.tasks.append(task)

    def _discard(self, b: _Backend) -> None:
        """Stop ``b``'s tasks (except the one running this) and close its sockets."""
        try:
            me = asyncio.current_task()
        except RuntimeError:  # close() outside the loop
            me = None
        for task in b.tasks:
            if task is not me:
                task.cancel()
        if b.redial is not None:
            b.redial.cancel()
            b.redial = None
        close_dealer(b.sock, b.monitor)

    def _renew(self, b: _Backend) -> None:
        """Replace a disconnected backend's socket: whatever it still queued for the
        old connection is dropped, never delivered to a restarted backend."""
        if self._sockets.get(b.endpoint) is not b:
            return
        self._discard(b)
        self._install(self._open(b.endpoint))

    def _submit(
        self, task: str, args: Any, kwargs: Any, timeout: float | None, target: str | None
    ) -> asyncio.Future[Any]:
        self._start()
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        call = self._core.new_call(task, args, kwargs, waiter=fut, timeout=timeout, target=target)
        fut.add_done_callback(functools.partial(self._forget, call=call))
        self._core.submit(call)
        self._flush()
        self._schedule()
        return fut

    def _forget(self, fut: asyncio.Future[Any], *, call: PendingCall) -> None:
        if fut.cancelled() and not self._closed:
            self._core.cancel(call)
            self._schedule()

    def _resolve(self, done: list[tuple[PendingCall, bool, Any]]) -> None:
        for call, ok, value in done:
            fut = call.waiter
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _flush(self) -> None:
        """Write every routed call to its backend's socket."""
        core = self._core
        while True:
            out = core.drain_outbox()
            if not out:
                return
            used: dict[str, _Backend] = {}
            for call in out:
                if call.done or call.backend is None:
                    continue
                b = self._sockets.get(call.backend)
                frames = core.frames_for(call)
                try:
                    if b is None:
                        raise zmq.Again()
                    send_frames(b.raw.send, frames)
                    used[b.endpoint] = b
                except zmq.Again:
                    # Not expected (unbounded queue); if it happens, keep the replies
                    # the socket holds, then the core marks the backend down and
                    # re-routes; re-routed calls come round in this loop.
                    if b is not None:
                        self._drain(b)
                    self._resolve(core.send_failed(call))
            for b in used.values():
                self._drain(b)

    def _schedule(self) -> None:
        """Keep one timer armed for the core's next deadline."""
        if self._closed or self._loop is None:
            return
        when = self._core.next_wakeup()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            delay = max(0.0, when - self._core.clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self._closed:
            return
        core = self._core
        self._resolve(core.tick())
        if core.pings or core.suspects:
            self._liveness()
        self._flush()
        self._schedule()

    def _liveness(self) -> None:
        """Send the PINGs the core asked for; drop the connections it finds silent
        (after reading what they still hold: the core decides on everything heard)."""
        core = self._core
        for endpoint in core.take_pings():
            b = self._sockets.get(endpoint)
            if b is not None:
                try:
                    send_frames(b.raw.send, core.ping_frames())
                except zmq.ZMQError:  # a dead connection: the monitor reports it
                    pass
        for endpoint in core.take_suspects():
            b = self._sockets.get(endpoint)
            if b is None:
                continue
            self._drain(b)
            done = core.check_suspect(endpoint)
            if done is not None:
                _log.info("backend %s stopped answering (PING unanswered)", endpoint)
                self._resolve(done)
                self._renew(b)

    async def _read(self, b: _Backend) -> None:
        core, sock, endpoint = self._core, b.sock, b.endpoint
        while True:
            try:
                frames = await sock.recv_multipart(copy=True)
            except zmq.ZMQError:
                return  # closed
            self._resolve(core.on_message(endpoint, frames))
            self._drain(b)  # what else is queued, before yielding to the loop
            self._flush()  # Busy/Stopping replies re-route calls
            self._schedule()

    def _drain(self, b: _Backend) -> None:
        """Hand every reply already queued on ``b``'s socket to the core (no waiting)."""
        raw, core, endpoint = b.raw, self._core, b.endpoint
        while cast(int, raw.getsockopt(_EVENTS)) & _POLLIN:
            self._resolve(core.on_message(endpoint, raw.recv_multipart(_NOBLOCK)))

    async def _watch(self, b: _Backend) -> None:
        core, endpoint = self._core, b.endpoint
        while True:
            try:
                event = monitor_event(await b.monitor.recv_multipart())
            except zmq.ZMQError:
                return
            if event & UP_EVENT:
                b.up = True
                core.backend_up(endpoint)
            elif not b.up and event & (DISCONNECTED | HANDSHAKE_FAILED):
                self._refused(b, event)
                return  # the new socket has its own tasks
            elif event & DISCONNECTED:
                # Replies the backend sent before it went (e.g. the answer to <stop>)
                # arrived before this event. One may sit in the reader task's
                # resolved-but-not-yet-resumed recv: yielding once lets the reader
                # run first; the rest are still queued on the socket.
                await asyncio.sleep(0)
                if self._closed:
                    return
                self._drain(b)
                self._resolve(core.backend_down(endpoint, "disconnected"))
                self._renew(b)
                self._flush()
                self._schedule()
                return  # the new socket has its own tasks
            elif event & CONNECT_RETRIED:
                if core.backends[endpoint].state == DOWN:
                    continue
                self._resolve(core.backend_down(endpoint, "cannot connect"))
            else:
                continue
            self._flush()
            self._schedule()

    def _refused(self, b: _Backend, event: int) -> None:
        """``b``'s connection ended before it came up (the peer refused the handshake
        or closed it): replace the socket and connect the new one after a growing
        backoff. Renewing at once would bypass libzmq's reconnect interval, and a
        peer that refuses every connection would see thousands a second."""
        endpoint = b.endpoint
        why = refusal(event, self._settings.curve is not None)
        done, delay, report = self._core.connect_refused(endpoint, why)
        if report is not None:
            _log.warning("%s", report)
        self._resolve(done)
        if self._sockets.get(endpoint) is b and not self._closed:
            self._discard(b)
            new = self._open(endpoint, connect=False)
            self._install(new)
            assert self._loop is not None
            new.redial = self._loop.call_later(delay, self._dial, new)
        self._flush()
        self._schedule()

    def _dial(self, b: _Backend) -> None:
        """Connect ``b``'s socket once its backoff is over (if it is still in use)."""
        b.redial = None
        if self._closed or self._sockets.get(b.endpoint) is not b:
            return
        try:
            b.raw.connect(b.endpoint)
        except zmq.ZMQError as e:  # it connected before: not expected
            _log.warning("cannot connect to %s again: %s", b.endpoint, e)

    def _shutdown(self) -> list[asyncio.Task[None]]:
        if self._closed:
            return []
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._resolve(
            self._core.fail_all(
                FrontEndClosedError("the AsyncFrontEnd was closed before this call was answered")
            )
        )
        tasks = [t for b in self._sockets.values() for t in b.tasks]
        for t in tasks:
            t.cancel()
        return tasks

    def _release(self) -> None:
        for b in self._sockets.values():
            self._discard(b)
        self._sockets.clear()
        if self._ctx is not None:
            # destroy, not term: a socket left open by any path would block term() for ever
            self._ctx.destroy(linger=0)
            self._ctx = None
