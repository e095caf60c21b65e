"""The taskit front end: call functions of remote backends by name.

A :class:`FrontEnd` keeps one ZeroMQ DEALER connection per backend and
pipelines every call on it (many in flight, replies matched by call id). The
routing, retry and reply logic lives in :mod:`taskit._client.core` (pure, shared
with the asyncio front end); this module only moves frames and wakes waiters.

How the sockets are driven is :mod:`taskit._client.threaded`'s concern: the calling
thread drives them itself when nobody else does (no thread hand-off on a
synchronous call), else the current driver or the ``taskit-frontend-io``
thread does.

Failure detection: the socket monitor reports connects and disconnects, and
the client PINGs a backend that has gone silent (taskit PING/PONG messages,
decided by :class:`taskit._client.core.ClientCore`; not ZMTP heartbeats, which
libzmq 4.3.5 can abort a backend on): one silent for ``heartbeat_timeout``
with its PING unanswered is lost and its connection replaced. Calls in
flight on a lost or dropped connection fail with
:class:`BackendLostError` (at-most-once, the default) or are re-sent with
``retries=N`` (at-least-once). A restarted backend is reconnected by libzmq
and rejoins by itself.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from taskit._client.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
)
from taskit._client.core import PendingCall
from taskit._client.face import ClientFace
from taskit._client.threaded import CallFuture, ThreadedIO, Waiter
from taskit.errors import (
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    CallTimeoutError,
    FrontEndClosedError,
)
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

_MAP_WINDOW = 1000  # calls map() keeps in flight


class FrontEnd(ClientFace):
    """A client of one or more taskit backends (TaskIt 4.0 compatible).

    ``backends``: ``"host"`` (``default_port``), ``"host:port"``, ``("host", port)``,
    ``"tcp://host:port"`` or ``"ipc://path"``. ``logger``: a TaskIt logger
    (``logger(importance, msg)``); stdlib logging under ``taskit.frontend`` is
    always used too. ``codec``: the codec of every call (``JSONCodec`` as in
    4.0; ``MsgpackCodec`` is faster and carries bytes).

    Keyword-only options:

    - ``timeout``: default seconds a call may take (None: no limit); a call
      that runs out raises :class:`CallTimeoutError` (a ``TimeoutError``).
    - ``retries``: re-sends of a call whose backend was lost (its connection
      dropped, or its PINGs went unanswered). 0 (default) is *at-most-once*: a
      lost call fails with :class:`BackendLostError` -- it may or may not have
      run, but never runs twice. N > 0 is *at-least-once*: the call is re-sent to
      a live backend, so it may run twice. The default is at-most-once because
      only the caller knows whether a task is idempotent: running "charge the
      card" twice is worse than an error the caller sees and can act on.
    - ``busy_retries``: re-sends after a ``Busy`` answer (backend queue full),
      with exponential backoff, before :class:`BusyError` is raised.
    - ``connect_timeout``: how long a call waits for a reachable backend
      before :class:`BackendNotAvailableError`, which names each backend's
      last connection error (e.g. "refused the CURVE handshake", "not a taskit
      backend"). A backend that refuses every connection is retried after
      0.1 s, doubling up to 5 s, and its cause logged once.
    - ``prefetch`` (8): calls per worker this client keeps on one backend at
      most (a backend's workers come from its handshake). Further calls wait
      in the client and go, in order, to the backend expected to finish them
      soonest (its reported load, other clients' included, and its service
      time), so a slow backend does not hoard calls a fast one would finish
      first, and a backend that joins later takes waiting calls at once.
    - ``heartbeat_interval`` / ``heartbeat_timeout`` (0.5 s / 2 s): liveness.
      Any reply proves a backend alive; one with calls in flight that is silent
      for ``heartbeat_interval`` gets a PING (an idle one after 4 x
      ``heartbeat_timeout``), and one silent for ``heartbeat_timeout`` with its
      PING unanswered is lost -- a frozen backend within 2-2.5 s by default.
      Its backend answers PINGs from its I/O thread, so raise the timeout if
      tasks can hold the backend's GIL longer. ``heartbeat_interval=None``
      turns the checks off (a frozen backend then holds its calls until their
      ``timeout``). These are taskit messages, not ZMTP heartbeats.
    - ``key``: shared secret; every message is signed (HMAC-SHA256) and
      replies not signed with it are dropped. A call the backend refuses for
      its signature (the keys differ, or one side has none) raises
      :class:`AuthenticationError`.
    - ``curve_serverkey`` (the backend's public key) and optionally
      ``curve_publickey``/``curve_secretkey`` (this client's keypair, generated
      when omitted): CurveZMQ encryption. Each key is 40 Z85 characters or 32
      raw bytes; anything else raises ``ValueError`` at once.
    - ``max_message_size``: largest reply accepted and largest call sent (bytes;
      None: no limit). A call over it raises :class:`MessageTooLargeError` at
      once: a backend with that limit would drop the connection, and with it
      every call in flight there. Keep it equal to the backends'.
    - ``metrics_registry``: a ``prometheus_client`` ``CollectorRegistry`` (or
      ``prometheus_client.REGISTRY``) to publish this client's metrics in,
      per backend: calls sent, answered, failed, lost, retried, busy, and the
      time from send to answer (``taskit_client_*``, doc/operations.md); taken
      out again by :meth:`close`. One client per registry at a time (a second
      raises ``ValueError``). Needs ``pip install 'taskit[metrics]'``.

    A call made inside an OpenTelemetry span carries its trace context to the
    backend, which runs the task in a child span (doc/operations.md).

    Thread-safety: every method may be called from any number of threads.
    """

    _stdlog = _log

    def _start_driver(self, endpoints: list[str]) -> None:
        self._cb_pool: ThreadPoolExecutor | None = None
        self._cb_pool_lock = threading.Lock()
        self._io = ThreadedIO(self._core, self._settings, endpoints, self._note)
        self._resolving = threading.Event()  # set: stop re-resolving (closing)
        self._resolver_thread: threading.Thread | None = None
        if self.resolve_every is not None:
            self._resolver_thread = threading.Thread(
                target=self._resolve_loop, name="taskit-frontend-resolve", daemon=True
            )
            self._resolver_thread.start()

    def _resolve_loop(self) -> None:
        """Every ``resolve_every`` seconds, resolve the backends' names again (off the
        I/O thread: DNS blocks) and hand the changes to the I/O thread."""
        every = self.resolve_every
        assert every is not None
        while not self._resolving.wait(every):
            joined, left = self._refresh()
            if (joined or left) and not self._io.closed:
                try:
                    apply = functools.partial(self._io.apply_members, joined, left)
                    self._io.as_leader(apply, wait=False)
                except FrontEndClosedError:
                    return

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
        endpoint = self._core.known(backend, self.default_port)
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
        endpoint = self._status_target(backend)
        if endpoint is None:
            return "down"
        try:
            return str(self._call(STATUS, (), None, self.connect_timeout, target=endpoint))
        except (BackendNotAvailableError, BackendLostError, CallTimeoutError):
            return "down"

    def add_backends(self, *backends: Any) -> None:
        """Connect to more backends (same forms as the constructor; a host name that
        resolves to several addresses adds that many). Blocks until done."""
        endpoints = self._expand(backends)
        self._io.as_leader(lambda: self._io.apply_members(endpoints, []))

    def remove_backends(self, *backends: Any) -> None:
        """Stop using backends (as given to the constructor or :meth:`add_backends`, or
        one address a name stood for): they get no new calls; calls they are running
        finish there (their replies still come), and each connection closes once it
        has none left. Does not wait for that. ``ValueError('No such backend!')`` for
        one this client does not use."""
        endpoints = self._leaving(backends)
        self._io.as_leader(lambda: self._io.apply_members([], endpoints))

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

        Does not block on the network. The Future is already *running*; its
        ``cancel()`` withdraws the call: True only when it will never run (not sent
        yet, or still queued on its backend, which confirmed), False when it runs
        or ran (a bounded round trip to the backend).
        Its ``result()``/``exception()`` drive the sockets from the waiting thread
        when no other thread does. Done-callbacks run in the thread that receives
        the reply: keep them short, and never wait there on another Future of this
        FrontEnd (``work()`` is fine; so is :meth:`callback`, whose callbacks run
        on their own threads). Raises :class:`EncodeError` at once for
        unencodable arguments.
        """
        fut = CallFuture(self._io)
        call = fut._call = self._core.new_call(task, args, kwargs, fut, self.timeout)
        self._io.start(call)
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
        is reached (arguments that cannot be encoded raise :class:`EncodeError`
        when they are read, up to a window of calls ahead). Input is consumed
        lazily. ``progress=True`` draws a progress bar (tqdm, on a terminal).
        ``timeout`` applies to each call (default: the FrontEnd's).
        """
        bar = self._map_bar(task, iterables, progress)
        timeout = self.timeout if timeout is None else timeout
        window: collections.deque[tuple[PendingCall, Waiter]] = collections.deque()
        source = zip(*iterables, strict=False)  # stops at the shortest, like map()
        exhausted = False
        try:
            while True:
                # refill when half the window is free: fewer, larger batches
                if not exhausted and len(window) <= _MAP_WINDOW // 2:
                    want = _MAP_WINDOW - len(window)
                    batch = []
                    for args in itertools.islice(source, want):
                        w = Waiter()
                        call = self._core.new_call(task, args, None, w, timeout)
                        window.append((call, w))
                        batch.append(call)
                    exhausted = len(batch) < want
                    if batch:
                        self._io.start_many(batch, len(window))
                if not window:
                    return
                call, w = window.popleft()
                value = self._io.wait(call, w, timeout, len(window))
                if progress:
                    bar.update()
                yield value
        finally:
            bar.close()
            if window and not self._io.closed:  # abandoned by the consumer: forget them
                calls = [c for c, _ in window]
                self._io.as_leader(lambda: [self._core.cancel(c) for c in calls], wait=False)  # type: ignore[func-returns-value]

    def stats(self, backend: Any) -> dict[str, Any]:
        """The ``<stats>`` of one backend (uptime, in flight, per-task counts...)."""
        return self.send_signal(backend, STATS)

    def tasks(self, backend: Any) -> list[str]:
        """The task names one backend serves (``<tasks>``)."""
        return self.send_signal(backend, TASKS)

    def close(self) -> None:
        """Fail every pending call with :class:`FrontEndClosedError`, close the sockets
        and stop the I/O thread. Idempotent; blocks briefly."""
        self._resolving.set()
        self._io.close()
        self._meter_off()
        with self._cb_pool_lock:
            if self._cb_pool is not None:
                self._cb_pool.shutdown(wait=False)

    def __enter__(self) -> FrontEnd:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._io.closed else f"{len(self._io.links)} backends"
        return f"<FrontEnd {state}, {self._core.pending} pending>"

    # -- calls ---------------------------------------------------------------------

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
        w = Waiter()
        # new_call copies args into the body list; io.call raises FrontEndClosedError
        call = self._core.new_call(task, args, kwargs, w, timeout, target)
        return self._io.call(call, w, timeout)

    # -- callbacks and logging -----------------------------------------------------

    def _callbacks(self) -> ThreadPoolExecutor:
        with self._cb_pool_lock:
            if self._cb_pool is None:
                self._cb_pool = ThreadPoolExecutor(8, thread_name_prefix="taskit-frontend-cb")
            return self._cb_pool

    def _run_cb(self, task: str, fut: Future, cb: Callable, error_cb: Any, outer: Future) -> None:
        exc = fut.exception()
        try:
            self._deliver(task, exc, None if exc is not None else fut.result(), cb, error_cb)
        finally:
            if exc is None:
                outer.set_result(fut.result())
            else:
                outer.set_exception(exc)
