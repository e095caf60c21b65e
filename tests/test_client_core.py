"""Unit tests of the sans-I/O client core (taskit._client.core): no sockets, a fake clock.

A :class:`Peer` plays each backend's side of protocol v2 (handshake, sessions, replies),
as sans-I/O as the core."""

from __future__ import annotations

from concurrent.futures import CancelledError

import pytest

from taskit import protocol
from taskit._client.core import (
    BATCH_ITEMS,
    CANCEL_REFUSED,
    CONNECTING,
    DOWN,
    HANDSHAKE,
    RECONNECT_CAP,
    RECONNECT_FIRST,
    REJECTED,
    STOPPING,
    UP,
    ClientCore,
    backoff_delay,
    error_from_reply,
    parse_backend,
    reconnect_delay,
)
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer
from taskit.errors import (
    AuthenticationError,
    BackendLostError,
    BackendNotAvailableError,
    BackendProcessingError,
    BusyError,
    CallTimeoutError,
    CodecNotAllowedError,
    DecodeError,
    EncodeError,
    ExpiredError,
    MessageTooLargeError,
    ProtocolVersionError,
    StoppingError,
    UnknownTaskError,
)
from taskit.protocol import Kind, Session, pack_items, pack_one, parse

A, B = "tcp://127.0.0.1:1001", "tcp://127.0.0.1:1002"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Peer:
    """The backend at one endpoint, for one core: answers its HELLO, seals replies."""

    def __init__(self, core, ep, signer=None):
        self.core, self.ep, self.signer = core, ep, signer
        self.session = None  # the backend's Session once WELCOMEd (with a key)

    def seal(self, items, session=None):
        session = session if session is not None else self.session
        if self.signer is None:
            return pack_items(items)
        return pack_items(items, session)

    def reply(self, kind, codec_id, call_id, body=b"", a=0, b=0):
        return self.core.on_message(self.ep, self.seal([(kind, codec_id, call_id, a, b, body)]))

    def hello(self):
        """Connect: the core says HELLO; returns (call id, HELLO map)."""
        self.core.backend_up(self.ep)
        for ep, frame, _ in self.core.messages():
            if ep == self.ep:
                zero = Session(self.signer, outgoing=b"B") if self.signer else None
                (item,) = parse(frame, zero)
                if item.kind == Kind.HELLO:
                    return item.call_id, protocol.parse_handshake(item.body, Kind.HELLO)
        raise AssertionError("no HELLO")

    def welcome(self, signed=None, codecs=None, version=2, nonce=None, **kw):
        """Connect and answer the HELLO with a WELCOME (its fields overridable)."""
        call_id, hello = self.hello()
        server_nonce = protocol.new_nonce()
        fields = dict(
            client_nonce=nonce or hello["nonce"],
            server_nonce=server_nonce,
            name=self.ep,
            pid=4242,
            started=bytes(16),
            codec_ids=codecs or [1, 2],
            signed=self.signer is not None if signed is None else signed,
            workers=4,
            max_pending=100,
            max_message_size=None,
        )
        fields.update(kw)
        body = protocol.welcome_body(**fields)
        if version != 2:
            body = body.replace(b'"version":2', b'"version":%d' % version)
        zero = Session(self.signer, outgoing=b"B") if self.signer else None
        frame = self.seal([(Kind.WELCOME, 1, call_id, 0, 0, body)], zero)
        if self.signer:
            cn = bytes.fromhex(hello["nonce"])
            self.session = Session(self.signer, cn, server_nonce, outgoing=b"B")
        return self.core.on_message(self.ep, frame)


PEERS: dict = {}


def peer(core, ep) -> Peer:
    key = (id(core), ep)
    if key not in PEERS or PEERS[key].core is not core:
        PEERS[key] = Peer(core, ep, core.signer)
    return PEERS[key]


def up(core, ep, **kw):
    """Connect ``ep`` and complete its handshake."""
    return peer(core, ep).welcome(**kw)


def make(n=2, **kw):
    clock = Clock()
    core = ClientCore(clock=clock, **kw)
    for ep in (A, B)[:n]:
        core.add_backend(ep)
        up(core, ep)
    return core, clock


def send_all(core):
    """Send what the core has, as a driver would; {call id: (backend, CALL item)}."""
    out = {}
    for ep, frame, calls in core.messages():
        items = parse(frame, peer(core, ep).session if core.signer else None)
        for item in items:
            if item.kind == Kind.CALL:
                out[item.call_id] = (ep, item)
        assert [c.id for c in calls] == [i.call_id for i in items if i.kind == Kind.CALL]
    return out


