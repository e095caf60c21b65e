"""BackEnd construction, configuration and the TaskIt 4.0 names (no serving needed),
plus the worked example of doc/protocol.md checked against taskit.protocol."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskit.backend import (
    ADMIN_TASKS,
    DEFAULT_PORT,
    BackEnd,
    build_backend,
    task_count,
    task_kill,
    task_stop,
)
from taskit.codecs import JSONCodec, MsgpackCodec
from taskit.common import KILL, STATUS, STOP
from taskit.errors import InsecureCodecError

DOC = Path(__file__).resolve().parents[1] / "doc" / "protocol.md"


def add(a, b):
    return a + b


def test_admin_tasks_have_the_original_shape():
    assert ADMIN_TASKS == {
        STOP: (task_stop, True),
        KILL: (task_kill, True),
        STATUS: (task_count, True),
    }
    b = BackEnd({}, port=0)
    b.started_task()
    assert task_count(b) == "1"  # a string, as TaskIt 4.0 clients expect
    b.finished_task()
    assert task_count(b) == "0"


def test_defaults_follow_taskit_4():
    b = BackEnd({"add": add})
    assert (b.host, b.port, b.end_resp, b.tracebacks) == ("127.0.0.1", DEFAULT_PORT, 0.5, True)
    assert b.codec is JSONCodec
    assert b.endpoint == f"tcp://127.0.0.1:{DEFAULT_PORT}"
    assert b.codecs == ["json", "msgpack"]
    assert not b.running and b.task_count == 0
    assert b.max_pending == 50_000  # bounded by default (issue 11): ~120 MB of small calls


def test_positional_arguments_of_the_original():
    log = []
    b = BackEnd({"add": add}, "0.0.0.0", 5555, log.append, MsgpackCodec, 0.1)
    assert (b.host, b.port, b.log, b.codec, b.end_resp) == (
        "0.0.0.0",
        5555,
        log.append,
        MsgpackCodec,
        0.1,
    )
    assert b.endpoint == "tcp://0.0.0.0:5555"


def test_tasks_dict_is_kept_and_validated():
    tasks = {"add": add, "with_backend": (add, True)}
    b = BackEnd(tasks)
    assert b.tasks is tasks
    b.add_tasks({"mul": lambda a, b: a * b})
    assert "mul" in tasks
    with pytest.raises(TypeError, match="'x'"):
        BackEnd({"x": 42})
    with pytest.raises(TypeError, match="names must be strings"):
        BackEnd({1: add})
    with pytest.raises(TypeError, match="mapping"):
        BackEnd([add])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"port": -1}, "port"),
        ({"port": 70000}, "port"),
        ({"port": "54543"}, "port"),
        ({"endpoint": "udp://x"}, "endpoint"),
        ({"pool": "fibers"}, "pool"),
        ({"max_pending": 0}, "max_pending"),
        ({"inline": "sometimes"}, "inline"),
        ({"codecs": []}, "at least one"),
    ],
)
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        BackEnd({"add": add}, **kw)


def test_endpoints():
    assert BackEnd({}, port=0).endpoint == "tcp://127.0.0.1:*"
    assert BackEnd({}, host="::1", port=9).endpoint == "tcp://[::1]:9"
    assert BackEnd({}, endpoint="ipc:///tmp/x.sock").endpoint == "ipc:///tmp/x.sock"


def test_codec_sets_and_pickle_gating():
    assert BackEnd({}, codecs=["msgpack"]).codecs == ["msgpack"]
    assert BackEnd({}, codecs="json").codecs == ["json"]
    assert BackEnd({}, key="k").codecs == ["json", "msgpack", "pickle"]
    assert BackEnd({}, insecure_pickle=True).codecs == ["json", "msgpack", "pickle"]
    with pytest.raises(InsecureCodecError, match="insecure_pickle=True"):
        BackEnd({}, codecs=["pickle"])


def test_stop_and_terminate_before_start_are_harmless():
    b = BackEnd({}, port=0)
    assert b.stop_server() is True
    b.terminate_server()
    b.close()
    with pytest.raises(RuntimeError, match="already served"):
        b.start()


def test_subtask_counts_and_returns():
    b = BackEnd({}, port=0)
    seen = []
    assert b.subtask(lambda x: seen.append(b.task_count) or x * 2, 21) == 42
    assert seen == [1] and b.task_count == 0
    with pytest.raises(ZeroDivisionError):
        b.subtask(lambda: 1 / 0)
    assert b.task_count == 0


def test_build_backend_reads_host_and_port_from_argv():
    b = build_backend({"add": add}, argv=[])
    assert (b.host, b.port) == ("127.0.0.1", DEFAULT_PORT)
    b = build_backend({"add": add}, ("0.0.0.0", 1234), argv=["localhost"])
    assert (b.host, b.port) == ("localhost", 1234)
    b = build_backend({"add": add}, argv=["10.0.0.1", "54545"], max_pending=5)
    assert (b.host, b.port, b.max_pending) == ("10.0.0.1", 54545, 5)
    b = build_backend({"add": add}, argv=["ipc:///tmp/taskit.sock"])
    assert b.endpoint == "ipc:///tmp/taskit.sock"
    with pytest.raises(ValueError, match="port must be a number"):
        build_backend({"add": add}, argv=["localhost", "http"])


def test_build_backend_uses_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["worker.py", "127.0.0.2", "6000"])
    b = build_backend({"add": add})
    assert (b.host, b.port) == ("127.0.0.2", 6000)


def test_stats_before_serving():
    stats = BackEnd({"add": add}, port=0).stats()
    assert stats["in_flight"] == 0 and stats["done"] == 0 and stats["uptime"] == 0.0
    assert set(stats["dropped"]) == {
        "bad_signature",
        "malformed",
        "oversized",
        "reply_unroutable",
        "reply_hwm",
        "reply_over_budget",
        "client_gone",
        "replayed",
        "no_session",
    }
    assert stats["cancelled"] == 0
    assert stats["reply_backlog"] == stats["reply_deferred"] == 0


def test_peer_options_checked():
    with pytest.raises(ValueError, match="peer_budget"):
        BackEnd({"add": add}, port=0, peer_budget=-1)
    with pytest.raises(ValueError, match="peer_queue"):
        BackEnd({"add": add}, port=0, peer_queue=0)
    assert BackEnd({"add": add}, port=0, peer_budget=None).peer_budget is None
