"""BackEnd over real ZeroMQ sockets, driven by a raw DEALER speaking taskit.protocol."""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from taskit import protocol
from taskit._server import accounting
from taskit.backend import ADMIN_TASKS, BackEnd
from taskit.codecs import JSONCodec, MsgpackCodec
from taskit.errors import BackendBindError
from taskit.protocol import Kind
from tests.integration._backend_helpers import RawClient, RemoteError

ROOT = Path(__file__).resolve().parents[2]


def add(a, b):
    return a + b


def fail(*args):
    raise ValueError(*args)


TASKS = {"add": add, "fail": fail, "echo": lambda x: x}


# --- calls and replies ------------------------------------------------------------------


@pytest.mark.parametrize("codec", [JSONCodec, MsgpackCodec])
def test_call_is_answered_in_the_request_codec(serve, client, codec):
    b = serve(TASKS)
    c = client(b)
    call_id = c.send("add", 2, 3, codec=codec)
    kind, got_codec, got_id, value = c.recv()
    assert (kind, got_codec, got_id, value) == (Kind.RESULT, codec, call_id, 5)
    assert c.call("echo", {"a": [1, None, "x"]}, codec=codec) == {"a": [1, None, "x"]}
    assert c.call("add", "a", "b", codec=codec) == "ab"


def test_kwargs_reach_the_task(serve, client):
    b = serve({"kw": lambda a, b=0, *, c=0: [a, b, c]})
    assert client(b).call("kw", 1, kwargs={"c": 3, "b": 2}) == [1, 2, 3]


def test_pipelined_calls_are_matched_by_id(serve, client):
    gate = threading.Event()

    def slow(x):
        gate.wait(10)
        return x

    b = serve({"slow": slow, "fast": lambda x: x}, workers=4)
    c = client(b)
    slow_id = c.send("slow", "s")
    fast_ids = {c.send("fast", i): i for i in range(20)}
    assert c.results(20) == fast_ids  # the fast ones overtake the blocked one
    gate.set()
    assert c.recv()[2:] == (slow_id, "s")


def test_task_errors_carry_type_args_and_traceback(serve, client):
    b = serve(TASKS)
    c = client(b)
    with pytest.raises(RemoteError) as e:
        c.call("fail", "bad", 3)
    assert e.value.type == "ValueError"
    assert e.value.remote_args == ["bad", 3]
    assert "Traceback" in e.value.tb and "in fail" in e.value.tb
    assert c.call("add", 1, 1) == 2  # still serving


def test_tracebacks_false_sends_none(serve, client):
    b = serve(TASKS, tracebacks=False)
    with pytest.raises(RemoteError) as e:
        client(b).call("fail", "x")
    assert e.value.type == "ValueError" and e.value.tb == ""


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_base_exceptions_from_tasks_become_errors(serve, client, exc):
    def raiser():
        raise exc

    b = serve({"raise": raiser, "add": add})
    c = client(b)
    with pytest.raises(RemoteError) as e:
        c.call("raise")
    assert e.value.type == type(exc).__name__
    assert c.call("add", 2, 2) == 4
    assert b.running


def test_unencodable_arguments_of_an_error_fall_back_to_reprs(serve, client):
    class Odd:
        def __repr__(self):
            return "<odd>"

    def raise_odd():
        raise ValueError(Odd())

    b = serve({"odd": raise_odd})
    with pytest.raises(RemoteError) as e:
        client(b).call("odd")
    assert e.value.type == "ValueError" and e.value.remote_args == ["<odd>"]


def test_unencodable_result_is_an_encode_error(serve, client):
    b = serve({"bytes": lambda: b"\x00\x01", "big": lambda: 9**99})
    c = client(b)
    assert c.call("bytes") == b"\x00\x01"  # msgpack carries bytes
    with pytest.raises(RemoteError) as e:
        c.call("bytes", codec=JSONCodec)
    assert e.value.type == "EncodeError" and "bytes" in e.value.remote_args[0]
    with pytest.raises(RemoteError) as e:
        c.call("big")
    assert e.value.type == "EncodeError" and "64 bits" in e.value.remote_args[0]


def test_unknown_task(serve, client):
    b = serve(TASKS)
    with pytest.raises(RemoteError) as e:
        client(b).call("nope")
    assert e.value.type == "UnknownTask" and "nope" in e.value.remote_args[0]


def test_ping_is_answered_with_pong(serve, client):
    b = serve(TASKS)
    c = client(b)
    c.send_frame(protocol.pack_one(Kind.PING, 2, 77))
    assert c.recv()[0:3:2] == (Kind.PONG, 77)


