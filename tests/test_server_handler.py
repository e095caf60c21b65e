"""Unit tests of the sans-I/O request handler (taskit._server.handler): no sockets.

Messages go in as the I/O loop hands them over (the routing id as bytes, then the
message's one frame as a ``zmq.Frame``, which needs no socket); decisions and reply
items (or whole frames) come out.
"""

from __future__ import annotations

import os
import threading
import time

import zmq

from taskit import protocol
from taskit._server.accounting import CALL_COST, QUALIFY, PeerLedger
from taskit._server.handler import CANCELLED, RUNNING, Call, RequestHandler
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


def frame(items, session=None):
    return zmq.Frame(protocol.pack_items(items, session))


def call_item(name, *args, call_id=7, codec=JSONCodec, budget=0):
    return (Kind.CALL, codec.wire_id, call_id, budget, 0, protocol.encode_call(codec, name, args))


def call(name, *args, call_id=7, codec=JSONCodec, session=None, budget=0):
    return frame([call_item(name, *args, call_id=call_id, codec=codec, budget=budget)], session)


def error_of(item, codec=JSONCodec):
    if isinstance(item, protocol.Item):
        item = (item.kind, item.codec_id, item.call_id, item.body)
    kind, codec_id, call_id, body = item
    assert kind == Kind.ERROR
    return call_id, protocol.decode_error(codec, body)


def parse_one(data, session=None):
    (item,) = protocol.parse(data, session)
    return item


def hello(h, key, ident=ID):
    """Say HELLO to keyed handler ``h``: the client's session, sealed as a FrontEnd's."""
    signer = Signer(key)
    nonce = protocol.new_nonce()
    body = protocol.hello_body([JSONCodec.wire_id], True, nonce, "test")
    zero = protocol.Session(signer)  # the handshake's: zero nonces, the client's letter
    out = h.handle(ident, frame([(Kind.HELLO, 1, 1, 0, 0, body)], zero))
    assert type(out) is bytes
    welcome = parse_one(out, zero)
    info = protocol.parse_handshake(welcome.body, Kind.WELCOME)
    assert welcome.kind == Kind.WELCOME and info["nonce"] == nonce.hex() and info["signed"]
    return protocol.Session(signer, nonce, bytes.fromhex(info["session"]), b"C")


def test_a_call_becomes_one_record_counted_in_flight_and_charged():
    h, _ = make(peers=PeerLedger(1 << 20))
    f = call("add", 1, 2, call_id=42)
    out = h.handle(ID, f)
    assert type(out) is Call
    assert (out.ident, out.codec, out.call_id, out.name) == (ID, JSONCodec, 42, "add")
    assert (out.fn, out.args, out.kwargs, out.inline, out.pass_backend) == (
        add,
        [1, 2],
        {},
        False,
        False,
    )
    assert out.size == len(f.bytes)
    assert (out.budget, out.expires) == (0, 0.0)
    assert h.acct.in_flight == 1
    assert h.peers.held_by(ID) == out.size + CALL_COST
    assert h.queued[(ID, 42)] is out  # where a CANCEL finds it
    item, ok = h.result_item(out, 3)
    assert ok and item[:3] == (Kind.RESULT, JSONCodec.wire_id, 42)
    assert JSONCodec.decode(item[3]) == 3


def test_a_call_with_meta_or_a_tuple_body_is_accepted_like_any_other():
    h, _ = make()
    body = MsgpackCodec.encode(["add", [1, 2], {}, {"traceparent": "00-1-2-01"}])
    out = h.handle(ID, frame([(Kind.CALL, MsgpackCodec.wire_id, 5, 0, 0, body)]))
    assert type(out) is Call and (out.name, out.args, out.call_id) == ("add", [1, 2], 5)
    bad_meta = MsgpackCodec.encode(["add", [1, 2], {}, {"k": 1}])
    out = h.handle(ID, frame([(Kind.CALL, MsgpackCodec.wire_id, 6, 0, 0, bad_meta)]))
    assert error_of(out, MsgpackCodec)[1][0] == "ProtocolError"


def test_replies_carry_the_load_queued_and_running():
    h, _ = make()
    for i in range(3):
        h.handle(ID, call("add", 1, 2, call_id=i + 1))
    h.acct.running = 1
    data = h.pack([(Kind.RESULT, 1, 9, b"1"), (Kind.PONG, 1, 10, b"")])
    items = protocol.parse(data)
    assert [(i.call_id, i.a, i.b) for i in items] == [(9, 2, 1), (10, 2, 1)]
    assert protocol.parse(h.pack([(Kind.RESULT, 1, 9, b"1")]))[0][3:5] == (2, 1)
    # the unsigned batch is packed in one pass: the same bytes as protocol.pack_items
    items = [
        (Kind.RESULT, 2, 5, b"\x01"),
        (Kind.ERROR, 1, 6, b'["x",[],""]'),
        (Kind.PONG, 2, 7, b""),
    ]
    assert h.pack(items) == protocol.pack_items([(k, c, i, 2, 1, b) for k, c, i, b in items])


