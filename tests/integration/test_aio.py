"""taskit.aio.AsyncFrontEnd over real sockets, each test under its own event loop
(asyncio.run inside the test: no plugin needed)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from taskit.aio import AsyncFrontEnd
from taskit.backend import ADMIN_TASKS, BackEnd
from taskit.errors import (
    AuthenticationError,
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    CallTimeoutError,
    EncodeError,
    FrontEndClosedError,
    MessageTooLargeError,
    UnknownTaskError,
)
from tests.integration._cli_helpers import TASKIT, TASKS_SOURCE, env, wait_until

release = threading.Event()  # set at teardown so held tasks end and backends stop


def add(a, b):
    return a + b


def fail(message):
    raise ValueError(message)


def hold(seconds):
    release.wait(seconds)
    return "held"


TASKS = {"add": add, "fail": fail, "hold": hold, **ADMIN_TASKS}


@pytest.fixture
def backends():
    """Start in-process backends on free ports; stopped at teardown."""
    started = []
    release.clear()

    def start(n=1, **kw):
        new = [BackEnd(TASKS, "127.0.0.1", 0, **kw).start() for _ in range(n)]
        started.extend(new)
        return new

    yield start
    release.set()
    for b in started:
        b.close(timeout=10)


def addr(b):
    return ("127.0.0.1", b.port)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))  # a hang fails, bounded


def test_work_submit_call_map(backends):
    (b,) = backends()

    async def main():
        async with AsyncFrontEnd([addr(b)], codec="msgpack") as fe:
            assert await fe.work("add", 1, 2) == 3
            fut = fe.submit("add", "a", "b")
            assert isinstance(fut, asyncio.Future)
            assert await fut == "ab"
            assert await fe.call("add", (2, 3)) == 5
            assert await fe.call("add", kwargs={"a": 1, "b": 1}, timeout=5) == 2
            assert [r async for r in fe.map("add", range(5), range(5))] == [0, 2, 4, 6, 8]
            assert await fe.work("add", b"x", b"y") == b"xy"  # msgpack carries bytes
            assert fe.task_count == 0

    run(main())


def test_map_over_nothing_yields_nothing_even_with_progress(backends):
    (b,) = backends()

    async def main():
        async with AsyncFrontEnd([addr(b)]) as fe:
            assert [r async for r in fe.map("add", progress=True)] == []
            assert [r async for r in fe.map("add", [], [], progress=True)] == []

    run(main())


def test_many_concurrent_calls_get_their_own_results(backends):
    (b,) = backends(workers=4)

    async def main():
        async with AsyncFrontEnd([addr(b)], codec="msgpack") as fe:
            results = await asyncio.gather(*(fe.submit("add", i, i) for i in range(3000)))
            assert results == [2 * i for i in range(3000)]
            assert [r async for r in fe.map("add", range(2500), [1] * 2500)] == [
                i + 1 for i in range(2500)
            ]

    run(main())


def test_remote_errors_carry_type_args_traceback_task_backend(backends):
    (b,) = backends()

    async def main():
        async with AsyncFrontEnd([addr(b)]) as fe:
            with pytest.raises(BackendProcessingError) as info:
                await fe.work("fail", "boom")
            e = info.value
            assert e.type == "ValueError" and e.args == ("boom",)
            assert e.task == "fail" and e.backend == f"tcp://127.0.0.1:{b.port}"
            assert "raise ValueError(message)" in e.remote_traceback
            with pytest.raises(UnknownTaskError):
                await fe.work("nope")
            with pytest.raises(EncodeError):
                fe.submit("add", {1, 2}, 3)  # JSON cannot carry a set: refused at once
        async with AsyncFrontEnd([addr(b)], max_message_size=1024) as fe:
            with pytest.raises(MessageTooLargeError, match="max_message_size"):
                fe.submit("add", "x" * 2000, "y")  # over the limit: refused before sending
            assert await fe.work("add", 1, 1) == 2  # still serving

    run(main())


def test_calls_are_balanced_over_backends_and_skip_a_dead_one(backends):
    b1, b2 = backends(2)
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", s.getsockname()[1])  # nobody listens there

    async def main():
        async with AsyncFrontEnd([addr(b1), dead, addr(b2)], connect_timeout=5) as fe:
            # both live ones connected (a pinned status call waits for its backend)
            assert await fe.get_tasks(addr(b1)) == "0"
            assert await fe.get_tasks(addr(b2)) == "0"
            results = await asyncio.gather(*(fe.submit("add", i, 0) for i in range(200)))
            assert results == list(range(200))
            for _ in range(20):  # one at a time: ties go round-robin
                await fe.work("add", 0, 0)
            status = fe.backends_status()
            assert status[f"tcp://{dead[0]}:{dead[1]}"]["state"] != "up"
            return status

    run(main())
    served = [b.stats()["tasks"]["add"]["calls"] for b in (b1, b2)]
    assert sum(served) == 220
    assert min(served) >= 10  # each got a share


def test_no_backend_reachable_raises_in_bounded_time():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        async with AsyncFrontEnd([("127.0.0.1", port)], connect_timeout=0.5) as fe:
            t0 = time.monotonic()
            with pytest.raises(BackendNotAvailableError, match="reachable"):
                await fe.work("add", 1, 2)
            assert time.monotonic() - t0 < 10
            assert await fe.get_tasks(("127.0.0.1", port)) == "down"
        async with AsyncFrontEnd([], connect_timeout=0.2) as fe:
            with pytest.raises(BackendNotAvailableError, match="no backends"):
                await fe.work("add", 1, 2)

    run(main())


def test_timeout_and_cancellation(backends):
    (b,) = backends(workers=2)

    async def main():
        async with AsyncFrontEnd([addr(b)]) as fe:
            with pytest.raises(CallTimeoutError) as info:
                await fe.call("hold", (30,), timeout=0.3)
            assert isinstance(info.value, TimeoutError)
            fut = fe.submit("hold", 30)
            await asyncio.sleep(0)  # let it go out
            fut.cancel()
            await asyncio.sleep(0)  # the done-callback forgets the call
            assert fe.task_count == 0
            with pytest.raises(asyncio.TimeoutError):  # asyncio's own timeout works too
                await asyncio.wait_for(fe.work("hold", 30), 0.2)
            release.set()  # let the held tasks finish
            assert await fe.work("add", 2, 2) == 4

    run(main())


def test_callback_and_ignore(backends):
    (b,) = backends()

    async def main():
        async with AsyncFrontEnd([addr(b)]) as fe:
            got, errors = [], []
            assert await fe.callback("add", got.append, errors.append, 20, 22) == 42
            assert got == [42]
            with pytest.raises(BackendProcessingError):
                await fe.callback("fail", got.append, errors.append, "bad")
            assert len(errors) == 1 and errors[0].type == "ValueError"
            silenced = fe.callback("fail", got.append, False, "silenced")  # error_cb=False
            with pytest.raises(BackendProcessingError):
                await silenced  # the future still carries it, if anyone asks
            assert len(errors) == 1 and got == [42]
            fe.ignore("fail", "ignored")
            assert await fe.work("add", 0, 1) == 1

    run(main())


def test_admin_signals_and_unknown_backend(backends):
    (b,) = backends()

    async def main():
        async with AsyncFrontEnd([addr(b)]) as fe:
            stats = await fe.stats(addr(b))
            assert {"uptime", "in_flight", "done", "tasks"} <= set(stats)
            assert {"add", "fail", "hold"} <= set(await fe.tasks(addr(b)))
            with pytest.raises(ValueError, match="No such backend!"):
                await fe.send_signal(("127.0.0.1", 1), "<status>")
            await fe.send_stop(addr(b))
        assert b.join(10)  # the backend stopped

    run(main())


def test_keyed_backend_needs_the_key(backends):
    (b,) = backends(key=b"s3cret")

    async def main():
        async with AsyncFrontEnd([addr(b)], key=b"s3cret") as fe:
            assert await fe.work("add", 1, 2) == 3
        async with AsyncFrontEnd([addr(b)], timeout=5) as fe:
            with pytest.raises(AuthenticationError):  # unsigned: refused unread
                await fe.work("add", 1, 2)
        assert b.stats()["dropped"]["bad_signature"] >= 1

    run(main())


def test_ipc_endpoint(tmp_path):
    path = f"ipc://{tmp_path}/taskit.sock"
    with BackEnd(TASKS, endpoint=path):

        async def main():
            async with AsyncFrontEnd([path]) as fe:
                return await fe.work("add", 4, 4)

        assert run(main()) == 8


def test_close_fails_pending_calls_and_refuses_new_ones(backends):
    (b,) = backends()

    async def main():
        fe = AsyncFrontEnd([addr(b)])
        pending = fe.submit("hold", 30)
        await asyncio.sleep(0)
        await fe.aclose()
        with pytest.raises(FrontEndClosedError):
            await pending
        with pytest.raises(FrontEndClosedError):
            await fe.work("add", 1, 2)
        await fe.aclose()  # idempotent

    run(main())


def _start_cli_backend(workdir, port="0"):
    log_path = workdir / f"backend-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [*TASKIT, "backend", "aio_tasks.py", "--port", str(port)],
        cwd=workdir,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    found = wait_until(
        lambda: (
            proc.poll() is None and re.findall(r"on tcp://127.0.0.1:(\d+)", log_path.read_text())
        ),
        60,
        "backend up",
    )
    return proc, int(found[0])


def test_a_backend_killed_mid_call_fails_the_call_and_rejoins_when_restarted(tmp_path):
    (tmp_path / "aio_tasks.py").write_text(TASKS_SOURCE)
    procs = []
    try:
        proc, port = _start_cli_backend(tmp_path)
        procs.append(proc)
        backend = ("127.0.0.1", port)

        async def main():
            async with AsyncFrontEnd([backend], heartbeat_timeout=1.0, connect_timeout=30) as fe:
                assert await fe.work("add", 1, 1) == 2
                fut = fe.submit("hold", 60)
                while (await fe.get_tasks(backend)) != "1":
                    await asyncio.sleep(0.02)  # until the backend runs it
                os.kill(proc.pid, signal.SIGKILL)
                t0 = time.monotonic()
                with pytest.raises(BackendLostError):
                    await fut
                assert time.monotonic() - t0 < 20
                # a backend restarted on the same port is used again by itself
                procs.append(_start_cli_backend(tmp_path, port)[0])
                assert await fe.work("add", 2, 2) == 4
                assert fe.backends_status()[f"tcp://127.0.0.1:{port}"]["connects"] == 2

        run(main())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_an_async_front_end_belongs_to_one_loop(backends):
    (b,) = backends()
    fe = AsyncFrontEnd([addr(b)])

    async def use():
        return await fe.work("add", 1, 1)

    assert asyncio.run(use()) == 2
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(use())
    fe.close()


@pytest.mark.skipif(not __import__("zmq").has("curve"), reason="libzmq without CURVE")
def test_curve_encryption(backends):
    import zmq

    public, secret = zmq.curve_keypair()
    (b,) = backends(curve_secretkey=secret, curve_publickey=public)

    async def main():
        async with AsyncFrontEnd([addr(b)], curve_serverkey=public) as fe:
            assert await fe.work("add", 20, 22) == 42
        wrong_public, _ = zmq.curve_keypair()
        async with AsyncFrontEnd([addr(b)], curve_serverkey=wrong_public, connect_timeout=1) as fe:
            with pytest.raises(BackendNotAvailableError):  # the handshake never succeeds
                await fe.work("add", 1, 1)

    run(main())


def test_the_taskit_logger_hears_connection_events_as_in_frontend(backends):
    # AsyncFrontEnd had no logger, and its monitor handling was its own copy: now the
    # connection events of both faces come from taskit._client.connection.
    (b,) = backends()
    heard = []

    async def main():
        async with AsyncFrontEnd([addr(b)], logger=lambda imp, msg: heard.append(msg)) as fe:
            assert await fe.work("add", 1, 2) == 3
            for _ in range(200):  # bounded: the monitor's UP event may follow the reply
                if any("is up" in m for m in heard):
                    break
                await asyncio.sleep(0.05)
            await fe.send_stop(addr(b))
            for _ in range(200):
                if any("disconnected" in m for m in heard):
                    break
                await asyncio.sleep(0.05)

    run(main())
    assert any(f"backend tcp://127.0.0.1:{b.port} is up" in m for m in heard), heard
    assert any(f"backend tcp://127.0.0.1:{b.port} disconnected" in m for m in heard), heard
