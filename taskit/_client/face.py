"""What FrontEnd and AsyncFrontEnd share that never waits: their one constructor
(so both take the same options with the same defaults), the checks of those
options, the backends' status and counters, logging, and what a ``callback``
does with a call's outcome.

A face subclasses :class:`ClientFace` and provides ``_start_driver(endpoints)``
(its way of waiting: :mod:`taskit._client.threaded` or
:mod:`taskit._client.aio_driver`) and the calls, which return a value or an
awaitable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from taskit._client.connection import (
    DEFAULT_BUSY_RETRIES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DealerSettings,
    curve_keys,
)
from taskit._client.core import DOWN, ClientCore, parse_backend
from taskit._client.dispatch import DEFAULT_PREFETCH
from taskit._client.membership import Membership, Resolver
from taskit.codecs import JSONCodec, Signer
from taskit.errors import BackendProcessingError
from taskit.log import ERROR, null_logger
from taskit.progress import progress_bar
from taskit.protocol import DEFAULT_PORT

__all__ = ["ClientFace"]


class ClientFace:
    """The options, state and reporting of a client face (see the module docstring).

    ``backends``: ``"host"`` (``default_port``), ``"host:port"``, ``("host", port)``,
    ``"tcp://host:port"`` or ``"ipc://path"``. ``logger``: a TaskIt logger
    (``logger(importance, msg)``); stdlib logging is always used too. ``codec``: the
    codec of every call. The keyword-only options are described on
    :class:`taskit.frontend.FrontEnd`.

    Raises ``ValueError`` for a malformed backend, a bad timeout, heartbeat option or
    key set, ``TypeError`` for a logger that is not one, ``NotImplementedError`` when
    CURVE keys are given but libzmq lacks CURVE.
    """

    _stdlog = logging.getLogger("taskit.frontend")  # each face names its own

    def __init__(
        self,
        backends: Iterable[Any] = (),
        default_port: int = DEFAULT_PORT,
        logger: Callable[[str, Any], Any] = null_logger,
        codec: Any = JSONCodec,
        *,
        timeout: float | None = None,
        retries: int = 0,
        busy_retries: int = DEFAULT_BUSY_RETRIES,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        key: bytes | str | None = None,
        curve_serverkey: bytes | str | None = None,
        curve_publickey: bytes | str | None = None,
        curve_secretkey: bytes | str | None = None,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        prefetch: int = DEFAULT_PREFETCH,
        resolve_every: float | None = None,
        resolver: Resolver | None = None,
        metrics_registry: Any = None,
    ) -> None:
        if isinstance(backends, (str, bytes)):
            backends = (backends,)  # a lone "host" would otherwise be split into letters
        specs = [parse_backend(spec, default_port) for spec in backends]  # ValueError
        if logger is None:
            logger = null_logger  # accepted as "no logger", as before
        if not callable(logger) or isinstance(logger, type) or hasattr(logger, "encode"):
            raise TypeError(
                f"logger must be a TaskIt logger, logger(importance, msg), not {logger!r}; "
                f"pass a codec as codec=..."
            )
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, not {timeout!r}")
        if heartbeat_interval is not None and not heartbeat_interval > 0:
            raise ValueError(
                f"heartbeat_interval must be > 0 seconds, or None for no liveness checks, "
                f"not {heartbeat_interval!r}"
            )
        if resolve_every is not None and not resolve_every > 0:
            raise ValueError(
                f"resolve_every must be > 0 seconds, or None never to re-resolve host "
                f"names, not {resolve_every!r}"
            )
        if resolver is not None and not callable(resolver):
            raise TypeError(f"resolver must be resolver(host, port) -> addresses, not {resolver!r}")
        # What each backend given stands for (a name may be several backends);
        # re-resolved every ``resolve_every`` seconds off the I/O thread (DNS blocks).
        self._members = Membership(resolver)
        self._members_lock = threading.Lock()
        self.resolve_every = resolve_every
        endpoints = [e for spec in specs for e in self._members.add(spec)]
        if type(prefetch) is not int or prefetch < 1:
            raise ValueError(f"prefetch must be a whole number >= 1, not {prefetch!r}")
        if not heartbeat_timeout > 0:
            raise ValueError(f"heartbeat_timeout must be > 0 seconds, not {heartbeat_timeout!r}")
        self.default_port = default_port
        self.logger = logger
        self.timeout = timeout
        self.connect_timeout = float(connect_timeout)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size
        self._settings = DealerSettings(
            connect_timeout=self.connect_timeout,
            max_message_size=max_message_size,
            curve=curve_keys(curve_serverkey, curve_publickey, curve_secretkey),
        )
        self._core = ClientCore(
            codec=codec,
            signer=Signer(key) if key is not None else None,
            retries=retries,
            busy_retries=busy_retries,
            connect_timeout=self.connect_timeout,
            max_body=max_message_size,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            prefetch=prefetch,
        )
        self.codec = self._core.codec
        self._metrics: tuple[Any, Any] | None = None  # (registry, collector)
        if metrics_registry is not None:
            self._meter_on(metrics_registry)
        self._start_driver(endpoints)

    def _meter_on(self, registry: Any) -> None:
        """Time each answer and register this client's collector in ``registry``."""
        try:
            from taskit import _prometheus
        except ImportError:
            raise ImportError(
                "metrics_registry needs the prometheus_client package: "
                "pip install 'taskit[metrics]'"
            ) from None
        from taskit._metering import ClientMeter

        meter = ClientMeter()
        collector = _prometheus.ClientCollector(self, meter)
        try:
            registry.register(collector)
        except ValueError:
            raise ValueError(
                "another client's metrics are in this metrics_registry: close that client "
                "first, or give each client its own CollectorRegistry"
            ) from None
        self._core.observe = meter.answered
        self._metrics = (registry, collector)

    def _meter_off(self) -> None:
        """Take this client's metrics out of the registry (closing). Idempotent."""
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            registry, collector = metrics
            registry.unregister(collector)

    def _start_driver(self, endpoints: list[str]) -> None:
        raise NotImplementedError  # each face binds its driver

    # -- membership ------------------------------------------------------------------

    def _expand(self, backends: tuple[Any, ...]) -> list[str]:
        """The new endpoints ``backends`` stand for (ValueError for a malformed one)."""
        specs = [parse_backend(spec, self.default_port) for spec in backends]
        with self._members_lock:
            return [e for spec in specs for e in self._members.add(spec)]

    def _leaving(self, backends: tuple[Any, ...]) -> list[str]:
        """The endpoints that leave when ``backends`` are removed; ``ValueError('No
        such backend!')`` for one this client does not use."""
        specs = []
        for spec in backends:
            endpoint = parse_backend(spec, self.default_port)
            with self._members_lock:
                known = endpoint in self._members.specs or self._members.owner(endpoint)
            if not known and endpoint not in self._core.backends:
                raise ValueError("No such backend!")
            specs.append(endpoint)
        with self._members_lock:
            return [e for spec in specs for e in self._members.remove(spec)]

    def _refresh(self) -> tuple[list[str], list[str]]:
        """Resolve the backends' host names again: ``(joined, left)``. Blocks on DNS:
        called off the I/O thread. A resolver that fails changes nothing."""
        with self._members_lock:
            try:
                return self._members.refresh()
            except Exception:
                self._stdlog.warning("re-resolving the backends' names failed", exc_info=True)
                return [], []

    # -- what never waits ----------------------------------------------------------

    @property
    def backends(self) -> list[str]:
        """Endpoints of every backend, in the order added."""
        return list(self._core.backends)

    def backends_status(self) -> dict[str, dict[str, Any]]:
        """``{endpoint: {"state", "for": seconds, "name", "pid", "started",
        "capacity": {"workers", "max_pending", "max_message_size"}, "queued",
        "running", "load_age", "credit": {"limit", "in_use"}, "service_time",
        "in_flight", "sent", "answered", "failed", "lost", "retried",
        "busy", "connects", "disconnects", "pings", "cancelled", "last_error"}}`` as
        this client sees each backend now. ``state``: "connecting", "handshake"
        (connected, its WELCOME not in yet), "up", "stopping", "draining" (being
        removed: no new calls), "down" or "rejected" (its handshake ruled it out:
        ``last_error`` says why). ``credit``: how many of this client's calls it may
        hold (``limit``) and holds (``in_use``); ``service_time``: seconds one call
        keeps one of its workers busy, as this client measures it (None before).
        ``name`` ... ``capacity`` are what its WELCOME said (None before);
        ``queued``/``running`` the load it reported last (every reply carries it),
        ``load_age`` seconds ago; ``pings``: PINGs sent by the liveness check;
        ``cancelled``: calls it withdrew unrun."""
        return self._core.snapshot()

    @property
    def task_count(self) -> int:
        """Calls of this client not yet answered (its own count, as in 4.0)."""
        return self._core.pending

    @property
    def dropped(self) -> dict[str, int]:
        """Replies dropped: ``late_replies`` (after a timeout), ``bad_replies``,
        ``bad_signatures`` (wrong or missing HMAC), ``replayed`` (correctly signed but
        seen before, or too old: a replay); and ``refused_signatures``: calls or
        handshakes the backend refused for their signature (AuthenticationError)."""
        return dict(self._core.stats)

    # -- helpers of the faces' calls -----------------------------------------------

    def _status_target(self, backend: Any) -> str | None:
        """``get_tasks``: the endpoint to ask (ValueError if unknown), None if known down."""
        endpoint = self._core.known(backend, self.default_port)
        return None if self._core.backends[endpoint].state == DOWN else endpoint

    @staticmethod
    def _map_bar(task: str, iterables: tuple[Iterable[Any], ...], progress: bool) -> Any:
        """``map``'s progress bar (a no-op one unless ``progress``)."""
        total = None
        if progress and iterables:
            try:
                total = min(len(it) for it in iterables)  # type: ignore[arg-type]
            except TypeError:
                total = None
        return progress_bar(total=total, enabled=progress, desc=task)

    def _deliver(
        self,
        task: str,
        exc: BaseException | None,
        value: Any,
        cb: Callable[[Any], Any],
        error_cb: Callable[[BaseException], Any] | None | bool,
    ) -> None:
        """What ``callback`` does with a call's outcome: ``cb(value)``; a
        BackendProcessingError to ``error_cb`` (None: logged, False: ignored); any
        other failure logged. A callback that raises is logged, never propagated."""
        try:
            if exc is None:
                cb(value)
            elif isinstance(exc, BackendProcessingError):
                if error_cb is None:
                    self._note(ERROR, f"task {task!r} failed on the backend:\n{exc}")
                elif error_cb is not False:
                    error_cb(exc)  # type: ignore[operator]
            else:
                self._note(ERROR, f"task {task!r} failed: {type(exc).__name__}: {exc}")
        except Exception:  # a user callback raised: report it, keep the driver going
            self._stdlog.exception("callback of task %r raised", task)

    def _note(self, importance: str, msg: str, level: int | None = None) -> None:
        """Report an event to stdlib logging and to the TaskIt ``logger``."""
        if level is None:
            level = logging.ERROR if importance == ERROR else logging.INFO
        self._stdlog.log(level, msg)
        if self.logger is not null_logger:
            try:
                self.logger(importance, msg)
            except Exception:  # a broken user logger must not break the I/O loop
                self._stdlog.exception("TaskIt logger raised")
