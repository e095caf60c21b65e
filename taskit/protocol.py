"""The taskit wire protocol, version 2: frame layout, kinds, sessions, bodies.

Pure logic, no sockets: the client and server engines only move the frames
these functions build. ``doc/protocol.md`` is the normative description.

A message is **one ZeroMQ frame** (after any ROUTER envelope)::

    preamble  4 bytes   "TK", version (2), flags (bit 0: signed)
    item      24 bytes  kind u8, codec u8, reserved u16, call id u64, a u32, b u32,
                        body length u32 (big-endian)
              n bytes   body
    ...       more items (a batch)
    trailer   40 bytes  signed only: sequence u64, HMAC-SHA256 (see Session)

``a`` and ``b`` depend on the kind: a CALL's time budget in milliseconds (0: none),
or a backend's load (calls queued, calls running) in everything it sends.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

from taskit.codecs import Signer, as_body, get_codec
from taskit.errors import ProtocolError, SignatureError

__all__ = [
    "VERSION",
    "PREAMBLE",
    "DEFAULT_PORT",
    "Kind",
    "HEAD",
    "ITEM",
    "HEAD_SIZE",
    "ITEM_SIZE",
    "TRAILER_SIZE",
    "SIGNED",
    "MAX_BUDGET_MS",
    "Item",
    "Session",
    "ReplayError",
    "STOP",
    "KILL",
    "STATUS",
    "STATS",
    "TASKS",
    "ADMIN_SIGNALS",
    "ERROR_TYPES",
    "UNAUTHENTICATED",
    "KEY_DIFFERS",
    "NO_KEY_HERE",
    "NO_SESSION",
    "V1_MAGIC",
    "pack_one",
    "pack_items",
    "parse",
    "peek",
    "is_v1",
    "v1_refusal",
    "new_nonce",
    "hello_body",
    "welcome_body",
    "parse_handshake",
    "encode_call",
    "decode_call",
    "encode_error",
    "decode_error",
    "budget_ms",
]

VERSION = 2
PREAMBLE = b"TK" + bytes([VERSION])
DEFAULT_PORT = 54543
SIGNED = 0x01  # preamble flags: a trailer follows the items

# The first item's header with the preamble before it (the single-message fast path):
# magic, version, flags, kind, codec, reserved, call id, a, b, body length.
HEAD = struct.Struct(">2sBBBBHQIII")
ITEM = struct.Struct(">BBHQIII")  # one item's header: kind, codec, reserved, id, a, b, length
HEAD_SIZE = HEAD.size  # 28
ITEM_SIZE = ITEM.size  # 24
_SEQ = struct.Struct(">Q")
TRAILER_SIZE = _SEQ.size + 32  # sequence, HMAC-SHA256
MAX_BUDGET_MS = 0xFFFFFFFF  # a CALL's budget field: u32 milliseconds (0: no deadline)
_U32 = 0xFFFFFFFF

# The v1 message's first frame: a v1 peer gets a clear answer, never silence.
V1_MAGIC = b"TKIT\x01"

STOP = "<stop>"
KILL = "<kill>"
STATUS = "<status>"
STATS = "<stats>"
TASKS = "<tasks>"
ADMIN_SIGNALS = (STOP, KILL, STATUS, STATS, TASKS)

# Type names of the errors the backend raises itself (ERROR body, element 0).
ERROR_TYPES = (
    "UnknownTask",
    "CodecNotAllowed",
    "DecodeError",
    "EncodeError",
    "Busy",
    "Stopping",
    "Expired",
    "ProtocolError",
    "Unauthenticated",
)

# The ERROR a backend answers a message whose signature it cannot check, unsigned, in
# JSON, with one of these fixed messages (so a client can tell which side lacks the
# key; nothing in it depends on the key). See doc/protocol.md.
UNAUTHENTICATED = "Unauthenticated"
KEY_DIFFERS = "this backend has a key; the call's signature is missing or made with another key"
NO_KEY_HERE = "this backend has no key; it cannot check a signed call"
NO_SESSION = "this backend holds no handshake for this connection; reconnect and say HELLO"


class Kind(IntEnum):
    CALL = 1  # client: [task, args, kwargs(, meta)]; a = time budget ms (0: none)
    RESULT = 2  # backend: the value
    ERROR = 3  # backend: [type_name, args, remote_traceback]
    PING = 4  # client: empty
    PONG = 5  # backend: empty
    HELLO = 6  # client, first on a connection: a JSON map
    WELCOME = 7  # backend, the answer to HELLO: a JSON map
    CANCEL = 8  # client: withdraw the call with this id, empty
    CANCELLED = 9  # backend: that call was removed unrun; no other reply follows
    NOT_CANCELLED = 10  # backend: it started, was answered, or is unknown here


class Item(NamedTuple):
    """One item of a message: ``body`` is bytes, or a memoryview of the frame."""

    kind: int
    codec_id: int
    call_id: int
    a: int
    b: int
    body: Any


class ReplayError(SignatureError):
    """A correctly signed message whose sequence number was seen before, or is too
    old for the receiver's window: a replay (or a reorder beyond the window)."""


