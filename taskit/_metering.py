"""What the metrics of a BackEnd or a FrontEnd record per call, beyond the counters
they keep anyway: pure bookkeeping, no exporter, no import of one.

Made only when metrics are asked for (``BackEnd(metrics_port=...)``,
``FrontEnd(metrics_registry=...)``); their hooks are then set on the request
handler, the I/O loop or the client core, which otherwise skip them. The
Prometheus side (:mod:`taskit._prometheus`) reads these at scrape time, with
the counters the backend and client keep anyway (``<stats>``, backends_status()).

Not thread-safe by themselves; each field has one writer at a time (see the
classes), and a scrape reads plain ints and lists.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Container
from typing import Any

from taskit.codecs import JSONCodec
from taskit.protocol import ADMIN_SIGNALS, decode_error

__all__ = ["BUCKETS", "UNKNOWN", "Histogram", "ServerMeter", "ClientMeter"]

# Upper bounds (seconds) of the duration histograms' buckets: from the 100 us a
# quick task takes to the minute of a slow one (Prometheus' defaults start at 5 ms).
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

# The task label of calls naming a task the backend does not serve: a client must
# not be able to create label values (time series) by sending made-up names.
UNKNOWN = "<unknown>"


class Histogram:
    """Counts of observations per bucket of :data:`BUCKETS` (not cumulative; the last
    one is over the largest bound), and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to it (Prometheus' "le")
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ..., ("+Inf", total)]``."""
        out, total = [], 0
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class ServerMeter:
    """A BackEnd's per-call records: calls received by task, run times, failures by
    error type, bytes in and out.

    :meth:`received` and :meth:`other` run on the thread reading the socket (one at a
    time); :meth:`replied` under the backend's lock. ``tasks`` is the backend's task
    dict (read, to keep made-up task names out of the labels).
    """

    def __init__(self, tasks: Container[str]) -> None:
        self.tasks = tasks
        self.calls: dict[str, int] = {}  # task (or UNKNOWN, or an admin signal) -> calls
        self.run_time: dict[str, Histogram] = {}
        self.failed: dict[tuple[str, str], int] = {}  # (task, error type) -> calls
        # bytes of every message received (the reading thread) and sent (under the lock)
        self.bytes_in = self.bytes_out = 0

    def read(self, nbytes: int) -> None:
        """A message of ``nbytes`` was received (whatever it is, even dropped)."""
        self.bytes_in += nbytes

    def sent(self, nbytes: int) -> None:
        """A message of ``nbytes`` was sent (a frame of replies, a notice, a refusal)."""
        self.bytes_out += nbytes

    def received(self, name: str) -> None:
        """A call of ``name`` was decoded (accepted or not)."""
        if name not in self.tasks and name not in ADMIN_SIGNALS:
            name = UNKNOWN
        calls = self.calls
        calls[name] = calls.get(name, 0) + 1

    def replied(self, call: Any, ok: bool, run_time: float | None, item: tuple) -> None:
        """``call`` (a ``_server.handler.Call``) was answered with reply ``item``
        ``(kind, codec id, call id, body)``, after running ``run_time`` seconds (None:
        in another process, timed from its hand-off to the pool). A failure's error
        type is read back from its ERROR body."""
        name = call.name
        hist = self.run_time.get(name)
        if hist is None:
            hist = self.run_time[name] = Histogram()
        hist.observe(run_time if run_time is not None else _since(call.t0))
        if not ok:
            key = (name, _error_type(call.codec, item))
            self.failed[key] = self.failed.get(key, 0) + 1


def _since(t0: float) -> float:
    from time import perf_counter

    return perf_counter() - t0 if t0 else 0.0


def _error_type(codec: Any, item: tuple) -> str:
    """The error type name of an ERROR reply item (in ``codec``, or JSON: the fallback)."""
    try:
        used = codec if item[1] == codec.wire_id else JSONCodec
        return decode_error(used, bytes(item[3]))[0]
    except Exception:  # never let a metric fail a reply
        return "unknown"


class ClientMeter:
    """A client's per-call record: the latency of each backend's answers (from the
    call's send to its reply), written by the driver holding the client core."""

    def __init__(self) -> None:
        self.latency: dict[str, Histogram] = {}

    def answered(self, endpoint: str, seconds: float) -> None:
        hist = self.latency.get(endpoint)
        if hist is None:
            hist = self.latency[endpoint] = Histogram()
        hist.observe(seconds)
