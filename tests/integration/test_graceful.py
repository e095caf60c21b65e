"""A graceful stop answers every call that reached the backend: with its result, or
with ``Stopping`` (never ran), so a FrontEnd re-routes it even with ``retries=0``.
Real sockets on 127.0.0.1; the SIGTERM cases stop a backend in a child process."""

from __future__ import annotations

import collections
import itertools
import signal
import threading
import time

import pytest

from taskit import protocol
from taskit.codecs import MsgpackCodec
from taskit.frontend import FrontEnd
from taskit.protocol import Kind

from ..conftest import free_port
from ._backend_helpers import ChildScript, RawClient


def add(a, b):
    return a + b


def _outcomes(futures, timeout: float) -> collections.Counter:
    """How every future ended: 'ok' or the exception's class name (bounded wait)."""
    deadline = time.monotonic() + timeout
    counts: collections.Counter = collections.Counter()
    for f in futures:
        exc = f.exception(max(0.0, deadline - time.monotonic()))
        counts["ok" if exc is None else type(exc).__name__] += 1
    return counts


def test_stop_mid_burst_answers_every_call(serve):
    """One backend, 5,000 pipelined submits, stop_server() from inside the 1,000th call:
    every call ends with its result or a never-ran error, none with BackendLostError."""
    seen = itertools.count(1)  # next() is atomic: the tasks run on 4 threads

    def counted(backend, a, b):
        if next(seen) == 1000:
            backend.stop_server(wait=False)
        return a + b

    b = serve({"add": (counted, True)}, workers=4)
    with FrontEnd([b.endpoint], codec=MsgpackCodec, retries=0, connect_timeout=1.0) as fe:
        futures = [fe.submit("add", i, 1) for i in range(5000)]
        counts = _outcomes(futures, 60)
    assert b.join(30)
    assert counts["BackendLostError"] == 0, counts
    assert set(counts) <= {"ok", "StoppingError", "BackendNotAvailableError"}, counts
    assert counts["ok"] >= 1000 and sum(counts.values()) == 5000
    stats = b.stats()
    assert stats["done"] == counts["ok"]  # what ran was answered with its result


def test_stop_answers_calls_queued_behind_the_last_accepted_one(serve):
    """Calls that reach a stopping backend around the time its last accepted call
    finishes get ``Stopping``, not silence (a raw client: what the wire promises)."""
    gate = threading.Event()
    b = serve({"wait": lambda: gate.wait(30), "add": add}, workers=2)
    c = RawClient(b.endpoint)
    try:
        first = c.send("wait")
        assert c.call("<status>") == "1"  # accepted and running
        b.stop_server(wait=False)
        gate.set()  # the last accepted call ends while these are on their way
        later = [c.send("add", n, 1) for n in range(200)]
        replies = {}
        for _ in range(201):
            kind, _codec, call_id, value = c.recv(10)
            replies[call_id] = (kind, value)
        assert replies[first] == (Kind.RESULT, True)
        assert [n[0] for n in c.notices] == ["Stopping"]  # told once, with call id 0
        for call_id in later:
            kind, value = replies[call_id]
            assert kind == Kind.ERROR and value[0] == "Stopping", value
        assert b.join(30)
    finally:
        gate.set()
        c.close()


def test_stop_tells_idle_clients(serve):
    """A client that has no call in flight hears that the backend stops (an ERROR
    ``Stopping`` with call id 0), so its FrontEnd routes nothing more there."""
    gate = threading.Event()
    b = serve({"wait": lambda: gate.wait(30), "add": add}, workers=2)
    busy, idle = RawClient(b.endpoint), RawClient(b.endpoint)
    try:
        assert idle.call("add", 1, 2) == 3
        busy.send("wait")
        assert busy.call("<status>") == "1"
        b.stop_server(wait=False)
        with pytest.raises(TimeoutError):  # no reply: the notice is not one
            idle.recv(0.5)
        assert [n[0] for n in idle.notices] == ["Stopping"]
        gate.set()
        assert b.join(30)
    finally:
        gate.set()
        busy.close()
        idle.close()


def test_stopped_is_the_last_word_of_a_graceful_stop(serve):
    """After answering every call it read, a stopping backend says ``Stopped`` (call id
    0) and reads no more: a FrontEnd then re-sends what is still unanswered there,
    which never ran, instead of failing it as lost when the connection drops."""
    gate = threading.Event()
    b = serve({"wait": lambda: gate.wait(30)}, workers=2)
    client = RawClient(b.endpoint)
    try:
        cid = client.send("wait")
        assert client.call("<status>") == "1"
        b.stop_server(wait=False)
        gate.set()
        assert client.recv()[2] == cid  # the accepted call is answered first
        assert b.join(30)
        with pytest.raises(TimeoutError):  # notices only from here on
            client.recv(1.0)
        assert [n[0] for n in client.notices] == ["Stopping", "Stopped"]
    finally:
        gate.set()
        client.close()


@pytest.mark.parametrize("kind", ["ping", "call"])
def test_stop_is_bounded_while_a_client_keeps_sending(serve, kind):
    """PINGs do not hold a stop open at all; CALLs from a client that ignores
    ``Stopping`` hold it for at most 10 x end_resp (4 s here)."""
    b = serve({"add": add}, end_resp=0.4)
    c = RawClient(b.endpoint)
    try:
        assert c.call("add", 1, 1) == 2
        b.stop_server(wait=False)
        start = time.monotonic()
        while not b.join(0.02):  # one message every 20 ms
            assert time.monotonic() - start < 10
            if kind == "ping":
                c.send_frame(protocol.pack_one(Kind.PING, 2, 0xFFFF))
            else:
                c.send("add", 1, 1)
        took = time.monotonic() - start
    finally:
        c.close()
    if kind == "ping":
        assert took < 2.0  # quiet after 0.2 s without a CALL, far from the cap
    else:
        assert took < 8.0  # the cap, then closing (a loaded machine may send slower)


