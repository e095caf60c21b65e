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
    assert c.call("add", 1, 2) == 3  # RawClient.recv verifies the reply's signature
    c.send("add", 2, 2)
    assert c.sock.poll(5000)
    frames = c.sock.recv_multipart()
    assert len(frames) == 4 and protocol.unpack(frames, c.signer).kind == Kind.RESULT


@pytest.mark.parametrize("how", ["unsigned", "wrong key", "tampered", "truncated digest"])
def test_bad_signatures_are_dropped_unread_and_counted(serve, client, how):
    b = serve(TASKS, key=KEY)
    good = client(b, key=KEY)
    bad = client(b, key=b"not the key" if how == "wrong key" else KEY)
    frames = protocol.encode_call(MsgpackCodec, 1, "add", (1, 2), None, bad.signer)
    if how == "unsigned":
        frames = frames[:3]
    elif how == "tampered":
        frames[2] = MsgpackCodec.encode(["add", [1000, 2], {}])
    elif how == "truncated digest":
        frames[3] = frames[3][:16]
    bad.send_raw(frames)
    # Never run; answered only with the fixed, unsigned refusal (nothing in it
    # depends on the key), so the caller gets an error instead of a hang.
    assert_refused_unsigned(bad, call_id=1, why=protocol.KEY_DIFFERS)
    assert bad.silent()
    assert good.call("<stats>")["dropped"]["bad_signature"] == 1


def assert_refused_unsigned(c, call_id, why):
    """``c`` received exactly the backend's fixed refusal of a signature: an unsigned
    JSON ERROR ``Unauthenticated`` for ``call_id``."""
    assert c.sock.poll(5000)
    frames = c.sock.recv_multipart()
    m = protocol.unpack(frames)  # unsigned: 3 frames, no key needed to read it
    assert (m.kind, m.codec_id, m.call_id) == (Kind.ERROR, JSONCodec.wire_id, call_id)
    assert protocol.decode_error(JSONCodec, m.body) == (protocol.UNAUTHENTICATED, [why], "")


def test_a_keyless_backend_refuses_signed_calls_unread(serve, client):
    b = serve(TASKS)
    keyed = client(b, key=KEY)
    keyed.send_raw(protocol.encode_call(JSONCodec, 7, "add", (1, 2), None, keyed.signer))
    assert_refused_unsigned(keyed, call_id=7, why=protocol.NO_KEY_HERE)
    assert b.stats()["dropped"]["bad_signature"] == 1


def test_admin_signals_need_a_signature_when_a_key_is_set(serve, client):
    b = serve(TASKS, key=KEY)
    stranger = client(b)
    for signal in ("<kill>", "<stop>", "<status>"):
        stranger.send(signal)
    for _ in range(3):  # each refused, none run
        frames = stranger.sock.recv_multipart() if stranger.sock.poll(5000) else []
        m = protocol.unpack(frames)
        assert protocol.decode_error(JSONCodec, m.body)[0] == protocol.UNAUTHENTICATED
    assert stranger.silent()
    assert b.running
    owner = client(b, key=KEY)
    assert owner.call("<stats>")["dropped"]["bad_signature"] == 3
    assert owner.call("<stop>") is None
    assert b.join(10)


# --- pickle gating ------------------------------------------------------------------------


def test_pickle_is_refused_without_key_and_never_unpickled(serve, client, tmp_path):
    b = serve({"echo": lambda x: x})
    c = client(b)
    marker = tmp_path / "pwned"
    body = pickle.dumps(["echo", [_Touch(str(marker))], {}])
    c.send_raw(protocol.pack(Kind.CALL, PickleCodec.wire_id, 9, body))
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
