"""FrontEnd against real BackEnds over real ZeroMQ sockets on 127.0.0.1 (backends
in threads of this process; tests/integration/test_reliability.py uses child
processes)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, wait

import pytest
import zmq

from taskit import protocol
from taskit.backend import ADMIN_TASKS
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec
from taskit.errors import (
    AuthenticationError,
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    BusyError,
    CallTimeoutError,
    CodecNotAllowedError,
    EncodeError,
    FrontEndClosedError,
    MessageTooLargeError,
    UnknownTaskError,
)
from taskit.frontend import FrontEnd
from taskit.protocol import STATUS, Kind

from ..conftest import free_port


def add(a, b):
    return a + b


def fail(msg):
    raise ValueError(msg, 42)


def echo(x):
    return x


def nap(seconds, value=None):
    time.sleep(seconds)
    return value


def a_set():
    return {1, 2}


TASKS = {"add": add, "fail": fail, "echo": echo, "nap": nap, "a_set": a_set}


@pytest.fixture
def backends(serve):
    """A factory of started BackEnds (threads) serving TASKS by default; all are
    closed at the end (by conftest's ``serve``)."""

    def make(tasks=None, **kw):
        kw.setdefault("host", "127.0.0.1")
        kw.setdefault("codecs", ["json", "msgpack"])
        return serve(dict(tasks or TASKS), **kw)

    return make


def test_work_submit_map_call(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint])
    assert fe.work("add", 1, 2) == 3
    assert fe.call("add", (2,), {"b": 5}) == 7
    assert fe.submit("add", 3, 4).result(10) == 7
    assert list(fe.map("add", range(100), range(100))) == [2 * i for i in range(100)]
    assert list(fe.map("add", [], [])) == []
    # call() keeps per-call options apart from the task's own keyword arguments
    assert fe.call("nap", (0,), {"value": "timeout"}, timeout=5) == "timeout"
    assert fe.task_count == 0


def test_backend_forms(backends, frontends):
    be = backends()
    for spec in (be.endpoint, ("127.0.0.1", be.port), f"127.0.0.1:{be.port}"):
        fe = frontends([spec])
        assert fe.work("add", 1, 1) == 2
    fe = frontends("127.0.0.1", default_port=be.port)  # a lone host string, 4.0 style
    assert fe.work("add", 2, 2) == 4


def test_ipc_endpoint(tmp_path, backends, frontends):
    endpoint = f"ipc://{tmp_path}/be.sock"
    backends(endpoint=endpoint)
    fe = frontends([endpoint])
    assert fe.work("add", "a", "b") == "ab"
    assert fe.backends_status()[endpoint]["state"] == "up"


def test_remote_error_fields(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint])
    with pytest.raises(BackendProcessingError) as info:
        fe.work("fail", "boom")
    e = info.value
    assert type(e) is BackendProcessingError
    assert e.type == "ValueError" and e.args == ("boom", 42)
    assert e.task == "fail" and e.backend == be.endpoint
    assert "Traceback" in e.remote_traceback and "fail" in e.remote_traceback
    assert "boom" in str(e) and "Traceback" in str(e)
    with pytest.raises(UnknownTaskError) as info:
        fe.work("no-such-task")
    assert info.value.type == "UnknownTask" and isinstance(info.value, BackendProcessingError)
    assert fe.work("add", 1, 1) == 2  # still serving


@pytest.mark.parametrize(
    "codec, values",
    [
        (JSONCodec, [None, True, 7, -2.5, "ünïcode", [1, [2, "x"]], {"a": [1, None]}, 2**62]),
        (MsgpackCodec, [None, False, 2**63, 1.5, "s", b"\x00\xffbytes", {1: "int keys"}, [b"x"]]),
    ],
)
def test_codec_round_trips(codec, values, backends, frontends):
    be = backends()
    fe = frontends([be.endpoint], codec=codec)
    for v in values:
        assert fe.work("echo", v) == v
    assert fe.work("echo", (1, 2)) == [1, 2]  # tuples come back as lists (documented)


