"""FrontEnd and AsyncFrontEnd speaking wire protocol v2 over real sockets, against a raw
v2 backend (tests/_v2_responder.py): handshake outcomes, budgets, load, cancel,
batches. The same behaviours against taskit's BackEnd are in tests/integration."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import CancelledError

import pytest

from taskit.aio import AsyncFrontEnd
from taskit.codecs import MsgpackCodec
from taskit.errors import (
    AuthenticationError,
    BackendNotAvailableError,
    BackendProcessingError,
    CodecNotAllowedError,
    ProtocolVersionError,
)
from taskit.frontend import FrontEnd

from ._v2_responder import Responder, wait_for


@pytest.fixture
def responder():
    made = []

    def make(**kw):
        r = Responder(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.release.set()
        r.close()


def _face_call(face, endpoint, **kw):
    """One call ('add', 1, 2) through ``face`` ("sync" or "aio"); the outcome and seconds."""
    t0 = time.monotonic()
    if face == "sync":
        with FrontEnd([endpoint], **kw) as fe:
            try:
                return fe.work("add", 1, 2), time.monotonic() - t0
            except Exception as e:  # noqa: BLE001 - the outcome under test
                return e, time.monotonic() - t0

    async def run():
        async with AsyncFrontEnd([endpoint], **kw) as fe:
            try:
                return await fe.work("add", 1, 2)
            except Exception as e:  # noqa: BLE001
                return e

    return asyncio.run(run()), time.monotonic() - t0


@pytest.mark.parametrize("face", ["sync", "aio"])
@pytest.mark.parametrize(
    "backend, client, cls, words",
    [
        (dict(mode="version"), {}, ProtocolVersionError, "version 3"),
        (dict(mode="v1"), {}, ProtocolVersionError, "version 1"),
        (dict(codecs=[2]), {}, CodecNotAllowedError, "accepts codecs 'msgpack'"),
        (dict(key=b"k"), {}, AuthenticationError, "this client has no key"),
        ({}, dict(key=b"k"), AuthenticationError, "the backend has none"),
        (dict(key=b"k"), dict(key=b"other"), AuthenticationError, "key is not this client's"),
    ],
)
def test_a_handshake_that_does_not_fit_is_a_typed_error_within_connect_timeout(
    responder, face, backend, client, cls, words
):
    r = responder(**backend)
    exc, took = _face_call(face, r.endpoint, connect_timeout=5.0, **client)
    assert isinstance(exc, cls) and words in str(exc), exc
    assert took < 5.0  # at once: not a wait for connect_timeout


@pytest.mark.parametrize("face", ["sync", "aio"])
def test_a_backend_that_never_answers_hello_is_not_available_naming_the_handshake(responder, face):
    r = responder(mode="silent")
    exc, took = _face_call(face, r.endpoint, connect_timeout=0.5)
    assert isinstance(exc, BackendNotAvailableError)
    assert "did not answer the taskit handshake" in str(exc)
    assert 0.5 <= took < 5.0


@pytest.mark.parametrize("key", [None, b"k"])
def test_calls_budgets_load_and_batches_over_a_real_socket(responder, key):
    r = responder(key=key, load=(6, 2))
    with FrontEnd([r.endpoint], key=key, codec=MsgpackCodec) as fe:
        assert fe.work("add", 1, 2) == 3
        assert r.budgets[-1] == 0  # no timeout: no deadline
        assert fe.call("add", (2, 3), timeout=30.0) == 5
        assert 25_000 <= r.budgets[-1] <= 30_000
        assert list(fe.map("add", range(300), range(300))) == [2 * i for i in range(300)]
        assert max(r.batches) > 1  # map's calls went in batches
        status = fe.backends_status()[r.endpoint]
        assert (status["queued"], status["running"], status["pid"]) == (6, 2, 1234)
        assert status["capacity"]["workers"] == 3


def test_cancel_of_a_queued_call_is_confirmed_and_it_never_runs(responder):
    r = responder()
    with FrontEnd([r.endpoint]) as fe:
        fut = fe.submit("hold", 1)
        assert wait_for(lambda: r.held)
        assert fut.cancel() is True
        assert fut.cancelled() and len(r.cancelled) == 1 and r.ran == []
        with pytest.raises(CancelledError):
            fut.result(1)
        r.release.set()
        assert fe.work("add", 1, 1) == 2
        assert len(r.ran) == 1  # only the add: the cancelled call never ran


def test_cancel_of_a_running_call_is_false_and_its_result_comes(responder):
    r = responder()
    with FrontEnd([r.endpoint]) as fe:
        fut = fe.submit("block", 7)
        assert wait_for(lambda: r.held)
        assert fut.cancel() is False and not fut.cancelled()
        r.release.set()
        assert fut.result(10) == 7


def test_cancel_of_a_call_never_sent_is_true_at_once(responder):
    r = responder(mode="silent")  # no WELCOME: the call waits, parked
    with FrontEnd([r.endpoint], connect_timeout=30) as fe:
        fut = fe.submit("add", 1, 2)
        assert fut.cancel() is True and fut.cancelled()
        with pytest.raises(CancelledError):
            fut.result(0)
    assert not any(f[:4] == b"TK\x02\x00" and f[4] == 1 for f in r.frames)  # no CALL sent


def test_an_abandoned_map_cancels_its_calls_on_the_wire(responder):
    r = responder()
    with FrontEnd([r.endpoint]) as fe:
        results = fe.map("hold", range(20))
        assert next(results) == 0  # the others wait on the backend, queued
        assert wait_for(lambda: len(r.held) == 19)
        results.close()
        assert wait_for(lambda: len(r.cancelled) == 19)
        assert not r.held


def test_close_cancels_the_calls_still_on_the_wire(responder):
    r = responder()
    fe = FrontEnd([r.endpoint])
    futs = [fe.submit("hold", i) for i in range(1, 6)]
    assert wait_for(lambda: len(r.held) == 5)
    fe.close()
    assert wait_for(lambda: len(r.cancelled) == 5)
    assert all(f.done() for f in futs)


def test_cancelling_an_async_call_sends_cancel(responder):
    r = responder()

    async def run():
        async with AsyncFrontEnd([r.endpoint]) as fe:
            fut = fe.submit("hold", 3)
            for _ in range(1000):  # bounded: up to 10 s
                if r.held:
                    break
                await asyncio.sleep(0.01)
            fut.cancel()
            for _ in range(1000):
                if r.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert await fe.work("add", 2, 2) == 4

    asyncio.run(run())
    assert len(r.cancelled) == 1 and not r.held


def test_an_async_map_sends_its_calls_in_batches(responder):
    r = responder()

    async def run():
        async with AsyncFrontEnd([r.endpoint]) as fe:
            return [v async for v in fe.map("add", range(300), range(300))]

    assert asyncio.run(run()) == [2 * i for i in range(300)]
    assert max(r.batches) > 1


@pytest.mark.parametrize("face", ["sync", "aio"])
def test_a_large_reply_is_read_whole_on_both_faces(responder, face):
    r = responder()
    payload = bytes(range(256)) * 4096  # 1 MiB: read from libzmq's buffer, uncopied

    if face == "sync":
        with FrontEnd([r.endpoint], codec=MsgpackCodec) as fe:
            assert fe.work("echo", payload) == payload
        return

    async def run():
        async with AsyncFrontEnd([r.endpoint], codec=MsgpackCodec) as fe:
            return await fe.work("echo", payload)

    assert asyncio.run(run()) == payload


def test_closing_an_async_front_end_cancels_its_calls_on_the_wire(responder):
    r = responder()

    async def run():
        fe = AsyncFrontEnd([r.endpoint])
        futs = [fe.submit("hold", i) for i in range(1, 4)]
        for _ in range(1000):  # bounded: up to 10 s
            if len(r.held) == 3:
                break
            await asyncio.sleep(0.01)
        await fe.aclose()
        return futs

    futs = asyncio.run(run())
    assert all(f.done() for f in futs)
    assert wait_for(lambda: len(r.cancelled) == 3)


def test_calls_in_a_batch_fail_and_succeed_as_single_calls_do(responder):
    r = responder(tasks={"inv": lambda x: 1 / x})
    with FrontEnd([r.endpoint]) as fe:
        with pytest.raises(BackendProcessingError) as single:
            fe.work("inv", 0)
        results = fe.map("inv", [1, 2, 0, 4] * 50)
        assert [next(results) for _ in range(2)] == [1.0, 0.5]
        with pytest.raises(BackendProcessingError) as batched:
            next(results)
        assert max(r.batches) > 1
        assert (batched.value.type, batched.value.args) == (single.value.type, single.value.args)
        assert batched.value.type == "ZeroDivisionError"


def test_a_burst_of_async_submits_goes_out_in_one_message(responder):
    r = responder()

    async def run():
        # credit for the whole burst (3 workers x 64): this is about batching
        async with AsyncFrontEnd([r.endpoint], prefetch=64) as fe:
            assert await fe.work("add", 0, 0) == 0  # connected: the burst is not parked
            return await asyncio.gather(*(fe.submit("add", i, 1) for i in range(50)))

    assert asyncio.run(run()) == [i + 1 for i in range(50)]
    assert r.batches[-1] == 50