def test_a_budget_sets_the_calls_deadline_from_its_receipt():
    h, _ = make()
    before = time.monotonic()
    c = h.handle(ID, call("add", 1, 2, budget=1500))
    assert c.budget == 1500 and before + 1.5 <= c.expires <= time.monotonic() + 1.5
    kind, codec_id, call_id, body = h.expired(c)
    type_name, args, _tb = protocol.decode_error(JSONCodec, body)
    assert (kind, call_id, type_name) == (Kind.ERROR, 7, "Expired")
    assert args == [
        "the call's deadline passed before it could start (budget 1500 ms); it did not run"
    ]
    assert h.acct.refused == {"Expired": 1}


def test_a_ping_is_answered_with_a_pong_of_its_id():
    h, _ = make()
    out = h.handle(ID, frame([(Kind.PING, JSONCodec.wire_id, 5, 0, 0, b"")]))
    assert out == (Kind.PONG, JSONCodec.wire_id, 5, b"")
    assert ID in h.heard  # told when a graceful stop begins


def test_a_keyless_hello_is_welcomed_with_the_backends_identity():
    h, owner = make(max_pending=9)
    h.workers = lambda: 3
    nonce = protocol.new_nonce()
    body = protocol.hello_body([2], False, nonce, "test")
    kind, codec_id, call_id, wbody = h.handle(ID, frame([(Kind.HELLO, 1, 4, 0, 0, body)]))
    assert (kind, codec_id, call_id) == (Kind.WELCOME, 1, 4)
    w = protocol.parse_handshake(wbody, Kind.WELCOME)
    assert w["nonce"] == nonce.hex() and w["version"] == 2 and not w["signed"]
    assert (w["name"], w["pid"], w["started"]) == (owner.endpoint, os.getpid(), h.started.hex())
    assert (w["codecs"], w["workers"], w["max_pending"]) == ([1, 2], 3, 9)
    assert w["max_message_size"] == 10_000
    assert not h.sessions  # keyless: stateless


def test_refusals_are_reply_items_counted_by_type():
    h, _ = make(max_pending=1)
    assert error_of(h.handle(ID, call("nope")))[1][0] == "UnknownTask"
    assert type(h.handle(ID, call("add", 1, 2))) is Call
    call_id, (type_name, _args, _tb) = error_of(h.handle(ID, call("add", 1, 2, call_id=8)))
    assert (call_id, type_name) == (8, "Busy")
    assert h.acct.refused == {"UnknownTask": 1, "Busy": 1}
    h.stopping = True
    call_id, (type_name, _args, _tb) = error_of(h.handle(ID, call("add", 1, 2, call_id=9)))
    assert (call_id, type_name) == (9, "Stopping")
    wrong_codec = frame([(Kind.CALL, 99, 7, 0, 0, b"x")])
    assert error_of(h.handle(ID, wrong_codec))[1][0] == "CodecNotAllowed"


def test_oversized_and_malformed_messages_are_dropped_and_counted():
    h, _ = make(request_limit=100)
    assert h.handle(ID, call("add", "x" * 200)) is None
    assert h.handle(ID, zmq.Frame(b"junk" * 10)) is None
    assert h.handle_frames(ID, [zmq.Frame(b"junk"), zmq.Frame(b"more")], 2) is None
    assert h.acct.dropped["oversized"] == 1 and h.acct.dropped["malformed"] == 2
    assert h.acct.in_flight == 0


def test_a_batch_is_decided_item_by_item_in_order():
    h, _ = make(max_pending=2)
    items = [
        call_item("add", 1, 2, call_id=1),
        call_item("nope", call_id=2),
        (Kind.PING, 1, 3, 0, 0, b""),
        call_item("add", 3, 4, call_id=4),
        call_item("add", 5, 6, call_id=5),  # over max_pending
    ]
    out = h.handle(ID, frame(items))
    assert [type(o).__name__ for o in out] == ["Call", "tuple", "tuple", "Call", "tuple"]
    assert out[0].call_id == 1 and out[3].call_id == 4
    assert error_of(out[1])[1][0] == "UnknownTask" and out[2][0] == Kind.PONG
    assert error_of(out[4])[0:2] == (5, ("Busy", out and error_of(out[4])[1][1], ""))
    assert h.acct.in_flight == 2