def test_oversized_calls_and_results_are_refused_and_lose_nothing(backends, frontends):
    """A message over the limit would make ZeroMQ drop the whole connection (every
    call in flight on it): the FrontEnd refuses such a call before sending it, the
    BackEnd answers an oversized result with an EncodeError."""
    gate = threading.Event()
    be = backends(
        {**TASKS, "held": lambda: gate.wait(30), "blob": lambda n: b"z" * n},
        max_message_size=64 * 1024,
    )
    fe = frontends([be.endpoint], codec=MsgpackCodec, max_message_size=64 * 1024)
    held = fe.submit("held")  # in flight on the same connection throughout
    with pytest.raises(MessageTooLargeError, match="max_message_size") as info:
        fe.work("echo", b"x" * (100 * 1024))
    assert isinstance(info.value, EncodeError)  # refused like any unsendable argument
    with pytest.raises(BackendProcessingError, match="max_message_size") as remote:
        fe.work("blob", 100 * 1024)
    assert remote.value.type == "EncodeError"
    assert fe.work("blob", 1000) == b"z" * 1000
    gate.set()
    assert held.result(10) is True  # nothing in flight was lost
    stats = be.stats()
    assert stats["dropped"]["malformed"] == 0 and stats["in_flight"] == 0
    unlimited = frontends([be.endpoint], codec=MsgpackCodec, max_message_size=None)
    assert unlimited.work("echo", b"y" * 1000) == b"y" * 1000


def test_codecs_refuse_clearly(backends, frontends):
    be = backends()
    fe_json = frontends([be.endpoint])
    with pytest.raises(EncodeError, match="bytes"):
        fe_json.work("echo", b"raw")
    with pytest.raises(EncodeError):
        fe_json.work("echo", {1, 2})
    fe_mp = frontends([be.endpoint], codec=MsgpackCodec)
    with pytest.raises(EncodeError, match="64 bits"):
        fe_mp.work("echo", 9**9999)
    # the backend cannot encode a result: a clear remote EncodeError, backend keeps serving
    with pytest.raises(BackendProcessingError) as info:
        fe_json.work("a_set")  # JSON cannot carry the set the task returns
    assert info.value.type == "EncodeError"
    assert fe_json.work("add", 1, 2) == 3


def test_json_carries_no_nan_or_infinity_either_way(backends, frontends, client):
    """RFC 8259 has no NaN or Infinity (doc/protocol.md promises it): refused when
    encoding, on either side, and when decoding; msgpack carries them."""
    be = backends({**TASKS, "nan": lambda: float("nan"), "inf": lambda: [-math.inf]})
    fe = frontends([be.endpoint])  # JSON
    with pytest.raises(EncodeError, match="NaN or Infinity"):
        fe.work("echo", math.inf)
    for task in ("nan", "inf"):
        with pytest.raises(BackendProcessingError, match="NaN or Infinity") as info:
            fe.work(task)
        assert info.value.type == "EncodeError"
    raw = client(be)  # a call whose body spells NaN (another client's encoder)
    raw.send_raw([protocol.pack_one(Kind.CALL, JSONCodec.wire_id, 7, 0, 0, b'["echo",[NaN],{}]')])
    kind, _codec, call_id, value = raw.recv()
    assert (kind, call_id, value[0]) == (Kind.ERROR, 7, "DecodeError")
    assert fe.work("add", 1, 2) == 3
    assert math.isnan(frontends([be.endpoint], codec=MsgpackCodec).work("nan"))


def test_pickle_gated_and_round_trips(backends, frontends):
    plain = backends()
    fe = frontends([plain.endpoint], codec=PickleCodec)
    with pytest.raises(CodecNotAllowedError):
        fe.work("echo", {1, 2})
    keyed = backends(key=b"secret", codecs=["json", "msgpack", "pickle"])
    fe = frontends([keyed.endpoint], codec=PickleCodec, key=b"secret")
    assert fe.work("echo", {1, 2}) == {1, 2}
    assert fe.work("echo", (1, b"x")) == (1, b"x")


def test_signed_calls_and_wrong_key(backends, frontends):
    be = backends(key="k1")
    assert frontends([be.endpoint], key="k1").work("add", 1, 2) == 3
    # a wrong key: the backend refuses our calls unread, and says so
    fe = frontends([be.endpoint], key="k2", timeout=5)
    with pytest.raises(AuthenticationError, match="keys differ"):
        fe.work("add", 1, 2)
    # a keyless backend refuses signed calls the same way
    unkeyed = backends()
    fe = frontends([unkeyed.endpoint], key="k1", timeout=5)
    with pytest.raises(AuthenticationError, match="the backend has none"):
        fe.work("add", 1, 2)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_curve_encryption(backends, frontends):
    server_public, server_secret = zmq.curve_keypair()
    be = backends(curve_secretkey=server_secret, curve_publickey=server_public)
    fe = frontends([be.endpoint], curve_serverkey=server_public)
    assert fe.work("add", 20, 22) == 42
    # the wrong server key: the handshake fails, the backend is never "up"
    fe_bad = frontends([be.endpoint], curve_serverkey=zmq.curve_keypair()[0], connect_timeout=0.5)
    with pytest.raises(BackendNotAvailableError):
        fe_bad.work("add", 1, 2)


