"""Codecs turn Python values into message bodies and back.

A codec is any object (usually a class with static methods) with ``name``
(str), ``wire_id`` (int 1..255, carried in every message header) and
``encode(obj) -> bytes`` / ``decode(data) -> obj``. Failures raise
:class:`EncodeError` / :class:`DecodeError` naming what went wrong, never a
bare library exception. Users add their own with :func:`register`.

JSON and msgpack only build plain data, so they are safe to accept from
anyone; pickle runs code while decoding, so the backend gates it (see
``doc/security.md``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
from typing import Any, Protocol

import msgpack

from taskit.errors import DecodeError, EncodeError, UnknownCodecError

__all__ = [
    "Codec",
    "JSONCodec",
    "MsgpackCodec",
    "PickleCodec",
    "register",
    "get_codec",
    "registered_codecs",
    "Signer",
    "as_body",
]


class Codec(Protocol):
    name: str
    wire_id: int

    @staticmethod
    def encode(obj: Any) -> bytes: ...

    @staticmethod
    def decode(data: bytes) -> Any: ...


def _type_name(obj: Any) -> str:
    return type(obj).__qualname__


class JSONCodec:
    """UTF-8 JSON, strictly RFC 8259. Carries None, bool, int, finite float, str,
    list/tuple and str-keyed dicts.

    Tuples come back as lists. Bytes, sets and other objects are refused with
    an :class:`EncodeError` naming their type; NaN and the infinities, which
    RFC 8259 has no words for, with an :class:`EncodeError` too, and a body
    that spells them (``NaN``, ``Infinity``) with a :class:`DecodeError`.
    """

    name = "json"
    wire_id = 1

    @staticmethod
    def encode(obj: Any) -> bytes:
        try:
            return _json_encode(obj).encode()
        except EncodeError:
            raise
        except ValueError as e:
            if "Out of range float" in str(e):  # what allow_nan=False raises
                raise EncodeError(
                    "JSON (RFC 8259) cannot carry NaN or Infinity; send None or a string "
                    "instead, or use the msgpack codec"
                ) from e
            raise EncodeError(f"JSON cannot encode this value: {e}") from e
        except (TypeError, RecursionError) as e:
            raise EncodeError(f"JSON cannot encode this value: {e}") from e

    @staticmethod
    def decode(data: bytes) -> Any:
        try:
            text: Any = data
            if isinstance(data, (bytes, bytearray, memoryview)):  # as json.loads does
                raw = bytes(data)
                text = raw.decode(json.detect_encoding(raw), "surrogatepass")
            return _json_decode(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise DecodeError(f"not valid JSON: {e}") from e


def _json_refuse(obj: Any) -> Any:
    raise EncodeError(
        f"JSON cannot carry a value of type {_type_name(obj)!r}"
        + (" (use the msgpack codec for bytes)" if isinstance(obj, (bytes, bytearray)) else "")
    )


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not RFC 8259 JSON (it has no NaN or Infinity)")


# One shared encoder and decoder (neither keeps state between calls): json.dumps
# and json.loads with options would build a new one per call (about 2 us each).
_json_encode = json.JSONEncoder(separators=(",", ":"), default=_json_refuse, allow_nan=False).encode
_json_decode = json.JSONDecoder(parse_constant=_json_constant).decode


def _msgpack_packer() -> Any:
    return msgpack.Packer(use_bin_type=True, autoreset=True)


# A body this long or longer is packed by a Packer used once (see MsgpackCodec.encode).
_PACKER_KEEP = 64 * 1024


class MsgpackCodec:
    """msgpack: JSON's types plus bytes and any-keyed maps; compact and fast.

    Integers must fit in 64 bits (``9**9999`` is refused); tuples come back as
    lists. The default codec of the distributed half.
    """

    name = "msgpack"
    wire_id = 2
    # One Packer is reused for every small body: a new one per call (as
    # msgpack.packb makes) costs three times as much. Its buffer grows to the
    # largest body it packed and is never given back, so after a body of
    # _PACKER_KEEP bytes or more it is dropped and replaced: a big buffer kept for
    # ever stops glibc's malloc from raising its mmap and trim thresholds (they rise
    # when a big mmapped block is freed), and then every big call's allocations are
    # trimmed from the heap and faulted in again (~470 page faults per 1 MiB call;
    # doc/comparison.md). Shared by threads: pack() runs under the GIL throughout.
    _packer: Any = _msgpack_packer()

    @staticmethod
    def encode(obj: Any) -> bytes:
        try:
            body: bytes = MsgpackCodec._packer.pack(obj)
            if len(body) >= _PACKER_KEEP:
                MsgpackCodec._packer = _msgpack_packer()
            return body
        except OverflowError as e:
            raise EncodeError(
                "msgpack cannot carry integers beyond 64 bits (got a value of type 'int' "
                "that is too large); send it as a string or use the pickle codec"
            ) from e
        except (TypeError, ValueError) as e:
            raise EncodeError(f"msgpack cannot encode this value: {e}") from e

    @staticmethod
    def decode(data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated exception types
            raise DecodeError(f"not valid msgpack: {type(e).__name__}: {e}") from e


class PickleCodec:
    """pickle: any picklable Python object. Decoding runs code: trust the sender."""

    name = "pickle"
    wire_id = 3

    @staticmethod
    def encode(obj: Any) -> bytes:
        try:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise EncodeError(f"pickle cannot encode this value: {type(e).__name__}: {e}") from e

    @staticmethod
    def decode(data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as e:
            raise DecodeError(f"not a valid pickle: {type(e).__name__}: {e}") from e


def as_body(codec: Any, body: Any) -> bytes:
    """``body`` (what ``codec.encode`` returned) as bytes for the wire.

    Call sites check ``type(body) is bytes`` first, so this only runs for user
    codecs: a ``str`` (what TaskIt 4.0 codecs returned) is sent as UTF-8,
    anything else that is not bytes-like raises :class:`EncodeError`.
    """
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise EncodeError(
        f"codec {getattr(codec, 'name', codec)!r} returned {type(body).__name__}; "
        "encode() must return bytes (or str)"
    )


_BY_ID: dict[int, Any] = {}
_BY_NAME: dict[str, Any] = {}


def register(codec: Any) -> Any:
    """Make ``codec`` usable by name and wire id; returns it (usable as a decorator).

    Raises ``ValueError`` for a malformed codec or an id/name already taken
    by a different codec.
    """
    name, wire_id = getattr(codec, "name", None), getattr(codec, "wire_id", None)
    if not isinstance(name, str) or not name:
        raise ValueError("a codec needs a non-empty str 'name'")
    if not isinstance(wire_id, int) or not 1 <= wire_id <= 255:
        raise ValueError(f"codec {name!r} needs an int 'wire_id' in 1..255, got {wire_id!r}")
    if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise ValueError(f"codec {name!r} needs encode() and decode()")
    key: Any  # a wire id in _BY_ID, a name in _BY_NAME
    for table, key in ((_BY_ID, wire_id), (_BY_NAME, name)):
        if table.get(key, codec) is not codec:
            raise ValueError(f"codec {key!r} is already registered as {table[key]!r}")
    _BY_ID[wire_id] = codec
    _BY_NAME[name] = codec
    return codec


def get_codec(codec: Any) -> Any:
    """Resolve a codec given as an object, a name (``"json"``) or a wire id (``2``).

    Raises :class:`UnknownCodecError` when nothing is registered under it.
    """
    if isinstance(codec, str):
        found = _BY_NAME.get(codec.lower())
    elif isinstance(codec, int):
        found = _BY_ID.get(codec)
    elif _BY_ID.get(getattr(codec, "wire_id", None)) is codec:  # type: ignore[arg-type]
        found = codec
    else:
        return register(codec)  # a user's codec object: registering validates it
    if found is None:
        raise UnknownCodecError(
            f"no codec registered as {codec!r}; known: {', '.join(sorted(_BY_NAME))}"
        )
    return found


def registered_codecs() -> dict[str, Any]:
    """A copy of the registry, name -> codec."""
    return dict(_BY_NAME)


for _c in (JSONCodec, MsgpackCodec, PickleCodec):
    register(_c)


class Signer:
    """HMAC-SHA256 over message frames, keyed by a shared secret.

    ``sign(frames)`` returns the 32-byte digest; ``verify(frames, digest)``
    compares in constant time.
    """

    digest_size = 32

    def __init__(self, key: bytes | str) -> None:
        if isinstance(key, str):
            key = key.encode()
        if not key:
            raise ValueError("an HMAC key must not be empty")
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def sign(self, frames: Any) -> bytes:
        h = self._base.copy()
        for f in frames:
            h.update(f)
        return h.digest()

    def verify(self, frames: Any, digest: bytes) -> bool:
        return hmac.compare_digest(self.sign(frames), digest)
