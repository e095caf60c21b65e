"""Security of the BackEnd: HMAC signing, pickle gating, size limits, CurveZMQ."""

from __future__ import annotations

import os
import pickle

import pytest
import zmq

from taskit import protocol
from taskit.backend import ADMIN_TASKS, BackEnd
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec
from taskit.errors import BackendNotAvailableError, InsecureCodecError
from taskit.frontend import FrontEnd
from taskit.protocol import Kind
from tests.integration._backend_helpers import RemoteError

KEY = b"a shared secret that only the operators know"
TASKS = {"add": lambda a, b: a + b, "echo": lambda x: x, **ADMIN_TASKS}


class _Touch:
    """Unpickling this creates a file: proof that pickle data was (not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- signing ------------------------------------------------------------------------------


def test_signed_calls_are_answered_with_signed_replies(serve, client):
    b = serve(TASKS, key=KEY)
    c = client(b, key=KEY)
    assert c.call("add", 1, 2) == 3  # RawClient.recv verifies the reply's session seal
    c.send("add", 2, 2)
    assert c.sock.poll(5000)
    frame = c.sock.recv()
    assert frame[3] & protocol.SIGNED
    assert protocol.parse(frame, c.session)[0].kind == Kind.RESULT
    with pytest.raises(protocol.SignatureError):  # sealed for this connection only
        protocol.parse(frame, protocol.Session(c.signer, bytes(16), bytes(16)))


def test_the_handshake_is_signed_and_the_welcome_echoes_the_nonce(serve, client):
    b = serve(TASKS, key=KEY, workers=3, max_pending=100)
    c = client(b, key=KEY)
    w = c.hello()  # checks the seal (zero-nonce session) and the nonce echo
    assert w["signed"] and w["workers"] == 3 and w["max_pending"] == 100
    assert w["name"] == b.endpoint and w["pid"] == os.getpid()
    other = client(b, key=KEY).hello()
    assert other["session"] != w["session"] and other["started"] == w["started"]


COUNT: list[int] = []
COUNTED = {"count": lambda: COUNT.append(1) or len(COUNT), **TASKS}


def test_a_message_sent_twice_by_a_man_in_the_middle_runs_once(serve, client):
    COUNT.clear()
    b = serve(COUNTED, key=KEY)
    c = client(b, key=KEY)
    call_id = c.send("count")
    captured = c.last_frame  # what a man in the middle saw go by
    assert c.recv()[2:] == (call_id, 1)
    c.send_frame(captured)  # replayed on the same connection: dropped, never run
    assert c.silent()
    assert c.call("<stats>")["dropped"]["replayed"] == 1
    # replayed on a connection of its own: no session there, refused unsigned
    mitm = client(b)
    mitm.send_frame(captured)
    assert_refused_unsigned(mitm, call_id=call_id, why=protocol.NO_SESSION)
    assert mitm.silent()
    stats = c.call("<stats>")
    assert stats["dropped"]["no_session"] == 1 and stats["tasks"]["count"]["calls"] == 1
    assert COUNT == [1]


def test_a_second_hello_on_a_connection_is_dropped_as_a_replay(serve, client):
    b = serve(TASKS, key=KEY)
    zero = protocol.Session(protocol.Signer(KEY))
    body = protocol.hello_body([MsgpackCodec.wire_id], True, protocol.new_nonce(), "t")
    frame = protocol.pack_items([(Kind.HELLO, 1, 1, 0, 0, body)], zero)
    c = client(b)
    c.send_frame(frame)
    assert c.sock.poll(5000) and protocol.parse(c.sock.recv(), zero)[0].kind == Kind.WELCOME
    c.send_frame(frame)  # the same HELLO again: its connection has a session now
    assert c.silent()
    assert b.stats()["dropped"]["replayed"] == 1


@pytest.mark.parametrize("how", ["unsigned", "wrong key", "tampered", "truncated digest"])
def test_bad_signatures_are_dropped_unread_and_counted(serve, client, how):
    b = serve(TASKS, key=KEY)
    good = client(b, key=KEY)
    bad = client(b, key=KEY)
    bad.hello()
    item = bad.call_item("add", 1, 2, call_id=1)
    if how == "wrong key":
        frame = protocol.pack_items([item], protocol.Session(protocol.Signer(b"not the key")))
    else:
        frame = protocol.pack_items([item], bad.session)
    if how == "unsigned":
        frame = protocol.pack_items([item])
    elif how == "tampered":
        body = MsgpackCodec.encode(["add", [9, 2], {}])
        assert len(body) == len(item[5])
        frame = frame.replace(item[5], body)
    elif how == "truncated digest":
        frame = frame[:-16]
    bad.send_frame(frame)
    # Never run; answered only with the fixed, unsigned refusal (nothing in it
    # depends on the key), so the caller gets an error instead of a hang.
    assert_refused_unsigned(bad, call_id=1, why=protocol.KEY_DIFFERS)
    assert bad.silent()
    assert good.call("<stats>")["dropped"]["bad_signature"] == 1


def assert_refused_unsigned(c, call_id, why):
    """``c`` received exactly the backend's fixed refusal of a signature: an unsigned
    JSON ERROR ``Unauthenticated`` for ``call_id``."""
    assert c.sock.poll(5000)
    (m,) = protocol.parse(c.sock.recv())  # unsigned: no key needed to read it
    assert (m.kind, m.codec_id, m.call_id) == (Kind.ERROR, JSONCodec.wire_id, call_id)
    assert protocol.decode_error(JSONCodec, m.body) == (protocol.UNAUTHENTICATED, [why], "")


def test_a_keyless_backend_refuses_signed_calls_unread(serve, client):
    b = serve(TASKS)
    keyed = client(b)
    item = keyed.call_item("add", 1, 2, call_id=7, codec=JSONCodec)
    keyed.send_frame(protocol.pack_items([item], protocol.Session(protocol.Signer(KEY))))
    assert_refused_unsigned(keyed, call_id=7, why=protocol.NO_KEY_HERE)
    assert b.stats()["dropped"]["bad_signature"] == 1


def test_admin_signals_need_a_signature_when_a_key_is_set(serve, client):
    b = serve(TASKS, key=KEY)
    stranger = client(b)  # no key: no HELLO, no session
    for signal in ("<kill>", "<stop>", "<status>"):
        stranger.send(signal)
    for _ in range(3):  # each refused, none run
        assert stranger.sock.poll(5000)
        (m,) = protocol.parse(stranger.sock.recv())
        assert protocol.decode_error(JSONCodec, m.body) == (
            protocol.UNAUTHENTICATED,
            [protocol.NO_SESSION],
            "",
        )
    assert stranger.silent()
    assert b.running
    owner = client(b, key=KEY)
    assert owner.call("<stats>")["dropped"]["no_session"] == 3
    assert owner.call("<stop>") is None
    assert b.join(10)


# --- pickle gating ------------------------------------------------------------------------


def test_pickle_is_refused_without_key_and_never_unpickled(serve, client, tmp_path):
    b = serve({"echo": lambda x: x})
    c = client(b)
    marker = tmp_path / "pwned"
    body = pickle.dumps(["echo", [_Touch(str(marker))], {}])
    c.send_frame(protocol.pack_one(Kind.CALL, PickleCodec.wire_id, 9, 0, 0, body))
    kind, codec, call_id, (type_name, args, _tb) = c.recv()
    assert (kind, codec, call_id, type_name) == (Kind.ERROR, JSONCodec, 9, "CodecNotAllowed")
    assert "pickle" not in b.codecs and "json" in args[0]
    assert not marker.exists()
    assert c.call("<stats>")["refused"]["CodecNotAllowed"] == 1


def test_pickle_needs_key_or_explicit_insecure_flag():
    with pytest.raises(InsecureCodecError, match="key="):
        BackEnd(TASKS, port=0, codecs=["json", "pickle"])
    with pytest.raises(InsecureCodecError):
        BackEnd(TASKS, port=0, codec=PickleCodec)  # TaskIt 4.0 style
    assert "pickle" in BackEnd(TASKS, port=0, key=KEY).codecs
    assert "pickle" in BackEnd(TASKS, port=0, insecure_pickle=True).codecs
    assert "pickle" not in BackEnd(TASKS, port=0, key=KEY, codecs=["msgpack"]).codecs


def test_pickle_with_key_round_trips_objects(serve, client):
    b = serve(TASKS, key=KEY)
    c = client(b, key=KEY)
    value = {"set": {1, 2}, "tuple": (1, "a"), "big": 9**99, "complex": 1 + 2j}
    assert c.call("echo", value, codec=PickleCodec) == value


def test_insecure_pickle_round_trip(serve, client):
    b = serve({"union": lambda a, b: a | b}, insecure_pickle=True)
    assert client(b).call("union", {1}, {2}, codec=PickleCodec) == {1, 2}


# --- limits -------------------------------------------------------------------------------


def test_oversized_messages_are_refused_by_zeromq(serve, client):
    b = serve(TASKS, max_message_size=64 * 1024)
    big = client(b)
    big.send("echo", b"x" * (128 * 1024))
    assert big.silent(0.5)  # libzmq drops the connection instead of reading the message
    small = client(b)
    assert small.call("echo", b"y" * 1000) == b"y" * 1000
    assert b.running


def test_max_message_size_none_means_unlimited(serve, client):
    b = serve(TASKS, max_message_size=None)
    payload = os.urandom(3 * 1024 * 1024)
    assert client(b).call("echo", payload) == payload


def test_router_has_tcp_keepalive_and_no_zmtp_heartbeat_by_default(serve):
    # ZMTP heartbeats let a flood-and-reset client abort the process (libzmq 4.3.5;
    # tests/integration/test_flood_reset.py): off by default, TCP keepalive instead
    sock = serve(TASKS)._loop.router  # white-box: no other observable effect in a short test
    assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
    assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
    assert sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE) == 30
    assert sock.getsockopt(zmq.TCP_KEEPALIVE_INTVL) == 10
    assert sock.getsockopt(zmq.TCP_KEEPALIVE_CNT) == 3
    assert sock.getsockopt(zmq.TCP_MAXRT) == 60_000


def test_heartbeat_options_are_set_on_the_router(serve):
    b = serve(TASKS, heartbeat_interval=0.5)
    sock = b._loop.router  # white-box: the options have no other observable effect in a test
    assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 500
    assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 1500
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 64 * 1024 * 1024
    b2 = serve(TASKS, heartbeat_interval=0.2, heartbeat_timeout=5.0)
    assert b2._loop.router.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 5000
    b3 = serve(TASKS, heartbeat_interval=None)
    assert b3._loop.router.getsockopt(zmq.HEARTBEAT_IVL) == 0


# --- CurveZMQ -----------------------------------------------------------------------------


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE")
def test_curve_encryption(serve, client):
    server_public, server_secret = zmq.curve_keypair()
    b = serve(TASKS, curve_secretkey=server_secret, curve_publickey=server_public)
    client_public, client_secret = zmq.curve_keypair()
    c = client(
        b,
        curve_serverkey=server_public,
        curve_publickey=client_public,
        curve_secretkey=client_secret,
    )
    assert c.call("add", 20, 22) == 42
    plain = client(b)  # no CURVE handshake: the connection never comes up
    plain.send("add", 1, 2)
    assert plain.silent(0.5)
    wrong = client(
        b,
        curve_serverkey=zmq.curve_keypair()[0],
        curve_publickey=client_public,
        curve_secretkey=client_secret,
    )
    wrong.send("add", 1, 2)
    assert wrong.silent(0.5)
    assert c.call("add", 1, 1) == 2


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE")
def test_curve_clients_admits_only_the_listed_keys(serve, client):
    server_public, server_secret = zmq.curve_keypair()
    listed_public, listed_secret = zmq.curve_keypair()
    other_public, other_secret = zmq.curve_keypair()
    b = serve(
        TASKS,
        curve_secretkey=server_secret,
        curve_publickey=server_public,
        curve_clients=[listed_public.decode()],  # str or bytes
    )
    listed = client(
        b,
        curve_serverkey=server_public,
        curve_publickey=listed_public,
        curve_secretkey=listed_secret,
    )
    assert listed.call("add", 20, 22) == 42
    stranger = client(  # knows the server key, but its own key is not listed
        b,
        curve_serverkey=server_public,
        curve_publickey=other_public,
        curve_secretkey=other_secret,
    )
    stranger.send("add", 1, 2)
    assert stranger.silent(0.5)
    assert listed.call("add", 1, 1) == 2
    assert b.stats()["dropped"]["curve_denied"] >= 1
    # A FrontEnd with an unlisted key finds no reachable backend, in bounded time.
    with FrontEnd(
        [b.endpoint],
        connect_timeout=1.0,
        curve_serverkey=server_public,
        curve_publickey=other_public,
        curve_secretkey=other_secret,
    ) as fe:
        with pytest.raises(BackendNotAvailableError):
            fe.work("add", 1, 2)
    with FrontEnd(
        [b.endpoint],
        curve_serverkey=server_public,
        curve_publickey=listed_public,
        curve_secretkey=listed_secret,
    ) as fe:
        assert fe.work("add", 2, 3) == 5


def test_curve_clients_needs_the_server_key_and_z85_keys():
    with pytest.raises(ValueError, match="curve_secretkey"):
        BackEnd(TASKS, port=0, curve_clients=[zmq.curve_keypair()[0]])
    if zmq.has("curve"):
        _, secret = zmq.curve_keypair()
        with pytest.raises(ValueError, match="Z85"):
            BackEnd(TASKS, port=0, curve_secretkey=secret, curve_clients=["not a key"])


@pytest.mark.skipif(zmq.has("curve"), reason="only meaningful when libzmq lacks CURVE")
def test_curve_without_libzmq_support_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="CURVE"):
        BackEnd(TASKS, port=0, curve_secretkey=b"x" * 40)


def test_remote_errors_never_leak_unsigned(serve, client):
    b = serve(TASKS, key=KEY)
    c = client(b, key=KEY)
    with pytest.raises(RemoteError) as e:
        c.call("nope")
    assert e.value.type == "UnknownTask"
