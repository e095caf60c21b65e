"""Unit tests of the sans-I/O request handler (taskit._server.handler): no sockets.

Messages go in as the I/O loop hands them over (the routing id as bytes, then
``zmq.Frame`` objects, which need no socket); decisions and reply frames come out.
"""

from __future__ import annotations

import threading

import zmq

from taskit import protocol
from taskit._server.accounting import CALL_COST, QUALIFY, PeerLedger
from taskit._server.handler import Call, RequestHandler
from taskit.backend import task_count, task_kill, task_stop
from taskit.codecs import JSONCodec, MsgpackCodec, Signer
from taskit.protocol import Kind

ID = b"\x00client-1"


class Owner:
    """What the handler asks of its BackEnd: task_count, stats(), endpoint, stop."""

    endpoint = "tcp://127.0.0.1:1"
    task_count = 3

    def __init__(self):
        self.stops = 0

    def stats(self):
        return {"in_flight": 0}

    def stop_server(self, wait=True):
        self.stops += 1


def add(a, b):
    return a + b


def make(tasks=None, **kw):
    opts = dict(
        codecs={JSONCodec.wire_id: JSONCodec, MsgpackCodec.wire_id: MsgpackCodec},
        signer=None,
        admin=(task_stop, task_kill, task_count),
        request_limit=10_000,
        reply_limit=10_000,
        max_message_size=10_000,
        max_pending=None,
        peers=None,
    )
    opts.update(kw)
    owner = Owner()
    tasks = {"add": add} if tasks is None else tasks
    return RequestHandler(owner, tasks, threading.Lock(), **opts), owner


def msg(frames, ident=ID):
    return [ident, *(zmq.Frame(f) for f in frames)]


def call(name, *args, call_id=7, codec=JSONCodec, signer=None):
    return msg(protocol.encode_call(codec, call_id, name, args, None, signer))


def error_of(frames, codec=JSONCodec):
    m = protocol.unpack(frames)
    assert m.kind == Kind.ERROR
    return m.call_id, protocol.decode_error(codec, m.body)


def test_a_call_becomes_one_record_counted_in_flight_and_charged():
    h, _ = make(peers=PeerLedger(1 << 20))
    out = h.handle(call("add", 1, 2, call_id=42))
    assert type(out) is Call
    assert (out.ident, out.codec, out.call_id, out.name) == (ID, JSONCodec, 42, "add")
    assert (out.fn, out.args, out.kwargs, out.inline, out.pass_backend) == (
        add,
        [1, 2],
        {},
        False,
        False,
    )
    assert out.size == sum(map(len, protocol.encode_call(JSONCodec, 42, "add", (1, 2))))
    assert h.acct.in_flight == 1
    assert h.peers.held_by(ID) == out.size + CALL_COST
    frames, ok = h.result_frames(out, 3)
    assert ok and protocol.unpack(frames).call_id == 42
    assert JSONCodec.decode(protocol.unpack(frames).body) == 3


def test_a_ping_is_answered_with_a_pong_of_its_id():
    h, _ = make()
    out = h.handle(msg(protocol.pack(Kind.PING, JSONCodec.wire_id, 5)))
    m = protocol.unpack(out)
    assert (m.kind, m.call_id) == (Kind.PONG, 5)
    assert ID in h.heard  # told when a graceful stop begins


def test_refusals_are_reply_frames_counted_by_type():
    h, _ = make(max_pending=1)
    assert error_of(h.handle(call("nope")))[1][0] == "UnknownTask"
    assert type(h.handle(call("add", 1, 2))) is Call
    call_id, (type_name, _args, _tb) = error_of(h.handle(call("add", 1, 2, call_id=8)))
    assert (call_id, type_name) == (8, "Busy")
    assert h.acct.refused == {"UnknownTask": 1, "Busy": 1}
    h.stopping = True
    call_id, (type_name, _args, _tb) = error_of(h.handle(call("add", 1, 2, call_id=9)))
    assert (call_id, type_name) == (9, "Stopping")
    wrong_codec = call("add", 1, 2)
    wrong_codec[2] = zmq.Frame(protocol.HEADER.pack(Kind.CALL, 99, 7))
    assert error_of(h.handle(wrong_codec))[1][0] == "CodecNotAllowed"