def test_cancel_withdraws_a_queued_call_once_and_never_a_running_one():
    h, _ = make(peers=PeerLedger(1 << 20))
    c = h.handle(ID, call("add", 1, 2, call_id=3))
    assert h.handle(ID, frame([(Kind.CANCEL, 0, 3, 0, 0, b"")])) == (Kind.CANCELLED, 0, 3, b"")
    assert c.state == CANCELLED and h.acct.cancelled == 1 and h.acct.in_flight == 0
    assert ID not in h.peers.held  # its ledger charge settled
    # again, or unknown, or started: NOT_CANCELLED
    assert h.handle(ID, frame([(Kind.CANCEL, 0, 3, 0, 0, b"")]))[0] == Kind.NOT_CANCELLED
    assert h.cancel(ID, 99)[0] == Kind.NOT_CANCELLED
    c2 = h.handle(ID, call("add", 1, 2, call_id=4))
    c2.state = RUNNING  # as a worker marks it (under the lock)
    assert h.cancel(ID, 4)[0] == Kind.NOT_CANCELLED and h.acct.cancelled == 1
    assert h.cancel(b"someone else", 4)[0] == Kind.NOT_CANCELLED


def test_cancel_later_in_a_batch_withdraws_an_inline_call_of_it():
    h, _ = make(inline_names=frozenset({"add"}))
    out = h.handle(ID, frame([call_item("add", 1, 2, call_id=5), (Kind.CANCEL, 0, 5, 0, 0, b"")]))
    assert out[0].inline and out[0].state == CANCELLED
    assert out[1] == (Kind.CANCELLED, 0, 5, b"")
    assert h.acct.in_flight == 0 and h.acct.cancelled == 1


def test_a_keyed_backend_opens_a_session_per_connection_on_hello():
    h, _ = make(signer=Signer(b"k1"))
    session = hello(h, b"k1")
    assert ID in h.sessions
    out = h.handle(ID, call("add", 1, 2, session=session))
    assert type(out) is Call
    sealed = h.pack([(Kind.RESULT, 1, 7, b"3")], h.sessions[ID])
    assert parse_one(sealed, session).body == b"3"  # sealed for this connection


def test_a_replayed_message_is_dropped_and_counted_never_run():
    h, _ = make(signer=Signer(b"k1"))
    session = hello(h, b"k1")
    f = protocol.pack_items([call_item("add", 1, 2)], session)
    assert type(h.handle(ID, zmq.Frame(f))) is Call
    assert h.handle(ID, zmq.Frame(f)) is None
    assert h.acct.dropped["replayed"] == 1 and h.acct.in_flight == 1
    # on another connection (no session there): refused, NO_SESSION, unsigned
    out = h.handle(b"\x00client-2", zmq.Frame(f))
    call_id, (type_name, args, _tb) = error_of(parse_one(out))
    assert (call_id, type_name, args) == (7, protocol.UNAUTHENTICATED, [protocol.NO_SESSION])
    assert h.acct.dropped["no_session"] == 1
    # a second HELLO on a connection that has a session: dropped as a replay
    body = protocol.hello_body([1], True, protocol.new_nonce(), "t")
    zero = protocol.Session(Signer(b"k1"))
    assert h.handle(ID, frame([(Kind.HELLO, 1, 9, 0, 0, body)], zero)) is None
    assert h.acct.dropped["replayed"] == 2


def test_a_hello_replayed_on_another_connection_opens_no_session():
    h, _ = make(signer=Signer(b"k1"))
    body = protocol.hello_body([1], True, protocol.new_nonce(), "t")
    f = protocol.pack_items([(Kind.HELLO, 1, 1, 0, 0, body)], protocol.Session(Signer(b"k1")))
    assert type(h.handle(ID, zmq.Frame(f))) is bytes  # welcomed
    assert h.handle(b"\x00elsewhere", zmq.Frame(f)) is None
    assert list(h.sessions) == [ID] and h.acct.dropped["replayed"] == 1


def test_sessions_are_bounded_oldest_forgotten_and_gone_clients_forgotten():
    h, _ = make(signer=Signer(b"k1"), max_sessions=2)
    for i in range(3):
        hello(h, b"k1", ident=bytes([i]))
    assert list(h.sessions) == [b"\x01", b"\x02"] and h.acct.sessions_evicted == 1
    h.client_gone(b"\x01")
    assert list(h.sessions) == [b"\x02"]