def test_frontend_stops_routing_to_a_backend_that_said_it_stops(serve):
    """An idle FrontEnd hears the notice and sends its next calls elsewhere."""
    gate = threading.Event()
    tasks = {"wait": lambda: gate.wait(30), "add": add}
    a, b = serve(tasks, workers=2), serve(tasks, workers=2)
    holder = RawClient(a.endpoint)  # keeps a stopping (not closed) while the test looks
    try:
        with FrontEnd([a.endpoint, b.endpoint], codec=MsgpackCodec, connect_timeout=5) as fe:
            for x in (a, b):  # both have seen this FrontEnd
                assert fe.send_signal(x.endpoint, "<status>") == "0"
            holder.send("wait")
            assert holder.call("<status>") == "1"
            a.stop_server(wait=False)
            deadline = time.monotonic() + 10
            while fe.backends_status()[a.endpoint]["state"] != "stopping":
                assert time.monotonic() < deadline, fe.backends_status()
                time.sleep(0.01)
            assert [fe.work("add", n, 1) for n in range(20)] == [n + 1 for n in range(20)]
            assert b.stats()["done"] == 20
            assert a.stats()["refused"].get("Stopping", 0) == 0  # nothing was sent there
            gate.set()
            assert a.join(30)
    finally:
        gate.set()
        holder.close()


# --- rolling restart under load, SIGTERM to a backend in a child process -------------------

SERVER = r"""
import sys
from taskit.backend import BackEnd
def add(a, b):
    return a + b
def note(level, msg):
    if msg.startswith("Serving on"):  # once bound; nothing more (nobody reads the pipe)
        print(msg, flush=True)
BackEnd({"add": add}, port=int(sys.argv[1]), workers=4, logger=note).main()
"""


class Child(ChildScript):
    """A backend serving "add" in a child process (``main()``: SIGTERM stops it
    gracefully); stop() always ends it, by pid."""

    def __init__(self, port: int) -> None:
        super().__init__(SERVER, str(port), stdin_eof_stops=False)
        if not self.ready.startswith(b"Serving on"):
            self.stop()
            raise AssertionError(f"backend on port {port} did not start: {self.ready!r}")

    def sigterm(self, timeout: float = 30) -> int:
        """Stop it gracefully; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def children():
    made: list[Child] = []

    def make(port: int) -> Child:
        c = Child(port)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def test_rolling_restart_under_load_loses_nothing(serve, children):
    """Two backends under steady load, ``retries=0``; one is stopped by SIGTERM and
    restarted on its port, twice: no call fails, none is lost."""
    port = free_port()
    first = children(port)
    other = serve({"add": add}, workers=4)
    ep = f"tcp://127.0.0.1:{port}"
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with FrontEnd([ep, other.endpoint], codec=MsgpackCodec, retries=0, connect_timeout=10) as fe:
        assert fe.send_signal(ep, "<status>") == "0"

        def load() -> None:
            while not stop.is_set():
                futures = [fe.submit("add", i, 1) for i in range(200)]
                for f in futures:
                    exc = f.exception(60)
                    with lock:
                        counts["ok" if exc is None else type(exc).__name__] += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            child = first
            for _ in range(2):
                _wait_answered(fe, ep, 500)  # the load reaches this backend
                assert child.sigterm() == 0
                child = children(port)
                assert fe.send_signal(ep, "<status>").isdigit()  # the new one answers
            _wait_answered(fe, ep, 500)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert set(counts) == {"ok"} and counts["ok"] > 1000, counts


def _wait_answered(fe: FrontEnd, ep: str, n: int, timeout: float = 30) -> None:
    """Until ``n`` more calls were answered by ``ep`` (bounded)."""
    start = fe.backends_status()[ep]["answered"]
    deadline = time.monotonic() + timeout
    while fe.backends_status()[ep]["answered"] < start + n:
        assert time.monotonic() < deadline, fe.backends_status()
        time.sleep(0.01)


def test_sigterm_mid_burst_single_backend(children):
    """SIGTERM to the only backend while 10,000 calls are being submitted: each ends
    with its result or a never-ran error, none with BackendLostError."""
    port = free_port()
    child = children(port)
    ep = f"tcp://127.0.0.1:{port}"
    futures: list = []
    with FrontEnd([ep], codec=MsgpackCodec, retries=0, connect_timeout=1.0) as fe:
        assert fe.send_signal(ep, "<status>") == "0"

        def burst() -> None:
            for i in range(10_000):
                futures.append(fe.submit("add", i, 1))

        submitter = threading.Thread(target=burst, daemon=True)
        submitter.start()
        deadline = time.monotonic() + 30
        while len(futures) <= 1000:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        futures[1000].result(30)
        child.proc.send_signal(signal.SIGTERM)
        submitter.join(60)
        assert not submitter.is_alive()
        counts = _outcomes(futures, 60)
        assert child.proc.wait(30) == 0
    assert counts["BackendLostError"] == 0, counts
    assert set(counts) <= {"ok", "StoppingError", "BackendNotAvailableError"}, counts
    assert counts["ok"] > 1000 and sum(counts.values()) == 10_000
