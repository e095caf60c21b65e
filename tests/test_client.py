"""Unit tests of the sans-I/O client core (taskit._client): no sockets, a fake clock."""

from __future__ import annotations

import pytest

from taskit._client import (
    CONNECTING,
    DOWN,
    STOPPING,
    UP,
    ClientCore,
    backoff_delay,
    error_from_reply,
    parse_backend,
)
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer
from taskit.errors import (
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    BusyError,
    CallTimeoutError,
    CodecNotAllowedError,
    DecodeError,
    EncodeError,
    MessageTooLargeError,
    StoppingError,
    UnknownTaskError,
)
from taskit.protocol import Kind, encode_error, encode_result, pack, unpack

A, B = "tcp://127.0.0.1:1001", "tcp://127.0.0.1:1002"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(n=2, **kw):
    clock = Clock()
    core = ClientCore(clock=clock, **kw)
    for ep in (A, B)[:n]:
        core.add_backend(ep)
        core.backend_up(ep)
    return core, clock


def send_all(core):
    """Drain the outbox as a driver would; returns {call id: (backend, frames)}."""
    return {c.id: (c.backend, core.frames_for(c)) for c in core.drain_outbox()}


def reply_result(core, call, value, codec=JSONCodec):
    return core.on_message(call.backend, encode_result(codec, call.id, value, core.signer))


@pytest.mark.parametrize(
    "spec, want",
    [
        ("example.org", "tcp://example.org:54543"),
        ("example.org:80", "tcp://example.org:80"),
        (("10.0.0.1", 9000), "tcp://10.0.0.1:9000"),
        (["h", "77"], "tcp://h:77"),
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("ipc:///tmp/x.sock", "ipc:///tmp/x.sock"),
        ("inproc://be", "inproc://be"),
        ("::1", "tcp://[::1]:54543"),
        ("[::1]:80", "tcp://[::1]:80"),
    ],
)
def test_parse_backend(spec, want):
    assert parse_backend(spec) == want


@pytest.mark.parametrize(
    "bad", ["", ("h", 0), ("h", "x"), ("", 5), 42, "tcp://h", "ipc://", ("h",)]
)
def test_parse_backend_rejects(bad):
    with pytest.raises(ValueError, match="a backend is|needs|no address"):
        parse_backend(bad)


def test_parse_backend_default_port():
    assert parse_backend("h", 1234) == "tcp://h:1234"


def test_result_round_trip_and_counts():
    core, _ = make(1)
    call = core.new_call("add", (1, 2), waiter="w")
    core.submit(call)
    sent = send_all(core)
    backend, frames = sent[call.id]
    assert backend == A
    msg = unpack(frames)
    assert msg.kind == Kind.CALL and JSONCodec.decode(msg.body) == ["add", [1, 2], {}]
    done = reply_result(core, call, 3)
    assert done == [(call, True, 3)]
    assert core.pending == 0
    snap = core.snapshot()[A]
    assert (snap["sent"], snap["answered"], snap["in_flight"]) == (1, 1, 0)


def test_encode_error_is_raised_at_creation():
    core, _ = make(1)
    with pytest.raises(EncodeError, match="bytes"):
        core.new_call("echo", (b"x",))
    core_mp, _ = make(1, codec=MsgpackCodec)
    with pytest.raises(EncodeError, match="64 bits"):
        core_mp.new_call("double", (9**9999,))


def test_a_call_over_max_body_is_refused_before_anything_is_registered():
    core, _ = make(1, codec=MsgpackCodec, max_body=100)
    with pytest.raises(MessageTooLargeError, match=r"task 'echo' encode to \d+ bytes"):
        core.new_call("echo", (b"x" * 200,))
    assert core.pending == 0 and not core.outbox
    call = core.new_call("echo", (b"x" * 50,))  # under the limit: as usual
    core.submit(call)
    assert list(send_all(core)) == [call.id]


