"""Prometheus metrics over real sockets: a BackEnd's /metrics page scraped with a plain
HTTP client after real calls (successes, task errors, unknown tasks, Busy), checked by
value and parsed whole with prometheus_client's own parser; a FrontEnd's metrics in a
registry of the test's."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from taskit import protocol  # noqa: E402
from taskit.aio import AsyncFrontEnd  # noqa: E402
from taskit.backend import BackEnd  # noqa: E402
from taskit.codecs import MsgpackCodec  # noqa: E402
from taskit.errors import BackendBindError, BusyError, UnknownTaskError  # noqa: E402
from taskit.frontend import FrontEnd  # noqa: E402

BOUND = 30.0  # seconds: every wait of these tests


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=BOUND) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the page, parsed by prometheus_client: {(name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("taskit_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict, name: str, **labels: str) -> float:
    return page[(name, tuple(sorted(labels.items())))]


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {BOUND} s")
        time.sleep(0.005)  # polling the backend's own counters: no event to wait on


def add(a, b):
    return a + b


def boom(message):
    raise ValueError(message)


def nap(seconds):
    threading.Event().wait(seconds)  # a task that takes this long by design
    return seconds


def request_bytes(task: str, *args) -> int:
    """The bytes of a CALL message (one frame, one item; its time budget is a field)."""
    return protocol.HEAD_SIZE + len(protocol.encode_call(MsgpackCodec, task, args))


def hello_bytes() -> int:
    """The bytes of a FrontEnd's HELLO (its nonce is always 32 hex digits)."""
    from taskit import __version__

    body = protocol.hello_body(
        [MsgpackCodec.wire_id], False, bytes(16), f"taskit/{__version__} python"
    )
    return protocol.HEAD_SIZE + len(body)


def test_a_scrape_counts_calls_by_task_and_outcome(serve):
    gate = threading.Event()

    def block():
        gate.wait(BOUND)
        return "done"

    tasks = {"add": add, "boom": boom, "nap": nap, "block": block}
    be = serve(tasks, workers=2, max_pending=1, inline=False, metrics_port=0)
    assert be.metrics_port > 0
    fe = FrontEnd(
        [("127.0.0.1", be.port)], codec=MsgpackCodec, busy_retries=0, heartbeat_interval=None
    )
    try:
        assert [fe.work("add", i, 1) for i in range(3)] == [1, 2, 3]
        for _ in range(2):
            with pytest.raises(Exception, match="no good"):
                fe.work("boom", "no good")
        for i in range(20):  # made-up names: one label value, not twenty
            with pytest.raises(UnknownTaskError):
                fe.work(f"nope{i}")
        assert fe.work("nap", 0.05) == 0.05
        held = fe.submit("block")
        wait_for(lambda: be.stats()["in_flight"] == 1, "block running")
        with pytest.raises(BusyError):
            fe.work("add", 5, 5)  # max_pending=1: refused at once
        gate.set()
        assert held.result(BOUND) == "done"
    finally:
        fe.close()

    page = samples(scrape(be.metrics_port))
    received = {
        labels[0][1]: v
        for (name, labels), v in page.items()
        if name == "taskit_calls_received_total"
    }
    assert received == {"add": 4, "boom": 2, "nap": 1, "block": 1, "<unknown>": 20}
    for task, n in (("add", 3), ("boom", 2), ("nap", 1), ("block", 1)):
        assert value(page, "taskit_calls_answered_total", task=task) == n
        assert value(page, "taskit_task_run_seconds_count", task=task) == n
        assert value(page, "taskit_task_run_seconds_bucket", task=task, le="+Inf") == n
    assert value(page, "taskit_calls_failed_total", task="boom", error="ValueError") == 2
    failed = [k for k in page if k[0] == "taskit_calls_failed_total"]
    assert len(failed) == 1
    assert value(page, "taskit_calls_refused_total", error="UnknownTask") == 20
    assert value(page, "taskit_calls_refused_total", error="Busy") == 1

    # nap ran >= 50 ms: in no bucket up to 25 ms, in every one from 60 s; the sum says so
    assert value(page, "taskit_task_run_seconds_bucket", task="nap", le="0.025") == 0
    assert value(page, "taskit_task_run_seconds_bucket", task="nap", le="60.0") == 1
    assert value(page, "taskit_task_run_seconds_sum", task="nap") >= 0.05
    # add is quick: all three under a second, and the buckets are cumulative
    buckets = [
        v
        for (n, lab), v in page.items()
        if n == "taskit_task_run_seconds_bucket" and dict(lab)["task"] == "add"
    ]
    assert (
        buckets == sorted(buckets)
        and value(page, "taskit_task_run_seconds_bucket", task="add", le="1.0") == 3
    )

    sent = (
        hello_bytes()  # the FrontEnd's handshake
        + sum(request_bytes("add", i, 1) for i in range(3))
        + 2 * request_bytes("boom", "no good")
        + sum(request_bytes(f"nope{i}") for i in range(20))
        + request_bytes("nap", 0.05)
        + request_bytes("block")
        + request_bytes("add", 5, 5)
    )
    assert value(page, "taskit_received_bytes_total") == sent
    results = sum(protocol.HEAD_SIZE + len(MsgpackCodec.encode(v)) for v in (1, 2, 3))
    assert value(page, "taskit_sent_bytes_total") > results

    assert value(page, "taskit_calls_in_flight") == 0
    assert value(page, "taskit_pool_size") == 2
    assert value(page, "taskit_queue_depth") == 0
    assert value(page, "taskit_running") == 0
    assert value(page, "taskit_stopping") == 0
    assert value(page, "taskit_dropped_messages_total", cause="malformed") == 0
    assert value(page, "taskit_uptime_seconds") > 0