def test_timeout_is_a_timeouterror(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint], timeout=0.2)
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        fe.work("nap", 5)
    assert time.monotonic() - t < 3
    with pytest.raises(CallTimeoutError):
        fe.submit("nap", 5).result(10)
    assert fe.call("nap", (0.3, "ok"), timeout=10) == "ok"  # per-call override
    assert fe.work("add", 1, 2) == 3


def test_future_result_waits_at_most_its_timeout(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint])
    fut = fe.submit("nap", 1.0, "late")
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.1)  # this thread drives the sockets meanwhile
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0.1)
    assert time.monotonic() - t < 0.9
    assert fut.result(10) == "late"
    assert fut.cancel() is False  # answered already: nothing to withdraw


def test_callback_and_ignore(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint])
    got: list = []
    done = threading.Event()

    def cb(value):
        got.append(value)
        if len(got) == 2:
            done.set()

    errors: list = []
    err_done = threading.Event()

    def error_cb(exc):
        errors.append(exc)
        err_done.set()

    fe.callback("add", cb, error_cb, 1, 2)
    fe.callback("add", cb, None, 3, b=4)
    fe.callback("fail", cb, error_cb, "bad")
    assert done.wait(10) and err_done.wait(10)
    assert sorted(got) == [3, 7]
    assert isinstance(errors[0], BackendProcessingError) and errors[0].args[0] == "bad"
    # a callback may call the FrontEnd again
    inner = Future()
    fe.callback("add", lambda v: inner.set_result(fe.work("add", v, 1)), False, 1, 1)
    assert inner.result(10) == 3
    assert fe.ignore("add", 1, 1).result(10) == 2


def test_callback_other_errors_are_logged_not_given_to_error_cb(frontends, caplog):
    fe = frontends([("127.0.0.1", free_port())], connect_timeout=0.3)
    errors: list = []
    with caplog.at_level(logging.ERROR, logger="taskit.frontend"):
        fut = fe.callback("add", lambda v: None, errors.append, 1, 2)
        assert isinstance(fut.exception(10), BackendNotAvailableError)
        deadline = time.monotonic() + 5
        while "BackendNotAvailableError" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert errors == [] and "BackendNotAvailableError" in caplog.text


def test_two_backends_share_load(backends, frontends):
    a = backends({"who": lambda: "a"})
    b = backends({"who": lambda: "b"})
    fe = frontends([a.endpoint, b.endpoint])
    for be in (a, b):  # a pinned signal waits until that backend is connected
        assert fe.get_tasks(be.endpoint) == "0"
    sync = [fe.work("who") for _ in range(40)]
    # idle backends of the same speed share sequential calls: neither is shunned
    assert min(sync.count("a"), sync.count("b")) >= 5
    many = [f.result(10) for f in [fe.submit("who") for _ in range(400)]]
    assert 60 <= many.count("a") <= 340, many.count("a")  # both take a share
    status = fe.backends_status()
    assert status[a.endpoint]["answered"] + status[b.endpoint]["answered"] == 442  # + 2 signals


def test_one_backend_down_calls_go_to_other(backends, frontends):
    a = backends({"who": lambda: "a"})
    dead = ("127.0.0.1", free_port())
    fe = frontends([dead, a.endpoint], connect_timeout=1.0)
    assert [fe.work("who") for _ in range(10)] == ["a"] * 10
    assert fe.backends_status()[a.endpoint]["answered"] == 10


def test_all_down_bounded(frontends):
    fe = frontends([("127.0.0.1", free_port()), ("127.0.0.1", free_port())], connect_timeout=0.5)
    t = time.monotonic()
    with pytest.raises(BackendNotAvailableError, match="reachable"):
        fe.work("add", 1, 2)
    assert time.monotonic() - t < 3
    assert {s["state"] for s in fe.backends_status().values()} <= {"down", "connecting"}
    fe_none = frontends([], connect_timeout=0.1)
    with pytest.raises(BackendNotAvailableError, match="add_backends"):
        fe_none.work("add", 1, 2)