_KINDS = frozenset(int(k) for k in Kind)
_new_item = tuple.__new__
_pack_head = HEAD.pack
_unpack_head = HEAD.unpack_from
_pack_item = ITEM.pack
_unpack_item = ITEM.unpack_from
_MAGIC = b"TK"
_REPLAY_WINDOW = 64


def new_nonce() -> bytes:
    """16 random bytes: a connection's half of its session, or a process start's id."""
    return os.urandom(16)


class Session:
    """The signing state of one connection, one end's view: a keyed HMAC bound to
    both nonces, a counter for what this end sends and a replay window for what
    it receives.

    ``outgoing`` is b"C" on a client, b"B" on a backend (what it signs; it verifies
    the other letter), so a message cannot be reflected back at its sender. Before
    the handshake both nonces are 16 zero bytes (None; HELLO and WELCOME are signed so).
    Not thread-safe: the engine that sends (and the one that receives) serialise.
    """

    __slots__ = ("_out", "_in", "_seq", "_hi", "_seen")

    def __init__(
        self,
        signer: Signer,
        client_nonce: bytes | None = None,
        server_nonce: bytes | None = None,
        outgoing: bytes = b"C",
    ) -> None:
        client_nonce = client_nonce or bytes(16)
        server_nonce = server_nonce or bytes(16)
        incoming = b"B" if outgoing == b"C" else b"C"
        base = signer._base  # the HMAC keyed once; copies cost no key schedule
        self._out = base.copy()
        self._out.update(b"taskit/2" + outgoing + client_nonce + server_nonce)
        self._in = base.copy()
        self._in.update(b"taskit/2" + incoming + client_nonce + server_nonce)
        self._seq = 0  # last sequence sent
        self._hi = 0  # highest sequence received
        self._seen = 0  # bit i: sequence _hi - i was received

    def trailer(self, parts: Sequence[Any]) -> bytes:
        """The trailer sealing a frame made of ``parts`` (signed flag already set)."""
        self._seq += 1
        seq = _SEQ.pack(self._seq)
        h = self._out.copy()
        for p in parts:
            h.update(p)
        h.update(seq)
        return seq + h.digest()

    def check(self, frame: Any) -> None:
        """Verify a signed frame's trailer and its sequence. Raises
        :class:`SignatureError` (a digest that does not match) or
        :class:`ReplayError` (seen before, or older than the window)."""
        n = len(frame)
        if n < HEAD_SIZE + TRAILER_SIZE:
            raise SignatureError("signed message too short for its trailer")
        view = memoryview(frame)
        h = self._in.copy()
        h.update(view[: n - 32])
        if not hmac.compare_digest(h.digest(), view[n - 32 :]):
            raise SignatureError("message signature does not match the shared key")
        (seq,) = _SEQ.unpack_from(view, n - TRAILER_SIZE)
        hi = self._hi
        if seq > hi:
            shift = seq - hi
            self._seen = ((self._seen << shift) | 1) & ((1 << _REPLAY_WINDOW) - 1)
            self._hi = seq
            return
        back = hi - seq
        if seq == 0 or back >= _REPLAY_WINDOW or self._seen >> back & 1:
            raise ReplayError(f"message sequence {seq} replayed or too old (highest {hi})")
        self._seen |= 1 << back


def pack_one(
    kind: int, codec_id: int, call_id: int, a: int = 0, b: int = 0, body: Any = b""
) -> bytes:
    """One unsigned single-item message (the hot path: one struct pack, one join)."""
    return _pack_head(_MAGIC, VERSION, 0, kind, codec_id, 0, call_id, a, b, len(body)) + body


def pack_items(items: Iterable[Sequence[Any]], session: Session | None = None) -> bytes:
    """One message of ``items`` (each ``(kind, codec_id, call_id, a, b, body)``),
    sealed by ``session`` when given. The bodies are copied once, into the frame."""
    parts: list[Any] = [PREAMBLE + (b"\x01" if session is not None else b"\x00")]
    for kind, codec_id, call_id, a, b, body in items:
        parts.append(_pack_item(kind, codec_id, 0, call_id, a, b, len(body)))
        parts.append(body)
    if len(parts) == 1:
        raise ValueError("a message has at least one item")
    if session is not None:
        parts.append(session.trailer(parts))
    return b"".join(parts)