def test_malformed_messages_answered_when_attributable_else_dropped(serve, client):
    b = serve(TASKS)
    c = client(b)
    # attributable: a good preamble and first header, but a body overrunning the frame /
    # an unknown kind / a garbage body / not a call / a reply kind / an unknown codec
    c.send_frame(protocol.pack_one(Kind.CALL, 2, 5, 0, 0, b"abc")[:-1])
    kind, codec, call_id, (type_name, args, _tb) = c.recv()
    assert (kind, codec, call_id, type_name) == (Kind.ERROR, JSONCodec, 5, "ProtocolError")
    c.send_frame(
        protocol.pack_items([(Kind.CALL, 2, 6, 0, 0, b"\x90")])[:4]
        + bytes([99, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6] + [0] * 12)
    )
    kind, codec, call_id, (type_name, args, _tb) = c.recv()
    assert (call_id, type_name, args) == (6, "ProtocolError", ["unknown message kind 99"])
    c.send_frame(protocol.pack_one(Kind.CALL, 2, 7, 0, 0, b"\xc1garbage"))
    assert c.recv()[3][0] == "DecodeError"
    c.send_frame(protocol.pack_one(Kind.CALL, 1, 8, 0, 0, b'{"not": "a call"}'))
    assert c.recv()[3][0] == "ProtocolError"
    c.send_frame(protocol.pack_one(Kind.RESULT, 1, 9, 0, 0, b"1"))
    assert c.recv()[3][0] == "ProtocolError"
    c.send_frame(protocol.pack_one(Kind.CALL, 200, 10, 0, 0, b"x"))
    _kind, codec, call_id, (type_name, _args, _tb) = c.recv()
    assert (codec, call_id, type_name) == (JSONCodec, 10, "CodecNotAllowed")
    # unattributable: no preamble, a short header, several frames (not v1) -> dropped
    c.send_frame(b"GET / HTTP/1.0\r\n\r\n" + bytes(20))
    c.send_frame(protocol.PREAMBLE + b"\x00short")
    c.send_raw([b"HTTP", b"GET / HTTP/1.0", b""])
    c.send_raw([protocol.pack_one(Kind.CALL, 2, 11, 0, 0, b"x"), b"extra"])
    assert c.silent()
    assert c.call("add", 1, 2) == 3
    dropped = c.call("<stats>")["dropped"]
    assert dropped["malformed"] == 4


def test_a_v1_call_is_refused_in_v1_frames_with_a_clear_error(serve, client):
    """A v1 client gets its own frame layout back, saying what to do (upgrade)."""
    import json
    import struct

    b = serve(TASKS)
    c = client(b)
    header = struct.pack(">BBQ", 1, 1, 42)
    c.send_raw([protocol.V1_MAGIC, header, b'["add", [1, 2], {}]'])
    assert c.sock.poll(10_000)
    frames = c.sock.recv_multipart()
    assert frames[0] == protocol.V1_MAGIC and struct.unpack(">BBQ", frames[1]) == (3, 1, 42)
    type_name, args, _tb = json.loads(frames[2])
    assert type_name == "ProtocolError" and "version 2, not 1" in args[0]
    assert "upgrade taskit on the client" in args[0]
    # signed v1 (four frames) too; a v1 PING is dropped (no call to answer)
    c.send_raw([protocol.V1_MAGIC, struct.pack(">BBQ", 1, 1, 43), b"[]", bytes(32)])
    assert c.sock.poll(10_000) and struct.unpack(">BBQ", c.sock.recv_multipart()[1])[2] == 43
    c.send_raw([protocol.V1_MAGIC, struct.pack(">BBQ", 4, 1, 44), b""])
    assert c.silent()
    stats = c.call("<stats>")
    assert stats["refused"]["ProtocolError"] == 2 and stats["dropped"]["malformed"] == 1
    assert stats["done"] == 0  # nothing ran


def test_codec_not_allowed_is_answered_in_json(serve, client):
    b = serve(TASKS, codecs=["msgpack"])
    c = client(b)
    call_id = c.send("add", 1, 2, codec=JSONCodec)
    kind, codec, got_id, (type_name, args, _tb) = c.recv()
    assert (kind, codec, got_id, type_name) == (Kind.ERROR, JSONCodec, call_id, "CodecNotAllowed")
    assert "msgpack" in args[0]
    assert c.call("add", 1, 2) == 3


# --- admin signals -----------------------------------------------------------------------


def test_status_tasks_and_stats_are_always_answered(serve, client):
    b = serve(TASKS)
    c = client(b)
    assert c.call("<status>") == "0"
    assert c.call("<tasks>") == ["add", "echo", "fail"]
    c.call("add", 1, 2)
    with pytest.raises(RemoteError):
        c.call("fail")
    stats = c.call("<stats>", codec=JSONCodec)
    assert stats["done"] == 1 and stats["failed"] == 1 and stats["in_flight"] == 0
    assert stats["tasks"]["add"]["calls"] == 1 and stats["tasks"]["fail"]["failed"] == 1
    assert stats["tasks"]["add"]["mean_latency"] > 0
    assert stats["pool_size"] >= 1 and stats["queue_depth"] == 0 and stats["uptime"] > 0
    assert set(stats["dropped"]) >= {"bad_signature", "malformed"}


def test_stop_and_kill_need_admin_tasks(serve, client):
    b = serve(TASKS)
    c = client(b)
    for sig in ("<stop>", "<kill>"):
        with pytest.raises(RemoteError) as e:
            c.call(sig)
        assert e.value.type == "UnknownTask" and "ADMIN_TASKS" in e.value.remote_args[0]
    assert b.running