def test_a_call_it_cannot_authenticate_gets_the_fixed_unsigned_answer():
    h, _ = make(signer=Signer(b"k1"))
    session = hello(h, b"k1")
    wrong = protocol.Session(Signer(b"k2"), bytes(16), bytes(16))
    out = h.handle(ID, call("add", 1, 2, session=wrong))
    call_id, (type_name, args, _tb) = error_of(parse_one(out))
    assert (call_id, type_name, args) == (7, protocol.UNAUTHENTICATED, [protocol.KEY_DIFFERS])
    assert h.acct.dropped["bad_signature"] == 1
    assert type(h.handle(ID, call("add", 1, 2, session=session))) is Call  # still fine
    # a HELLO with another key is told too (its call id)
    body = protocol.hello_body([1], True, protocol.new_nonce(), "t")
    out = h.handle(
        b"\x00c2", frame([(Kind.HELLO, 1, 9, 0, 0, body)], protocol.Session(Signer(b"k2")))
    )
    assert error_of(parse_one(out))[0:2] == (
        9,
        (protocol.UNAUTHENTICATED, [protocol.KEY_DIFFERS], ""),
    )
    h2, _ = make()
    out = h2.handle(ID, call("add", 1, 2, session=wrong))
    assert error_of(parse_one(out))[1][1] == [protocol.NO_KEY_HERE]
    ping = frame([(Kind.PING, 1, 3, 0, 0, b"")], wrong)
    assert h.handle(ID, ping) is None  # not a call: nothing to answer


def test_a_quick_task_is_decided_inline_after_qualifying():
    h, _ = make(inline_auto=True, peers=PeerLedger(1 << 20))
    for _ in range(QUALIFY):
        c = h.handle(ID, call("add", 1, 2))
        assert not c.inline
        h.peers.settle(ID, c.size)  # as the loop does when it replies
        h.acct.finished("add", True, 0.0, 0.0)
    c = h.handle(ID, call("add", 1, 2))
    assert c.inline
    assert ID not in h.peers.held  # answered before the next is read: never charged


def result_of(item):
    assert item[0] == Kind.RESULT
    return JSONCodec.decode(item[3])


def test_admin_signals_answer_at_once_and_stop_asks_the_owner():
    h, owner = make({"add": add, "<stop>": (task_stop, True)})
    assert result_of(h.handle(ID, call("<status>"))) == "3"
    assert result_of(h.handle(ID, call("<tasks>"))) == ["<stop>", "add"]
    assert result_of(h.handle(ID, call("<stats>"))) == {"in_flight": 0}
    assert h.handle(ID, call("<stop>"))[0] == Kind.RESULT
    assert owner.stops == 1 and h.acct.admin == 4 and h.acct.in_flight == 0
    assert error_of(h.handle(ID, call("<kill>")))[1][0] == "UnknownTask"  # not enabled


def test_a_gone_clients_call_is_not_accepted():
    h, _ = make()
    h.client_gone(ID)
    assert h.handle(ID, call("add", 1, 2)) is None
    assert h.acct.dropped["client_gone"] == 1 and h.acct.in_flight == 0


def test_outcomes_become_replies_in_the_calls_codec():
    h, _ = make(reply_limit=50)
    c = h.handle(ID, call("add", 1, 2, codec=MsgpackCodec))
    item, ok = h.result_item(c, "x" * 100)
    assert not ok and error_of(item, MsgpackCodec)[1][0] == "EncodeError"
    item, ok = h.result_item(c, object())
    assert not ok and error_of(item, MsgpackCodec)[1][0] == "EncodeError"
    try:
        raise ValueError("bad", 1)
    except ValueError as e:
        call_id, (type_name, args, tb) = error_of(h.error_item(c, e), MsgpackCodec)
    assert (call_id, type_name, args) == (7, "ValueError", ["bad", 1])
    assert "Traceback" in tb


def test_the_stop_notice_goes_to_every_client_heard():
    h, _ = make()
    h.handle(ID, call("add", 1, 2))
    h.handle(b"\x00client-2", frame([(Kind.PING, JSONCodec.wire_id, 1, 0, 0, b"")]))
    item, idents = h.stopping_notice()
    call_id, (type_name, _a, _t) = error_of(item)
    assert (call_id, type_name, idents) == (0, "Stopping", {ID, b"\x00client-2"})


def test_the_stopped_notice_is_an_error_of_call_id_0():
    h, _ = make()
    call_id, (type_name, args, _t) = error_of(h.stopped_notice())
    assert (call_id, type_name) == (0, "Stopped") and "never ran" in args[0]