def sent_call(core):
    """A call of task "t" submitted and written out, as a driver would."""
    c = core.new_call("t")
    core.submit(c)
    send_all(core)
    return c


def result(core, ep, call_id, value, codec=JSONCodec):
    return peer(core, ep).reply(Kind.RESULT, codec.wire_id, call_id, codec.encode(value))


def error(core, ep, call_id, type_name, args=(), tb="", codec=JSONCodec):
    return peer(core, ep).reply(
        Kind.ERROR, codec.wire_id, call_id, codec.encode([type_name, list(args), tb])
    )


def reply_result(core, call, value, codec=JSONCodec):
    return result(core, call.backend, call.id, value, codec)


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
    backend, item = sent[call.id]
    assert backend == A
    assert item.kind == Kind.CALL and JSONCodec.decode(item.body) == ["add", [1, 2], {}]
    assert item.a == 0  # no deadline: no budget
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
        (done,) = error(core, A, call.id, type_name, ["x"], "TB")
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
    up(core, A)
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
    ((_, _, calls),) = core.messages()
    assert core.send_failed(calls) == []
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
    peer(core, A).hello()
    assert core.snapshot()[A]["state"] == HANDSHAKE
    assert core.drain_outbox() == []  # connected, but no WELCOME yet: still parked
    up(core, A)
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
    assert result(core, A, c.id, 1) == []
    assert core.stats["late_replies"] == 1
    assert core.snapshot()[A]["in_flight"] == 0


def test_busy_goes_to_other_backend_then_backs_off():
    core, clock = make(2, busy_retries=2)
    c = sent_call(core)
    assert c.backend == A
    assert error(core, A, c.id, "Busy", []) == []
    assert send_all(core)[c.id][0] == B  # another backend had room: at once
    assert error(core, B, c.id, "Busy", []) == []
    assert core.drain_outbox() == []  # both busy: back off
    wake = core.next_wakeup()
    assert wake is not None and wake > clock.t
    clock.t = wake
    core.tick()
    ((ep, _),) = send_all(core).values()
    ((_, ok, exc),) = error(core, ep, c.id, "Busy")
    assert isinstance(exc, BusyError) and exc.task == "t"
    assert core.snapshot()[A]["busy"] + core.snapshot()[B]["busy"] == 3


def test_stopping_reroutes_once_then_fails():
    core, _ = make(2)
    c = sent_call(core)
    assert error(core, A, c.id, "Stopping", []) == []
    assert core.snapshot()[A]["state"] == STOPPING
    assert send_all(core)[c.id][0] == B
    ((_, _, exc),) = error(core, B, c.id, "Stopping", [])
    assert isinstance(exc, StoppingError)


def test_stop_notice_routes_new_calls_elsewhere_until_reconnected():
    core, _ = make(2)
    assert error(core, A, 0, "Stopping", ["stopping"]) == []
    assert core.snapshot()[A]["state"] == STOPPING
    calls = [core.new_call("t") for _ in range(4)]
    for c in calls:
        core.submit(c)
    assert {backend for backend, _ in send_all(core).values()} == {B}
    core.backend_down(A)
    up(core, A)  # a new process on that endpoint
    c = core.new_call("t")
    core.submit(c)
    assert send_all(core)[c.id][0] == A  # the least loaded again
    assert core.stats["late_replies"] == 0 and core.stats["bad_replies"] == 0


def test_stopped_notice_reroutes_the_calls_it_left_unanswered():
    # "Stopped": the backend answered every call it read and reads no more, so a call
    # still unanswered there never ran -- re-sent elsewhere, not lost (issue 11).
    core, _ = make(2)
    c = sent_call(core)
    first = c.backend
    other = B if first == A else A
    assert error(core, first, 0, "Stopped", ["stopped"]) == []
    assert core.snapshot()[first]["state"] == STOPPING
    assert send_all(core)[c.id][0] == other and c.attempts == 1
    assert core.backend_down(first) == []  # nothing left there to lose
    assert reply_result(core, c, 7) == [(c, True, 7)]


def test_stopped_notice_with_no_other_backend_fails_the_call_as_stopping():
    core, _ = make(1)
    c = sent_call(core)
    ((call, ok, exc),) = error(core, A, 0, "Stopped", ["x"])
    assert call is c and not ok and isinstance(exc, StoppingError)
    assert core.snapshot()[A]["lost"] == 0