def test_admin_signals_work_while_the_pool_is_saturated(serve, client):
    gate, started = threading.Event(), threading.Event()

    def block() -> bool:
        started.set()
        return gate.wait(20)

    tasks = {"block": block, **ADMIN_TASKS}
    b = serve(tasks, workers=1)
    c = client(b)
    ids = [c.send("block") for _ in range(3)]
    # the worker has taken the first one (else, on a busy machine, all 3 are queued)
    assert started.wait(20)
    assert c.call("<status>") == "3"  # 1 running + 2 queued, answered by the I/O thread
    stats = c.call("<stats>")
    assert stats["in_flight"] == 3 and stats["queue_depth"] == 2 and stats["pool_running"] == 1
    assert b.task_count == 3
    gate.set()
    assert sorted(c.recv()[2] for _ in ids) == ids


def test_stop_signal_stops_gracefully(serve, client):
    gate = threading.Event()
    tasks = {"wait": lambda: gate.wait(20) and "done", **ADMIN_TASKS}
    b = serve(tasks)
    c = client(b)
    running = c.send("wait")
    stop_id = c.send("<stop>")
    assert c.recv()[2:] == (stop_id, None)
    with pytest.raises(RemoteError) as e:
        c.call("wait")
    assert e.value.type == "Stopping"
    assert c.call("<status>") == "1"  # still answered while stopping
    assert b.running
    gate.set()
    assert c.recv()[2:] == (running, "done")
    assert b.join(10) and not b.running


def test_kill_signal_ends_at_once(serve, client):
    gate = threading.Event()
    tasks = {"wait": lambda: gate.wait(20), **ADMIN_TASKS}
    b = serve(tasks)
    c = client(b)
    c.send("wait")
    kill_id = c.send("<kill>")
    assert c.recv()[2:] == (kill_id, None)  # the answer is flushed before closing
    assert b.join(10)
    gate.set()


def test_task_count_includes_subtasks_and_pass_backend(serve, client):
    inside = threading.Event()
    gate = threading.Event()

    def helper():
        inside.set()
        gate.wait(20)

    def spawn(backend):
        threading.Thread(target=backend.subtask, args=(helper,)).start()
        return backend.task_count

    b = serve({"spawn": (spawn, True), **ADMIN_TASKS})
    c = client(b)
    assert c.call("spawn") >= 1  # itself, maybe the subtask too
    assert inside.wait(10)
    assert c.call("<status>") == "1"  # the subtask still runs
    # a graceful stop waits for the subtask
    assert b.stop_server(wait=True, timeout=0.2) is False
    gate.set()
    assert b.join(10)


def test_stop_server_from_inside_a_task_does_not_deadlock(serve, client):
    b = serve({"stop": (lambda backend: backend.stop_server(), True)})
    c = client(b)
    assert c.call("stop") is False
    assert b.join(10)


def test_max_pending_answers_busy_at_once(serve, client):
    gate = threading.Event()
    b = serve({"wait": lambda: gate.wait(20), "add": add}, workers=2, max_pending=3)
    c = client(b)
    accepted = [c.send("wait") for _ in range(3)]
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as e:
        c.call("add", 1, 2)
    assert e.value.type == "Busy" and time.monotonic() - t0 < 5
    assert c.call("<stats>")["refused"]["Busy"] == 1
    gate.set()
    assert sorted(c.recv()[2] for _ in accepted) == accepted
    assert c.call("add", 1, 2) == 3


# --- inline running of quick tasks ----------------------------------------------------------


def test_quick_tasks_run_inline_and_a_blocking_one_is_taken_over(serve, client):
    released = threading.Event()
    entered = threading.Event()

    def maybe_wait(block):
        if block:
            entered.set()
            released.wait(20)
        return block

    b = serve({"w": maybe_wait, "release": released.set}, workers=2)
    c, c2 = client(b), client(b)
    for _ in range(40):  # quick runs: "w" qualifies for the I/O thread
        for _ in range(10):  # (a run slowed down by a busy machine restarts the count)
            assert c.call("w", False) is False
        if "w" in c.call("<stats>")["inline_tasks"]:
            break
    assert "w" in c.call("<stats>")["inline_tasks"]
    blocked = c.send("w", True)  # now blocks the thread that reads the socket...
    assert entered.wait(10)
    assert c2.call("release", timeout=10) is None  # ...yet the standby keeps serving
    assert c.recv()[2:] == (blocked, True)
    stats = c.call("<stats>")
    assert stats["takeovers"] == 1 and "w" not in stats["inline_tasks"]
    assert c.call("w", False) is False and b.running


def test_inline_false_always_uses_the_pool(serve, client):
    b = serve({"add": add}, inline=False)
    c = client(b)
    for _ in range(20):
        c.call("add", 1, 2)
    assert c.call("<stats>")["inline_tasks"] == []


