"""Fuzz the BackEnd with >= 10,000 random and mutated multipart messages from a raw socket.

Afterwards the backend must still answer correct calls, must not have grown its
memory without bound, and must account for every message: each one is either
answered exactly once or counted as dropped in ``<stats>``.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc

import msgpack
import zmq

from taskit import protocol
from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec, Signer, get_codec
from taskit.protocol import HEADER, MAGIC, Kind
from tests.integration._backend_helpers import RawClient

KEY = b"fuzz key"
TASKS = {"add": lambda a, b: a + b, "echo": lambda x: x}
REPLY_KINDS = {Kind.RESULT, Kind.ERROR, Kind.PONG}


def _valid(rng: random.Random, call_id: int) -> list[bytes]:
    codec = rng.choice([JSONCodec, MsgpackCodec])
    task = rng.choice(["add", "echo", "<status>", "<tasks>", "nope", "<stop>", "<kill>"])
    args = [rng.randint(-9, 9), rng.randint(-9, 9)] if task == "add" else []
    if task == "echo":
        args = [rng.choice([None, "x" * rng.randint(0, 50), [1, 2], {"k": 1.5}])]
    return protocol.encode_call(codec, call_id, task, args)


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(frames))
        data = bytearray(frames[i])
        op = rng.randrange(4)
        if op == 0 and data:  # flip a byte
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert bytes
            j = rng.randint(0, len(data))
            data[j:j] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        else:  # drop or duplicate a frame
            if len(frames) > 1 and rng.random() < 0.5:
                del frames[i]
                continue
            frames.insert(i, bytes(data))
        frames[i] = bytes(data)
    return frames


def _message(rng: random.Random, call_id: int, signer: Signer | None) -> list[bytes]:
    kind = rng.randrange(16)
    header = HEADER.pack(Kind.CALL, rng.choice([1, 2]), call_id)
    if kind == 0:
        frames = _valid(rng, call_id)
    elif kind == 1:  # wrong magic / other protocol version
        frames = [rng.choice([b"TKIT\x02", b"HTTP/", rng.randbytes(5), b""]), header, b"[]"]
    elif kind == 2:  # short or long header
        frames = [MAGIC, rng.randbytes(rng.choice([0, 1, 9, 11, 64])), b"[]"]
    elif kind == 3:  # unknown kind or codec
        frames = protocol.pack(rng.choice([0, 6, 99, 255]), 2, call_id, b"\x90")
        if rng.random() < 0.5:
            frames = protocol.pack(Kind.CALL, rng.choice([0, 4, 77, 255]), call_id, b"\x90")
    elif kind == 4:  # truncated body
        body = _valid(rng, call_id)[2]
        frames = [MAGIC, _valid(rng, call_id)[1], body[: rng.randrange(max(1, len(body)))]]
    elif kind == 5:  # random body in a real codec
        frames = [MAGIC, header, rng.randbytes(rng.randint(0, 200))]
    elif kind == 6:  # hostile but well-formed bodies
        body = rng.choice(
            [
                b"\xdd\xff\xff\xff\xff",  # msgpack array claiming 4 G elements
                b"\xdb\xff\xff\xff\xff",  # msgpack str claiming 4 GiB
                b"[" * 50_000,  # JSON nesting deeper than the recursion limit
                b"9" * 20_000,  # an integer too long to convert
                msgpack.packb([1, 2, 3]),  # not [task, args, kwargs]
                msgpack.packb(["add", {"a": 1}, {}]),  # args not a list
                msgpack.packb(["add", [1, 2], {1: 2}]),  # kwargs keys not str
                json.dumps([7, [], {}]).encode(),  # task name not a string
                msgpack.packb(["add", [1], {}]),  # wrong arity: TypeError from the task
            ]
        )
        frames = [MAGIC, HEADER.pack(Kind.CALL, 1 if body[:1] in b"[9" else 2, call_id), body]
    elif kind == 7:  # huge body (garbage, below the size limit)
        frames = [MAGIC, header, rng.randbytes(rng.randint(100_000, 200_000))]
    elif kind == 8:  # pickle: must be refused, never loaded
        frames = protocol.pack(Kind.CALL, PickleCodec.wire_id, call_id, b"\x80\x05garbage")
    elif kind == 9:  # messages a backend never expects, and PING
        frames = protocol.pack(
            rng.choice([Kind.RESULT, Kind.ERROR, Kind.PONG, Kind.PING]), 2, call_id, b""
        )
    elif kind == 10:  # wrong number of frames
        frames = _valid(rng, call_id)
        frames = frames[: rng.randint(1, 2)] if rng.random() < 0.5 else frames + [b"x"] * 3
    else:  # mutations of a valid call
        frames = _mutate(rng, _valid(rng, call_id))
    if signer is not None:
        r = rng.random()
        if r < 0.4:
            frames = frames + [signer.sign(frames[:3])] if len(frames) >= 3 else frames
        elif r < 0.6:
            frames = frames + [rng.randbytes(32)]  # bad signature
        elif r < 0.7:
            frames = frames[:3] + [signer.sign(frames[:3])[:31]]  # short digest
    return frames or [b""]


def _check_reply(frames: list[bytes], signer: Signer | None) -> bool:
    """Check one reply; True when it is the backend's refusal of a signature (the
    fixed unsigned ``Unauthenticated``: that call is also counted as dropped)."""
    if len(frames) == 3 and signer is not None:
        m = protocol.unpack(frames)
        assert m.kind == Kind.ERROR and m.codec_id == JSONCodec.wire_id
        assert protocol.decode_error(JSONCodec, m.body)[0] == protocol.UNAUTHENTICATED
        return True
    m = protocol.unpack(frames, signer)
    assert m.kind in REPLY_KINDS
    if m.kind == Kind.ERROR:
        codec = get_codec(m.codec_id)  # pickle too, on the keyed backend
        type_name, args, _tb = protocol.decode_error(codec, m.body)
        assert isinstance(type_name, str) and isinstance(args, list)
        return type_name == protocol.UNAUTHENTICATED
    return False


def _fuzz(backend, rng: random.Random, n: int, signer: Signer | None, on_progress=None) -> None:
    fuzzer = RawClient(backend.endpoint, rcvhwm=0)
    try:
        received = 0  # replies, less the refusals of signatures (counted as dropped)

        def drain(timeout_ms: int) -> None:
            nonlocal received
            while fuzzer.sock.poll(timeout_ms):
                if not _check_reply(fuzzer.sock.recv_multipart(), signer):
                    received += 1

        for i in range(n):
            fuzzer.send_raw(_message(rng, i, signer))
            if i % 500 == 499:
                drain(0)
                if on_progress:
                    on_progress(i + 1)
        # Every message is answered once or counted as dropped: wait for the sum.
        watcher = RawClient(backend.endpoint, key=KEY if signer else None)
        deadline = time.monotonic() + 30
        while True:
            drain(50)
            stats = watcher.call("<stats>")
            dropped = stats["dropped"]["malformed"] + stats["dropped"]["bad_signature"]
            if received + dropped >= n or time.monotonic() > deadline:
                break
        watcher.close()
        drain(200)
        assert received + dropped == n, (received, stats["dropped"], n)
        assert stats["dropped"]["malformed"] > 0
        assert stats["dropped"]["reply_hwm"] == 0
        if signer is not None:
            assert stats["dropped"]["bad_signature"] > 0
        assert stats["refused"].get("ProtocolError", 0) > 0
        assert stats["refused"].get("CodecNotAllowed", 0) > 0
        assert stats["refused"].get("DecodeError", 0) > 0
        assert stats["in_flight"] == 0
    finally:
        fuzzer.close()


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
        big.send_raw([MAGIC, HEADER.pack(Kind.CALL, 2, 1), b"\0" * (300 * 1024)])
    assert big.silent(0.3)
    c = client(b)
    assert c.call("add", 2, 3) == 5 and c.call("echo", "still here") == "still here"
    assert b.running


def test_fuzz_signed_backend(serve, client):
    b = serve(TASKS, key=KEY, workers=2)
    _fuzz(b, random.Random(7), 3000, Signer(KEY))
    c = client(b, key=KEY)
    assert c.call("add", 20, 22) == 42
    unsigned = client(b)
    unsigned.send("add", 1, 2)
    assert unsigned.sock.poll(5000)
    assert _check_reply(unsigned.sock.recv_multipart(), Signer(KEY))  # refused, never run
    assert unsigned.silent()
    assert isinstance(zmq.zmq_version(), str)
