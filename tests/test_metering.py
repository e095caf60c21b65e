"""The per-call records behind the metrics (taskit._metering), without sockets."""

from __future__ import annotations

from taskit import protocol
from taskit._metering import BUCKETS, UNKNOWN, ClientMeter, Histogram, ServerMeter
from taskit._server.handler import Call
from taskit.codecs import JSONCodec, MsgpackCodec


def test_a_histogram_counts_a_value_equal_to_a_bound_in_that_bucket():
    h = Histogram()
    for v in (0.0, 0.0001, 0.00011, 0.5, 60.0, 61.0):
        h.observe(v)
    cumulative = dict(h.cumulative())
    assert list(cumulative)[-1] == "+Inf" and len(cumulative) == len(BUCKETS) + 1
    assert cumulative["0.0001"] == 2  # 0 and the bound itself ("le")
    assert cumulative["0.00025"] == 3
    assert cumulative["0.5"] == 4
    assert cumulative["60.0"] == 5
    assert cumulative["+Inf"] == 6
    assert h.sum == 0.0001 + 0.00011 + 0.5 + 60.0 + 61.0


def test_made_up_task_names_share_one_label_value():
    meter = ServerMeter({"add": None})
    for name in ("add", "add", "<stats>", "x", "y", "z"):
        meter.received(name)
    assert meter.calls == {"add": 2, "<stats>": 1, UNKNOWN: 3}


def _call(codec, name="t", size=40) -> Call:
    return Call(b"\x00peer", codec, 7, name, size, print, [], {}, False, False)


def test_a_reply_is_timed_and_a_failure_typed_from_its_error_item():
    meter = ServerMeter({"t": None})
    ok = (2, MsgpackCodec.wire_id, 7, MsgpackCodec.encode("fine"))
    meter.replied(_call(MsgpackCodec), True, 0.002, ok)
    codec_id, body = protocol.encode_error(MsgpackCodec, "KeyError", ["k"], "tb")
    meter.replied(_call(MsgpackCodec), False, 0.2, (3, codec_id, 7, body))
    # a codec that could not encode the error: the backend falls back to JSON
    codec_id, body = protocol.encode_error(JSONCodec, "EncodeError", ["x"], "")
    meter.replied(_call(MsgpackCodec), False, None, (3, codec_id, 7, body))  # t0 unset
    assert meter.failed == {("t", "KeyError"): 1, ("t", "EncodeError"): 1}
    assert meter.run_time["t"].counts[-1] == 0 and sum(meter.run_time["t"].counts) == 3


def test_bytes_are_counted_as_messages_are_read_and_sent():
    meter = ServerMeter({"t": None})
    meter.read(40)
    meter.read(8)
    meter.sent(29)
    assert (meter.bytes_in, meter.bytes_out) == (48, 29)


def test_a_client_meter_keeps_one_histogram_per_backend():
    meter = ClientMeter()
    meter.answered("tcp://a:1", 0.001)
    meter.answered("tcp://a:1", 0.003)
    meter.answered("tcp://b:2", 2.0)
    assert sorted(meter.latency) == ["tcp://a:1", "tcp://b:2"]
    assert dict(meter.latency["tcp://a:1"].cumulative())["0.0025"] == 1
    assert meter.latency["tcp://b:2"].sum == 2.0


def test_without_metrics_or_debug_logs_no_hook_is_set():
    import logging

    from taskit.backend import BackEnd

    assert not logging.getLogger("taskit.backend").isEnabledFor(logging.DEBUG)
    be = BackEnd({"t": print}, port=0)
    assert be._handler.on_received is None
    assert be._loop.observe is None and be._loop.observe_read is None
    assert be._handler.trace_in_thread
    assert not BackEnd({"t": print}, port=0, pool="process")._handler.trace_in_thread


def test_metrics_set_the_hooks_without_serving_yet():
    import pytest

    pytest.importorskip("prometheus_client")
    from taskit.backend import BackEnd

    be = BackEnd({"t": print}, port=0, metrics_port=0)
    assert be._handler.on_received is not None
    assert be._loop.observe is not None and be._loop.observe_read is not None
    assert be.metrics_port == 0  # the bound one is known once started