def test_inline_and_pool_replies_interleave_without_loss(serve, client):
    """While no call is in a worker's hands the I/O thread waits in a blocking recv
    without the lock; workers' replies must still all reach their callers."""

    def slow(x):
        time.sleep(0.0005)  # simulated work: keeps calls in the pool's hands
        return -x

    b = serve({"add": add, "slow": slow}, workers=4)
    peers = [client(b) for _ in range(4)]
    for _ in range(20):  # "add" qualifies to run inline
        peers[0].call("add", 1, 2)
    assert "add" in peers[0].call("<stats>")["inline_tasks"]
    expected: list[dict[int, int]] = []
    for c in peers:
        ids = {}
        for n in range(300):
            if n % 3 == 0:
                ids[c.send("slow", n)] = -n
            else:
                ids[c.send("add", n, 1)] = n + 1
        expected.append(ids)
    for c, ids in zip(peers, expected, strict=True):
        assert c.results(len(ids)) == ids
    assert b.task_count == 0


def test_task_count_drops_before_the_reply_is_sent(serve, client):
    """A caller that has its reply reads a task_count without its call, whether the
    task ran inline or on the pool (it used to drop just after the send)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: widens the window of the race
    try:
        b = serve({"quick": add, "pooled": add}, inline={"quick"}, workers=2)
        c = client(b)
        late = collections.Counter()
        for n in range(1500):
            for task in ("quick", "pooled"):
                assert c.call(task, n, 1) == n + 1
                if b.task_count:
                    late[task] += 1
    finally:
        sys.setswitchinterval(switch)
    assert not late


def test_calls_of_a_client_gone_are_not_started(serve, client):
    """Once a reply to a client proves its connection closed, its calls still queued
    are not run (its FrontEnd failed them already, e.g. after a freeze)."""
    gate = threading.Event()
    ran = []

    def held(n):
        gate.wait(30)
        ran.append(n)
        time.sleep(0.02)  # simulated work: 50 calls would take 1 s
        return n

    b = serve({"held": held}, workers=1)
    leaving = RawClient(b.endpoint)
    try:
        for n in range(50):
            leaving.send("held", n)
        assert leaving.call("<status>") == "50"
    finally:
        leaving.close()  # linger 0: the connection closes with 50 calls queued
    other = client(b)
    gate.set()
    deadline = time.monotonic() + 30
    while b.task_count:
        assert time.monotonic() < deadline, b.stats()
        assert other.call("<status>")  # keeps the I/O thread (and the ROUTER) busy
    dropped = b.stats()["dropped"]
    assert len(ran) + dropped["client_gone"] == 50
    assert 1 <= len(ran) < 50 and dropped["reply_unroutable"] >= 1


def test_stop_after_sync_calls_is_prompt(serve, client):
    b = serve(TASKS)
    c = client(b)
    for n in range(50):  # the I/O thread now waits in its blocking read
        assert c.call("add", n, 1) == n + 1
    t = time.monotonic()
    assert b.stop_server(timeout=10)
    assert time.monotonic() - t < 2.0  # bounded by the blocking read's timeout, not longer


# --- graceful stop under load --------------------------------------------------------------


def test_graceful_stop_under_load_answers_every_accepted_call(serve):
    gate = threading.Event()

    def sq(x):
        gate.wait(30)
        return x * x

    b = serve({"sq": sq}, workers=4)
    peers = [RawClient(b.endpoint) for _ in range(4)]
    try:
        sent: list[dict[int, int]] = []
        for c in peers:
            ids = {c.send("sq", n): n for n in range(300)}
            # A ROUTER reads each peer in order: once <status> is answered, all 300 are accepted.
            assert c.call("<status>") == str(300 * (len(sent) + 1))
            sent.append(ids)
        assert b.task_count == 1200
        b.stop_server(wait=False)
        for c in peers:  # new calls are refused while the accepted ones wait
            with pytest.raises(RemoteError) as e:
                c.call("sq", 1)
            assert e.value.type == "Stopping"
        assert b.running
        gate.set()
        for c, ids in zip(peers, sent, strict=True):
            assert c.results(len(ids)) == {call_id: n * n for call_id, n in ids.items()}
        assert b.join(30) and not b.running
        assert b.stats()["done"] == 1200 and b.stats()["refused"] == {"Stopping": 4}
    finally:
        gate.set()
        for c in peers:
            c.close()


# --- life cycle and endpoints -------------------------------------------------------------


def test_port_zero_binds_a_free_port(serve, client):
    b = serve(TASKS, port=0)
    assert b.port > 0 and b.endpoint == f"tcp://127.0.0.1:{b.port}"
    assert client(b).call("add", 1, 2) == 3


def test_running_only_once_bound():
    """Another thread that sees ``running`` must see the bound port (it used to turn
    True before the bind: port still 0)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: widens the window of the race
    early = []
    try:
        for _ in range(20):
            b = BackEnd(TASKS, port=0)
            starter = threading.Thread(target=b.start)
            starter.start()
            try:
                while starter.is_alive() and not b.running:
                    pass
                if b.running and b.port == 0:
                    early.append(b.endpoint)
            finally:
                starter.join(10)
                b.close(timeout=10)
    finally:
        sys.setswitchinterval(switch)
    assert early == []


def test_ipc_endpoint(serve, client, tmp_path):
    b = serve(TASKS, endpoint=f"ipc://{tmp_path}/backend.sock")
    assert b.endpoint.startswith("ipc://") and b.port is None
    assert client(b).call("add", 40, 2) == 42