def peek(frame: Any) -> tuple[int, int, int] | None:
    """``(kind, codec_id, call_id)`` of the first item of a frame that may be
    malformed or badly signed, or None when not even that much is well-formed.
    Lets a backend answer a broken request when it can tell whose it is."""
    if len(frame) < HEAD_SIZE or bytes(frame[:3]) != PREAMBLE:
        return None
    _, _, _, kind, codec_id, _, call_id, _, _, _ = _unpack_head(frame)
    return kind, codec_id, call_id


def parse(frame: Any, session: Session | None = None) -> list[Item]:
    """The items of one message; bodies are slices of ``frame`` (give a memoryview
    to keep a big body zero-copy).

    With ``session``, a message must be signed and its trailer checked first
    (nothing unsigned is read further): :class:`SignatureError` /
    :class:`ReplayError`. Without one, a signed message raises
    :class:`SignatureError`. Anything else malformed raises :class:`ProtocolError`
    (an unknown kind, lengths that do not add up, another version).
    """
    n = len(frame)
    if n < HEAD_SIZE or frame[:2] != _MAGIC:
        raise ProtocolError("not a taskit message (no 'TK' preamble)")
    version, flags = frame[2], frame[3]
    if version != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version}; this peer speaks version {VERSION}"
        )
    if session is not None:
        if not flags & SIGNED:
            raise SignatureError("message is not signed; this peer requires a shared key")
        session.check(frame)
        end = n - TRAILER_SIZE
    elif flags & SIGNED:
        raise SignatureError("message is signed but this peer has no shared key")
    else:
        end = n
    if flags & ~SIGNED:
        raise ProtocolError(f"unknown preamble flags {flags:#x}")
    items: list[Item] = []
    pos = 4
    while pos < end:
        if end - pos < ITEM_SIZE:
            raise ProtocolError(f"truncated item header at byte {pos}")
        kind, codec_id, _, call_id, a, b, blen = _unpack_item(frame, pos)
        if kind not in _KINDS:
            raise ProtocolError(f"unknown message kind {kind}")
        pos += ITEM_SIZE
        if blen > end - pos:
            raise ProtocolError(f"item body of {blen} bytes overruns the message")
        items.append(_new_item(Item, (kind, codec_id, call_id, a, b, frame[pos : pos + blen])))
        pos += blen
    return items


def is_v1(frames: Sequence[Any]) -> bool:
    """True for a message of protocol version 1 (several frames, 'TKIT\\x01' first)."""
    return len(frames) >= 2 and bytes(frames[0]) == V1_MAGIC


def v1_refusal(frames: Sequence[Any]) -> list[bytes] | None:
    """The version-1 ERROR that tells a version-1 client to upgrade (its own frame
    layout, so it raises a clear ``ProtocolError`` instead of waiting), or None when
    the message is not a v1 CALL with a readable call id."""
    if len(frames) < 3 or bytes(frames[0]) != V1_MAGIC or len(frames[1]) != 10:
        return None
    kind, _, call_id = struct.unpack(">BBQ", bytes(frames[1]))
    if kind != 1 or call_id == 0:
        return None
    msg = (
        f"this backend speaks taskit wire protocol version {VERSION}, not 1; "
        "upgrade taskit on the client"
    )
    body = json.dumps(["ProtocolError", [msg], ""]).encode()
    return [V1_MAGIC, struct.pack(">BBQ", 3, 1, call_id), body]


# -- handshake bodies (always JSON, codec id 1) -----------------------------------


def hello_body(codec_ids: Sequence[int], signed: bool, nonce: bytes, agent: str) -> bytes:
    """A HELLO's body: what the client speaks and its half of the session."""
    return json.dumps(
        {
            "version": VERSION,
            "codecs": list(codec_ids),
            "signed": signed,
            "nonce": nonce.hex(),
            "agent": agent,
        },
        separators=(",", ":"),
    ).encode()


def welcome_body(
    *,
    client_nonce: str,
    server_nonce: bytes,
    name: str,
    pid: int,
    started: bytes,
    codec_ids: Sequence[int],
    signed: bool,
    workers: int,
    max_pending: int | None,
    max_message_size: int | None,
) -> bytes:
    """A WELCOME's body: the backend's identity, what it accepts and its capacity;
    ``client_nonce`` echoes the HELLO's (proof that this WELCOME answers it)."""
    return json.dumps(
        {
            "version": VERSION,
            "nonce": client_nonce,
            "session": server_nonce.hex(),
            "name": name,
            "pid": pid,
            "started": started.hex(),
            "codecs": list(codec_ids),
            "signed": signed,
            "workers": workers,
            "max_pending": max_pending,
            "max_message_size": max_message_size,
        },
        separators=(",", ":"),
    ).encode()


_HELLO_FIELDS = {"version": int, "codecs": list, "signed": bool, "nonce": str}
_WELCOME_FIELDS = {
    "version": int,
    "nonce": str,
    "session": str,
    "codecs": list,
    "signed": bool,
    "workers": int,
}