def test_add_backends_later(backends, frontends):
    fe = frontends([], connect_timeout=2)
    be = backends()
    fe.add_backends(be.endpoint)
    assert fe.work("add", 1, 2) == 3
    fe.add_backends(be.endpoint)  # already known: no second connection
    assert list(fe.backends_status()) == [be.endpoint]


def test_admin_signals(backends, frontends):
    tasks = dict(TASKS)
    tasks.update(ADMIN_TASKS)
    be = backends(tasks)
    fe = frontends([be.endpoint])
    assert fe.get_tasks(be.endpoint) == "0"
    assert fe.send_signal(be.endpoint, STATUS) == "0"
    assert set(fe.tasks(be.endpoint)) >= {"add", "echo"}
    uptime = fe.stats(be.endpoint)["uptime"]
    assert isinstance(uptime, (int, float)) and 0 <= uptime < 3600
    with pytest.raises(ValueError, match="No such backend!"):
        fe.send_signal(("127.0.0.1", 1), STATUS)
    with pytest.raises(ValueError, match="No such backend!"):
        fe.get_tasks("not a backend ::")
    slow = fe.submit("nap", 0.5, "finished")
    fe.send_stop(be.endpoint)  # graceful: the accepted call is still answered
    assert slow.result(10) == "finished"
    assert be.join(10)


def test_get_tasks_down_quickly(frontends):
    port = free_port()
    fe = frontends([("127.0.0.1", port)], connect_timeout=0.5)
    t = time.monotonic()
    assert fe.get_tasks(("127.0.0.1", port)) == "down"
    assert time.monotonic() - t < 2


def test_32_threads_x_500_calls(backends, frontends):
    be = backends(workers=8)
    fe = frontends([be.endpoint], codec=MsgpackCodec)
    wrong: list = []

    def worker(k):
        for i in range(500):
            r = fe.work("add", k * 1000, i)
            if r != k * 1000 + i:
                wrong.append((k, i, r))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []
    assert fe.backends_status()[be.endpoint]["answered"] == 32 * 500


def test_busy_backpressure(backends, frontends):
    be = backends(workers=1, max_pending=2)
    fe = frontends([be.endpoint])
    futures = [fe.submit("nap", 0.005, i) for i in range(20)]
    assert [f.result(30) for f in futures] == list(range(20))
    assert fe.backends_status()[be.endpoint]["busy"] > 0
    # without re-sends, Busy reaches the caller as BusyError
    fe0 = frontends([be.endpoint], busy_retries=0)
    futures = [fe0.submit("nap", 0.02, i) for i in range(10)]
    wait(futures, 30)
    errors = [f.exception() for f in futures if f.exception() is not None]
    assert errors and all(isinstance(e, BusyError) and e.type == "Busy" for e in errors)


def test_default_max_pending_takes_a_20000_call_burst_without_busy(backends, frontends):
    """The default bound is finite, yet one client pipelining 20,000 calls of a task
    that cannot finish yet is never answered Busy (bench/rpc.py's burst size)."""
    gate = threading.Event()
    be = backends({"held": lambda n: gate.wait(60) and n})
    # credit for all of them at once (the default keeps most in the client)
    fe = frontends([be.endpoint], codec=MsgpackCodec, prefetch=20_000)
    try:
        futures = [fe.submit("held", n) for n in range(20_000)]
        deadline = time.monotonic() + 60
        while be.task_count < 20_000:
            assert time.monotonic() < deadline, be.task_count
            time.sleep(0.01)
        assert be.stats()["refused"] == {}
    finally:
        gate.set()
    assert [f.result(60) for f in futures] == list(range(20_000))


def test_map_keeps_order_and_raises_in_place(backends, frontends):
    a = backends()
    b = backends()
    fe = frontends([a.endpoint, b.endpoint], codec=MsgpackCodec)
    n = 3000
    assert list(fe.map("add", range(n), range(n), progress=True)) == [2 * i for i in range(n)]
    it = fe.map("echo", [1, 2, b"x"])  # the third cannot be encoded (JSON? no: msgpack can)
    assert list(it) == [1, 2, b"x"]
    results = fe.map("nap", [0, 0, 0], [1, 2, 3])
    assert next(results) == 1
    results.close()  # abandoned: the rest is forgotten, nothing hangs
    with pytest.raises(BackendProcessingError):
        list(fe.map("fail", ["x"]))