def test_oversized_and_malformed_messages_are_dropped_and_counted():
    h, _ = make(request_limit=100)
    assert h.handle(call("add", "x" * 200)) is None
    assert h.handle(msg([b"junk", b"more"])) is None
    assert h.acct.dropped["oversized"] == 1 and h.acct.dropped["malformed"] == 1
    assert h.acct.in_flight == 0


def test_a_call_it_cannot_authenticate_gets_the_fixed_unsigned_answer():
    h, _ = make(signer=Signer(b"k1"))
    out = h.handle(call("add", 1, 2, signer=Signer(b"k2")))
    call_id, (type_name, args, _tb) = error_of(out)
    assert (call_id, type_name, args) == (7, protocol.UNAUTHENTICATED, [protocol.KEY_DIFFERS])
    assert h.acct.dropped["bad_signature"] == 1
    h2, _ = make()
    out = h2.handle(call("add", 1, 2, signer=Signer(b"k2")))
    assert error_of(out)[1][1] == [protocol.NO_KEY_HERE]
    assert h.handle(msg(protocol.pack(Kind.PING, 1, 3, b"", Signer(b"k2")))) is None


def test_a_quick_task_is_decided_inline_after_qualifying():
    h, _ = make(inline_auto=True, peers=PeerLedger(1 << 20))
    for _ in range(QUALIFY):
        c = h.handle(call("add", 1, 2))
        assert not c.inline
        h.peers.settle(ID, c.size)  # as the loop does when it replies
        h.acct.finished("add", True, 0.0, 0.0)
    c = h.handle(call("add", 1, 2))
    assert c.inline
    assert ID not in h.peers.held  # answered before the next is read: never charged


def test_admin_signals_answer_at_once_and_stop_asks_the_owner():
    h, owner = make({"add": add, "<stop>": (task_stop, True)})
    assert JSONCodec.decode(protocol.unpack(h.handle(call("<status>"))).body) == "3"
    assert JSONCodec.decode(protocol.unpack(h.handle(call("<tasks>"))).body) == ["<stop>", "add"]
    assert JSONCodec.decode(protocol.unpack(h.handle(call("<stats>"))).body) == {"in_flight": 0}
    assert protocol.unpack(h.handle(call("<stop>"))).kind == Kind.RESULT
    assert owner.stops == 1 and h.acct.admin == 4 and h.acct.in_flight == 0
    assert error_of(h.handle(call("<kill>")))[1][0] == "UnknownTask"  # not enabled


def test_a_gone_clients_call_is_not_accepted():
    h, _ = make()
    h.client_gone(ID)
    assert h.handle(call("add", 1, 2)) is None
    assert h.acct.dropped["client_gone"] == 1 and h.acct.in_flight == 0


def test_outcomes_become_replies_in_the_calls_codec():
    h, _ = make(reply_limit=50)
    c = h.handle(call("add", 1, 2, codec=MsgpackCodec))
    frames, ok = h.result_frames(c, "x" * 100)
    assert not ok and error_of(frames, MsgpackCodec)[1][0] == "EncodeError"
    frames, ok = h.result_frames(c, object())
    assert not ok and error_of(frames, MsgpackCodec)[1][0] == "EncodeError"
    try:
        raise ValueError("bad", 1)
    except ValueError as e:
        call_id, (type_name, args, tb) = error_of(h.error_frames(c, e), MsgpackCodec)
    assert (call_id, type_name, args) == (7, "ValueError", ["bad", 1])
    assert "Traceback" in tb


def test_the_stop_notice_goes_to_every_client_heard():
    h, _ = make()
    h.handle(call("add", 1, 2))
    h.handle(msg(protocol.pack(Kind.PING, JSONCodec.wire_id, 1), ident=b"\x00client-2"))
    frames, idents = h.stopping_notice()
    call_id, (type_name, _a, _t) = error_of(frames)
    assert (call_id, type_name, idents) == (0, "Stopping", {ID, b"\x00client-2"})


def test_the_stopped_notice_is_an_error_of_call_id_0():
    h, _ = make()
    call_id, (type_name, args, _t) = error_of(h.stopped_notice())
    assert (call_id, type_name) == (0, "Stopped") and "never ran" in args[0]
