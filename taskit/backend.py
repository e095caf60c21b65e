"""The taskit backend: a ZeroMQ ROUTER that serves plain functions by name.

A :class:`BackEnd` binds one ROUTER socket and runs every CALL it accepts on
the worker-pool core (:mod:`taskit.pool`); the reply goes out in the codec of
the request. ``doc/protocol.md`` is the wire format, ``doc/security.md`` the
threat model.

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
task whose recent runs were all very short (see ``_backend_parts.QUALIFY``)
runs on the I/O thread itself (``inline="auto"``). If such a task blocks
after all, a standby thread notices within ``_TAKEOVER`` seconds and takes
over reading the socket; the task is sent back to the pool for a long while.

Admin signals (``<status> <stats> <tasks>``, and ``<stop> <kill>`` when
enabled through :data:`ADMIN_TASKS`) are answered by the I/O thread itself, so
they work while every worker is busy.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq

from taskit._backend_calls import (  # the raw socket calls are shared with the I/O loop
    _EVENTS,
    _NOBLOCK,
    _POLLIN,
    ADMIN_TASKS,
    CallHandler,
    _get,
    _recv,
    in_task,
    task_count,
    task_kill,
    task_stop,
)
from taskit._backend_parts import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PENDING,
    DEFAULT_PEER_BUDGET,
    DEFAULT_PEER_QUEUE,
    ENVELOPE,
    Accounting,
    CurveAllowList,
    PeerLedger,
    TracebackLimiter,
    accepted_codecs,
    check_tasks,
    configure_router,
    make_endpoint,
    parse_inline,
)
from taskit._curve import check_pair, curve_key
from taskit.codecs import JSONCodec, Signer, get_codec
from taskit.errors import BackendBindError
from taskit.log import IMPORTANT, null_logger
from taskit.protocol import ADMIN_SIGNALS, DEFAULT_PORT, Kind

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


def _bind_hint(err: int | None) -> str:
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


END_RESP = 0.5  # seconds: socket linger on close and the I/O thread's longest sleep
_BATCH = 64  # requests read per wake-up before flags are checked again
# Frames of the longest valid request, with the routing id: id, magic, header, body,
# HMAC. The I/O loop stops keeping the frames of a longer message and drops it.
_MAX_PARTS = 5

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
_CALL_KIND = bytes([Kind.CALL])  # the first byte of a CALL's header frame

# Life cycle of a BackEnd.
_NEW, _BINDING, _RUNNING, _STOPPED = "new", "binding", "running", "stopped"


def _curve_keys(secret: Any, public: Any) -> tuple[bytes | None, bytes | None]:
    """The backend's CURVE keys checked up front (40 Z85 characters or 32 raw bytes
    each, and a pair) as Z85: libzmq would only refuse them with a bare EINVAL at
    bind time. Raises ``ValueError`` naming the option."""
    if secret is None:
        if public is not None:
            raise ValueError("curve_publickey needs its curve_secretkey")
        return None, None
    secret = curve_key("curve_secretkey", secret, secret=True)
    if public is None:
        return secret, None
    public = curve_key("curve_publickey", public)
    check_pair(public, secret, "curve_publickey", "curve_secretkey")
    return secret, public


class BackEnd(CallHandler):
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
    every frame of an incoming message (a larger frame makes ZeroMQ drop the
    connection), the whole message (frames in all, plus 64 bytes of envelope:
    a larger one, or one of more than four frames, is dropped unread and
    counted), and every reply (a larger result is answered with an
    ``EncodeError``, since a client with the same limit would drop the
    connection).

    What one client (one connection) can make the backend hold, in bytes, with
    ``M = max_message_size + 64``, ``Q = peer_queue``, ``B = peer_budget``::

          (Q + 1) * M   requests ZeroMQ queued or receiving, not yet read (RCVHWM = Q)
        + E * B + M     its accepted, unanswered calls and its replies waiting in
                        the backend (the ledger: wire bytes + 3 KiB per call, 512 B
                        per reply; decoded arguments take E <= 73 x their wire bytes)
        + Q * M         replies handed to ZeroMQ, not yet sent (SNDHWM = Q)
        + kernel        SO_RCVBUF + SO_SNDBUF of its TCP connection (not in our RSS)

    The request terms hold for messages of up to four frames. ZeroMQ bounds
    each frame (by ``max_message_size``), not their number, and queues a
    message only once it has all of it: a client sending more frames makes it
    hold ``frames * max_message_size`` per message until the backend reads and
    drops it (doc/security.md). A call from a client already holding
    something that would take it past ``peer_budget`` is answered ``Busy``;
    a reply to a client whose ZeroMQ queue is full (it is not reading) waits
    in the ledger, and past ``peer_budget`` is dropped and counted
    (``<stats>`` ``dropped["reply_over_budget"]``); a client that left is
    forgotten. ``peer_budget=None`` turns the ledger off (no ``Busy``;
    replies to a full queue are dropped at once, ``reply_hwm``).
    Security: ``key`` (bytes or str) makes every message carry an HMAC and
    drops those that do not; ``curve_secretkey``/``curve_publickey`` (40 Z85
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
    ) -> None:
        check_tasks(tasks)
        self.tasks = tasks if isinstance(tasks, dict) else dict(tasks)
        self.host = host
        self.port = port
        self.log = logger
        self.codec = get_codec(codec)
        self.end_resp = float(end_resp)
        self.tracebacks = bool(tracebacks)
        self._endpoint = make_endpoint(endpoint, host, port)
        if max_pending is not None and (not isinstance(max_pending, int) or max_pending < 1):
            raise ValueError(f"max_pending must be an int >= 1 or None, not {max_pending!r}")
        self.max_pending = max_pending
        self.max_message_size = max_message_size
        # replies are bounded too: a client with the same limit would drop a larger one
        self._reply_limit = sys.maxsize if max_message_size is None else int(max_message_size)
        # a whole request: ZeroMQ's MAXMSGSIZE only bounds each frame
        self._request_limit = self._reply_limit + ENVELOPE
        for opt, value, least in (("peer_budget", peer_budget, 0), ("peer_queue", peer_queue, 1)):
            if value is None and opt == "peer_budget":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{opt} must be an int >= {least}, not {value!r}")
        self.peer_budget = peer_budget
        self.peer_queue = peer_queue
        self._peers = PeerLedger(peer_budget) if peer_budget is not None else None
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._signer = Signer(key) if key is not None else None
        self._codecs = accepted_codecs(codecs, self.codec, key is not None, insecure_pickle)
        if curve_secretkey is not None and not zmq.has("curve"):
            raise NotImplementedError(
                "this libzmq was built without CURVE; install a pyzmq wheel with libsodium "
                "or drop curve_secretkey"
            )
        self._curve = _curve_keys(curve_secretkey, curve_publickey)
        if curve_clients is not None and curve_secretkey is None:
            raise ValueError(
                "curve_clients needs curve_secretkey: the allow-list is checked in the "
                "CurveZMQ handshake"
            )
        self._allow = CurveAllowList(curve_clients) if curve_clients is not None else None
        if isinstance(pool, str) and pool in ("thread", "process"):
            self._pool_kind, self._pool, self._owns_pool = pool, None, True
        elif callable(getattr(pool, "submit", None)):
            self._pool_kind = getattr(pool, "kind", "thread")
            self._pool, self._owns_pool = pool, False
        else:
            raise ValueError(f"pool must be 'thread', 'process' or a WorkerPool, not {pool!r}")
        self._workers = workers
        self._inline_auto, self._inline_names = parse_inline(inline)
        if self._pool_kind == "process":
            self._inline_auto, self._inline_names = False, frozenset()

        self._lock = threading.Lock()  # guards the socket and every counter below
        self._state = _NEW
        self._stopping = False
        self._terminating = False
        self._stopped = threading.Event()
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._io_owner: int | None = None  # the thread now reading the socket
        self._role_idents: set[int] = set()  # the I/O and standby threads
        self._standby_thread: threading.Thread | None = None
        self._inline_since = 0.0  # perf_counter() start of the inline task running, else 0
        self._inline_seen = 0.0  # start of the latest inline task
        self._started_at = 0.0
        self._acct = Accounting()  # counters, under self._lock
        # Clients heard from lately (routing ids; two generations bound the memory):
        # told when a graceful stop begins. Written by the I/O thread only.
        self._heard: set[bytes] = set()
        self._heard_old: set[bytes] = set()
        self._told = False  # the clients were told of the stop
        # Clients known to be gone (a reply to them was unroutable): their calls still
        # queued are not started. Written under the lock, read without it.
        self._gone: set[bytes] = set()
        self._tb_limit = TracebackLimiter()  # tracebacks logged per task and error type
        self._verbose = logger is not null_logger

    # -- public state ----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The bound endpoint once serving (``tcp://127.0.0.1:40123``), else the requested one."""
        return self._endpoint

    @property
    def task_count(self) -> int:
        """Calls queued or running, plus running :meth:`subtask` calls."""
        return self._acct.in_flight + self._acct.subtasks

    @property
    def running(self) -> bool:
        """True from the end of binding (:attr:`port` and :attr:`endpoint` are the
        bound ones) to the end of serving."""
        return self._state == _RUNNING

    @property
    def codecs(self) -> list[str]:
        """Names of the codecs this backend accepts."""
        return sorted(c.name for c in self._codecs.values())

    def add_tasks(self, tasks: Mapping[str, Any] = {}) -> None:  # noqa: B006 (4.0 signature)
        """Serve more tasks (same forms as the constructor's). Thread-safe."""
        check_tasks(tasks)
        self.tasks.update(tasks)

    def started_task(self) -> None:
        """Count one more running task (4.0 interface; prefer :meth:`subtask`)."""
        with self._lock:
            self._acct.subtasks += 1

    def finished_task(self) -> None:
        """Count one task less (pairs with :meth:`started_task`)."""
        with self._lock:
            self._acct.subtasks -= 1
            if self._stopping:
                self._wake_locked()

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
        with self._lock:
            out = self._acct.snapshot()
            quick = sorted(filter(self._acct.quick, self._acct.speed)) if self._inline_auto else []
            out["inline_tasks"] = quick + sorted(self._inline_names)
            peers = self._peers
            out["reply_backlog"] = sum(map(len, peers.backlog.values())) if peers else 0
            out["reply_deferred"] = peers.deferred if peers else 0
        if self._allow is not None:
            out["dropped"]["curve_denied"] = self._allow.denied
        out["uptime"] = time.monotonic() - self._started_at if self._started_at else 0.0
        # Who answers: lets a service manager tell its own backends from another
        # process's on the same port (taskit ctl --owner).
        out["pid"], out["ppid"] = os.getpid(), os.getppid()
        out["stopping"] = self._stopping
        pool = self._pool
        pstats = pool.stats() if pool is not None and hasattr(pool, "stats") else {}
        out["pool_kind"] = self._pool_kind
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
        self._thread = threading.Thread(
            target=self._serve, name=f"taskit-backend-io:{self.port or self._endpoint}", daemon=True
        )
        self._thread.start()
        return self

    def main(self) -> None:
        """Serve in this thread until stopped (blocks).

        In the main thread, SIGTERM and SIGINT stop gracefully (a second one
        ends at once). After :meth:`start`, just waits for the end.
        """
        if self._thread is not None:
            self.join()
            return
        self._bind()
        restore: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, self._on_signal)
        try:
            self._serve()
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
        with self._lock:
            if self._end_unstarted_locked():
                return True
            self._stopping = True
            self._wake_locked()
        if not wait or self._inside():
            return self._stopped.is_set()
        return self._stopped.wait(timeout)

    def terminate_server(self) -> None:
        """End now: stop reading, close the socket; running calls go unanswered. Returns at once."""
        with self._lock:
            if self._end_unstarted_locked():
                return
            self._terminating = True
            self._wake_locked()

    def join(self, timeout: float | None = None) -> bool:
        """Block until serving has ended; True if it has."""
        return self._stopped.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop gracefully and release everything; after ``timeout`` seconds, terminate.

        Blocks until the socket, pipe and owned pool are released, except when
        called from one of this backend's own tasks (then it only asks to stop).
        """
        if self._inside():
            self.stop_server(wait=False)
            return
        if not self.stop_server(wait=True, timeout=timeout):
            self.terminate_server()
            self._stopped.wait()
        for thread in (self._thread, self._standby_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> BackEnd:
        if self._state == _NEW:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BackEnd {self._endpoint} {self._state} tasks={len(self.tasks)}>"

    # -- internals: setup and teardown -----------------------------------------------

    def _end_unstarted_locked(self) -> bool:
        """Mark a BackEnd that never bound as stopped; True if it was one. Holds the lock."""
        if self._state != _NEW:
            return False
        self._state = _STOPPED
        self._stopped.set()
        return True

    def _inside(self) -> bool:
        """True on this backend's I/O thread or while running one of its tasks."""
        return (
            threading.get_ident() in self._role_idents or getattr(in_task, "backend", None) is self
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between bytecodes of the main thread, maybe while it holds the lock:
        # only set flags and poke the pipe.
        if self._stopping:
            self._terminating = True
        self._stopping = True
        fd = self._wake_w
        if fd >= 0:
            try:
                os.write(fd, b"\0")
            except OSError:
                pass

    def _bind(self) -> None:
        with self._lock:
            if self._state != _NEW:
                raise RuntimeError("this BackEnd has already served; create a new one")
            self._state = _BINDING  # running only once bound: port is read from it
        ctx = zmq.Context()
        if self._allow is not None:
            self._allow.start(ctx)  # ZAP must be served before the ROUTER binds
        sock = ctx.socket(zmq.ROUTER)
        try:
            configure_router(
                sock,
                self._endpoint,
                self.end_resp,
                self.max_message_size,
                (self.heartbeat_interval, self.heartbeat_timeout),
                self._curve,
                self.peer_queue,
            )
            sock.setsockopt(zmq.RCVTIMEO, _WAIT_MS)  # bounds the I/O loop's blocking reads
            sock.bind(self._endpoint)
        except zmq.ZMQError as e:
            self._release(ctx, sock)
            with self._lock:
                self._state = _STOPPED
                self._stopped.set()
            raise BackendBindError(
                f"cannot bind {self._endpoint}: {e.strerror}; {_bind_hint(e.errno)}"
            ) from e
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._endpoint = bound
        if bound.startswith("tcp://"):
            self.port = int(bound.rsplit(":", 1)[1])
        else:
            self.port = None  # type: ignore[assignment]
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if self._pool is None:
            from taskit.pool import WorkerPool

            try:
                self._pool = WorkerPool(
                    self._workers,
                    kind=self._pool_kind,
                    name=f"taskit-backend-{self.port or 'ipc'}",
                )
            except BaseException:
                self._release(ctx, sock)
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
                self._wake_r = self._wake_w = -1
                with self._lock:
                    self._state = _STOPPED
                    self._stopped.set()
                raise
        self._ctx, self._router = ctx, sock
        self._started_at = time.monotonic()
        with self._lock:
            self._state = _RUNNING
        users = sum(1 for name in self.tasks if name not in ADMIN_SIGNALS)
        _log.info(
            "backend serving %d task%s (and the admin signals) on %s",
            users,
            "" if users == 1 else "s",
            bound,
        )
        self._note(IMPORTANT, f"Serving on {bound}")

    def _serve(self) -> None:
        """Body of the I/O thread (start()) or of main(): serve, then release everything."""
        me = threading.get_ident()
        self._role_idents.add(me)
        self._io_owner = me
        if self._inline_auto or self._inline_names:
            self._standby_thread = threading.Thread(
                target=self._roles,
                args=(False,),
                daemon=True,
                name=f"taskit-backend-standby:{self.port or self._endpoint}",
            )
            self._standby_thread.start()
        self._roles(True)

    def _roles(self, reading: bool) -> None:
        """Alternate between reading the socket and standing by, until serving ends.

        The thread that finds serving over while reading tears everything down.
        """
        me = threading.get_ident()
        self._role_idents.add(me)
        try:
            self._alternate(reading)
        finally:
            self._role_idents.discard(me)  # thread idents are reused after a thread ends

    def _alternate(self, reading: bool) -> None:
        while True:
            if reading:
                try:
                    outcome = self._loop()
                except BaseException:  # a bug in the loop itself: say so, release everything
                    _log.exception("backend I/O loop crashed on %s", self._endpoint)
                    self._terminating = True
                    outcome = _DONE
                if outcome == _DONE:
                    if not self._terminating:
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
            # _inline_seen and _inline_since are time.perf_counter() values.
            recent = time.perf_counter() - self._inline_seen < 1.0
            if self._stopped.wait(_TAKEOVER / 2 if recent else 0.5):
                return False
            since = self._inline_since
            if since and time.perf_counter() - since > _TAKEOVER:
                with self._lock:
                    if self._inline_since != since or self._state != _RUNNING:
                        continue
                    self._io_owner = me
                    self._acct.takeovers += 1
                _log.debug("standby thread took the socket over from a long inline task")
                return True

    def _teardown(self) -> None:
        graceful = not self._terminating
        with self._lock:
            sock, self._router = self._router, None
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            if sock is not None:
                sock.close()  # lingers end_resp seconds to flush the last replies
        for fd in (wake_r, wake_w):
            if fd >= 0:
                os.close(fd)
        if self._ctx is not None:
            self._release(self._ctx)
            self._ctx = None
        if self._owns_pool and self._pool is not None:
            self._pool.shutdown(wait=graceful, cancel_pending=not graceful)
        with self._lock:
            self._state = _STOPPED
        how = "stopped" if graceful else "terminated"
        _log.info("backend on %s %s", self._endpoint, how)
        self._note(IMPORTANT, f"Server {how}")
        self._stopped.set()

    def _drain(self) -> None:
        """Graceful stop, every accepted call answered: answer what still arrives
        (``Stopping``, admin signals, PONGs) until the socket has been quiet for
        ``end_resp * _QUIET`` seconds, at most ``end_resp * _DRAIN`` seconds.

        A call its client sent before hearing of the stop (from a ``Stopping``
        reply or the notice of :meth:`_tell_stopping`) still reaches us after the
        last accepted call was answered; closing then would leave it unanswered,
        and its caller could not know that it never ran.
        """
        router = self._router
        if router is None or self.end_resp <= 0:
            return
        if not self._told:
            self._tell_stopping()
        with self._lock:
            if not (self._heard or self._heard_old or _get(router, _EVENTS) & _POLLIN):
                return  # no client was ever heard from, none is waiting: none to wait for
        lock, handle = self._lock, self._handle
        poller = select.poll()
        poller.register(router.getsockopt(zmq.FD), select.POLLIN)  # type: ignore[arg-type]
        poller.register(self._wake_r, select.POLLIN)
        now = time.monotonic()
        give_up = now + self.end_resp * _DRAIN
        quiet_until = now + self.end_resp * _QUIET
        while not self._terminating:
            with lock:
                # Reading EVENTS also re-arms the edge-triggered descriptor polled below.
                if _get(router, _EVENTS) & _POLLIN:
                    ident, *frames = router.recv_multipart(_NOBLOCK, copy=False)
                    msg: list[Any] | None = [ident.bytes, *frames]  # as _handle takes it
                else:
                    msg = None
            if msg is not None:
                try:
                    handle(msg)
                except Exception:  # as in _loop: never let one message end the stop early
                    _log.exception("backend on %s could not handle a message", self._endpoint)
                # Only a CALL says more may be on their way: a client's periodic PING
                # (or a peer sending junk) must not hold the stop open until the cap.
                if len(msg) > 2 and msg[2].bytes[:1] == _CALL_KIND:
                    quiet_until = time.monotonic() + self.end_resp * _QUIET
                continue
            left = min(quiet_until, give_up) - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                if fd == self._wake_r:
                    try:
                        os.read(fd, 4096)
                    except BlockingIOError:
                        pass

    def _release(self, ctx: zmq.Context, sock: zmq.Socket | None = None) -> None:
        """Close ``sock`` at once (if given), stop the ZAP handler, end ``ctx``."""
        if sock is not None:
            sock.close(0)
        if self._allow is not None:
            self._allow.stop()
        ctx.term()

    def _wake_locked(self) -> None:
        fd = self._wake_w
        if fd >= 0:
            try:
                os.write(fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the I/O thread has wake-ups pending anyway

    def _note(self, importance: str, msg: str) -> None:
        if self._verbose:
            try:
                self.log(importance, msg)
            except Exception:  # a broken logger must not break serving
                _log.exception("the TaskIt logger given to the BackEnd raised")

    # -- internals: the I/O loop -----------------------------------------------------

    def _discard_rest_locked(self, router: zmq.Socket) -> list:
        """Read and free the remaining frames of a message with too many (lock held);
        count it dropped. Returns an empty list: nothing to handle."""
        frame = _recv(router, _NOBLOCK, False)
        while frame.more:
            frame = _recv(router, _NOBLOCK, False)  # the previous one is freed here
        self._acct.drop("malformed")
        return []

    def _loop(self) -> str:
        router = self._router
        assert router is not None
        lock = self._lock
        poller = select.poll()
        zmq_fd = router.getsockopt(zmq.FD)
        poller.register(zmq_fd, select.POLLIN)  # type: ignore[arg-type]  # FD is an int
        poller.register(self._wake_r, select.POLLIN)
        wake_r = self._wake_r
        sleep_ms = max(1, int(self.end_resp * 1000))  # a safety net: wake-ups are explicit
        handle = self._handle
        peers = self._peers
        me = threading.get_ident()
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
                    if self._terminating:
                        return _DONE
                    # The routing id as bytes: a ROUTER always has more frames after it.
                    if state == _WAIT:
                        try:
                            msg = [_recv(router, 0)]
                        except zmq.Again:  # idle for _WAIT_MS: sleep in poll() from now on
                            state = _CHECK
                            break
                    elif state == _CHECK:
                        if not _get(router, _EVENTS) & _POLLIN:
                            break
                        msg = [_recv(router, _NOBLOCK)]
                        state = _BACKLOG
                    else:
                        try:
                            msg = [_recv(router, _NOBLOCK)]
                        except zmq.Again:
                            break
                        if state == _TRY:
                            state = _CHECK
                    # The rest as Frames, not bytes: a Frame carries its RCVMORE flag,
                    # read in C; each getsockopt(RCVMORE) from Python costs an enum lookup.
                    frame = _recv(router, _NOBLOCK, False)
                    msg.append(frame)
                    while frame.more:
                        if len(msg) == _MAX_PARTS:
                            msg = self._discard_rest_locked(router)
                            break
                        frame = _recv(router, _NOBLOCK, False)
                        msg.append(frame)
                    frame = None  # hold no frame of this message past its handling
                if msg:
                    try:
                        handle(msg)
                    except Exception:  # a bug, or a user codec raising oddly: keep serving
                        _log.exception("backend on %s could not handle a message", self._endpoint)
                        with lock:
                            self._acct.drop("malformed")
                    del msg  # free its buffers now, not when the next message arrives
                if self._io_owner != me:
                    return _DEMOTED  # the standby took over during an inline task
                # Checked under the lock: a worker's reply and its in_flight decrement
                # happen in one hold of it, so 0 means no worker will wait for the lock.
                with lock:
                    if self._acct.in_flight == 0 and not (self._stopping or self._terminating):
                        state = _WAIT
                    elif state == _WAIT:
                        state = _BACKLOG
            else:
                more = True
            if peers is not None and peers.backlog:
                with lock:
                    self._flush_backlog_locked()
            if self._terminating:
                return _DONE
            if self._stopping:
                if not self._told:
                    self._tell_stopping()
                if self._acct.in_flight == 0 and self._acct.subtasks == 0:
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
