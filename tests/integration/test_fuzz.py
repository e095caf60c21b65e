"""Fuzz the BackEnd with >= 10,000 random and mutated v2 messages from a raw socket
(single items, batches, signed ones, old v1 and junk multipart messages), while a
well-behaved client calls alongside.

Afterwards the backend must still answer correct calls, must not have grown its
memory without bound, and must account for every unit: each item of a message it
could read is answered once, counted dropped, or withdrawn by a CANCEL (counted
``cancelled``); a message it could not read is answered once (a refusal) or counted
dropped. The well-behaved client gets every one of its replies, right.
"""

from __future__ import annotations

import json
import random
import struct
import time
import tracemalloc

import msgpack

from taskit import protocol
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer, get_codec
from taskit.protocol import Kind
from tests.integration._backend_helpers import RawClient

KEY = b"fuzz key"
TASKS = {"add": lambda a, b: a + b, "echo": lambda x: x}
REPLY_KINDS = {Kind.RESULT, Kind.ERROR, Kind.PONG, Kind.WELCOME, Kind.CANCELLED}
REPLY_KINDS |= {Kind.NOT_CANCELLED}
DROPS = ("malformed", "bad_signature", "replayed", "no_session", "oversized")


def _call(rng: random.Random, call_id: int) -> tuple:
    codec = rng.choice([JSONCodec, MsgpackCodec])
    task = rng.choice(["add", "echo", "<status>", "<tasks>", "nope", "<stop>", "<kill>"])
    args = [rng.randint(-9, 9), rng.randint(-9, 9)] if task == "add" else []
    if task == "echo":
        args = [rng.choice([None, "x" * rng.randint(0, 50), [1, 2], {"k": 1.5}])]
    budget = rng.choice([0, 0, 0, 1, 5000])
    return (Kind.CALL, codec.wire_id, call_id, budget, 0, protocol.encode_call(codec, task, args))


HOSTILE = [
    b"\xdd\xff\xff\xff\xff",  # msgpack array claiming 4 G elements
    b"\xdb\xff\xff\xff\xff",  # msgpack str claiming 4 GiB
    b"[" * 50_000,  # JSON nesting deeper than the recursion limit
    b"9" * 20_000,  # an integer too long to convert
    msgpack.packb([1, 2, 3]),  # not [task, args, kwargs]
    msgpack.packb(["add", {"a": 1}, {}]),  # args not a list
    msgpack.packb(["add", [1, 2], {1: 2}]),  # kwargs keys not str
    msgpack.packb(["add", [1, 2], {}, {"m": 1}]),  # meta not str -> str
    json.dumps([7, [], {}]).encode(),  # task name not a string
    msgpack.packb(["add", [1], {}]),  # wrong arity: TypeError from the task
]


def _item(rng: random.Random, call_id: int) -> tuple:
    r = rng.randrange(10)
    if r < 4:
        return _call(rng, call_id)
    if r == 4:  # hostile but well-formed bodies
        body = rng.choice(HOSTILE)
        return (Kind.CALL, 1 if body[:1] in b"[9" else 2, call_id, 0, 0, body)
    if r == 5:  # random body in a real codec, or an unknown / refused codec
        codec_id = rng.choice([1, 2, 2, 0, 77, 255, PickleCodec.wire_id])
        return (Kind.CALL, codec_id, call_id, 0, 0, rng.randbytes(rng.randint(0, 200)))
    if r == 6:  # kinds a backend never expects, PING, HELLO, CANCEL (of anything)
        kind = rng.choice(list(Kind))
        cid = rng.choice([call_id, call_id, rng.randrange(1, call_id + 2), 0])
        body = b""
        if kind == Kind.HELLO:
            body = protocol.hello_body([2], False, protocol.new_nonce(), "fuzz")
            body = body if rng.random() < 0.7 else body[: rng.randrange(len(body))]
        return (kind, rng.choice([0, 1, 2]), cid, 0, 0, body)
    if r == 7:  # huge body (garbage, below the size limit)
        return (Kind.CALL, 2, call_id, 0, 0, rng.randbytes(rng.randint(60_000, 120_000)))
    if r == 8:  # a call id 0 (reserved for notices)
        return _call(rng, 0)
    return _call(rng, call_id)


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        if op == 0 and data:  # flip a bit
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert bytes
            j = rng.randint(0, len(data))
            data[j:j] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        else:  # set a header byte (kind, codec, flags, version, length)
            j = rng.choice([2, 3, 4, 5, 24, 25, 26, 27])
            if j < len(data):
                data[j] = rng.randrange(256)
    return bytes(data)