def parse_handshake(body: Any, kind: int) -> dict[str, Any]:
    """The map of a HELLO or WELCOME body, its required fields checked (unknown
    fields are ignored, for later versions). Raises :class:`ProtocolError`."""
    try:
        value = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{Kind(kind).name} body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{Kind(kind).name} body must be a JSON object")
    fields = _HELLO_FIELDS if kind == Kind.HELLO else _WELCOME_FIELDS
    for key, typ in fields.items():
        if not isinstance(value.get(key), typ) or (typ is int and type(value[key]) is bool):
            raise ProtocolError(f"{Kind(kind).name} field {key!r} missing or not {typ.__name__}")
    for key in ("nonce", "session"):
        if key in fields:
            try:
                if len(bytes.fromhex(value[key])) != 16:
                    raise ValueError
            except ValueError:
                raise ProtocolError(f"{Kind(kind).name} {key!r} must be 32 hex digits") from None
    if not all(type(c) is int and 0 < c < 256 for c in value["codecs"]):
        raise ProtocolError(f"{Kind(kind).name} codecs must be codec ids 1-255")
    return value


# -- bodies -------------------------------------------------------------------------


def budget_ms(remaining: float | None) -> int:
    """A CALL's ``a`` field for ``remaining`` seconds: at least 1 ms while any time
    is left (0 means no deadline), capped at the field's maximum."""
    if remaining is None:
        return 0
    if remaining <= 0:
        return 1
    return min(MAX_BUDGET_MS, max(1, int(remaining * 1000)))


def encode_call(
    codec: Any,
    task: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    meta: dict[str, str] | None = None,
) -> bytes:
    """A CALL body. Raises :class:`EncodeError` for unencodable arguments."""
    value = [task, list(args), kwargs or {}]
    if meta:
        value.append(meta)
    body = codec.encode(value)
    return body if type(body) is bytes else as_body(codec, body)


def decode_call(
    codec: Any, body: Any
) -> tuple[str, list[Any], dict[str, Any], dict[str, Any] | None]:
    """``(task, args, kwargs, meta)`` of a CALL body (``meta`` None when absent).

    Raises :class:`DecodeError` when the body does not decode and
    :class:`ProtocolError` when it is not ``[str, list, map-with-str-keys(, map)]``.
    """
    value = codec.decode(body)
    if not isinstance(value, (list, tuple)) or not 3 <= len(value) <= 4:
        raise ProtocolError(
            "a CALL body must be [task, args, kwargs] or [task, args, kwargs, meta]"
        )
    task, args, kwargs = value[0], value[1], value[2]
    meta = value[3] if len(value) == 4 else None
    if not isinstance(task, str):
        raise ProtocolError(f"task name must be a string, got {type(task).__name__}")
    if type(args) is not list:  # a fresh list from the decoder is returned as is
        if not isinstance(args, (list, tuple)):
            raise ProtocolError(f"args must be a list, got {type(args).__name__}")
        args = list(args)
    if not isinstance(kwargs, dict) or (kwargs and not all(isinstance(k, str) for k in kwargs)):
        raise ProtocolError("kwargs must be a map with string keys")
    if meta is not None and not (
        isinstance(meta, dict) and all(type(k) is str and type(v) is str for k, v in meta.items())
    ):
        raise ProtocolError("meta must be a map of strings to strings")
    return task, args, kwargs, meta


def encode_error(
    codec: Any, type_name: str, args: Sequence[Any] = (), remote_traceback: str = ""
) -> tuple[int, bytes]:
    """``(codec_id, body)`` of an ERROR. Never raises for unencodable ``args``: they
    fall back to reprs, and a codec that fails entirely falls back to JSON."""
    args = list(args)
    for attempt in (args, [repr(a) for a in args]):
        try:
            body = codec.encode([type_name, attempt, remote_traceback])
            return codec.wire_id, body if type(body) is bytes else as_body(codec, body)
        except Exception:  # an ERROR must always go out, whatever the codec does
            continue
    json_codec = get_codec("json")
    return json_codec.wire_id, json_codec.encode(
        [type_name, [repr(a) for a in args], remote_traceback]
    )


def decode_error(codec: Any, body: Any) -> tuple[str, list[Any], str]:
    """``(type_name, args, remote_traceback)`` of an ERROR body (lenient about shape)."""
    value = codec.decode(body)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        args = value[1] if len(value) > 1 else []
        tb = value[2] if len(value) > 2 and isinstance(value[2], str) else ""
        return value[0], list(args) if isinstance(args, (list, tuple)) else [args], tb
    raise ProtocolError("an ERROR body must be [type_name, args, remote_traceback]")