def test_close_fails_pending_and_refuses_new(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint])
    slow = fe.submit("nap", 2)
    fe.close()
    with pytest.raises(FrontEndClosedError):
        slow.result(5)
    with pytest.raises(FrontEndClosedError):
        fe.work("add", 1, 2)
    fe.close()  # idempotent
    with FrontEnd([be.endpoint]) as fe2:
        assert fe2.work("add", 1, 2) == 3


def test_backends_status_tracks_states(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint])
    assert fe.work("add", 1, 1) == 2
    st = fe.backends_status()[be.endpoint]
    assert st["state"] == "up" and st["connects"] == 1 and st["in_flight"] == 0
    be.terminate_server()
    be.close(timeout=5)
    deadline = time.monotonic() + 10
    while fe.backends_status()[be.endpoint]["state"] != "down" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fe.backends_status()[be.endpoint]["state"] == "down"


def test_lost_call_on_backend_terminate(backends, frontends):
    started = threading.Event()

    def nap_started(seconds):
        started.set()
        time.sleep(seconds)  # simulated work, cut short by the terminate

    be = backends({"nap": nap_started})
    fe = frontends([be.endpoint], connect_timeout=0.5)
    fut = fe.submit("nap", 5)
    assert started.wait(10)  # the call is running in the backend
    be.terminate_server()
    with pytest.raises(BackendLostError):
        fut.result(10)


def test_process_pool_backend(backends, frontends):
    be = backends({"pid": os.getpid}, pool="process", workers=2)
    fe = frontends([be.endpoint])
    pids = {fe.work("pid") for _ in range(4)}
    assert os.getpid() not in pids


def test_bad_backend_spec_is_a_valueerror():
    with pytest.raises(ValueError, match="a backend is"):
        FrontEnd([("127.0.0.1", "not a port")])
    with pytest.raises(ValueError):
        FrontEnd(["tcp://no-port"])


def test_large_payloads_round_trip(backends, frontends):
    be = backends()
    fe = frontends([be.endpoint], codec=MsgpackCodec)
    payload = os.urandom(3 * 1024 * 1024)  # sent and received without a copy
    assert fe.work("echo", payload) == payload
    futures = [fe.submit("echo", payload[i:]) for i in range(0, 400_000, 100_000)]
    assert [f.result(30) for f in futures] == [payload[i:] for i in range(0, 400_000, 100_000)]
    fe_json = frontends([be.endpoint])  # a JSON body above the zero-copy size
    assert fe_json.work("echo", "x" * 200_000) == "x" * 200_000


def test_submitted_futures_behave_as_futures_with_or_without_a_waiter(backends, frontends):
    # A CallFuture makes its Condition only when a thread waits on it, adds a
    # callback or looks under its lock; resolved before that, it is settled without
    # one. Either way it must behave as any Future: wait(), callbacks, exceptions.
    from taskit._client.threaded import CallFuture
    from taskit._wire import FUTURE_FIELDS

    be = backends()
    fe = frontends([be.endpoint])
    futs = [fe.submit("add", i, 1) for i in range(200)]
    assert isinstance(futs[0], CallFuture)
    assert set(FUTURE_FIELDS) - {"_condition"} <= set(vars(futs[0]))
    done, not_done = wait(futs, timeout=10)  # made the Conditions of those still out
    assert not not_done and [f.result(0) for f in futs] == [i + 1 for i in range(200)]
    late = fe.submit("fail", "no")
    assert isinstance(late.exception(10), BackendProcessingError)
    with pytest.raises(BackendProcessingError):
        late.result(0)
    # settled without a Condition (nobody waited): done, result, callbacks still work
    settled = fe.submit("add", 2, 2)
    assert fe.work("nap", 0.05, 1) == 1  # this call's drive resolves it too
    deadline = time.monotonic() + 10
    while not settled.done() and time.monotonic() < deadline:
        fe.work("add", 0, 0)
    assert settled.done() and "_condition" not in vars(settled)
    seen: list = []
    settled.add_done_callback(seen.append)
    assert seen == [settled] and settled.result() == 4 and settled.exception() is None
    assert not settled.cancel() and not settled.cancelled()


def test_threads_waiting_on_one_future_all_wake(backends, frontends):
    # several threads make (or share) the Condition while the reply is on its way
    be = backends()
    fe = frontends([be.endpoint])
    for _ in range(20):
        fut = fe.submit("nap", 0.02, "v")
        got: list = []

        def wait_for(fut=fut, got=got):
            got.append(fut.result(10))

        threads = [threading.Thread(target=wait_for) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert got == ["v"] * 4
