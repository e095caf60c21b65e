"""The taskit wire protocol, version 1: frame layout, message kinds, pack/unpack.

Pure logic, no sockets: the backend and frontend loops only move the frames
these functions build. ``doc/protocol.md`` is the normative description.

A message is a ZeroMQ multipart message (after any ROUTER envelope)::

    frame 0  MAGIC = b"TKIT\\x01"
    frame 1  header: kind (u8), codec wire id (u8), call id (u64), big-endian
    frame 2  body, encoded with the header's codec (empty for PING/PONG)
    frame 3  HMAC-SHA256 over frames 0-2, only when a shared key is set
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, NamedTuple

from taskit.codecs import Signer, as_body, get_codec
from taskit.errors import ProtocolError, SignatureError

__all__ = [
    "MAGIC",
    "VERSION",
    "DEFAULT_PORT",
    "Kind",
    "HEADER",
    "Message",
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
    "pack",
    "unpack",
    "peek_call_id",
    "encode_call",
    "decode_call",
    "encode_result",
    "encode_error",
    "decode_error",
]

VERSION = 1
MAGIC = b"TKIT" + bytes([VERSION])
DEFAULT_PORT = 54543

HEADER = struct.Struct(">BBQ")  # kind, codec wire id, call id: 10 bytes

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
    "ProtocolError",
    "Unauthenticated",
)

# The ERROR a backend answers a CALL whose signature it cannot check, unsigned, in
# JSON, with one of these two fixed messages (so a client can tell which side lacks
# the key; nothing in it depends on the key). See doc/protocol.md.
UNAUTHENTICATED = "Unauthenticated"
KEY_DIFFERS = "this backend has a key; the call's signature is missing or made with another key"
NO_KEY_HERE = "this backend has no key; it cannot check a signed call"


class Kind(IntEnum):
    CALL = 1
    RESULT = 2
    ERROR = 3
    PING = 4
    PONG = 5


_KINDS = frozenset(int(k) for k in Kind)
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack
_pack_header = HEADER.pack
_CALL, _RESULT = int(Kind.CALL), int(Kind.RESULT)


class Message(NamedTuple):
    kind: int
    codec_id: int
    call_id: int
    body: bytes


_new_message = tuple.__new__


def pack(
    kind: int, codec_id: int, call_id: int, body: bytes = b"", signer: Signer | None = None
) -> list[bytes]:
    """Build the frames of one message (signed when ``signer`` is given)."""
    frames = [MAGIC, _pack_header(kind, codec_id, call_id), body]
    if signer is not None:
        frames.append(signer.sign(frames))
    return frames


def peek_call_id(frames: Sequence[bytes]) -> int | None:
    """The call id of a message that may be malformed, or None if it has none.

    Lets the backend answer a broken request when it can tell whose it is.
    """
    if len(frames) >= 2 and frames[0] == MAGIC and len(frames[1]) == HEADER.size:
        return HEADER.unpack(frames[1])[2]
    return None


def unpack(frames: Sequence[bytes], signer: Signer | None = None) -> Message:
    """Parse and check the frames of one message.

    Raises :class:`SignatureError` when a key is set and the signature is
    missing or wrong (check this first: nothing unsigned is read further) or when
    no key is set and the message is signed, and :class:`ProtocolError` for
    anything else malformed. Does not decode the body.
    """
    return _unpack(frames, signer, True)


def _unpack(frames: Sequence[Any], signer: Signer | None, body_bytes: bool) -> Message:
    """:func:`unpack`; with ``body_bytes`` false a body given as another bytes-like
    object (a view of ZeroMQ's buffer) is kept as it is, not copied."""
    n = len(frames)
    if signer is not None:
        if n != 4:
            raise SignatureError("message is not signed; this peer requires a shared key")
        if not signer.verify(frames[:3], frames[3]):
            raise SignatureError("message signature does not match the shared key")
    elif n != 3:
        if n == 4:
            raise SignatureError("message is signed but this peer has no shared key")
        raise ProtocolError(f"expected 3 frames (4 when signed), got {n}")
    magic, header, body = frames[0], frames[1], frames[2]
    if magic != MAGIC:
        if magic[:4] == MAGIC[:4] and len(magic) == len(MAGIC):
            raise ProtocolError(
                f"unsupported protocol version {magic[4]}; this peer speaks version {VERSION}"
            )
        raise ProtocolError("not a taskit message (bad magic frame)")
    if len(header) != _HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER.size} bytes, got {len(header)}")
    kind, codec_id, call_id = _unpack_header(header)
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    if body_bytes and type(body) is not bytes:
        body = bytes(body)
    # tuple.__new__ skips the Python-level NamedTuple constructor (per-message hot path).
    return _new_message(Message, (kind, codec_id, call_id, body))