class Fuzzer:
    """Makes messages for one connection; ``units`` what each should produce."""

    def __init__(self, rng: random.Random, session: protocol.Session | None) -> None:
        self.rng = rng
        self.session = session
        self.next_id = 1
        self.sealed: list[bytes] = []  # frames sent sealed, for replays

    def ids(self, n: int) -> list[int]:
        first = self.next_id
        self.next_id += n
        return list(range(first, first + n))

    def message(self) -> tuple[list[bytes], int]:
        """(frames, units): units = the items of a readable message, else 1."""
        rng = self.rng
        r = rng.randrange(20)
        if r == 0:  # not v2: junk, v1 CALL (refused in v1), v1 PING, other multipart
            call_id = self.ids(1)[0]
            frames = rng.choice(
                [
                    [protocol.V1_MAGIC, struct.pack(">BBQ", 1, 2, call_id), b"\x90"],
                    [protocol.V1_MAGIC, struct.pack(">BBQ", 4, 2, call_id), b""],
                    [b"HTTP", b"GET /"],
                    [rng.randbytes(5), rng.randbytes(10), b"", b"", b"x"],
                ]
            )
            return frames, 1
        if r == 1:  # no preamble, short, empty
            return [rng.choice([b"", b"TK", rng.randbytes(rng.randint(1, 40))])], 1
        if r == 2 and self.sealed:  # a replay of a sealed message
            return [rng.choice(self.sealed)], 1
        n = 1 if rng.random() < 0.6 else rng.randint(2, 6)
        items = [_item(rng, i) for i in self.ids(n)]
        if sum(len(item[5]) for item in items) > 200_000:
            items = items[:1]  # under max_message_size: a bigger one ends the connection
            n = 1
        frame = protocol.pack_items(items, self.session)
        if self.session is not None:
            if r < 5:  # unsigned, on a keyed backend
                return [protocol.pack_items(items)], 1
            if r < 8:  # sealed, then changed on the way
                return [_mutate(rng, frame)], 1
            self.sealed = self.sealed[-20:] + [frame]
            if items[0][0] == Kind.HELLO:  # a HELLO again on this connection: all dropped
                return [frame], 1
            return [frame], n
        if r < 10:
            frame = _mutate(rng, frame)
            try:
                return [frame], len(protocol.parse(frame))
            except protocol.SignatureError:
                return [frame], 1
            except protocol.ProtocolError:
                return [frame], 1
        return [frame], n


def _replies(frames: list[bytes], session: protocol.Session | None) -> int:
    """Check one reply message; the number of replies in it that are not the
    backend's refusals of a signature or session (those units are counted dropped)."""
    if len(frames) > 1:  # a v1 client's refusal, in v1
        assert frames[0] == protocol.V1_MAGIC and len(frames) == 3
        return 1
    frame = frames[0]
    if session is not None and not frame[3] & protocol.SIGNED:
        (item,) = protocol.parse(frame)
        assert item.kind == Kind.ERROR and item.codec_id == JSONCodec.wire_id
        assert protocol.decode_error(JSONCodec, item.body)[0] == protocol.UNAUTHENTICATED
        return 0
    n = 0
    for item in protocol.parse(frame, session):
        assert item.kind in REPLY_KINDS, item
        if item.kind == Kind.ERROR:
            codec = get_codec(item.codec_id)  # pickle too, on the keyed backend
            type_name, args, _tb = protocol.decode_error(codec, item.body)
            assert isinstance(type_name, str) and isinstance(args, list)
            if type_name == protocol.UNAUTHENTICATED:
                continue
        n += 1
    return n


