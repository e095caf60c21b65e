"""A raw DEALER client speaking taskit.protocol (the ``client`` fixture's, in conftest.py).

Used by the backend, security and fuzz tests: the "client in another language"
view of a BackEnd. Also :class:`ChildScript`, a backend script in a child process
(the bounds, reliability and graceful tests). Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import itertools
import os
import selectors
import subprocess
import sys
import time
from typing import Any

import zmq

from taskit import protocol
from taskit.codecs import MsgpackCodec, Signer, get_codec
from taskit.protocol import Kind

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ChildScript:
    """``python -c script *args`` in a child process, importing this checkout's taskit;
    it is ready once it has printed a line (``ready``: that line, stripped).

    ``stdin_eof_stops``: the script ends when its stdin closes (then stop() closes
    it and waits), else stop() kills it. stop() always ends it, by pid; a child that
    printed nothing within 30 s is stopped and RuntimeError raised.
    """

    def __init__(self, script: str, *args: str, stdin_eof_stops: bool = True) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE if stdin_eof_stops else None,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            self.ready = self.proc.stdout.readline().strip() if sel.select(30) else b""
        if not self.ready:
            self.stop()
            raise RuntimeError(f"the child {args} printed nothing: it did not start")

    def stop(self, timeout: float = 10) -> None:
        proc = self.proc
        if proc.poll() is None and proc.stdin is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


class RemoteError(Exception):
    def __init__(self, type_name: str, args: list, tb: str) -> None:
        super().__init__(type_name, args)
        self.type, self.remote_args, self.tb = type_name, args, tb


class RawClient:
    """A bare DEALER that speaks wire protocol v2 (one call at a time or pipelined).

    With ``key``, it says HELLO on its first send (or :meth:`hello`) and seals
    everything with its connection's session, as a FrontEnd does. ``received``
    collects every item read, in order (load fields included)."""

    def __init__(self, endpoint: str, key: bytes | None = None, **sockopts: Any) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        for opt, value in sockopts.items():
            self.sock.setsockopt(getattr(zmq, opt.upper()), value)
        self.sock.connect(endpoint)
        self.signer = Signer(key) if key is not None else None
        self.session: protocol.Session | None = None  # after the WELCOME (keyed)
        self.welcome: dict | None = None
        self.ids = itertools.count(1)
        self.notices: list[Any] = []  # (type, args, traceback) of each notice received
        self.items: list[protocol.Item] = []  # read, not yet returned
        self.last_frame = b""  # the last frame sent (for replay tests)

    def hello(self, timeout: float = 10.0) -> dict:
        """Say HELLO and return the WELCOME's map (the session opened when keyed)."""
        nonce = protocol.new_nonce()
        call_id = next(self.ids)
        body = protocol.hello_body([MsgpackCodec.wire_id], self.signer is not None, nonce, "t")
        zero = protocol.Session(self.signer) if self.signer is not None else None
        self.sock.send(protocol.pack_items([(Kind.HELLO, 1, call_id, 0, 0, body)], zero))
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no WELCOME")
        (item,) = protocol.parse(self.sock.recv(), zero)
        assert (item.kind, item.call_id) == (Kind.WELCOME, call_id), item
        self.welcome = protocol.parse_handshake(item.body, Kind.WELCOME)
        assert self.welcome["nonce"] == nonce.hex()
        if self.signer is not None:
            self.session = protocol.Session(
                self.signer, nonce, bytes.fromhex(self.welcome["session"]), b"C"
            )
        return self.welcome

    def frame(self, items: list[tuple], sign: bool = True) -> bytes:
        """One frame of ``items`` (kind, codec, call id, a, b, body), sealed when keyed."""
        if self.signer is not None and sign and self.session is None:
            self.hello()
        return protocol.pack_items(items, self.session if sign else None)

    def call_item(
        self,
        task: str,
        *args: Any,
        codec: Any = MsgpackCodec,
        kwargs: dict | None = None,
        budget_ms: int = 0,
        call_id: int | None = None,
    ) -> tuple:
        call_id = next(self.ids) if call_id is None else call_id
        body = protocol.encode_call(codec, task, args, kwargs)
        return (Kind.CALL, codec.wire_id, call_id, budget_ms, 0, body)

    def send(
        self,
        task: str,
        *args: Any,
        codec: Any = MsgpackCodec,
        kwargs: dict | None = None,
        sign: bool = True,
        budget_ms: int = 0,
    ) -> int:
        item = self.call_item(task, *args, codec=codec, kwargs=kwargs, budget_ms=budget_ms)
        self.send_frame(self.frame([item], sign))
        return item[2]

    def send_items(self, items: list[tuple], sign: bool = True) -> None:
        self.send_frame(self.frame(items, sign))

    def send_frame(self, frame: bytes) -> None:
        self.last_frame = frame
        self.sock.send(frame)

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv_item(self, timeout: float = 10.0) -> protocol.Item:
        """The next item (notices with call id 0 are kept in ``notices``, skipped)."""
        deadline = time.monotonic() + timeout
        while not self.items:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                raise TimeoutError(f"no reply within {timeout} s")
            frames = self.sock.recv_multipart()
            assert len(frames) == 1, frames
            for item in protocol.parse(frames[0], self.session):
                if item.kind == Kind.ERROR and item.call_id == 0:
                    codec = get_codec(item.codec_id)
                    self.notices.append(protocol.decode_error(codec, item.body))
                else:
                    self.items.append(item)
        return self.items.pop(0)

    def recv(self, timeout: float = 10.0) -> tuple[int, Any, int, Any]:
        """(kind, codec, call_id, value); ERROR values are (type, args, traceback).

        A backend's notice (an ERROR with call id 0) is not a reply: it is kept
        in ``notices`` and the next message is read."""
        item = self.recv_item(timeout)
        codec = get_codec(item.codec_id) if item.codec_id else None
        if item.kind == Kind.ERROR:
            return item.kind, codec, item.call_id, protocol.decode_error(codec, item.body)
        if item.kind == Kind.RESULT:
            return item.kind, codec, item.call_id, codec.decode(item.body)
        return item.kind, codec, item.call_id, None

    def results(self, n: int, timeout: float = 30.0) -> dict[int, Any]:
        """The next ``n`` replies, all RESULTs, as {call id: value}."""
        got = {}
        for _ in range(n):
            kind, _codec, call_id, value = self.recv(timeout)
            assert kind == Kind.RESULT, value
            got[call_id] = value
        return got

    def silent(self, timeout: float = 0.3) -> bool:
        """True if nothing arrives within ``timeout`` (for messages that must be dropped)."""
        return not self.items and not self.sock.poll(int(timeout * 1000))

    def call(self, task: str, *args: Any, timeout: float = 10.0, **kw: Any) -> Any:
        call_id = self.send(task, *args, **kw)
        kind, _codec, got_id, value = self.recv(timeout)
        assert got_id == call_id
        if kind == Kind.ERROR:
            raise RemoteError(*value)
        assert kind == Kind.RESULT
        return value

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