def test_a_scrape_shows_calls_waiting_and_running(serve):
    gate = threading.Event()

    def block():
        gate.wait(BOUND)

    be = serve({"block": block}, workers=1, inline=False, metrics_port=0)
    fe = FrontEnd([("127.0.0.1", be.port)], heartbeat_interval=None)
    try:
        futures = [fe.submit("block") for _ in range(3)]
        wait_for(lambda: be.stats()["queue_depth"] == 2, "two calls queued")
        page = samples(scrape(be.metrics_port))
        assert value(page, "taskit_calls_in_flight") == 3
        assert value(page, "taskit_queue_depth") == 2
        assert value(page, "taskit_running") == 1
        assert value(page, "taskit_peers_holding") == 1
        assert value(page, "taskit_peer_held_bytes") > 3 * 3072  # CALL_COST each
        gate.set()
        for f in futures:
            f.result(BOUND)
    finally:
        gate.set()
        fe.close()


def test_metrics_are_served_on_the_given_host_until_close():
    be = BackEnd({"add": add}, port=0, metrics_port=0, metrics_host="127.0.0.1").start()
    try:
        port = be.metrics_port
        assert "taskit_calls_in_flight 0.0" in scrape(port)
    finally:
        be.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=BOUND)


def test_a_metrics_port_in_use_fails_start_and_releases_the_backend(serve):
    first = serve({"add": add}, metrics_port=0)
    second = BackEnd({"add": add}, port=0, metrics_port=first.metrics_port)
    with pytest.raises(BackendBindError, match="metrics_port"):
        second.start()
    assert not second.running


def test_a_bad_metrics_port_is_a_value_error():
    with pytest.raises(ValueError, match="metrics_port must be a port number"):
        BackEnd({"add": add}, port=0, metrics_port=-1)


def test_a_frontend_publishes_its_metrics_in_the_given_registry(serve):
    be = serve({"add": add, "boom": boom}, workers=2)
    registry = prometheus_client.CollectorRegistry()
    endpoint = f"tcp://127.0.0.1:{be.port}"
    fe = FrontEnd([endpoint], codec=MsgpackCodec, metrics_registry=registry)
    try:
        assert fe.work("add", 1, 2) == 3
        assert fe.work("add", 2, 2) == 4
        with pytest.raises(Exception, match="bad"):
            fe.work("boom", "bad")
        page = samples(prometheus_client.generate_latest(registry).decode())
        assert value(page, "taskit_client_answered_total", backend=endpoint) == 2
        assert value(page, "taskit_client_failed_total", backend=endpoint) == 1
        assert value(page, "taskit_client_sent_total", backend=endpoint) == 3
        assert value(page, "taskit_client_lost_total", backend=endpoint) == 0
        assert value(page, "taskit_client_retried_total", backend=endpoint) == 0
        assert value(page, "taskit_client_busy_total", backend=endpoint) == 0
        assert value(page, "taskit_client_backend_up", backend=endpoint) == 1
        assert value(page, "taskit_client_call_seconds_count", backend=endpoint) == 3
        assert value(page, "taskit_client_call_seconds_sum", backend=endpoint) > 0
        # a second client in the same registry would clash: refused, in words
        with pytest.raises(ValueError, match="own CollectorRegistry"):
            FrontEnd([endpoint], metrics_registry=registry)
    finally:
        fe.close()
    assert prometheus_client.generate_latest(registry) == b""  # close() took them out
    FrontEnd([endpoint], metrics_registry=registry).close()  # so another may come


def test_a_frontend_counts_busy_answers(serve):
    gate = threading.Event()

    def block():
        gate.wait(BOUND)

    be = serve({"block": block}, workers=1, max_pending=1, inline=False)
    registry = prometheus_client.CollectorRegistry()
    endpoint = f"tcp://127.0.0.1:{be.port}"
    with FrontEnd([endpoint], busy_retries=0, metrics_registry=registry) as fe:
        held = fe.submit("block")
        wait_for(lambda: be.stats()["in_flight"] == 1, "block running")
        with pytest.raises(BusyError):
            fe.work("block")
        gate.set()
        held.result(BOUND)
        page = samples(prometheus_client.generate_latest(registry).decode())
    assert value(page, "taskit_client_busy_total", backend=endpoint) == 1
    assert value(page, "taskit_client_answered_total", backend=endpoint) == 1


def test_an_async_frontend_publishes_the_same_metrics(serve):
    be = serve({"add": add})
    registry = prometheus_client.CollectorRegistry()
    endpoint = f"tcp://127.0.0.1:{be.port}"

    async def main():
        async with AsyncFrontEnd([endpoint], metrics_registry=registry) as fe:
            assert await fe.work("add", 1, 1) == 2
            return samples(prometheus_client.generate_latest(registry).decode())

    page = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert value(page, "taskit_client_answered_total", backend=endpoint) == 1
    assert value(page, "taskit_client_call_seconds_count", backend=endpoint) == 1
    assert prometheus_client.generate_latest(registry) == b""


def test_doc_operations_lists_every_metric_with_its_type(serve):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "doc" / "operations.md").read_text()
    listed = {}
    for name, kind in re.findall(r"^\| `(taskit_\w+)` \| (\w+) \|", doc, re.M):
        listed[name.removesuffix("_total")] = kind
    be = serve({"add": add}, metrics_port=0)
    registry = prometheus_client.CollectorRegistry()
    with FrontEnd([("127.0.0.1", be.port)], metrics_registry=registry) as fe:
        assert fe.work("add", 1, 1) == 2
        client_page = prometheus_client.generate_latest(registry).decode()
    exposed = {
        family.name: family.type
        for page in (scrape(be.metrics_port), client_page)
        for family in text_string_to_metric_families(page)
    }
    assert exposed == listed