def test_least_in_flight_then_round_robin():
    core, _ = make(2)
    calls = [core.new_call("t") for _ in range(4)]
    for c in calls:
        core.submit(c)
    send_all(core)
    assert [c.backend for c in calls] == [A, B, A, B]
    reply_result(core, calls[0], 0)  # A now has fewer in flight
    c = core.new_call("t")
    core.submit(c)
    assert c.backend == A
    # all idle: ties alternate
    for cc in calls[1:] + [c]:
        reply_result(core, cc, 0)
    seen = []
    for _ in range(4):
        cc = core.new_call("t")
        core.submit(cc)
        seen.append(cc.backend)
        send_all(core)
        reply_result(core, cc, 0)
    assert sorted(seen) == [A, A, B, B]


def test_remote_errors_map_to_classes():
    core, _ = make(1)
    for type_name, cls in [
        ("UnknownTask", UnknownTaskError),
        ("CodecNotAllowed", CodecNotAllowedError),
        ("ZeroDivisionError", BackendProcessingError),
    ]:
        call = core.new_call("div", (1, 0))
        core.submit(call)
        send_all(core)
        (done,) = core.on_message(A, encode_error(JSONCodec, call.id, type_name, ["x"], "TB"))
        exc = done[2]
        assert done[1] is False and type(exc) is cls
        assert (exc.type, exc.args, exc.remote_traceback, exc.task, exc.backend) == (
            type_name,
            ("x",),
            "TB",
            "div",
            A,
        )


def test_error_from_reply_str_shows_traceback():
    e = error_from_reply("ValueError", ["bad"], "Traceback...", "t", A)
    assert "ValueError" in str(e) and "Traceback..." in str(e) and "'t'" in str(e)


def test_lost_without_retries_fails_each_call():
    core, _ = make(2)
    calls = [core.new_call("t") for _ in range(4)]
    for c in calls:
        core.submit(c)
    send_all(core)
    done = core.backend_down(A, "disconnected")
    assert sorted(c.id for c, _, _ in done) == [calls[0].id, calls[2].id]
    assert all(isinstance(v, BackendLostError) and not ok for _, ok, v in done)
    assert core.snapshot()[A]["state"] == DOWN and core.snapshot()[A]["lost"] == 2
    assert core.pending == 2  # B's calls untouched


def test_lost_with_retries_resends_to_other_backend():
    core, _ = make(2, retries=1)
    calls = [core.new_call("t") for _ in range(4)]
    for c in calls:
        core.submit(c)
    send_all(core)
    assert core.backend_down(A) == []
    resent = send_all(core)
    assert set(resent) == {calls[0].id, calls[2].id}
    assert all(be == B for be, _ in resent.values())
    # lost a second time: the re-sent calls used up their retry; B's own calls
    # (first loss) wait for a backend to come back
    done = core.backend_down(B)
    assert sorted(c.id for c, _, _ in done) == [calls[0].id, calls[2].id]
    assert all(isinstance(v, BackendLostError) for _, _, v in done)
    core.backend_up(A)
    assert set(send_all(core)) == {calls[1].id, calls[3].id}


def test_unsent_calls_are_rerouted_not_counted_as_attempts():
    core, _ = make(2)
    c = core.new_call("t")
    core.submit(c)
    assert c.backend == A
    assert core.backend_down(A) == []  # assigned, not yet on the wire: re-routed
    assert send_all(core)[c.id][0] == B


def test_send_failed_marks_backend_down_and_reroutes():
    core, _ = make(2)
    c = core.new_call("t")
    core.submit(c)
    (call,) = core.drain_outbox()
    core.frames_for(call)
    assert core.send_failed(call) == []
    assert core.snapshot()[A]["state"] == DOWN
    assert send_all(core)[c.id][0] == B and c.attempts == 1


def test_parked_until_a_backend_comes_up():
    core, clock = make(0)
    core.add_backend(A)
    assert core.snapshot()[A]["state"] == CONNECTING
    c = core.new_call("t")
    core.submit(c)
    assert core.drain_outbox() == []
    clock.t += 1.0
    assert core.tick() == []
    core.backend_up(A)
    assert send_all(core)[c.id][0] == A