def test_other_notices_are_counted_not_obeyed():
    core, _ = make(1)
    error(core, A, 0, "Busy")
    core.on_message(A, pack_one(Kind.ERROR, 1, 0, 0, 0, b"not json"))
    assert core.snapshot()[A]["state"] == "up"
    assert core.stats["bad_replies"] == 2


def test_a_json_reply_spelling_nan_is_a_decode_error():
    core, _ = make(1)
    c = sent_call(core)
    ((_, ok, exc),) = core.on_message(
        A, pack_one(Kind.RESULT, JSONCodec.wire_id, c.id, 0, 0, b"NaN")
    )
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
    assert send_all(core)[c.id][0] == A  # verified by the backend's session
    body = JSONCodec.encode(1)
    # unsigned and wrongly signed replies are dropped and counted
    assert core.on_message(A, pack_one(Kind.RESULT, 1, c.id, 0, 0, body)) == []
    b = core.backends[A]
    other = Session(Signer(b"other"), b.nonce, bytes(16), outgoing=b"B")
    assert core.on_message(A, pack_items([(Kind.RESULT, 1, c.id, 0, 0, body)], other)) == []
    assert core.stats["bad_signatures"] == 2
    assert result(core, A, c.id, 1)[0][2] == 1


def test_pickle_reply_is_never_unpickled_by_a_json_client():
    core, _ = make(1)
    c = sent_call(core)
    ((_, ok, exc),) = result(core, A, c.id, 1, PickleCodec)
    assert not ok and isinstance(exc, DecodeError) and "does not accept" in str(exc)


def test_garbage_is_counted_not_raised():
    core, _ = make(1)
    assert core.on_message(A, b"junk") == []
    assert core.on_message(A, pack_one(Kind.PONG, 1, 12345)) == []
    assert core.on_frames(A, [b"a", b"b"]) == []
    assert core.stats["bad_replies"] == 2


def test_cancel_forgets_the_call():
    core, _ = make(1)
    c = sent_call(core)
    core.cancel(c)
    assert core.pending == 0 and core.snapshot()[A]["in_flight"] == 0
    assert result(core, A, c.id, 1) == []


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
        frame = pack_one(Kind.RESULT, codec.wire_id, c.id, 0, 0, codec.encode("y" * 100_000))
        assert core.on_message(A, memoryview(frame))[0][2] == "y" * 100_000


def test_pinned_calls_reach_a_stopping_backend():
    core, _ = make(2)
    c = sent_call(core)
    error(core, A, c.id, "Stopping", [])
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
    assert error(core, A, second.id, "Busy", []) == []
    assert core.drain_outbox() == []  # waits: the only backend is full
    # the answer to `first` frees a slot on A: `second` goes at once, no timer needed
    assert reply_result(core, first, 1) == [(first, True, 1)]
    assert send_all(core)[second.id][0] == A
    assert reply_result(core, second, 2) == [(second, True, 2)]


def test_refusal_of_a_signature_fails_only_that_call_never_completes_one():
    core, _ = make(n=1, signer=Signer(b"k"))
    call = core.new_call("add", (1, 2))
    core.submit(call)
    send_all(core)
    forged = pack_one(Kind.RESULT, 1, call.id, 0, 0, b"666")  # unsigned: never a value
    assert core.on_message(A, forged) == [] and core.pending == 1
    refusal = unsigned_error(call.id, protocol.UNAUTHENTICATED, [protocol.NO_KEY_HERE])
    assert core.on_message(B, refusal) == []  # not a backend of this client: ignored
    [(done, ok, exc)] = core.on_message(A, refusal)
    assert done is call and not ok and isinstance(exc, AuthenticationError)
    assert "the backend has none" in str(exc)
    assert core.stats["bad_signatures"] == 2 and core.stats["refused_signatures"] == 1
    assert core.snapshot()[A]["last_error"].startswith("refused the signature")


def test_a_keyless_client_is_told_the_backend_wants_a_key():
    core, _ = make(n=1)
    call = core.new_call("add", (1, 2))
    core.submit(call)
    send_all(core)
    refusal = unsigned_error(call.id, protocol.UNAUTHENTICATED, [protocol.KEY_DIFFERS])
    [(_, ok, exc)] = core.on_message(A, refusal)
    assert not ok and isinstance(exc, AuthenticationError)
    assert "this client has no key" in str(exc)


