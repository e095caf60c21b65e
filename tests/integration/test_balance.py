"""Balancing that follows capacity, and backends that come and go, over real sockets:
credit per backend, bursts spread over late connections, slow backends spared,
joins by re-resolution (an injected resolver, and the real one for localhost),
drains that lose nothing."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from taskit._client import membership
from taskit.codecs import MsgpackCodec
from taskit.frontend import FrontEnd

from ..conftest import free_port


def _tasks(name: str, seconds: float = 0.0, gate: threading.Event | None = None) -> dict:
    def work(i):
        if gate is not None:
            gate.wait(30)
        if seconds:
            time.sleep(seconds)
        return name

    return {"work": work, "who": lambda: name}


@pytest.fixture
def frontends(frontends):
    """conftest's, in msgpack (the tasks return what JSON carries too)."""
    return functools.partial(frontends, codec=MsgpackCodec)


def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_backend_holds_at_most_its_credit_and_the_rest_wait_in_the_client(serve, frontends):
    gate = threading.Event()
    be = serve(_tasks("a", gate=gate), workers=2, codecs=["msgpack"])
    fe = frontends([be.endpoint], prefetch=3)
    try:
        futures = [fe.submit("work", i) for i in range(20)]
        _wait_for(lambda: be.task_count == 6)  # 2 workers x prefetch 3
        status = fe.backends_status()[be.endpoint]
        assert status["credit"] == {"limit": 6, "in_use": 6}
        assert status["capacity"]["workers"] == 2
        assert be.task_count == 6 and fe.task_count == 20
    finally:
        gate.set()
    assert [f.result(30) for f in futures] == ["a"] * 20


def test_a_burst_made_before_every_backend_is_connected_is_spread(serve, frontends):
    a = serve(_tasks("a", 0.005), workers=4, codecs=["msgpack"])
    b = serve(_tasks("b", 0.005), workers=4, codecs=["msgpack"])
    fe = frontends([a.endpoint, b.endpoint])
    results = [f.result(30) for f in [fe.submit("work", i) for i in range(200)]]
    # each at least 40% of its fair share (100): neither took the burst alone
    assert results.count("a") >= 40 and results.count("b") >= 40, results.count("a")


def test_a_slow_backend_gets_fewer_calls_than_a_fast_one(serve, frontends):
    fast = serve(_tasks("fast", 0.001), workers=4, codecs=["msgpack"])
    slow = serve(_tasks("slow", 0.010), workers=4, codecs=["msgpack"])
    fe = frontends([fast.endpoint, slow.endpoint])
    for be in (fast, slow):  # both connected, so the run compares speeds only
        fe.get_tasks(be.endpoint)
    results = list(fe.map("work", range(600)))
    assert results.count("slow") < results.count("fast") / 3, results.count("slow")
    status = fe.backends_status()
    assert status[slow.endpoint]["service_time"] > status[fast.endpoint]["service_time"]


def test_a_backend_added_by_re_resolution_gets_calls_without_any_client_action(serve, frontends):
    port = free_port()
    a = serve(_tasks("a"), host="127.0.0.1", port=port, codecs=["msgpack"])
    b = serve(_tasks("b"), host="127.0.0.2", port=port, codecs=["msgpack"])
    records = {"fleet": ["127.0.0.1"]}
    fe = frontends(
        [f"fleet:{port}"], resolve_every=0.05, resolver=lambda host, p: records.get(host, [])
    )
    assert {fe.work("who") for _ in range(10)} == {"a"}
    assert fe.backends == [a.endpoint]
    records["fleet"] = ["127.0.0.1", "127.0.0.2"]  # the service grew
    _wait_for(lambda: b.endpoint in fe.backends_status())
    _wait_for(lambda: fe.backends_status()[b.endpoint]["state"] == "up")
    seen = {fe.work("who") for _ in range(40)}
    assert seen == {"a", "b"}
    records["fleet"] = ["127.0.0.2"]  # and shrank: a is drained and closed
    _wait_for(lambda: a.endpoint not in fe.backends_status())
    assert {fe.work("who") for _ in range(10)} == {"b"}