def test_not_available_after_connect_timeout():
    core, clock = make(0, connect_timeout=2.0)
    core.add_backend(A)
    core.backend_down(A, "connection refused")
    c = core.new_call("t")
    core.submit(c)
    assert core.next_wakeup() == pytest.approx(clock.t + 2.0)
    clock.t += 2.0
    ((call, ok, exc),) = core.tick()
    assert call is c and not ok and isinstance(exc, BackendNotAvailableError)
    assert A in str(exc)


def test_no_backends_at_all():
    core, clock = make(0, connect_timeout=0.0)
    core.submit(core.new_call("t"))
    ((_, _, exc),) = core.tick()
    assert isinstance(exc, BackendNotAvailableError) and "add_backends" in str(exc)


def test_deadline_times_out_and_late_reply_is_ignored():
    core, clock = make(1)
    c = core.new_call("slow", timeout=0.5)
    core.submit(c)
    send_all(core)
    clock.t += 0.5
    ((call, ok, exc),) = core.tick()
    assert isinstance(exc, CallTimeoutError) and isinstance(exc, TimeoutError)
    assert core.on_message(A, encode_result(JSONCodec, c.id, 1)) == []
    assert core.stats["late_replies"] == 1
    assert core.snapshot()[A]["in_flight"] == 0


def test_busy_goes_to_other_backend_then_backs_off():
    core, clock = make(2, busy_retries=2)
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    assert c.backend == A
    assert core.on_message(A, encode_error(JSONCodec, c.id, "Busy", [], "")) == []
    assert send_all(core)[c.id][0] == B  # another backend had room: at once
    assert core.on_message(B, encode_error(JSONCodec, c.id, "Busy", [], "")) == []
    assert core.drain_outbox() == []  # both busy: back off
    wake = core.next_wakeup()
    assert wake is not None and wake > clock.t
    clock.t = wake
    core.tick()
    (again,) = core.drain_outbox()
    core.frames_for(again)
    ((_, ok, exc),) = core.on_message(again.backend, encode_error(JSONCodec, c.id, "Busy", [], ""))
    assert isinstance(exc, BusyError) and exc.task == "t"
    assert core.snapshot()[A]["busy"] + core.snapshot()[B]["busy"] == 3


def test_stopping_reroutes_once_then_fails():
    core, _ = make(2)
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    assert core.on_message(A, encode_error(JSONCodec, c.id, "Stopping", [], "")) == []
    assert core.snapshot()[A]["state"] == STOPPING
    assert send_all(core)[c.id][0] == B
    ((_, _, exc),) = core.on_message(B, encode_error(JSONCodec, c.id, "Stopping", [], ""))
    assert isinstance(exc, StoppingError)


def test_stop_notice_routes_new_calls_elsewhere_until_reconnected():
    core, _ = make(2)
    assert core.on_message(A, encode_error(JSONCodec, 0, "Stopping", ["stopping"], "")) == []
    assert core.snapshot()[A]["state"] == STOPPING
    calls = [core.new_call("t") for _ in range(4)]
    for c in calls:
        core.submit(c)
    assert {backend for backend, _ in send_all(core).values()} == {B}
    core.backend_down(A)
    core.backend_up(A)  # a new process on that endpoint
    c = core.new_call("t")
    core.submit(c)
    assert send_all(core)[c.id][0] == A  # the least loaded again
    assert core.stats["late_replies"] == 0 and core.stats["bad_replies"] == 0


def test_other_notices_are_counted_not_obeyed():
    core, _ = make(1)
    core.on_message(A, encode_error(JSONCodec, 0, "Busy", [], ""))
    core.on_message(A, [b"TKIT\x01", bytes([3, 1]) + bytes(8), b"not json"])
    assert core.snapshot()[A]["state"] == "up"
    assert core.stats["bad_replies"] == 2