def test_connections_refused_before_coming_up_back_off_and_are_reported_once():
    assert reconnect_delay(1) == RECONNECT_FIRST and reconnect_delay(2) == 2 * RECONNECT_FIRST
    assert reconnect_delay(100) == RECONNECT_CAP
    core, clock = make(n=1)
    core.backend_down(A)
    why = "closed the connection during the ZeroMQ handshake: not a taskit backend"
    delays, reports = [], []
    for _ in range(8):
        _, delay, report = core.connect_refused(A, why)
        delays.append(delay)
        reports.append(report)
    assert delays[0] <= 1.25 * RECONNECT_FIRST and delays[-1] >= 0.75 * RECONNECT_CAP
    assert all(
        0.75 * reconnect_delay(i + 1) <= d <= 1.25 * reconnect_delay(i + 1)
        for i, d in enumerate(delays)
    )
    assert [r is not None for r in reports] == [False, True] + [False] * 6  # once per cause
    call = core.new_call("add", (1, 2))
    core.submit(call)
    clock.t += core.connect_timeout
    [(_, ok, exc)] = core.tick()
    assert isinstance(exc, BackendNotAvailableError) and "not a taskit backend" in str(exc)
    up(core, A)  # a connection that comes up resets the backoff
    assert core.connect_refused(A, why)[1] <= 1.25 * RECONNECT_FIRST


# -- liveness: taskit PINGs instead of ZMTP heartbeats (issue 11, item 1) -------------


def live(n=1, **kw):
    """A core with liveness checks at the FrontEnd defaults (0.5 s / 2 s)."""
    kw.setdefault("heartbeat_interval", 0.5)
    kw.setdefault("heartbeat_timeout", 2.0)
    return make(n, **kw)


def advance(core, clock, seconds, step=0.25):
    """Move the fake clock on by ``seconds``, ticking every ``step`` as a driver would;
    returns everything resolved on the way."""
    done = []
    end = clock.t + seconds
    while clock.t < end - 1e-9:
        clock.t = min(end, clock.t + step)
        done += core.tick()
    return done


def pong(core, endpoint):
    """The backend answers the PING the driver sends now."""
    core.ping(endpoint)
    p = peer(core, endpoint)
    ((ep, frame, _),) = core.messages()
    (m,) = parse(frame, p.session)
    assert m.kind == Kind.PING and m.call_id not in core.calls and m.body == b""
    return p.reply(Kind.PONG, m.codec_id, m.call_id)


def test_no_liveness_checks_without_heartbeat_interval():
    core, clock = make(1)
    assert core.timers == [] and core.next_wakeup() is None
    call = core.new_call("t")
    core.submit(call)
    send_all(core)
    assert advance(core, clock, 60) == [] and core.pings == [] and core.suspects == []


def test_the_liveness_check_is_a_timer_drivers_see():
    core, clock = live()
    assert core.next_wakeup() == clock.t + 0.5  # never discarded as a resolved call's
    clock.t += 0.5
    core.tick()
    assert core.next_wakeup() == clock.t + 0.5  # re-armed while a backend is up
    core.backend_down(A)
    advance(core, clock, 0.5)
    assert core.timers == []  # nothing connected: no wake-ups at all
    up(core, A)
    assert core.next_wakeup() == clock.t + 0.5


def test_replies_that_keep_flowing_need_no_ping():
    core, clock = live()
    for _ in range(40):  # 10 s of calls answered every 0.25 s
        core.submit(core.new_call("t"))
        (call_id,) = send_all(core)
        core.tick()
        assert core.pings == []
        clock.t += 0.25
        assert reply_result(core, core.calls[call_id], 1)
    assert core.snapshot()[A]["pings"] == 0 and core.backends[A].state == UP


def test_a_silent_backend_with_calls_is_pinged_then_lost_after_heartbeat_timeout():
    core, clock = live()
    call = core.new_call("t")
    core.submit(call)
    send_all(core)
    t0 = clock.t
    advance(core, clock, 0.5)
    assert core.take_pings() == [A]  # silent for heartbeat_interval, a call in flight
    advance(core, clock, 1.25)
    assert core.pings == [] and core.suspects == []  # one PING only, and not yet lost
    advance(core, clock, 0.25)
    assert clock.t - t0 == 2.0 and core.take_suspects() == [A]
    (done,) = core.check_suspect(A)  # the driver found nothing more on the socket
    assert done[0] is call and not done[1] and isinstance(done[2], BackendLostError)
    assert "no answer to PING" in str(done[2])
    assert core.backends[A].state == DOWN and core.pending == 0


