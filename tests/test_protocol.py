"""Protocol version 2 frames, sessions and handshake bodies, without sockets; and
doc/protocol.md's worked example checked against the implementation."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from taskit import protocol
from taskit.codecs import JSONCodec, MsgpackCodec, Signer
from taskit.errors import ProtocolError, SignatureError
from taskit.protocol import Kind, ReplayError, Session

DOC = Path(__file__).resolve().parents[1] / "doc" / "protocol.md"


def _sessions(key: bytes = b"secret") -> tuple[Session, Session]:
    signer = Signer(key)
    client_nonce, server_nonce = protocol.new_nonce(), protocol.new_nonce()
    client = Session(signer, client_nonce, server_nonce, b"C")
    backend = Session(signer, client_nonce, server_nonce, b"B")
    return client, backend


def test_a_single_call_is_one_frame_in_the_documented_layout():
    body = protocol.encode_call(MsgpackCodec, "add", (1, 2))
    frame = protocol.pack_one(Kind.CALL, MsgpackCodec.wire_id, 7, 1500, 0, body)
    assert frame[:4] == b"TK\x02\x00"
    assert frame[4:28] == struct.pack(">BBHQIII", 1, 2, 0, 7, 1500, 0, len(body))
    assert frame[28:] == body
    (item,) = protocol.parse(frame)
    assert item == (Kind.CALL, 2, 7, 1500, 0, body)
    assert protocol.peek(frame) == (1, 2, 7)
    assert protocol.pack_items([item]) == frame


def test_a_batch_is_several_items_and_parses_back_in_order():
    items = [
        (Kind.CALL, 2, 1, 0, 0, protocol.encode_call(MsgpackCodec, "a")),
        (Kind.CANCEL, 0, 9, 0, 0, b""),
        (Kind.PING, 2, 10, 0, 0, b""),
        (Kind.CALL, 2, 2, 250, 0, protocol.encode_call(MsgpackCodec, "b", [b"x" * 1000])),
    ]
    frame = protocol.pack_items(items)
    parsed = protocol.parse(memoryview(frame))
    assert [tuple(i[:5]) for i in parsed] == [tuple(i[:5]) for i in items]
    assert [bytes(i.body) for i in parsed] == [i[5] for i in items]
    assert all(type(i.body) is memoryview for i in parsed)  # zero-copy slices
    with pytest.raises(ValueError):
        protocol.pack_items([])


@pytest.mark.parametrize(
    "frame, words",
    [
        (b"TK\x02\x00" + bytes(10), "preamble"),
        (b"XX\x02\x00" + protocol.pack_one(1, 2, 1)[4:], "preamble"),
        (b"TK\x01\x00" + protocol.pack_one(1, 2, 1)[4:], "version 1"),
        (b"TK\x03\x00" + protocol.pack_one(1, 2, 1)[4:], "version 3"),
        (b"TK\x02\x04" + protocol.pack_one(1, 2, 1)[4:], "flags"),
        (protocol.pack_one(11, 2, 1), "kind 11"),
        (protocol.pack_one(1, 2, 1, body=b"abc")[:-1], "overruns"),
        (protocol.pack_one(1, 2, 1, body=b"abc") + b"\x01\x02", "truncated"),
        (b"TK\x02\x01" + protocol.pack_one(1, 2, 1)[4:], "signed but"),
    ],
)
def test_malformed_frames_are_protocol_errors(frame, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.parse(frame)


def test_sealed_frames_verify_once_and_tampering_is_detected():
    client, backend = _sessions()
    frame = protocol.pack_items([(Kind.CALL, 2, 5, 0, 0, b"\x93\xa1t\x90\x80")], client)
    assert frame[3] == protocol.SIGNED
    assert len(frame) == protocol.HEAD_SIZE + 5 + protocol.TRAILER_SIZE
    (item,) = protocol.parse(frame, backend)
    assert item.call_id == 5 and bytes(item.body) == b"\x93\xa1t\x90\x80"
    with pytest.raises(ReplayError, match="replayed"):
        protocol.parse(frame, backend)  # the same bytes again: spent
    tampered = bytearray(protocol.pack_items([(Kind.CALL, 2, 6, 0, 0, b"xy")], client))
    tampered[-41] ^= 1  # the body's last byte
    with pytest.raises(SignatureError, match="does not match"):
        protocol.parse(bytes(tampered), backend)
    unsigned = protocol.pack_one(Kind.CALL, 2, 7)
    with pytest.raises(SignatureError, match="not signed"):
        protocol.parse(unsigned, backend)


def test_a_sealed_frame_is_bound_to_its_session_and_direction():
    client, backend = _sessions()
    frame = protocol.pack_items([(Kind.CALL, 2, 1, 0, 0, b"")], client)
    other_client, other_backend = _sessions()
    with pytest.raises(SignatureError, match="does not match"):
        protocol.parse(frame, other_backend)  # another connection's session
    with pytest.raises(SignatureError, match="does not match"):
        protocol.parse(frame, client)  # turned back at its sender
    _, wrong_key = _sessions(b"other key")
    with pytest.raises(SignatureError):
        protocol.parse(frame, wrong_key)


def test_the_replay_window_accepts_reordering_within_64_and_nothing_twice():
    client, backend = _sessions()
    frames = [protocol.pack_items([(Kind.PING, 2, i, 0, 0, b"")], client) for i in range(1, 101)]
    for f in frames[10:80]:
        protocol.parse(f, backend)
    for f in frames[20:30]:  # already seen
        with pytest.raises(ReplayError):
            protocol.parse(f, backend)
    # 80 is the highest: 17..79 are within the window, 1..16 too old
    for f in frames[:10]:
        with pytest.raises(ReplayError, match="too old"):
            protocol.parse(f, backend)
    protocol.parse(frames[99], backend)  # a jump forward is fine
    protocol.parse(frames[85], backend)  # and a late one within the window


def test_v1_calls_get_a_v1_refusal_that_names_the_versions():
    header = struct.pack(">BBQ", 1, 2, 42)
    frames = [b"TKIT\x01", header, b"\x93\xa3add\x92\x01\x02\x80"]
    assert protocol.is_v1(frames)
    magic, reply_header, body = protocol.v1_refusal(frames)
    assert magic == b"TKIT\x01"
    assert struct.unpack(">BBQ", reply_header) == (3, 1, 42)  # ERROR, json, the call id
    type_name, (msg,), tb = json.loads(body)
    assert type_name == "ProtocolError" and "version 2, not 1" in msg and "upgrade" in msg
    assert protocol.v1_refusal([b"TKIT\x01", struct.pack(">BBQ", 4, 2, 42), b""]) is None
    assert protocol.v1_refusal([b"TKIT\x01", b"short", b""]) is None
    assert not protocol.is_v1([protocol.pack_one(1, 2, 1)])


def test_handshake_bodies_round_trip_and_are_checked():
    nonce = protocol.new_nonce()
    hello = protocol.parse_handshake(
        protocol.hello_body([2], True, nonce, "taskit/test"), Kind.HELLO
    )
    assert hello["version"] == 2 and hello["codecs"] == [2] and hello["signed"] is True
    assert bytes.fromhex(hello["nonce"]) == nonce
    welcome = protocol.parse_handshake(
        protocol.welcome_body(
            client_nonce=hello["nonce"],
            server_nonce=protocol.new_nonce(),
            name="tcp://127.0.0.1:1",
            pid=123,
            started=protocol.new_nonce(),
            codec_ids=[1, 2],
            signed=True,
            workers=4,
            max_pending=100,
            max_message_size=None,
        ),
        Kind.WELCOME,
    )
    assert welcome["nonce"] == hello["nonce"] and welcome["workers"] == 4
    assert welcome["max_message_size"] is None and welcome["pid"] == 123
    for bad, words in [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"version": 2, "codecs": [2], "signed": false}', "nonce"),
        (b'{"version": true, "codecs": [2], "signed": false, "nonce": "00"}', "version"),
        (b'{"version": 2, "codecs": [2], "signed": false, "nonce": "00"}', "32 hex"),
        (b'{"version": 2, "codecs": [0], "signed": false, "nonce": "' + b"0" * 32 + b'"}', "1-255"),
    ]:
        with pytest.raises(ProtocolError, match=words):
            protocol.parse_handshake(bad, Kind.HELLO)


@pytest.mark.parametrize(
    "remaining, field",
    [(None, 0), (0.0, 1), (-3.0, 1), (0.0004, 1), (2.5, 2500), (1e12, protocol.MAX_BUDGET_MS)],
)
def test_a_time_budget_is_whole_milliseconds_and_never_zero_while_time_is_left(remaining, field):
    assert protocol.budget_ms(remaining) == field


# --- doc/protocol.md's worked example is what the implementation produces ----------------


def _doc_block(after: str) -> bytes:
    """The hex bytes of the first ``` block after the line containing ``after``,
    ignoring the words after each line's hex."""
    text = DOC.read_text()
    start = text.index("```", text.index(after)) + 3
    block = text[start : text.index("```", start)]
    hexes = []
    for line in block.strip().splitlines():
        hexes += re.findall(r"\b[0-9a-f]{2}\b", line.split("  ")[0] if "  " in line else line)
    return bytes.fromhex("".join(hexes))


def test_the_worked_example_in_doc_protocol_md_is_exact():
    body = protocol.encode_call(MsgpackCodec, "add", (1, 2))
    call = protocol.pack_one(Kind.CALL, 2, 1, 5000, 0, body)
    assert _doc_block("It sends one frame of 37") == call and len(call) == 37
    result = protocol.pack_one(Kind.RESULT, 2, 1, 0, 1, MsgpackCodec.encode(3))
    assert _doc_block("answers 29 bytes") == result and len(result) == 29
    text = DOC.read_text()
    assert protocol.encode_call(JSONCodec, "add", (1, 2)).decode() in text
    _, err = protocol.encode_error(JSONCodec, "UnknownTask", ["no task named 'nope'"], "")
    assert err.decode() in text
    signer = Signer(b"secret")
    client = Session(signer, bytes(range(16)), bytes(range(16, 32)), b"C")
    signed = protocol.pack_items([(Kind.CALL, 2, 1, 0, 0, body)], client)
    assert _doc_block("is 77 bytes") == signed and len(signed) == 77
