"""Codecs and the message bodies they build, without sockets (tests/test_protocol.py: frames)."""

from __future__ import annotations

import json
import math

import pytest

from taskit import codecs, protocol
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer
from taskit.errors import (
    DecodeError,
    EncodeError,
    ProtocolError,
    UnknownCodecError,
)

ALL = [JSONCodec, MsgpackCodec, PickleCodec]


@pytest.mark.parametrize("codec", ALL)
def test_plain_data_round_trips(codec):
    value = {"a": [1, -2, 3.5, None, True, "é"], "b": {"c": ""}}
    assert codec.decode(codec.encode(value)) == value


def test_what_only_some_codecs_carry():
    assert MsgpackCodec.decode(MsgpackCodec.encode(b"\x00\xff")) == b"\x00\xff"
    assert MsgpackCodec.decode(MsgpackCodec.encode({1: "x"})) == {1: "x"}
    assert PickleCodec.decode(PickleCodec.encode({1, 2})) == {1, 2}
    assert PickleCodec.decode(PickleCodec.encode(9**9999)) == 9**9999


@pytest.mark.parametrize(
    "codec, value, words",
    [
        (JSONCodec, b"x", "bytes"),
        (JSONCodec, {1, 2}, "set"),
        (JSONCodec, 9**9999, "JSON"),
        (MsgpackCodec, 9**9999, "64 bits"),
        (MsgpackCodec, object(), "msgpack"),
        (PickleCodec, lambda: 0, "pickle"),
    ],
    ids=[
        "json-bytes",
        "json-set",
        "json-bigint",
        "msgpack-bigint",
        "msgpack-object",
        "pickle-lambda",
    ],
)
def test_refusals_are_encode_errors_that_say_why(codec, value, words):
    with pytest.raises(EncodeError, match=words):
        codec.encode(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, {"x": math.nan}]])
def test_json_refuses_nan_and_infinity(value):
    """RFC 8259 has no NaN or Infinity: Python's json module writes and reads them."""
    with pytest.raises(EncodeError, match="NaN or Infinity"):
        JSONCodec.encode(value)


@pytest.mark.parametrize("body", [b"NaN", b"[1,Infinity]", b'{"x":-Infinity}'])
def test_json_bodies_spelling_nan_or_infinity_are_decode_errors(body):
    with pytest.raises(DecodeError, match="RFC 8259"):
        JSONCodec.decode(body)


def test_json_decodes_every_bytes_like_body():
    for body in (b"[1]", bytearray(b"[1]"), memoryview(b"[1]"), "[1]", b"\xef\xbb\xbf[1]"):
        assert JSONCodec.decode(body) == [1]


@pytest.mark.parametrize("codec", ALL)
def test_garbage_is_a_decode_error(codec):
    with pytest.raises(DecodeError):
        codec.decode(b"\xc1\xff\x00garbage{")


def test_registry_resolves_names_ids_and_objects():
    assert codecs.get_codec("json") is JSONCodec
    assert codecs.get_codec("MSGPACK") is MsgpackCodec
    assert codecs.get_codec(3) is PickleCodec
    assert codecs.get_codec(MsgpackCodec) is MsgpackCodec
    assert set(codecs.registered_codecs()) >= {"json", "msgpack", "pickle"}
    with pytest.raises(UnknownCodecError, match="known: "):
        codecs.get_codec("yaml")
    with pytest.raises(UnknownCodecError):
        codecs.get_codec(250)


def test_register_checks_the_codec_and_refuses_clashes():
    class NoId:
        name = "noid"
        encode = decode = staticmethod(lambda x: x)

    with pytest.raises(ValueError, match="wire_id"):
        codecs.register(NoId)

    class Clash:
        name = "other-json"
        wire_id = 1
        encode = decode = staticmethod(lambda x: x)

    with pytest.raises(ValueError, match="already registered"):
        codecs.register(Clash)


class StrJSON:
    """A TaskIt 4.0-style codec: encode returns str."""

    name = "strjson-test"
    wire_id = 231

    @staticmethod
    def encode(obj):
        return json.dumps(obj)

    @staticmethod
    def decode(data):
        return json.loads(data)


def test_a_codec_returning_str_is_sent_as_utf8():
    body = protocol.encode_call(codecs.get_codec(StrJSON), "t", [1], {})
    assert body == json.dumps(["t", [1], {}]).encode()
    assert protocol.decode_call(StrJSON, body) == ("t", [1], {}, None)


def test_a_codec_returning_nonsense_is_an_encode_error_but_errors_still_go_out():
    class Bad:
        name = "bad-test"
        wire_id = 232
        encode = staticmethod(lambda obj: 42)
        decode = staticmethod(json.loads)

    codecs.register(Bad)
    with pytest.raises(EncodeError, match="returned int"):
        protocol.encode_call(Bad, "t", ["x"])
    codec_id, body = protocol.encode_error(Bad, "ValueError", ["boom"], "tb")
    assert codec_id == JSONCodec.wire_id  # fell back to JSON
    assert protocol.decode_error(JSONCodec, body) == ("ValueError", ["'boom'"], "tb")


def test_call_bodies_carry_meta_only_when_given():
    plain = protocol.encode_call(MsgpackCodec, "add", (1, 2))
    assert MsgpackCodec.decode(plain) == ["add", [1, 2], {}]
    meta = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    traced = protocol.encode_call(MsgpackCodec, "add", (1, 2), None, meta)
    assert protocol.decode_call(MsgpackCodec, traced) == ("add", [1, 2], {}, meta)


@pytest.mark.parametrize(
    "body, words",
    [
        ([1, [], {}], "task name"),
        (["t", 5, {}], "args"),
        (["t", [], {"k": 1, 2: 3}], "string keys"),
        (["t", []], r"\[task, args, kwargs\]"),
        (["t", [], {}, {"k": 1}], "meta"),
        (["t", [], {}, {}, 5], r"\[task, args, kwargs\]"),
    ],
)
def test_malformed_call_bodies_are_protocol_errors(body, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.decode_call(MsgpackCodec, MsgpackCodec.encode(body))


def test_empty_keys_are_refused():
    with pytest.raises(ValueError):
        Signer(b"")


def test_msgpack_packer_reused_for_small_bodies_and_let_go_after_a_big_one():
    # A Packer's buffer grows to the largest body it packed and is never shrunk: kept
    # after a big body, it stops glibc from raising its malloc thresholds and every
    # big call faults its heap in again (doc/comparison.md). Small bodies share one.
    from taskit.codecs import _PACKER_KEEP

    MsgpackCodec.encode(["add", [1, 2], {}])
    packer = MsgpackCodec._packer
    assert MsgpackCodec.decode(MsgpackCodec.encode(["add", [1, 2], {}])) == ["add", [1, 2], {}]
    assert MsgpackCodec._packer is packer
    big = b"x" * _PACKER_KEEP
    assert MsgpackCodec.decode(MsgpackCodec.encode(["echo", [big], {}])) == ["echo", [big], {}]
    assert MsgpackCodec._packer is not packer
    fresh = MsgpackCodec._packer
    assert MsgpackCodec.encode(7) == b"\x07"
    assert MsgpackCodec._packer is fresh