def test_bind_error_is_named(serve, port):
    b = serve(TASKS, port=port)
    with pytest.raises(BackendBindError, match=str(port)):
        BackEnd(TASKS, port=b.port).start()


def test_context_manager_and_port_reuse(client, port):
    with BackEnd(TASKS, port=port) as b:
        assert client(b).call("add", 1, 2) == 3
    assert not b.running
    with BackEnd(TASKS, port=port) as b2:  # the port was released
        assert client(b2).call("add", 2, 2) == 4
    with pytest.raises(RuntimeError, match="already served"):
        b2.start()


def test_terminate_server_returns_at_once(serve, client):
    gate = threading.Event()
    b = serve({"wait": lambda: gate.wait(20)})
    c = client(b)
    c.send("wait")
    t0 = time.monotonic()
    b.terminate_server()
    assert b.join(10) and time.monotonic() - t0 < 5
    gate.set()


def test_close_before_start_is_fine():
    b = BackEnd(TASKS, port=0)
    b.close()
    assert not b.running


def test_add_tasks(serve, client):
    b = serve(TASKS)
    c = client(b)
    b.add_tasks({"mul": lambda a, b: a * b})
    assert c.call("mul", 6, 7) == 42
    with pytest.raises(TypeError, match="'bad'"):
        b.add_tasks({"bad": 3})


def test_logger_receives_events(serve, client):
    events: list[tuple[str, str]] = []
    b = serve(TASKS, logger=lambda level, msg: events.append((level, msg)))
    c = client(b)
    c.call("add", 1, 2)
    with pytest.raises(RemoteError):
        c.call("fail", "oops")
    b.close()
    text = "\n".join(f"{level} {msg}" for level, msg in events)
    assert "INFO Fulfilling task 'add'" in text
    assert "ERROR Error while fulfilling task 'fail'" in text
    assert "IMPORTANT Server stopped" in text