def test_a_pong_keeps_a_slow_backend_up():
    core, clock = live()
    call = core.new_call("t")
    core.submit(call)
    send_all(core)
    for _ in range(20):  # a 10 s task: pinged about every second, always answering
        advance(core, clock, 0.5)
        for ep in core.take_pings():
            assert pong(core, ep) == []
        assert core.suspects == []
    assert core.backends[A].state == UP and core.pending == 1
    assert 5 <= core.snapshot()[A]["pings"] <= 10
    assert core.stats["late_replies"] == 0  # PONGs are not counted as late replies


def test_what_the_driver_reads_before_deciding_saves_the_backend():
    core, clock = live()
    call = core.new_call("t")
    core.submit(call)
    send_all(core)
    advance(core, clock, 2.0)
    assert core.take_pings() == [A] and core.take_suspects() == [A]
    # the reply was on the socket already, unread (e.g. the driver's loop was late)
    assert reply_result(core, call, 7) == [(call, True, 7)]
    assert core.check_suspect(A) is None and core.backends[A].state == UP
    advance(core, clock, 1.0)
    assert core.suspects == []  # heard: the clock started again


def test_a_lost_backends_calls_are_resent_with_retries():
    core, clock = live(2, retries=1)
    calls = [core.new_call("t") for _ in range(2)]
    for c in calls:
        core.submit(c)
    sent = send_all(core)
    on_a = [c for c in calls if sent[c.id][0] == A]
    assert len(on_a) == 1
    for _ in range(8):  # B answers PINGs, A does not
        advance(core, clock, 0.25)
        for ep in core.take_pings():
            if ep == B:
                pong(core, B)
    assert core.take_suspects() == [A]
    assert core.check_suspect(A) == []  # re-sent, not failed
    assert [c.backend for c in core.drain_outbox()] == [B]


def test_an_idle_backend_is_pinged_rarely_and_still_found_lost():
    core, clock = live()
    advance(core, clock, 7.75)
    assert core.pings == []  # idle: no traffic for IDLE_PING_FACTOR x heartbeat_timeout
    advance(core, clock, 0.25)
    assert core.take_pings() == [A]
    advance(core, clock, 1.25)
    assert core.suspects == []
    advance(core, clock, 0.25)  # PING unanswered for heartbeat_timeout - interval
    assert core.take_suspects() == [A]
    assert core.check_suspect(A) == []  # lost, no call to fail: the driver reconnects
    assert core.backends[A].state == DOWN


def test_a_call_to_a_backend_idle_for_long_is_lost_within_two_seconds():
    core, clock = live()
    advance(core, clock, 6.0)  # idle, silent: no PING yet
    call = core.new_call("t")
    core.submit(call)
    send_all(core)
    t0 = clock.t
    advance(core, clock, 0.5)  # the next check (every heartbeat_interval) pings it
    assert core.take_pings() == [A]
    while not core.suspects and clock.t - t0 < 5:
        advance(core, clock, 0.25)
    assert clock.t - t0 == 2.0  # its PING had max(0.5, 2 - 0.5) s to be answered
    assert isinstance(core.check_suspect(A)[0][2], BackendLostError)


def test_signed_pings():
    core, clock = live(signer=Signer(b"k"))
    assert pong(core, A) == []
    assert core.stats["bad_signatures"] == 0 and core.backends[A].heard >= 2


def unsigned_error(call_id, type_name, args):
    """A backend's refusal: an unsigned JSON ERROR (what it sends a call it cannot verify)."""
    body = JSONCodec.encode([type_name, list(args), ""])
    return pack_one(Kind.ERROR, JSONCodec.wire_id, call_id, 0, 0, body)


# -- protocol v2: handshake, load, budgets, sessions, cancel, batches (issue 13) ------