def encode_call(
    codec: Any,
    call_id: int,
    task: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    signer: Signer | None = None,
) -> list[bytes]:
    """Frames of a CALL of ``task``. Raises :class:`EncodeError` for unencodable arguments."""
    body = codec.encode([task, list(args), kwargs or {}])
    if type(body) is not bytes:
        body = as_body(codec, body)
    return pack(Kind.CALL, codec.wire_id, call_id, body, signer)


def decode_call(
    codec: Any, body: bytes
) -> tuple[str, list[Any], dict[str, Any], dict[str, str] | None]:
    """``(task, args, kwargs, meta)`` of a CALL body; ``meta`` is the optional fourth
    element (a map of strings: the trace context), None when absent.

    Raises :class:`DecodeError` when the body does not decode and
    :class:`ProtocolError` when it is not ``[str, list, map-with-str-keys]`` plus
    maybe a map of strings.
    """
    value = codec.decode(body)
    if not isinstance(value, (list, tuple)):
        raise ProtocolError("a CALL body must be [task, args, kwargs]")
    if len(value) == 3:
        task, args, kwargs = value
        meta = None
    elif len(value) == 4:  # OBS: the optional trace context (the v2 slot)
        task, args, kwargs, meta = value
        meta = _meta(meta)
    else:
        raise ProtocolError("a CALL body must be [task, args, kwargs]")
    if not isinstance(task, str):
        raise ProtocolError(f"task name must be a string, got {type(task).__name__}")
    if type(args) is not list:  # a fresh list from the decoder is returned as is
        if not isinstance(args, (list, tuple)):
            raise ProtocolError(f"args must be a list, got {type(args).__name__}")
        args = list(args)
    if not isinstance(kwargs, dict) or (kwargs and not all(isinstance(k, str) for k in kwargs)):
        raise ProtocolError("kwargs must be a map with string keys")
    return task, args, kwargs, meta


def _meta(meta: Any) -> dict[str, str] | None:
    """A CALL's metadata map, checked: string keys and values (empty: None)."""
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ProtocolError("a CALL's metadata must be a map of strings")
    return meta or None


def encode_result(
    codec: Any, call_id: int, value: Any, signer: Signer | None = None
) -> list[bytes]:
    """Frames of a RESULT. Raises :class:`EncodeError` when ``value`` is unencodable."""
    body = codec.encode(value)
    if type(body) is not bytes:
        body = as_body(codec, body)
    if signer is None:  # pack() inlined: this is on every reply's path
        return [MAGIC, _pack_header(_RESULT, codec.wire_id, call_id), body]
    return pack(_RESULT, codec.wire_id, call_id, body, signer)


def encode_error(
    codec: Any,
    call_id: int,
    type_name: str,
    args: Sequence[Any] = (),
    remote_traceback: str = "",
    signer: Signer | None = None,
) -> list[bytes]:
    """Frames of an ERROR. Never raises for unencodable ``args``: they fall back to reprs,
    and a codec that fails entirely falls back to JSON."""
    args = list(args)
    for attempt in (args, [repr(a) for a in args]):
        try:
            body = codec.encode([type_name, attempt, remote_traceback])
            if type(body) is not bytes:
                body = as_body(codec, body)
            break
        except Exception:  # an ERROR must always go out, whatever the codec does
            continue
    else:
        codec = get_codec("json")
        body = codec.encode([type_name, [repr(a) for a in args], remote_traceback])
    return pack(Kind.ERROR, codec.wire_id, call_id, body, signer)


def decode_error(codec: Any, body: bytes) -> tuple[str, list[Any], str]:
    """``(type_name, args, remote_traceback)`` of an ERROR body (lenient about shape)."""
    value = codec.decode(body)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        args = value[1] if len(value) > 1 else []
        tb = value[2] if len(value) > 2 and isinstance(value[2], str) else ""
        return value[0], list(args) if isinstance(args, (list, tuple)) else [args], tb
    raise ProtocolError("an ERROR body must be [type_name, args, remote_traceback]")