def test_failing_calls_log_one_traceback_per_task_and_error_per_interval(
    serve, client, caplog, monkeypatch
):
    """A client calling with the wrong arity used to write every traceback at INFO."""
    # one interval, however slow the machine
    monkeypatch.setattr("taskit._server.accounting.TRACEBACK_INTERVAL", 600.0, raising=False)
    b = serve(TASKS)
    c = client(b)
    caplog.set_level(logging.INFO, logger="taskit.backend")
    for n in range(300):
        with pytest.raises(RemoteError) as e:
            c.call("add", n)  # wrong arity: a TypeError in task 'add'
        assert "Traceback" in e.value.tb  # every caller still gets its traceback
    with pytest.raises(RemoteError):
        c.call("fail", "other")  # another task: its own traceback
    full = [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(full) == 2 and "'add'" in full[0] and "'fail'" in full[1]
    assert b.stats()["tasks"]["add"]["failed"] == 300  # counted, all of them


def test_skipped_tracebacks_are_counted_in_the_next_one_logged(serve, client, caplog, monkeypatch):
    # The limiter's clock is the test's: a real interval would race the burst on a
    # busy machine (when its last call happened to be logged, none was left to count).
    now = [1000.0]
    monkeypatch.setattr(accounting, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    b = serve(TASKS)
    c = client(b)
    caplog.set_level(logging.INFO, logger="taskit.backend")
    for n in range(100):
        with pytest.raises(RemoteError):
            c.call("add", n)
    now[0] += accounting.TRACEBACK_INTERVAL  # the interval passes: the next one is logged
    with pytest.raises(RemoteError):
        c.call("add", -1)
    full = [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()]
    counts = [re.search(r"and (\d+) more failures of task 'add'", m) for m in full]
    assert counts[-1] is not None  # the last one logged tells of the skipped ones
    assert len(full) + sum(int(m.group(1)) for m in counts if m) == 101
    assert len(full) == 2 and counts[-1].group(1) == "99"  # the first, then the next one


# --- real processes ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _wait_answering(endpoint: str, proc: subprocess.Popen, timeout: float = 20.0) -> RawClient:
    """Probe until the backend answers; return a fresh client (no stale replies queued)."""
    probe = RawClient(endpoint)
    deadline = time.monotonic() + timeout
    try:
        while True:
            probe.send("<status>")
            try:
                probe.recv(0.5)
                return RawClient(endpoint)
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"backend process did not answer (exit {proc.poll()})"
                    ) from None
    finally:
        probe.close()


SERVER = """
import sys, time
from taskit.backend import BackEnd
def slow(x):
    time.sleep(0.3)
    return x
BackEnd({"slow": slow}, port=int(sys.argv[1])).main()
print("main returned", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_main_stops_gracefully_on_signal(port, sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        c = _wait_answering(f"tcp://127.0.0.1:{port}", proc)
        call_id = c.send("slow", 5)
        assert c.call("<status>") == "1"
        proc.send_signal(sig)
        assert c.recv(10)[2:] == (call_id, 5)  # the accepted call is still answered
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "main returned" in out
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_example_worker(port):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "worker.py"), "127.0.0.1", str(port)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        c = _wait_answering(f"tcp://127.0.0.1:{port}", proc)
        assert c.call("wait-double", 5, codec=JSONCodec) == 10
        with pytest.raises(RemoteError) as e:
            c.call("get-error")
        assert e.value.type == "AssertionError"
        assert c.call("<status>") == "0"
        assert c.call("<stop>") is None
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "Fulfilling task 'wait-double'" in out and "Server stopped" in out
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- process pool -----------------------------------------------------------------------------


def square(x):
    return x * x


def die():
    os._exit(3)


def test_process_pool_backend(serve, client):
    tasks = {
        "square": square,
        "pid": os.getpid,
        "die": die,
        "fail": fail,
        "with_backend": (lambda backend: 1, True),
    }
    b = serve(tasks, pool="process", workers=2)
    c = client(b)
    assert c.call("square", 7, timeout=60) == 49
    assert c.call("pid", timeout=30) != os.getpid()  # ran in a child process
    with pytest.raises(RemoteError) as e:
        c.call("fail", "in a child", timeout=30)
    assert e.value.type == "ValueError" and e.value.remote_args == ["in a child"]
    with pytest.raises(RemoteError) as e:
        c.call("die", timeout=60)
    assert e.value.type == "WorkerLostError"  # only that call fails...
    assert c.call("square", 8, timeout=60) == 64  # ...and the pool replaced the worker
    with pytest.raises(RemoteError) as e:
        c.call("with_backend", timeout=10)
    assert e.value.type == "TypeError" and "pool='thread'" in e.value.remote_args[0]
    stats = c.call("<stats>")
    assert stats["pool_kind"] == "process" and stats["inline_tasks"] == []


class BrittleCodec:
    """A user codec whose decode raises something other than DecodeError."""

    name = "brittle-test"
    wire_id = 201

    @staticmethod
    def encode(obj):
        if isinstance(obj, list) and obj and obj[0] == "KeyError":
            raise RuntimeError("brittle encoder")
        return MsgpackCodec.encode(obj)

    @staticmethod
    def decode(data):
        if data.startswith(b"\x93\xa4boom"):
            raise TypeError("brittle")
        return MsgpackCodec.decode(data)


def test_a_user_codec_raising_oddly_never_stops_the_backend(serve, client):
    b = serve(TASKS, codecs=["msgpack", BrittleCodec])
    c = client(b)
    assert c.call("add", 1, 2, codec=BrittleCodec) == 3
    with pytest.raises(RemoteError) as e:
        c.call("boom", codec=BrittleCodec)
    assert e.value.type == "DecodeError" and "TypeError: brittle" in e.value.remote_args[0]
    assert c.call("add", 2, 2, codec=BrittleCodec) == 4 and b.running
    b.add_tasks({"keyerror": lambda: {}["x"]})
    call_id = c.send("keyerror", codec=BrittleCodec)  # its ERROR cannot be encoded in the codec
    _kind, codec, got_id, (type_name, _args, _tb) = c.recv()
    assert (codec, got_id, type_name) == (JSONCodec, call_id, "KeyError")
    assert c.call("<status>") == "0"


def test_a_given_pool_is_used_and_left_running(serve, client):
    from taskit.pool import WorkerPool

    with WorkerPool(3, name="shared-pool") as pool:
        b = serve({"name": lambda: threading.current_thread().name}, pool=pool, inline=False)
        c = client(b)
        assert c.call("name").startswith("shared-pool")
        assert c.call("<stats>")["pool_size"] == 3
        b.close()
        assert pool.submit(lambda: 42).result(10) == 42  # the BackEnd did not shut it down


BLOCKING_SERVER = """
import sys, threading
from taskit.backend import BackEnd
BackEnd({"block": lambda: threading.Event().wait(60)}, port=int(sys.argv[1])).main()
print("main returned", flush=True)
"""


def test_a_second_signal_ends_at_once(port):
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKING_SERVER, str(port)],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        c = _wait_answering(f"tcp://127.0.0.1:{port}", proc)
        c.send("block")
        assert c.call("<status>") == "1"
        proc.send_signal(signal.SIGTERM)  # graceful: waits for "block"...
        assert c.call("<stats>")["stopping"] is True
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # ...unless told twice
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 30 and "main returned" in out
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __call__(self):
        return "called"


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr for you")


def test_odd_callables_and_exception_arguments(serve, client):
    def raise_bad_repr():
        raise ValueError(_BadRepr())

    events = []
    b = serve(
        {"unhashable": _Unhashable(), "badrepr": raise_bad_repr},
        logger=lambda level, msg: events.append(msg),
    )
    c = client(b)
    assert c.call("unhashable") == "called"
    with pytest.raises(RemoteError) as e:
        c.call("badrepr")
    assert e.value.type == "ValueError" and "repr failed" in e.value.remote_args[0]
    assert c.call("<status>") == "0"


# --- protocol v2: handshake, load, deadlines, cancel, batches -----------------------------


class Gate:
    """Tasks for one test: ``block`` holds its worker until the test opens the gate;
    ``record`` notes that it ran. Every wait is bounded."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.starts = threading.Semaphore(0)
        self.ran: list[str] = []

    def started(self, n: int = 1) -> bool:
        """Wait (bounded) until ``n`` more ``block`` calls have started."""
        return all(self.starts.acquire(timeout=10) for _ in range(n))

    def block(self) -> str:
        self.starts.release()
        assert self.open.wait(30), "the test never opened the gate"
        self.ran.append("block")
        return "unblocked"

    def record(self, name: str) -> str:
        self.ran.append(name)
        return name

    def tasks(self) -> dict:
        return {"block": self.block, "record": self.record, **TASKS}


def test_welcome_tells_the_backends_identity_capacity_and_load(serve, client):
    gate = Gate()
    b = serve(gate.tasks(), workers=2, max_pending=77, max_message_size=1 << 20)
    c = client(b)
    w = c.hello()
    assert (w["version"], w["signed"], w["name"], w["pid"]) == (2, False, b.endpoint, os.getpid())
    assert (w["workers"], w["max_pending"], w["max_message_size"]) == (2, 77, 1 << 20)
    assert sorted(w["codecs"]) == sorted([JSONCodec.wire_id, MsgpackCodec.wire_id])
    assert len(bytes.fromhex(w["started"])) == 16 and len(bytes.fromhex(w["session"])) == 16
    other = client(b).hello()
    assert other["started"] == w["started"] and other["session"] != w["session"]
    # every reply carries the load: (queued, running)
    c.send("block")
    c.send("block")
    assert gate.started(2)
    call_id = c.send("<status>")
    item = c.recv_item()
    assert (item.call_id, item.a, item.b) == (call_id, 0, 2)  # both blocks running
    gate.open.set()
    assert {c.recv_item().kind for _ in range(2)} == {Kind.RESULT}
    c.send("<status>")
    item = c.recv_item()
    assert (item.a, item.b) == (0, 0)


def test_a_cancelled_queued_call_never_runs_a_running_one_is_not_cancelled(serve, client):
    gate = Gate()
    b = serve(gate.tasks(), workers=1)
    c = client(b)
    first = c.send("block")
    assert gate.started()  # the one worker is held
    second = c.send("record", "second")
    c.send_items([(Kind.CANCEL, 0, second, 0, 0, b"")])
    item = c.recv_item()
    assert (item.kind, item.call_id) == (Kind.CANCELLED, second)
    c.send_items([(Kind.CANCEL, 0, first, 0, 0, b"")])  # running: cannot be withdrawn
    item = c.recv_item()
    assert (item.kind, item.call_id) == (Kind.NOT_CANCELLED, first)
    gate.open.set()
    assert c.recv()[2:] == (first, "unblocked")  # its own reply still comes
    assert c.call("record", "after") == "after"  # ran after the cancelled one's turn
    assert gate.ran == ["block", "after"] and c.silent(0.1)  # no reply to the cancelled
    stats = c.call("<stats>")
    assert stats["cancelled"] == 1 and stats["in_flight"] == 0
    assert "record" not in stats["tasks"] or stats["tasks"]["record"]["calls"] == 1
    # unknown, or already answered: NOT_CANCELLED
    c.send_items([(Kind.CANCEL, 0, first, 0, 0, b""), (Kind.CANCEL, 0, 999, 0, 0, b"")])
    assert [(i.kind, i.call_id) for i in (c.recv_item(), c.recv_item())] == [
        (Kind.NOT_CANCELLED, first),
        (Kind.NOT_CANCELLED, 999),
    ]


def test_an_expired_call_never_starts(serve, client):
    gate = Gate()
    b = serve(gate.tasks(), workers=1)
    c = client(b)
    first = c.send("block")
    assert gate.started()
    late = c.send("record", "late", budget_ms=50)
    in_time = c.send("record", "in time", budget_ms=60_000)
    # Its deadline runs from when the backend reads it: wait until both are read
    # (queued behind the held worker), then let the 50 ms pass.
    deadline = time.monotonic() + 10
    while b.task_count < 3:
        assert time.monotonic() < deadline, b.task_count
        time.sleep(0.005)
    time.sleep(0.1)  # the late call's budget passes while the worker is held
    gate.open.set()
    replies = {}
    for _ in range(3):
        kind, _codec, call_id, value = c.recv()
        replies[call_id] = (kind, value)
    assert replies[first] == (Kind.RESULT, "unblocked")
    assert replies[in_time] == (Kind.RESULT, "in time")
    kind, (type_name, args, _tb) = replies[late]
    assert (kind, type_name) == (Kind.ERROR, "Expired")
    assert args == [
        "the call's deadline passed before it could start (budget 50 ms); it did not run"
    ]
    assert gate.ran == ["block", "in time"]  # the late one never ran
    stats = c.call("<stats>")
    assert stats["refused"]["Expired"] == 1 and stats["in_flight"] == 0


def test_an_expired_call_never_starts_inline_either(serve, client):
    """A quick task runs on the I/O thread: a budget already spent when it is read
    (here 1 ms behind a batch of slow inline calls) is not run there either."""
    ran = []

    def quick(x):
        if x == "slow":
            time.sleep(0.01)
        ran.append(x)
        return x

    b = serve({"quick": quick}, inline={"quick"})
    c = client(b)
    items = [c.call_item("quick", "slow") for _ in range(5)]
    late = c.call_item("quick", "late", budget_ms=1)
    c.send_items([*items, late])
    got = {}
    for _ in range(6):
        kind, _codec, call_id, value = c.recv()
        got[call_id] = (kind, value[0] if kind == Kind.ERROR else value)
    assert got[late[2]] == (Kind.ERROR, "Expired") and "late" not in ran


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def test_an_expired_call_never_starts_in_a_process_pool(serve, client):
    b = serve({"sleepy": sleepy}, pool="process", workers=1)
    c = client(b)
    assert c.call("sleepy", 0, timeout=60) == 0  # the child is up
    first = c.send("sleepy", 0.5)
    late = c.send("sleepy", 5, budget_ms=50)
    got = {}
    for _ in range(2):
        kind, _codec, call_id, value = c.recv(60)
        got[call_id] = (kind, value)
    assert got[first] == (Kind.RESULT, 0.5)
    kind, (type_name, _args, _tb) = got[late]
    assert (kind, type_name) == (Kind.ERROR, "Expired")
    stats = c.call("<stats>")
    assert stats["refused"]["Expired"] == 1 and stats["tasks"]["sleepy"]["calls"] == 2


def test_a_batch_gives_the_same_results_and_errors_as_single_calls(serve, client):
    b = serve(TASKS, codecs=["msgpack", "json"])
    single, batch = client(b), client(b)

    def items(c):
        return [
            c.call_item("add", 1, 2),
            c.call_item("fail", "boom", 3),
            c.call_item("nope"),
            c.call_item("add", 1),  # wrong arity
            c.call_item("echo", {"k": [1, 2.5, None]}),
            (Kind.CALL, 2, next(c.ids), 0, 0, b"\xc1garbage"),  # undecodable
            (Kind.CALL, 99, next(c.ids), 0, 0, b"x"),  # unknown codec
            c.call_item("add", "a", "b", codec=JSONCodec),
        ]

    def outcome(kind, value):
        if kind == Kind.ERROR:
            type_name, args, tb = value
            return type_name, args, bool(tb)
        return value

    one_by_one = []
    for item in items(single):
        single.send_items([item])
        kind, _codec, call_id, value = single.recv()
        assert call_id == item[2]
        one_by_one.append(outcome(kind, value))
    sent = items(batch)
    batch.send_items(sent)
    got = {}
    for _ in sent:
        kind, _codec, call_id, value = batch.recv()
        got[call_id] = outcome(kind, value)
    assert [got[item[2]] for item in sent] == one_by_one
    assert one_by_one[0] == 3 and one_by_one[2][0] == "UnknownTask"
    assert [o[0] for o in one_by_one[5:7]] == ["DecodeError", "CodecNotAllowed"]


def test_replies_ready_together_for_one_peer_go_in_one_frame(serve, client):
    b = serve({"quick": lambda x: x}, inline={"quick"})
    c = client(b)
    c.send_items([c.call_item("quick", i) for i in range(10)])
    assert c.sock.poll(10_000)
    items = protocol.parse(c.sock.recv())
    assert [MsgpackCodec.decode(i.body) for i in items] == list(range(10))
    # and capped: 300 items come in two frames at least
    c.send_items([c.call_item("quick", i) for i in range(300)])
    frames = 0
    got = []
    while len(got) < 300:
        assert c.sock.poll(10_000)
        got += protocol.parse(c.sock.recv())
        frames += 1
    assert frames >= 2 and [MsgpackCodec.decode(i.body) for i in got] == list(range(300))


def test_cancel_racing_the_workers_either_withdraws_or_answers_never_both(serve, client):
    ran = []
    lock = threading.Lock()

    def note(i):
        with lock:
            ran.append(i)
        return i

    b = serve({"note": note}, workers=2, inline=False)
    c = client(b)
    sent = []
    for i in range(300):  # each call, then its CANCEL in the next message: a close race
        item = c.call_item("note", i)
        sent.append(item[2])
        c.send_items([item])
        c.send_items([(Kind.CANCEL, 0, item[2], 0, 0, b"")])
    replies = collections.defaultdict(list)

    def settled(call_id):  # withdrawn, or answered and its CANCEL refused
        return replies[call_id] == [Kind.CANCELLED] or len(replies[call_id]) == 2

    while not all(settled(call_id) for call_id in sent):
        item = c.recv_item(30)
        replies[item.call_id].append(item.kind)
    assert c.silent(0.1)  # nothing more: no reply after a CANCELLED
    cancelled = {i for i, kinds in replies.items() if kinds == [Kind.CANCELLED]}
    answered = {
        i for i, kinds in replies.items() if sorted(kinds) == [Kind.RESULT, Kind.NOT_CANCELLED]
    }
    assert cancelled | answered == set(sent) and not cancelled & answered, replies
    assert sorted(ran) == sorted(c_id - sent[0] for c_id in answered)  # ran iff answered
    stats = c.call("<stats>")
    assert stats["cancelled"] == len(cancelled) and stats["in_flight"] == 0
