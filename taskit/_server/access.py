"""Who may talk to a BackEnd: its CURVE keys and the CurveZMQ client allow-list.
(What a message with a signature the backend cannot check gets, and the
per-connection sessions of a keyed backend, are the request handler's.)

The allow-list's ZAP thread is pyzmq's; nothing here owns the backend's socket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import zmq

from taskit._curve import check_pair, curve_key, is_z85_key

__all__ = ["CurveAllowList", "curve_keys"]


class CurveAllowList:
    """The CurveZMQ clients a backend admits: a ZAP handler (pyzmq's
    ``ThreadAuthenticator``, on the backend's own context) asks :meth:`callback`
    about each client's public key during the handshake; others never connect.

    ``keys``: the clients' public keys, Z85 (40 characters, bytes or str).
    Raises ``ValueError`` for a key that is not one.
    """

    def __init__(self, keys: Iterable[bytes | str]) -> None:
        self.keys = frozenset(self._z85(k) for k in keys)
        self.denied = 0  # handshakes refused (read by stats(); one writer thread)
        self._auth: Any = None

    @staticmethod
    def _z85(key: bytes | str) -> bytes:
        try:
            k = key.encode("ascii") if isinstance(key, str) else bytes(key)
        except (UnicodeError, TypeError):
            k = b""
        if not is_z85_key(k):
            raise ValueError(
                f"curve_clients takes Z85 public keys (40 characters, as "
                f"zmq.curve_keypair() returns), not {key!r}"
            )
        return k

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.denied += 1
        return False

    def start(self, ctx: zmq.Context) -> None:
        """Serve ZAP on ``ctx`` (before the ROUTER binds)."""
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("taskit.backend.zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def curve_keys(secret: Any, public: Any) -> tuple[bytes | None, bytes | None]:
    """The backend's CURVE keys checked up front (40 Z85 characters or 32 raw bytes
    each, and a pair) as Z85: libzmq would only refuse them with a bare EINVAL at
    bind time. Raises ``ValueError`` naming the option."""
    if secret is None:
        if public is not None:
            raise ValueError("curve_publickey needs its curve_secretkey")
        return None, None
    secret = curve_key("curve_secretkey", secret, secret=True)
    if public is None:
        return secret, None
    public = curve_key("curve_publickey", public)
    check_pair(public, secret, "curve_publickey", "curve_secretkey")
    return secret, public