def test_the_real_resolver_serves_localhost(serve, frontends, monkeypatch):
    real = membership.system_resolver
    asked = []

    def counted(host, port):  # the real resolver, its calls counted
        asked.append(host)
        return real(host, port)

    monkeypatch.setattr(membership, "system_resolver", counted)
    be = serve(_tasks("a"), host="127.0.0.1", codecs=["msgpack"])
    fe = frontends([f"localhost:{be.port}"], resolve_every=0.05)
    assert fe.work("who") == "a"
    _wait_for(lambda: len(asked) >= 4)  # resolved again three times at least
    assert fe.work("who") == "a"
    assert list(fe.backends_status()) == [f"tcp://localhost:{be.port}"]


def test_a_removed_backend_gets_no_new_calls_and_loses_none_in_flight(serve, frontends):
    gate = threading.Event()
    a = serve(_tasks("a", gate=gate), workers=4, codecs=["msgpack"])
    b = serve(_tasks("b", gate=gate), workers=4, codecs=["msgpack"])
    fe = frontends([a.endpoint, b.endpoint])
    for be in (a, b):
        fe.get_tasks(be.endpoint)
    try:
        first = [fe.submit("work", i) for i in range(8)]  # spread: both hold some
        _wait_for(lambda: a.task_count and b.task_count and a.task_count + b.task_count == 8)
        on_a = a.task_count
        fe.remove_backends(a.endpoint)
        assert fe.backends_status()[a.endpoint]["state"] == "draining"
        later = [fe.submit("work", i) for i in range(10)]
        _wait_for(lambda: b.task_count == 8 - on_a + 10)
        assert a.task_count == on_a  # nothing new went to a
    finally:
        gate.set()
    results = [f.result(30) for f in first]
    assert results.count("a") == on_a  # nothing in flight there was lost
    assert [f.result(30) for f in later] == ["b"] * 10
    _wait_for(lambda: a.endpoint not in fe.backends_status())  # then it is closed
    with pytest.raises(ValueError, match="No such backend"):
        fe.remove_backends(a.endpoint)


def test_an_async_frontend_balances_and_drains_the_same_way(serve):
    import asyncio

    from taskit.aio import AsyncFrontEnd

    gate = threading.Event()
    a = serve(_tasks("a", gate=gate), workers=2, codecs=["msgpack"])
    b = serve(_tasks("b"), workers=2, codecs=["msgpack"])

    async def run():
        async with AsyncFrontEnd([a.endpoint, b.endpoint], codec=MsgpackCodec) as fe:
            await fe.get_tasks(a.endpoint)
            await fe.get_tasks(b.endpoint)
            first = [fe.submit("work", i) for i in range(4)]  # some of them on a
            for _ in range(1000):
                if a.task_count:
                    break
                await asyncio.sleep(0.01)
            assert a.task_count
            fe.remove_backends(a.endpoint)
            assert fe.backends_status()[a.endpoint]["state"] == "draining"
            others = await asyncio.gather(*(fe.work("work", i) for i in range(10)))
            gate.set()
            return await asyncio.gather(*first), others, fe.backends_status()

    first, others, status = asyncio.run(run())
    assert "a" in first and set(others) == {"b"}  # a's calls finished; new ones went to b


def test_prefetch_must_be_a_positive_whole_number():
    with pytest.raises(ValueError, match="prefetch"):
        FrontEnd([], prefetch=0)
    with pytest.raises(ValueError, match="resolve_every"):
        FrontEnd([], resolve_every=0)


def test_one_clients_burst_does_not_starve_anothers_sync_calls(serve, frontends):
    be = serve(_tasks("a", 0.010), workers=2, codecs=["msgpack"])
    bursty = frontends([be.endpoint])
    polite = frontends([be.endpoint])
    assert polite.work("who") == "a"
    burst = [bursty.submit("work", i) for i in range(400)]  # 2 s of work on 2 workers
    _wait_for(lambda: be.task_count > 0)
    t0 = time.monotonic()
    assert polite.work("work", 0) == "a"
    waited = time.monotonic() - t0
    # Credit keeps the burst mostly in its own client: the sync call queues behind
    # at most that client's credit (16 calls, ~0.08 s here), not behind all 400.
    assert waited < 1.0, waited
    assert be.task_count <= 40
    assert [f.result(60) for f in burst] == ["a"] * 400