def test_a_backend_is_up_only_once_its_welcome_is_in():
    core, clock = make(0, connect_timeout=2.0)
    core.add_backend(A)
    c = core.new_call("t")
    core.submit(c)
    call_id, hello = peer(core, A).hello()
    assert core.snapshot()[A]["state"] == HANDSHAKE and core.drain_outbox() == []
    assert hello["codecs"] == [JSONCodec.wire_id] and hello["signed"] is False
    assert hello["version"] == 2 and hello["agent"].startswith("taskit/")
    assert call_id not in core.calls and call_id != c.id
    assert core.backends[A].nonce.hex() == hello["nonce"]
    core.backend_down(A)
    assert up(core, A) == []  # a new connection: a new HELLO, and its WELCOME
    snap = core.snapshot()[A]
    assert snap["state"] == UP and snap["connects"] == 1
    assert (snap["pid"], snap["name"]) == (4242, A)
    assert snap["capacity"] == {"workers": 4, "max_pending": 100, "max_message_size": None}
    assert send_all(core)[c.id][0] == A


def test_no_welcome_within_connect_timeout_says_the_handshake_went_unanswered():
    core, clock = make(0, connect_timeout=2.0)
    core.add_backend(A)
    peer(core, A).hello()
    core.submit(core.new_call("t"))
    clock.t += 2.0
    ((_, ok, exc),) = core.tick()
    assert isinstance(exc, BackendNotAvailableError)
    assert "did not answer the taskit handshake" in str(exc) and "v1" in str(exc)


@pytest.mark.parametrize(
    "welcome, cls, words",
    [
        (dict(version=3), ProtocolVersionError, "version 3; this client speaks 2"),
        (dict(codecs=[2, 3]), CodecNotAllowedError, "accepts codecs 'msgpack', 'pickle'"),
        (dict(signed=True), AuthenticationError, "the backend has one"),
    ],
)
def test_a_welcome_that_does_not_fit_fails_calls_at_once_with_a_typed_error(welcome, cls, words):
    core, clock = make(0, connect_timeout=2.0)
    core.add_backend(A)
    early = core.new_call("t")
    core.submit(early)  # parked, waiting for a backend
    assert up(core, A, **welcome) == []
    assert core.snapshot()[A]["state"] == REJECTED
    ((call, ok, exc),) = core.tick()  # at once, not after connect_timeout
    assert call is early and not ok and isinstance(exc, cls) and words in str(exc)
    late = core.new_call("t")
    core.submit(late)
    ((call, _, exc),) = core.tick()
    assert call is late and isinstance(exc, cls)
    assert words in core.snapshot()[A]["last_error"]


def test_a_rejected_backend_leaves_calls_to_the_others():
    core, _ = make(1)
    core.add_backend(B)
    up(core, B, codecs=[2])
    c = core.new_call("t")
    core.submit(c)
    assert send_all(core)[c.id][0] == A and core.tick() == []


def test_a_welcome_to_another_hello_is_dropped():
    core, clock = make(0)
    core.add_backend(A)
    assert up(core, A, nonce=protocol.new_nonce().hex()) == []
    assert core.snapshot()[A]["state"] == HANDSHAKE and core.stats["replayed"] == 1


def test_a_refused_hello_is_an_authentication_error_within_connect_timeout():
    core, clock = make(0, signer=Signer(b"k"))
    core.add_backend(A)
    c = core.new_call("t")
    core.submit(c)
    call_id, _ = peer(core, A).hello()
    refusal = unsigned_error(call_id, protocol.UNAUTHENTICATED, [protocol.NO_KEY_HERE])
    assert core.on_message(A, refusal) == []
    ((call, ok, exc),) = core.tick()
    assert call is c and isinstance(exc, AuthenticationError) and "the backend has none" in str(exc)


def test_a_v1_reply_is_a_protocol_version_error():
    core, _ = make(1)
    c = sent_call(core)
    v1 = [protocol.V1_MAGIC, bytes([3, 1]) + c.id.to_bytes(8, "big"), b"[]"]
    ((call, ok, exc),) = core.on_frames(A, v1)
    assert call is c and isinstance(exc, ProtocolVersionError) and "version 1" in str(exc)
    assert core.snapshot()[A]["state"] == REJECTED


def test_the_load_of_every_item_is_recorded():
    core, clock = make(1)
    c1, c2 = core.new_call("t"), core.new_call("t")
    core.submit(c1)
    core.submit(c2)
    send_all(core)
    assert core.snapshot()[A]["load_age"] == 0.0  # the WELCOME carried one
    p = peer(core, A)
    p.reply(Kind.RESULT, 1, c1.id, b"1", a=7, b=3)
    clock.t += 1.5
    snap = core.snapshot()[A]
    assert (snap["queued"], snap["running"], snap["load_age"]) == (7, 3, 1.5)
    core.on_message(
        A, pack_items([(Kind.PONG, 1, 999, 4, 2, b""), (Kind.RESULT, 1, c2.id, 1, 0, b"2")])
    )
    snap = core.snapshot()[A]
    assert (snap["queued"], snap["running"], snap["load_age"]) == (1, 0, 0.0)


