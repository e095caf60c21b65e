"""Codecs and the version-1 frames, without sockets (plus one user codec end to end)."""

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
    SignatureError,
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
    frames = protocol.encode_result(codecs.get_codec(StrJSON), 5, {"x": "é"})
    assert frames[2] == json.dumps({"x": "é"}).encode()
    call = protocol.encode_call(StrJSON, 6, "t", [1], {})
    assert protocol.decode_call(StrJSON, protocol.unpack(call).body) == ("t", [1], {}, None)


def test_a_codec_returning_nonsense_is_an_encode_error_but_errors_still_go_out():
    class Bad:
        name = "bad-test"
        wire_id = 232
        encode = staticmethod(lambda obj: 42)
        decode = staticmethod(json.loads)

    codecs.register(Bad)
    with pytest.raises(EncodeError, match="returned int"):
        protocol.encode_result(Bad, 1, "x")
    frames = protocol.encode_error(Bad, 1, "ValueError", ["boom"], "tb")
    msg = protocol.unpack(frames)
    assert msg.codec_id == JSONCodec.wire_id  # fell back to JSON
    assert protocol.decode_error(JSONCodec, msg.body) == ("ValueError", ["'boom'"], "tb")


def test_frames_follow_the_documented_layout():
    frames = protocol.encode_call(MsgpackCodec, 7, "add", (1, 2), {})
    assert frames[0] == b"TKIT\x01"
    assert frames[1] == bytes([1, 2]) + (7).to_bytes(8, "big")
    msg = protocol.unpack(frames)
    assert (msg.kind, msg.codec_id, msg.call_id) == (protocol.Kind.CALL, 2, 7)
    assert protocol.decode_call(MsgpackCodec, msg.body) == ("add", [1, 2], {}, None)
    assert protocol.peek_call_id(frames) == 7


@pytest.mark.parametrize(
    "frames, words",
    [
        ([b"TKIT\x01", b"\x01\x02" + bytes(8)], "3 frames"),
        ([b"XXXX\x01", b"\x01\x02" + bytes(8), b""], "magic"),
        ([b"TKIT\x02", b"\x01\x02" + bytes(8), b""], "version 2"),
        ([b"TKIT\x01", b"\x01\x02", b""], "header"),
        ([b"TKIT\x01", b"\x09\x02" + bytes(8), b""], "kind 9"),
        ([b"TKIT\x01", b"\x01\x02" + bytes(8), b"", b"sig"], "no shared key"),
    ],
)
def test_malformed_frames_are_protocol_errors(frames, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.unpack(frames)


@pytest.mark.parametrize(
    "body, words",
    [
        ([1, [], {}], "task name"),
        (["t", 5, {}], "args"),
        (["t", [], {"k": 1, 2: 3}], "string keys"),
        (["t", []], r"\[task, args, kwargs\]"),
        (["t", [], {}, {"traceparent": 5}], "metadata must be a map of strings"),
        (["t", [], {}, ["traceparent"]], "metadata must be a map of strings"),
        (["t", [], {}, {}, 5], r"\[task, args, kwargs\]"),
    ],
)
def test_malformed_call_bodies_are_protocol_errors(body, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.decode_call(MsgpackCodec, MsgpackCodec.encode(body))


def test_a_call_body_may_carry_a_metadata_map_as_fourth_element():
    # the trace context's slot (doc/protocol.md): strings only; an empty map is no metadata
    meta = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    for codec in (MsgpackCodec, JSONCodec):
        body = codec.encode(["t", [1], {"k": 2}, meta])
        assert protocol.decode_call(codec, body) == ("t", [1], {"k": 2}, meta)
        assert protocol.decode_call(codec, codec.encode(["t", [], {}, {}]))[3] is None


def test_signed_frames_verify_and_tampering_is_detected():
    signer = Signer("secret")
    frames = protocol.encode_result(MsgpackCodec, 9, [1, 2], signer)
    assert len(frames) == 4 and len(frames[3]) == Signer.digest_size
    assert protocol.unpack(frames, signer).call_id == 9
    tampered = frames[:2] + [MsgpackCodec.encode([1, 3]), frames[3]]
    with pytest.raises(SignatureError, match="does not match"):
        protocol.unpack(tampered, signer)
    with pytest.raises(SignatureError, match="not signed"):
        protocol.unpack(frames[:3], signer)
    with pytest.raises(SignatureError):
        protocol.unpack(frames, Signer("other"))
    with pytest.raises(ValueError):
        Signer(b"")
