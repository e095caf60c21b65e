"""The asyncio front end: call backend tasks with ``await``.

:class:`AsyncFrontEnd` has the same routing, retry and error semantics as
:class:`taskit.frontend.FrontEnd` because both drive the same sans-I/O core,
:class:`taskit._client.core.ClientCore`, over the same socket handling
(:mod:`taskit._client.connection`); only the waiting differs::

    async with AsyncFrontEnd([("127.0.0.1", 54543)]) as fe:
        await fe.work("add", 1, 2)                       # 3
        fut = fe.submit("add", 2, 3)                     # an asyncio.Future
        await fe.call("add", (1, 2), timeout=5)          # explicit form
        async for r in fe.map("add", [1, 2], [3, 4]):    # 4, 6 (in order)
            ...

How it waits is :mod:`taskit._client.aio_driver`'s concern (all on the event
loop's thread: reader tasks, monitor tasks, one timer).

An AsyncFrontEnd belongs to the event loop that first uses it and is not
thread-safe; use :class:`~taskit.frontend.FrontEnd` from threads.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from taskit._client.aio_driver import AsyncIO
from taskit._client.face import ClientFace
from taskit.errors import (
    BackendLostError,
    BackendNotAvailableError,
    CallTimeoutError,
)
from taskit.protocol import KILL, STATS, STATUS, STOP, TASKS

__all__ = ["AsyncFrontEnd"]

_log = logging.getLogger("taskit.aio")

_MAP_WINDOW = 1000  # calls map() keeps in flight


class AsyncFrontEnd(ClientFace):
    """Call tasks on backends from asyncio, with FrontEnd's semantics.

    Same arguments, with the same defaults, as :class:`taskit.frontend.FrontEnd`
    (one constructor serves both): ``backends`` as ``"host"`` (``default_port``),
    ``"host:port"``, ``("host", port)``, ``"tcp://host:port"`` or ``"ipc://path"``;
    ``logger`` (a TaskIt logger; stdlib logging under ``taskit.aio`` is always used
    too); ``codec`` of the requests (JSON by default, as the original; ``"msgpack"``
    is faster and carries bytes; pass it by keyword); keyword-only ``timeout``
    (default per-call limit, seconds), ``retries`` (re-sends of calls lost with
    their backend; 0 = at-most-once), ``busy_retries``, ``connect_timeout`` (how
    long a call waits for a reachable backend), ``heartbeat_interval`` /
    ``heartbeat_timeout`` (liveness by taskit PINGs: a backend silent for
    ``heartbeat_timeout``, its PING unanswered, is lost), ``key`` (shared HMAC
    key), ``curve_serverkey`` / ``curve_publickey`` / ``curve_secretkey``,
    ``max_message_size`` and ``metrics_registry`` (a Prometheus registry to
    publish this client's metrics in).

    Sockets are created when a running event loop first uses the front end
    (``async with``, or the first call); from then on it belongs to that loop.
    """

    _stdlog = _log

    def _start_driver(self, endpoints: list[str]) -> None:
        self._io = AsyncIO(self._core, self._settings, self._note)
        if self.resolve_every is not None:
            self._io.refresh = (self.resolve_every, self._refresh)
        for endpoint in endpoints:
            self._io.connect(endpoint)

    # -- backends -------------------------------------------------------------------

    def add_backends(self, *backends: Any) -> None:
        """Use more backends (same forms as the constructor; a host name that resolves
        to several addresses adds that many). Raises ``ValueError`` for a malformed
        one. Sockets connect when the loop first uses this front end."""
        if self._io.closed:
            raise self._io.closed_error()
        for endpoint in self._expand(backends):
            self._io.connect(endpoint)

    def remove_backends(self, *backends: Any) -> None:
        """Stop using backends (as given, or one address a name stood for): no new
        calls go there; calls running there finish, and each connection closes once
        it has none left. Does not wait. ``ValueError('No such backend!')`` for one
        this client does not use. Call it from the event loop's thread."""
        if self._io.closed:
            raise self._io.closed_error()
        self._io.apply_members([], self._leaving(backends))

    # -- calls ----------------------------------------------------------------------

    def submit(self, task: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Send a call of ``task``; return an :class:`asyncio.Future` of its result.

        Must run in the event loop's thread. Raises :class:`EncodeError` at once
        for unencodable arguments. The future raises what :meth:`work` raises;
        cancelling it forgets the call (a late reply is ignored) and withdraws it
        from its backend if it has not started there (a CANCEL, not awaited).
        """
        return self._io.submit(task, args, kwargs, self.timeout, None)

    async def work(self, task: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``task(*args, **kwargs)`` on the least loaded backend and return its result.

        Raises :class:`BackendProcessingError` (or a subclass such as
        :class:`UnknownTaskError`) when the task raises there,
        :class:`BackendNotAvailableError` when no backend is reachable within
        ``connect_timeout``, :class:`BackendLostError` when its backend died
        (without ``retries``), :class:`CallTimeoutError` after ``timeout``.
        """
        return await self._io.submit(task, args, kwargs, self.timeout, None)

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
        return await self._io.submit(task, args, kwargs, t, None)  # new_call copies args

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
        consumer stops are forgotten, and withdrawn from their backends if they have
        not started. Calls drawn together go out in batches (one message each).
        ``progress=True`` draws a progress bar."""
        bar = self._map_bar(task, iterables, progress)
        t = self.timeout if timeout is None else timeout
        source = zip(*iterables, strict=False)  # like the builtin: stop at the shortest
        window: collections.deque[asyncio.Future[Any]] = collections.deque()
        try:
            while True:
                if len(window) <= _MAP_WINDOW // 2:  # refill in batches
                    try:  # sent together at the end: batched on the wire
                        for args in itertools.islice(source, _MAP_WINDOW - len(window)):
                            window.append(self._io.submit(task, args, {}, t, None, send=False))
                    finally:
                        self._io.send_now()
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
        inner = self._io.submit(task, args, kwargs, self.timeout, None)
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
        fut = self._io.submit(task, args, kwargs, self.timeout, None)
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
        return await self._io.submit(signal, (), {}, t, endpoint)

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
            return str(await self._io.submit(STATUS, (), {}, self.connect_timeout, endpoint))
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
        self._io.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail the calls still pending with :class:`FrontEndClosedError`, stop the
        tasks and close the sockets. Idempotent."""
        tasks = self._io.shutdown()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._io.release()
        self._meter_off()

    def close(self) -> None:
        """:meth:`aclose` without awaiting the tasks (they are cancelled)."""
        self._io.shutdown()
        self._io.release()
        self._meter_off()

    def __repr__(self) -> str:
        state = "closed" if self._io.closed else f"{len(self._core.backends)} backends"
        return f"<AsyncFrontEnd {state}, {self._core.pending} pending>"
