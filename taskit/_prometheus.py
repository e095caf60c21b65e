"""Prometheus metrics of a BackEnd (served on ``/metrics``) and of a FrontEnd (in a
registry of the user's), through the official ``prometheus_client``.

Imported only when metrics are asked for; ``pip install 'taskit[metrics]'``
provides ``prometheus_client``. Each collector reads its side's counters at
scrape time (``BackEnd.stats()``, the client core's backend states, and the
per-call records of :mod:`taskit._metering`), so serving calls pays nothing for
a metric nobody scrapes. doc/operations.md lists the metrics.

Labels stay few: ``task`` (the backend's task names, ``<unknown>`` for any
other name a client sends, and the admin signals), ``error`` (an error type
name), ``cause`` (why a message was dropped), ``backend`` (a client's backend
endpoints, as configured). Never a call id or a client.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from taskit._metering import ClientMeter, Histogram, ServerMeter

__all__ = ["BackendCollector", "ClientCollector", "MetricsServer"]

# How often the HTTP server's thread looks for close() (the stdlib's default, 0.5 s,
# would make every BackEnd.close() wait that long).
_POLL = 0.05


def _histogram(name: str, doc: str, label: str, hists: dict[str, Histogram]) -> Any:
    family = HistogramMetricFamily(name, doc, labels=[label], unit="seconds")
    for value, hist in list(hists.items()):
        family.add_metric([value], hist.cumulative(), sum_value=hist.sum)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class BackendCollector(Collector):
    """The ``taskit_*`` metrics of one BackEnd, read from ``backend.stats()`` and
    ``meter`` at each scrape."""

    def __init__(self, backend: Any, meter: ServerMeter) -> None:
        self.backend = backend
        self.meter = meter

    def collect(self) -> Iterator[Any]:
        stats = self.backend.stats()
        meter = self.meter

        received = CounterMetricFamily(
            "taskit_calls_received",
            "Calls received, by task (<unknown>: a name this backend does not serve)",
            labels=["task"],
        )
        for task, n in list(meter.calls.items()):
            received.add_metric([task], n)
        yield received

        answered = CounterMetricFamily(
            "taskit_calls_answered",
            "Calls run and answered (with a result or the task's error), by task",
            labels=["task"],
        )
        for task, counts in stats["tasks"].items():
            answered.add_metric([task], counts["calls"])
        yield answered

        failed = CounterMetricFamily(
            "taskit_calls_failed",
            "Calls run and answered with an error, by task and error type",
            labels=["task", "error"],
        )
        for (task, error), n in list(meter.failed.items()):
            failed.add_metric([task, error], n)
        yield failed

        refused = CounterMetricFamily(
            "taskit_calls_refused",
            "Calls refused without running them, by error (Busy, UnknownTask, Stopping, ...)",
            labels=["error"],
        )
        for error, n in stats["refused"].items():
            refused.add_metric([error], n)
        yield refused

        yield _histogram(
            "taskit_task_run",
            "Time a task ran, by task (process pools: from the hand-off to the pool)",
            "task",
            meter.run_time,
        )

        dropped = CounterMetricFamily(
            "taskit_dropped_messages",
            "Messages dropped without an answer, and replies dropped, by cause",
            labels=["cause"],
        )
        for cause, n in stats["dropped"].items():
            dropped.add_metric([cause], n)
        yield dropped

        yield _counter("taskit_received_bytes", "Bytes of messages received", meter.bytes_in)
        yield _counter("taskit_sent_bytes", "Bytes of replies sent", meter.bytes_out)
        yield _counter("taskit_admin_signals", "Admin signals answered", stats["admin"])
        yield _counter(
            "taskit_takeovers", "Inline tasks the standby thread took over from", stats["takeovers"]
        )
        yield _counter(
            "taskit_replies_deferred",
            "Replies that waited for a client not reading",
            stats["reply_deferred"],
        )
        yield _gauge(
            "taskit_calls_in_flight", "Calls accepted, not yet answered", stats["in_flight"]
        )
        yield _gauge("taskit_queue_depth", "Calls waiting for a pool worker", stats["queue_depth"])
        yield _gauge("taskit_running", "Calls running on pool workers", stats["pool_running"])
        yield _gauge("taskit_pool_size", "Workers in the pool", stats["pool_size"])
        yield _gauge(
            "taskit_peers_holding",
            "Clients with calls in flight or replies waiting here",
            stats["peers_holding"],
        )
        yield _gauge(
            "taskit_peer_held_bytes",
            "Bytes clients make this backend hold (calls in flight, replies waiting)",
            stats["peer_held_bytes"],
        )
        yield _gauge("taskit_reply_backlog", "Replies waiting for a client", stats["reply_backlog"])
        yield _gauge("taskit_uptime_seconds", "Seconds since serving began", stats["uptime"])
        yield _gauge("taskit_stopping", "1 while a graceful stop is under way", stats["stopping"])


class ClientCollector(Collector):
    """The ``taskit_client_*`` metrics of one FrontEnd or AsyncFrontEnd (labelled by
    backend endpoint), read from its backends' states and ``meter`` at each scrape."""

    def __init__(self, face: Any, meter: ClientMeter) -> None:
        self.face = face
        self.meter = meter

    def describe(self) -> Iterator[Any]:
        # The families without samples: a registry checks their names on register(),
        # so a second client's metrics cannot silently duplicate the first one's.
        return self._families({}, {}, {})

    def collect(self) -> Iterator[Any]:
        return self._families(self.face.backends_status(), self.meter.latency, self.face.dropped)

    def _families(
        self, status: dict[str, Any], latency: dict[str, Histogram], dropped_replies: dict
    ) -> Iterator[Any]:
        for key, doc in (
            ("sent", "Calls sent to a backend, re-sends included"),
            ("answered", "Calls a backend answered with a result"),
            ("failed", "Calls a backend answered with the task's error"),
            ("lost", "Calls in flight when their backend was lost"),
            ("retried", "Lost calls re-sent (retries)"),
            ("busy", "Calls a backend refused as Busy"),
            ("disconnects", "Times a backend's connection dropped"),
        ):
            family = CounterMetricFamily(f"taskit_client_{key}", doc, labels=["backend"])
            for endpoint, s in status.items():
                family.add_metric([endpoint], s[key])
            yield family
        in_flight = GaugeMetricFamily(
            "taskit_client_in_flight", "Calls of this client on a backend", labels=["backend"]
        )
        up = GaugeMetricFamily(
            "taskit_client_backend_up", "1 while a backend is connected", labels=["backend"]
        )
        for endpoint, s in status.items():
            in_flight.add_metric([endpoint], s["in_flight"])
            up.add_metric([endpoint], 1 if s["state"] == "up" else 0)
        yield in_flight
        yield up
        yield _histogram(
            "taskit_client_call",
            "Time from sending a call to its answer (result or task error), by backend",
            "backend",
            latency,
        )
        dropped = CounterMetricFamily(
            "taskit_client_dropped_replies",
            "Replies dropped unread (late, malformed, badly signed), by cause",
            labels=["cause"],
        )
        for cause, n in dropped_replies.items():
            dropped.add_metric([cause], n)
        yield dropped


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress must not hold the process open


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape is not news (wsgiref writes every request to stderr)


class MetricsServer:
    """``/metrics`` over HTTP for one collector, in its own registry, on ``host:port``
    (0: a free port; :attr:`port` is the bound one). Serves from a daemon thread
    until :meth:`close`. Raises ``OSError`` when the address cannot be bound."""

    def __init__(self, collector: Collector, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(collector)
        server_class: type[_Server] = _Server6 if ":" in host else _Server
        app = make_wsgi_app(self.registry)
        self._httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL},
            name=f"taskit-metrics:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port. Blocks until the thread ends (at most
        a poll interval, 50 ms, plus a scrape in progress)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