def test_a_call_carries_its_remaining_time_budget_at_send_time():
    core, clock = make(1)
    c = core.new_call("t", timeout=2.5)
    core.submit(c)
    clock.t += 1.0  # routed, waiting in the outbox meanwhile
    assert send_all(core)[c.id][1].a == 1500
    late = core.new_call("t", timeout=0.0001)
    core.submit(late)
    clock.t += 1.0
    assert send_all(core)[late.id][1].a == 1  # 0 would mean "no deadline"


def test_expired_is_an_expired_error_and_a_timeout():
    core, _ = make(1)
    c = sent_call(core)
    ((_, ok, exc),) = error(core, A, c.id, "Expired", ["the call's deadline passed"])
    assert isinstance(exc, ExpiredError) and isinstance(exc, CallTimeoutError)
    assert isinstance(exc, TimeoutError) and exc.task == "t"


def test_a_replayed_reply_is_dropped_and_counted():
    core, _ = make(1, signer=Signer(b"k"))
    c1, c2 = core.new_call("t"), core.new_call("t")
    core.submit(c1)
    core.submit(c2)
    send_all(core)
    p = peer(core, A)
    frame = p.seal([(Kind.RESULT, 1, c1.id, 0, 0, b"1")])
    assert core.on_message(A, frame) == [(c1, True, 1)]
    assert core.on_message(A, frame) == [] and core.stats["replayed"] == 1
    # the session is bound to this connection: a frame sealed for another is refused
    other = Session(Signer(b"k"), protocol.new_nonce(), bytes(16), outgoing=b"B")
    assert core.on_message(A, pack_items([(Kind.RESULT, 1, c2.id, 0, 0, b"2")], other)) == []
    assert core.stats["bad_signatures"] == 1 and core.pending == 1


def test_no_session_puts_the_calls_back_unrun_and_asks_for_a_new_connection():
    core, _ = make(2, signer=Signer(b"k"))
    core.backend_down(B)
    c = sent_call(core)
    assert c.backend == A and c.attempts == 1
    refusal = unsigned_error(c.id, protocol.UNAUTHENTICATED, [protocol.NO_SESSION])
    assert core.on_message(A, refusal) == []  # not failed: it never ran
    assert core.take_resets() == [A] and core.snapshot()[A]["state"] == DOWN
    assert c.attempts == 0 and core.pending == 1 and core.drain_outbox() == []
    up(core, A)  # the driver's new connection says HELLO again
    assert send_all(core)[c.id][0] == A
    assert reply_result(core, c, 5) == [(c, True, 5)]


def test_withdrawing_a_call_not_yet_sent_is_local():
    core, _ = make(1)
    c = core.new_call("t")
    core.submit(c)
    assert core.withdraw(c) == "local" and core.pending == 0
    assert core.messages() == []  # nothing goes out, not even a CANCEL


def test_withdrawing_a_call_on_the_wire_asks_its_backend():
    core, _ = make(1)
    confirmed, refused = sent_call(core), sent_call(core)
    hooks = []
    for c in (confirmed, refused):
        c.cancel_hook = lambda c=c: hooks.append(c.id)
        assert core.withdraw(c) == "sent"
    cancels = [parse(f)[0] for _, f, calls in core.messages() if not calls]
    assert [(m.kind, m.call_id) for m in cancels] == [
        (Kind.CANCEL, confirmed.id),
        (Kind.CANCEL, refused.id),
    ]
    ((call, ok, exc),) = peer(core, A).reply(Kind.CANCELLED, 0, confirmed.id)
    assert call is confirmed and not ok and isinstance(exc, CancelledError)
    assert peer(core, A).reply(Kind.NOT_CANCELLED, 0, refused.id) == []
    assert refused.cancel_state == CANCEL_REFUSED and core.pending == 1
    assert hooks == [confirmed.id, refused.id]
    assert reply_result(core, refused, 9) == [(refused, True, 9)]  # its reply as usual
    assert core.snapshot()[A]["cancelled"] == 1 and core.stats["late_replies"] == 0


