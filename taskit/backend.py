"""The taskit backend: a ZeroMQ ROUTER that serves plain functions by name.

A :class:`BackEnd` binds one ROUTER socket and runs every CALL it accepts on
the worker-pool core (:mod:`taskit.pool`); the reply goes out in the codec of
the request. ``doc/protocol.md`` is the wire format, ``doc/security.md`` the
threat model.

This module is the public face. The engine is in :mod:`taskit._server`: the
sans-I/O request handler (``handler``: a message in, decisions and reply items
out), the I/O loop that owns the socket and the threads and feeds it
(``loop``: how threads share the socket, why quick tasks run inline), the
counters (``accounting``), access control (``access``) and the options
(``options``). A BackEnd checks its options and composes those.

Admin signals (``<status> <stats> <tasks>``, and ``<stop> <kill>`` when
enabled through :data:`ADMIN_TASKS`) are answered by the I/O thread itself, so
they work while every worker is busy.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq

from taskit._server.access import CurveAllowList, curve_keys
from taskit._server.accounting import PeerLedger
from taskit._server.handler import RequestHandler
from taskit._server.loop import NEW, RUNNING, ServerLoop
from taskit._server.options import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PENDING,
    DEFAULT_PEER_BUDGET,
    DEFAULT_PEER_QUEUE,
    ENVELOPE,
    accepted_codecs,
    check_tasks,
    configure_router,
    make_endpoint,
    parse_inline,
)
from taskit.codecs import JSONCodec, Signer, get_codec
from taskit.errors import BackendBindError
from taskit.log import IMPORTANT, null_logger
from taskit.protocol import ADMIN_SIGNALS, DEFAULT_PORT, KILL, STATUS, STOP

__all__ = [
    "BackEnd",
    "ADMIN_TASKS",
    "task_stop",
    "task_kill",
    "task_count",
    "build_backend",
    "DEFAULT_PORT",
    "END_RESP",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_PEER_QUEUE",
    "DEFAULT_PEER_BUDGET",
]

_log = logging.getLogger("taskit.backend")

END_RESP = 0.5  # seconds: socket linger on close and the I/O thread's longest sleep


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


class BackEnd:
    """A taskit server: exposes ``tasks`` (name -> callable) over ZeroMQ.

    ``tasks`` values are callables, or ``(callable, pass_backend)`` pairs;
    with ``pass_backend`` true the BackEnd is passed as the first argument
    (for tasks that use :meth:`subtask`). The dict is kept, not copied, as
    ``self.tasks``.

    Where: ``host``/``port`` (``port=0``: a free port, read it back from
    :attr:`port`), or ``endpoint`` (``"tcp://host:port"``, ``"ipc:///path"``).
    How: ``workers`` and ``pool`` (``"thread"``, ``"process"`` or a ready
    :class:`~taskit.pool.WorkerPool`, which the BackEnd then does not shut
    down); ``codecs`` the codecs accepted (names or codec objects; default
    json and msgpack, plus ``codec``, plus pickle when ``key`` or
    ``insecure_pickle`` is given); ``max_pending`` bounds calls queued or
    running (default 50,000, ``None``: no bound; more get a ``Busy`` error at
    once, which a FrontEnd retries with backoff); ``max_message_size`` bounds
    every message, in or out (one frame: a larger one makes ZeroMQ drop the
    connection; a message of several frames is not one of wire protocol v2,
    and is read frame by frame, dropped and counted), so a reply body has 68
    bytes of envelope less (a larger result is answered with an
    ``EncodeError``, since a client with the same limit would drop the
    connection).

    What one client (one connection) can make the backend hold, in bytes, with
    ``M = max_message_size``, ``Q = peer_queue``, ``B = peer_budget``::

          (Q + 1) * M   requests ZeroMQ queued or receiving, not yet read (RCVHWM = Q)
        + E * B + M     its accepted, unanswered calls and its replies waiting in
                        the backend (the ledger: wire bytes + 3 KiB per call, 512 B
                        per reply; decoded arguments take E <= 73 x their wire bytes)
        + Q * M         replies handed to ZeroMQ, not yet sent (SNDHWM = Q)
        + S             with ``key``: its session (see doc/security.md)
        + kernel        SO_RCVBUF + SO_SNDBUF of its TCP connection (not in our RSS)

    ZeroMQ bounds each frame (by ``max_message_size``), not their number, and
    queues a message only once it has all of it: a client sending a message of
    many frames makes it hold ``frames * max_message_size`` until the backend
    reads and drops it (doc/security.md). A call from a client already holding
    something that would take it past ``peer_budget`` is answered ``Busy``;
    a reply to a client whose ZeroMQ queue is full (it is not reading) waits
    in the ledger, and past ``peer_budget`` is dropped and counted
    (``<stats>`` ``dropped["reply_over_budget"]``); a client that left is
    forgotten. ``peer_budget=None`` turns the ledger off (no ``Busy``;
    replies to a full queue are dropped at once, ``reply_hwm``).
    Security: ``key`` (bytes or str) makes every message carry an HMAC bound to
    its connection (opened by a HELLO) and a sequence number, and drops those
    that do not, or that replay one seen before; ``curve_secretkey``/``curve_publickey`` (40 Z85
    characters or 32 raw bytes each; a malformed key is a ``ValueError`` at once)
    turn on CurveZMQ encryption, and ``curve_clients`` (Z85 public keys)
    admits only those clients (others fail the handshake; counted in
    ``<stats>`` as ``dropped["curve_denied"]``). Dead clients are dropped
    by TCP keepalive (about a minute after they vanish; their memory is freed
    then). ``heartbeat_interval`` (seconds; default ``None`` = off) and
    ``heartbeat_timeout`` (default 3x the interval) turn on ZMTP heartbeats as
    well -- **not recommended**: with libzmq 4.3.5 any client that floods the
    backend and resets its connection can then abort the backend process (a
    libzmq bug; see doc/security.md). ``logger`` is a TaskIt
    logger (``logger(importance, msg)``); ``tracebacks`` logs failing tasks'
    tracebacks (the first per task and exception type every 10 s; the next
    one logged counts those skipped) and sends them to the caller (every one).
    ``end_resp`` (seconds) is how long closing waits to flush the last replies;
    it also scales the end of a graceful stop (see :meth:`stop_server`; 0:
    close as soon as the accepted calls are answered).

    ``inline``: ``"auto"`` (quick tasks run on the I/O thread, see above),
    ``False`` (always the pool), or a set of task names always run inline.

    ``metrics_port``: serve Prometheus metrics over HTTP on ``/metrics`` at
    ``metrics_host:metrics_port`` (default host 127.0.0.1; port 0: a free port,
    read it back from :attr:`metrics_port` once started), from :meth:`start` (or
    :meth:`main`) until :meth:`close`. Needs ``pip install 'taskit[metrics]'``
    (else ``ImportError`` at once); doc/operations.md lists the metrics. A call
    made inside an OpenTelemetry span runs its task in a child span (see
    doc/operations.md), whatever these options. When the ``taskit.backend``
    logger is enabled for DEBUG as the BackEnd is made, every answered call is
    logged there, with ``task``, ``call_id``, ``peer`` and ``duration`` as record
    attributes (for :class:`taskit.log.JSONFormatter`).

    Anything a task raises, even ``SystemExit`` or ``KeyboardInterrupt``,
    becomes an ERROR reply and the backend keeps serving: a caller must not
    be able to end the server by making a task exit (that is what ``<stop>``
    and signals are for).

    Serve with :meth:`start` (background thread) or :meth:`main` (blocks);
    end with :meth:`stop_server` (graceful), :meth:`terminate_server` (now)
    or :meth:`close` / ``with``. Every public method is thread-safe.

    Raises ``TypeError`` for malformed tasks, :class:`InsecureCodecError` when
    pickle would be accepted without a key, ``ValueError`` for bad options.
    """

    def __init__(
        self,
        tasks: Mapping[str, Any],
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        logger: Callable[[str, Any], Any] = null_logger,
        codec: Any = JSONCodec,
        end_resp: float = END_RESP,
        tracebacks: bool = True,
        *,
        endpoint: str | None = None,
        workers: int | None = None,
        pool: Any = "thread",
        codecs: Iterable[Any] | None = None,
        key: bytes | str | None = None,
        insecure_pickle: bool = False,
        max_pending: int | None = DEFAULT_MAX_PENDING,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        peer_budget: int | None = DEFAULT_PEER_BUDGET,
        peer_queue: int = DEFAULT_PEER_QUEUE,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT,
        heartbeat_timeout: float | None = None,
        curve_secretkey: bytes | str | None = None,
        curve_publickey: bytes | str | None = None,
        curve_clients: Iterable[bytes | str] | None = None,
        inline: Any = "auto",
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        check_tasks(tasks)
        self.tasks = tasks if isinstance(tasks, dict) else dict(tasks)
        self.host = host
        self.port = port
        self.log = logger
        self.codec = get_codec(codec)
        self.end_resp = float(end_resp)
        self.tracebacks = bool(tracebacks)
        endpoint = make_endpoint(endpoint, host, port)
        if max_pending is not None and (not isinstance(max_pending, int) or max_pending < 1):
            raise ValueError(f"max_pending must be an int >= 1 or None, not {max_pending!r}")
        self.max_pending = max_pending
        self.max_message_size = max_message_size
        # replies are bounded too: a client with the same limit would drop a larger one
        # (max_message_size bounds a whole frame: a reply body has its envelope less)
        request_limit = sys.maxsize if max_message_size is None else int(max_message_size)
        reply_limit = max(0, request_limit - ENVELOPE)
        for opt, value, least in (("peer_budget", peer_budget, 0), ("peer_queue", peer_queue, 1)):
            if value is None and opt == "peer_budget":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{opt} must be an int >= {least}, not {value!r}")
        self.peer_budget = peer_budget
        self.peer_queue = peer_queue
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        signer = Signer(key) if key is not None else None
        codecs_ = accepted_codecs(codecs, self.codec, key is not None, insecure_pickle)
        if curve_secretkey is not None and not zmq.has("curve"):
            raise NotImplementedError(
                "this libzmq was built without CURVE; install a pyzmq wheel with libsodium "
                "or drop curve_secretkey"
            )
        curve = curve_keys(curve_secretkey, curve_publickey)
        if curve_clients is not None and curve_secretkey is None:
            raise ValueError(
                "curve_clients needs curve_secretkey: the allow-list is checked in the "
                "CurveZMQ handshake"
            )
        allow = CurveAllowList(curve_clients) if curve_clients is not None else None
        if isinstance(pool, str) and pool in ("thread", "process"):
            pool_kind, owns_pool = pool, True
            pool = None
        elif callable(getattr(pool, "submit", None)):
            pool_kind, owns_pool = getattr(pool, "kind", "thread"), False
        else:
            raise ValueError(f"pool must be 'thread', 'process' or a WorkerPool, not {pool!r}")
        inline_auto, inline_names = parse_inline(inline)
        if pool_kind == "process":
            inline_auto, inline_names = False, frozenset()
        self._verbose = logger is not null_logger

        self._handler = RequestHandler(
            self,
            self.tasks,
            threading.Lock(),  # guards the socket and every counter
            codecs=codecs_,
            signer=signer,
            admin=(task_stop, task_kill, task_count),
            request_limit=request_limit,
            reply_limit=reply_limit,
            max_message_size=max_message_size,
            max_pending=max_pending,
            peers=PeerLedger(peer_budget) if peer_budget is not None else None,
            tracebacks=self.tracebacks,
            inline_auto=inline_auto,
            inline_names=inline_names,
            note=self._note if self._verbose else None,
        )
        heartbeat = (heartbeat_interval, heartbeat_timeout)
        self._loop = ServerLoop(
            self,
            self._handler,
            endpoint,
            end_resp=self.end_resp,
            configure=lambda sock: configure_router(
                sock, endpoint, self.end_resp, max_message_size, heartbeat, curve, peer_queue
            ),
            allow=allow,
            pool=pool,
            pool_kind=pool_kind,
            owns_pool=owns_pool,
            workers=workers,
            standby=inline_auto or bool(inline_names),
            note=self._note,
        )
        self._handler.trace_in_thread = pool_kind != "process"
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self._metrics: Any = None  # the HTTP server, while serving metrics
        self._collector: Any = None
        # What runs on each reply (the loop's observe hook): nothing, unless asked for.
        replied: list[Callable[..., None]] = []
        if metrics_port is not None:
            replied.append(self._meter_on(metrics_port))
        if _log.isEnabledFor(logging.DEBUG):
            replied.append(_log_reply)
        if len(replied) == 1:
            self._loop.observe = replied[0]
        elif replied:
            self._loop.observe = functools.partial(_each, replied)

    def _meter_on(self, port: Any) -> Callable[..., None]:
        """Record what the metrics need per call (hooks on the handler and loop);
        return the reply hook."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"metrics_port must be a port number (0: any free port), not {port!r}")
        try:
            from taskit import _prometheus
        except ImportError:
            raise ImportError(
                "metrics_port needs the prometheus_client package: pip install 'taskit[metrics]'"
            ) from None
        from taskit._metering import ServerMeter

        meter = ServerMeter(self.tasks)
        self._handler.on_received = meter.received
        self._loop.observe_read = meter.read
        self._loop.observe_sent = meter.sent
        self._collector = _prometheus.BackendCollector(self, meter)
        return meter.replied

    # -- public state ----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The bound endpoint once serving (``tcp://127.0.0.1:40123``), else the requested one."""
        return self._loop.endpoint

    @property
    def task_count(self) -> int:
        """Calls queued or running, plus running :meth:`subtask` calls."""
        acct = self._handler.acct
        return acct.in_flight + acct.subtasks

    @property
    def running(self) -> bool:
        """True from the end of binding (:attr:`port` and :attr:`endpoint` are the
        bound ones) to the end of serving."""
        return self._loop.state == RUNNING

    @property
    def codecs(self) -> list[str]:
        """Names of the codecs this backend accepts."""
        return sorted(c.name for c in self._handler.codecs.values())

    def add_tasks(self, tasks: Mapping[str, Any] = {}) -> None:  # noqa: B006 (4.0 signature)
        """Serve more tasks (same forms as the constructor's). Thread-safe."""
        check_tasks(tasks)
        self.tasks.update(tasks)

    def started_task(self) -> None:
        """Count one more running task (4.0 interface; prefer :meth:`subtask`)."""
        with self._loop.lock:
            self._handler.acct.subtasks += 1

    def finished_task(self) -> None:
        """Count one task less (pairs with :meth:`started_task`)."""
        with self._loop.lock:
            self._handler.acct.subtasks -= 1
            if self._handler.stopping:
                self._loop.wake_locked()

    def subtask(self, func: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run ``func(*args, **kw)`` now, counted in :attr:`task_count`; return its result.

        A graceful stop waits for it. Use it from a ``pass_backend`` task to
        run helper work, e.g. ``backend.subtask(task.ignore, 1)``.
        """
        self.started_task()
        try:
            return func(*args, **kw)
        finally:
            self.finished_task()

    def stats(self) -> dict[str, Any]:
        """What ``<stats>`` answers: a dict of plain values (see doc/protocol.md §9)."""
        handler, loop = self._handler, self._loop
        acct = handler.acct
        with loop.lock:
            out = acct.snapshot()
            quick = sorted(filter(acct.quick, acct.speed)) if handler.inline_auto else []
            out["inline_tasks"] = quick + sorted(handler.inline_names)
            peers = handler.peers
            out["reply_backlog"] = sum(map(len, peers.backlog.values())) if peers else 0
            out["reply_deferred"] = peers.deferred if peers else 0
            out["peers_holding"] = len(peers.held) if peers else 0
            out["peer_held_bytes"] = sum(peers.held.values()) if peers else 0
            out["sessions"] = len(handler.sessions)  # keyed: connections that said HELLO
        if loop.allow is not None:
            out["dropped"]["curve_denied"] = loop.allow.denied
        out["uptime"] = time.monotonic() - loop.started_at if loop.started_at else 0.0
        # Who answers: lets a service manager tell its own backends from another
        # process's on the same port (taskit ctl --owner).
        out["pid"], out["ppid"] = os.getpid(), os.getppid()
        out["stopping"] = handler.stopping
        pool = loop.pool
        pstats = pool.stats() if pool is not None and hasattr(pool, "stats") else {}
        out["pool_kind"] = loop.pool_kind
        out["pool_size"] = int(pstats.get("size", pstats.get("workers", 0)))
        out["queue_depth"] = int(pstats.get("queued", 0))
        out["pool_running"] = int(pstats.get("running", 0))
        return out

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> BackEnd:
        """Bind, then serve in a background (daemon) thread; return once bound.

        Raises :class:`BackendBindError` when the endpoint cannot be bound and
        ``RuntimeError`` when this BackEnd already served. Returns ``self``.
        """
        self._bind()
        loop = self._loop
        loop.thread = threading.Thread(
            target=loop.serve, name=f"taskit-backend-io:{self.port or loop.endpoint}", daemon=True
        )
        loop.thread.start()
        return self

    def main(self) -> None:
        """Serve in this thread until stopped (blocks).

        In the main thread, SIGTERM and SIGINT stop gracefully (a second one
        ends at once). After :meth:`start`, just waits for the end.
        """
        if self._loop.thread is not None:
            self.join()
            return
        self._bind()
        restore: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, self._loop.on_signal)
        try:
            self._loop.serve()
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)

    def stop_server(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop gracefully: refuse new calls (``Stopping``), answer every accepted one, end.

        Every client heard from lately is told at once (a ``Stopping`` notice, so
        its FrontEnd sends nothing more here). Once the accepted calls are
        answered, calls still arriving keep getting ``Stopping`` until none came
        for ``end_resp / 2`` seconds (at most ``10 * end_resp`` seconds), so a call
        that reaches this backend before it closes ends with its result or with
        ``Stopping`` (it never ran: a FrontEnd sends it to another backend), not
        with silence. Then the socket closes, lingering ``end_resp`` seconds.

        With ``wait``, blocks until serving has ended (except when called from
        one of this backend's own tasks, which would wait for itself). Returns
        True when serving has ended.
        """
        loop = self._loop
        if loop.stop():
            return True
        if not wait or loop.inside():
            return loop.stopped.is_set()
        return loop.stopped.wait(timeout)

    def terminate_server(self) -> None:
        """End now: stop reading, close the socket; running calls go unanswered. Returns at once."""
        self._loop.terminate()

    def join(self, timeout: float | None = None) -> bool:
        """Block until serving has ended; True if it has."""
        return self._loop.stopped.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop gracefully and release everything; after ``timeout`` seconds, terminate.

        Blocks until the socket, pipe and owned pool are released, except when
        called from one of this backend's own tasks (then it only asks to stop).
        """
        loop = self._loop
        if loop.inside():
            self.stop_server(wait=False)
            return
        if not self.stop_server(wait=True, timeout=timeout):
            self.terminate_server()
            loop.stopped.wait()
        for thread in (loop.thread, loop.standby_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        self._close_metrics()

    def __enter__(self) -> BackEnd:
        if self._loop.state == NEW:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BackEnd {self._loop.endpoint} {self._loop.state} tasks={len(self.tasks)}>"

    # -- internals -------------------------------------------------------------------

    def _bind(self) -> None:
        loop = self._loop
        if self._collector is not None and self._metrics is None and loop.state == NEW:
            self._serve_metrics()
        try:
            bound = loop.bind()
        except BaseException:
            self._close_metrics()
            raise
        if bound.startswith("tcp://"):
            self.port = int(bound.rsplit(":", 1)[1])
        else:
            self.port = None  # type: ignore[assignment]
        loop.open(f"taskit-backend-{self.port or 'ipc'}")
        users = sum(1 for name in self.tasks if name not in ADMIN_SIGNALS)
        _log.info(
            "backend serving %d task%s (and the admin signals) on %s",
            users,
            "" if users == 1 else "s",
            bound,
        )
        self._note(IMPORTANT, f"Serving on {bound}")

    def _serve_metrics(self) -> None:
        from taskit._prometheus import MetricsServer

        host, port = self.metrics_host, self.metrics_port
        assert port is not None
        try:
            self._metrics = MetricsServer(self._collector, host, port)
        except OSError as e:
            raise BackendBindError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}; choose another "
                "metrics_port, or 0 for any free port"
            ) from e
        self.metrics_port = self._metrics.port
        _log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    def _close_metrics(self) -> None:
        server, self._metrics = self._metrics, None
        if server is not None:
            server.close()

    def _note(self, importance: str, msg: str) -> None:
        if self._verbose:
            try:
                self.log(importance, msg)
            except Exception:  # a broken logger must not break serving
                _log.exception("the TaskIt logger given to the BackEnd raised")


def _each(hooks: list[Callable[..., None]], *args: Any) -> None:
    for hook in hooks:
        hook(*args)


def _log_reply(call: Any, ok: bool, run_time: float | None, frames: Any) -> None:
    """Log one answered call at DEBUG, with its fields for structured logs (set as the
    loop's reply hook only when DEBUG is on for taskit.backend when the BackEnd is made)."""
    _log.debug(
        "call %d of task %r from %s %s",
        call.call_id,
        call.name,
        call.ident.hex(),
        "answered" if ok else "failed",
        extra={
            "task": call.name,
            "call_id": call.call_id,
            "peer": call.ident.hex(),
            "duration": run_time,
        },
    )


def build_backend(
    tasks: Mapping[str, Any],
    default_host: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT),
    *args: Any,
    argv: list[str] | None = None,
    **kw: Any,
) -> BackEnd:
    """A BackEnd whose host and port come from the command line (TaskIt 4.0).

    ``script.py [host [port]]``: ``sys.argv[1]`` overrides the host (or is a
    whole ``tcp://``/``ipc://`` endpoint), ``sys.argv[2]`` the port. Other
    arguments go to :class:`BackEnd`. Raises ``ValueError`` for a bad port.
    """
    host, port = default_host
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv:
        host = argv[0]
    if len(argv) > 1:
        try:
            port = int(argv[1])
        except ValueError:
            raise ValueError(f"the port must be a number, got {argv[1]!r}") from None
    if "://" in host:
        return BackEnd(tasks, *args, endpoint=host, **kw)
    return BackEnd(tasks, host, port, *args, **kw)
