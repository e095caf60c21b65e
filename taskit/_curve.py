"""CurveZMQ keys as the user gives them, checked before any socket sees them.

libzmq refuses a malformed key only when a socket option is set, with a bare
``EINVAL``; a socket left open after that blocks ``Context.term()`` for ever.
So FrontEnd, AsyncFrontEnd and BackEnd pass every key through
:func:`curve_key` first: a key is 40 Z85 characters (what
``zmq.curve_keypair()`` returns and ``taskit keygen`` writes), or its 32 raw
bytes. Shared by the client and the server side (neither imports the other).
"""

from __future__ import annotations

import os
from typing import Any

import zmq
from zmq.utils import z85

__all__ = ["curve_key", "check_pair"]

_WHAT = (
    "40 Z85 characters (as zmq.curve_keypair() returns and `taskit keygen` writes), "
    "or its 32 raw bytes"
)
_Z85 = frozenset(z85.Z85CHARS)


def is_z85_key(text: bytes) -> bool:
    """True when ``text`` is a CURVE key in Z85: 40 characters of the Z85 alphabet."""
    return len(text) == 40 and set(text) <= _Z85


def curve_key(option: str, value: Any, secret: bool = False) -> bytes:
    """``value`` as the 40 Z85 bytes libzmq takes: 40 Z85 characters (str or bytes;
    surrounding whitespace, as read from a key file, is ignored) or 32 raw bytes.

    Raises ``ValueError`` naming ``option`` and what a key looks like; a value
    that looks like a file's path says so. A ``secret`` key's value is never
    echoed in the message.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) == 32:
            return z85.encode(raw)
        text = raw.strip()
    elif isinstance(value, str):
        try:
            text = value.strip().encode("ascii")
        except UnicodeEncodeError:
            text = b""
    else:
        raise ValueError(f"{option} must be a CURVE key: {_WHAT}; got a {type(value).__name__}")
    if is_z85_key(text):
        return text
    raise ValueError(f"{option} must be a CURVE key: {_WHAT}; got {_describe(value, secret)}")


def check_pair(public: bytes, secret: bytes, public_option: str, secret_option: str) -> None:
    """Raise ``ValueError`` unless ``public`` (Z85) is the public half of ``secret``."""
    if zmq.curve_public(secret) != public:
        raise ValueError(
            f"{public_option} is not the public half of {secret_option}: pass the two "
            f"keys of one pair, or only {secret_option} (its public half is derived)"
        )


def _describe(value: Any, secret: bool) -> str:
    shown = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    if isinstance(value, (str, bytes)) and _looks_like_path(shown):
        what = "a value that" if secret else f"{shown!r}, which"
        return (
            f"{what} looks like the path of a file: pass the key the file holds, "
            "e.g. open(path).read().strip()"
        )
    if secret:
        return f"a {type(value).__name__} of length {len(value)}"
    return repr(value) if len(shown) <= 60 else f"{shown[:57]!r}..."


def _looks_like_path(text: str) -> bool:
    text = text.strip()
    return bool(text) and (
        os.path.exists(text) or "/" in text or text.endswith((".pub", ".key", ".key_secret"))
    )