def test_a_json_reply_spelling_nan_is_a_decode_error():
    core, _ = make(1)
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    ((_, ok, exc),) = core.on_message(A, pack(Kind.RESULT, JSONCodec.wire_id, c.id, b"NaN"))
    assert not ok and isinstance(exc, DecodeError) and "RFC 8259" in str(exc)


def test_pinned_calls_go_only_to_their_target():
    core, _ = make(2)
    c = core.new_call("<status>", target=B)
    core.submit(c)
    assert send_all(core)[c.id][0] == B


def test_signed_replies_only():
    signer = Signer(b"k")
    core, _ = make(1, signer=signer)
    c = core.new_call("t")
    core.submit(c)
    frames = send_all(core)[c.id][1]
    assert len(frames) == 4 and signer.verify(frames[:3], frames[3])
    # unsigned and wrongly signed replies are dropped and counted
    assert core.on_message(A, encode_result(JSONCodec, c.id, 1)) == []
    assert core.on_message(A, encode_result(JSONCodec, c.id, 1, Signer(b"other"))) == []
    assert core.stats["bad_signatures"] == 2
    assert core.on_message(A, encode_result(JSONCodec, c.id, 1, signer))[0][2] == 1


def test_pickle_reply_is_never_unpickled_by_a_json_client():
    core, _ = make(1)
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    ((_, ok, exc),) = core.on_message(A, encode_result(PickleCodec, c.id, 1))
    assert not ok and isinstance(exc, DecodeError) and "does not accept" in str(exc)


def test_garbage_is_counted_not_raised():
    core, _ = make(1)
    assert core.on_message(A, [b"junk"]) == []
    assert core.on_message(A, pack(Kind.PONG, 1, 12345)) == []
    assert core.stats["bad_replies"] == 1


def test_cancel_forgets_the_call():
    core, _ = make(1)
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    core.cancel(c)
    assert core.pending == 0 and core.snapshot()[A]["in_flight"] == 0
    assert core.on_message(A, encode_result(JSONCodec, c.id, 1)) == []


def test_fail_all():
    core, _ = make(1)
    for _ in range(3):
        core.submit(core.new_call("t"))
    boom = RuntimeError("closed")
    done = core.fail_all(boom)
    assert len(done) == 3 and all(v is boom for _, _, v in done) and core.pending == 0


def test_backoff_delay_grows_and_caps():
    delays = [backoff_delay(i) for i in range(12)]
    assert delays == sorted(delays) and delays[-1] == 0.05 and delays[0] > 0


def test_backend_up_state():
    core, _ = make(1)
    assert core.snapshot()[A]["state"] == UP and core.snapshot()[A]["connects"] == 1


def test_memoryview_bodies_are_accepted():
    for codec in (JSONCodec, MsgpackCodec):
        core, _ = make(1, codec=codec)
        c = core.new_call("echo", ("x" * 10,))
        core.submit(c)
        send_all(core)
        frames = encode_result(codec, c.id, "y" * 100_000)
        frames[2] = memoryview(frames[2])
        assert core.on_message(A, frames)[0][2] == "y" * 100_000


def test_pinned_calls_reach_a_stopping_backend():
    core, _ = make(2)
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    core.on_message(A, encode_error(JSONCodec, c.id, "Stopping", [], ""))
    assert core.snapshot()[A]["state"] == STOPPING
    sig = core.new_call("<status>", target=A)
    core.submit(sig)
    assert send_all(core)[sig.id][0] == A


def test_busy_call_resent_when_a_slot_frees():
    core, clock = make(1)
    first, second = core.new_call("t"), core.new_call("t")
    core.submit(first)
    core.submit(second)
    send_all(core)
    assert core.on_message(A, encode_error(JSONCodec, second.id, "Busy", [], "")) == []
    assert core.drain_outbox() == []  # waits: the only backend is full
    # the answer to `first` frees a slot on A: `second` goes at once, no timer needed
    assert reply_result(core, first, 1) == [(first, True, 1)]
    assert send_all(core)[second.id][0] == A
    assert reply_result(core, second, 2) == [(second, True, 2)]