def _fuzz(backend, rng: random.Random, n: int, key: bytes | None, on_progress=None) -> None:
    fuzzer = RawClient(backend.endpoint, key=key, rcvhwm=0)
    good = RawClient(backend.endpoint, key=key)  # well behaved, alongside
    try:
        if key is not None:
            fuzzer.hello()
        gen = Fuzzer(rng, fuzzer.session)
        units = received = 0
        expected: dict[int, int] = {}  # the well-behaved client's calls: id -> a + b

        def drain(timeout_ms: int) -> None:
            nonlocal received
            while fuzzer.sock.poll(timeout_ms):
                received += _replies(fuzzer.sock.recv_multipart(), fuzzer.session)

        for i in range(n):
            frames, u = gen.message()
            units += u
            fuzzer.send_raw(frames)
            if i % 100 == 99:  # the good client: a batch of three, answered in full
                items = [good.call_item("add", i, k) for k in range(3)]
                good.send_items(items)
                expected.update({item[2]: i + k for k, item in enumerate(items)})
                for _ in range(3):
                    kind, _codec, call_id, value = good.recv(30)
                    assert (kind, value) == (Kind.RESULT, expected.pop(call_id))
            if i % 500 == 499:
                drain(0)
                if on_progress:
                    on_progress(i + 1)
        # Every unit is answered once, counted dropped or cancelled: wait for the sum.
        deadline = time.monotonic() + 30
        while True:
            drain(50)
            stats = good.call("<stats>")
            accounted = received + sum(stats["dropped"][d] for d in DROPS) + stats["cancelled"]
            if accounted >= units or time.monotonic() > deadline:
                break
        drain(200)
        assert accounted == units, (received, stats["dropped"], stats["cancelled"], units)
        assert not expected and good.silent(0)
        assert stats["dropped"]["malformed"] > 0
        assert stats["dropped"]["reply_hwm"] == 0
        if key is not None:
            assert stats["dropped"]["bad_signature"] > 0 and stats["dropped"]["replayed"] > 0
        assert stats["refused"].get("ProtocolError", 0) > 0
        assert stats["refused"].get("CodecNotAllowed", 0) > 0
        assert stats["refused"].get("DecodeError", 0) > 0
        assert stats["in_flight"] == 0
    finally:
        fuzzer.close()
        good.close()


def test_fuzz_10000_messages(serve, client):
    b = serve(TASKS, max_message_size=256 * 1024, workers=2)
    rng = random.Random(20240605)
    tracemalloc.start()
    try:
        marks = {}

        def progress(sent: int) -> None:
            if sent in (2000, 10000):
                marks[sent] = tracemalloc.get_traced_memory()[0]

        _fuzz(b, rng, 10_000, None, progress)
        grown = marks[10000] - marks[2000]
    finally:
        tracemalloc.stop()
    # Whatever the backend keeps per message must not accumulate.
    assert grown < 4 * 1024 * 1024, f"traced memory grew by {grown} bytes over 8000 messages"
    # Oversized messages: ZeroMQ drops that connection; the backend carries on.
    big = client(b)
    for _ in range(3):
        big.send_frame(protocol.pack_one(Kind.CALL, 2, 1, 0, 0, b"\0" * (300 * 1024)))
    assert big.silent(0.3)
    c = client(b)
    assert c.call("add", 2, 3) == 5 and c.call("echo", "still here") == "still here"
    assert b.running


def test_fuzz_signed_backend(serve, client):
    b = serve(TASKS, key=KEY, workers=2)
    _fuzz(b, random.Random(7), 3000, KEY)
    c = client(b, key=KEY)
    assert c.call("add", 20, 22) == 42
    unsigned = client(b)
    unsigned.send("add", 1, 2)
    assert unsigned.sock.poll(5000)
    assert _replies(unsigned.sock.recv_multipart(), Signer(KEY)) == 0  # refused, never run
    assert unsigned.silent()