def test_forgetting_a_call_on_the_wire_cancels_it_there():
    core, _ = make(1)
    c = sent_call(core)
    core.cancel(c)
    ((ep, frame, calls),) = core.messages()
    assert (ep, calls, parse(frame)[0].kind) == (A, (), Kind.CANCEL)
    assert peer(core, A).reply(Kind.CANCELLED, 0, c.id) == []
    assert core.stats["late_replies"] == 0


def test_calls_drained_together_go_in_batches_and_resolve_as_singles():
    core, _ = make(1, codec=MsgpackCodec, prefetch=100)  # credit for all of them
    calls = [core.new_call("t", (i,)) for i in range(BATCH_ITEMS + 10)]
    big = core.new_call("t", (b"x" * 70_000,))
    for c in calls[:5] + [big] + calls[5:]:
        core.submit(c)
    messages = core.messages()
    assert [len(m[2]) for m in messages] == [5, 1, BATCH_ITEMS, 5]
    assert messages[1][2] == [big] and core.snapshot()[A]["sent"] == len(calls) + 1
    items = [(Kind.RESULT, 2, c.id, 0, 0, MsgpackCodec.encode(c.id)) for c in calls[:3]]
    items.append((Kind.ERROR, 1, calls[3].id, 0, 0, JSONCodec.encode(["Busy", [], ""])))
    items.append((Kind.ERROR, 1, calls[4].id, 0, 0, JSONCodec.encode(["KeyError", ["k"], ""])))
    done = core.on_message(A, pack_items(items))
    assert [(c, ok, v) for c, ok, v in done[:3]] == [(c, True, c.id) for c in calls[:3]]
    assert done[3][0] is calls[4] and isinstance(done[3][2], BackendProcessingError)
    assert calls[3].busy_tries == 1  # Busy: put back as a single would be


def test_a_keyed_client_reads_nothing_from_a_connection_without_a_handshake():
    core, _ = make(1, signer=Signer(b"k"))
    c = sent_call(core)
    core.backend_down(A)  # its session is gone with the connection
    assert core.on_message(A, pack_one(Kind.RESULT, 1, c.id, 0, 0, b"666")) == []
    assert core.stats["bad_signatures"] == 1


def test_a_call_rerouted_before_it_was_sent_goes_out_once():
    core, _ = make(2)
    c = core.new_call("t")
    core.submit(c)
    assert c.backend == A
    core.backend_down(A)  # before the driver sent it: re-routed to B
    ((ep, frame, calls),) = core.messages()
    assert (ep, calls) == (B, [c]) and len(parse(frame)) == 1 and c.attempts == 1


def test_a_malformed_welcome_rules_the_backend_out_with_a_protocol_error():
    core, _ = make(0)
    core.add_backend(A)
    c = core.new_call("t")
    core.submit(c)
    call_id, _ = peer(core, A).hello()
    assert peer(core, A).reply(Kind.WELCOME, 1, call_id, b"{}") == []
    ((call, ok, exc),) = core.tick()
    assert call is c and type(exc).__name__ == "ProtocolError" and "malformed WELCOME" in str(exc)
    assert core.snapshot()[A]["state"] == REJECTED


def test_retried_counts_lost_calls_resent_and_not_those_failed():
    core, _ = make(2, retries=1)
    calls = [core.new_call("t") for _ in range(4)]
    for c in calls:
        core.submit(c)
    send_all(core)
    core.backend_down(A)  # two lost there, both re-sent to B
    assert core.snapshot()[A]["lost"] == 2 and core.snapshot()[A]["retried"] == 2
    send_all(core)
    core.backend_down(B)  # four lost: B's own two re-sent later, A's two failed
    assert core.snapshot()[B]["lost"] == 4 and core.snapshot()[B]["retried"] == 2


def test_the_observe_hook_times_each_answer_from_its_last_send():
    core, clock = make(1)
    seen = []
    core.observe = lambda endpoint, seconds: seen.append((endpoint, seconds))
    ok = sent_call(core)
    clock.t += 0.25
    reply_result(core, ok, 1)
    failing = sent_call(core)
    clock.t += 0.5
    error(core, A, failing.id, "ValueError", ["x"])
    assert seen == [(A, 0.25), (A, 0.5)]


def test_a_call_made_outside_any_span_carries_no_metadata():
    core, _ = make(1)
    body = JSONCodec.decode(core.new_call("t", (1,)).body)
    assert body == ["t", [1], {}]  # three elements: no meta when there is no span
