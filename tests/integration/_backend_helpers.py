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
    """A bare DEALER that speaks wire protocol v1 (one call at a time or pipelined)."""

    def __init__(self, endpoint: str, key: bytes | None = None, **sockopts: Any) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        for opt, value in sockopts.items():
            self.sock.setsockopt(getattr(zmq, opt.upper()), value)
        self.sock.connect(endpoint)
        self.signer = Signer(key) if key is not None else None
        self.ids = itertools.count(1)
        self.notices: list[Any] = []  # (type, args, traceback) of each notice received

    def send(
        self,
        task: str,
        *args: Any,
        codec: Any = MsgpackCodec,
        kwargs: dict | None = None,
        sign: bool = True,
    ) -> int:
        call_id = next(self.ids)
        signer = self.signer if sign else None
        self.sock.send_multipart(protocol.encode_call(codec, call_id, task, args, kwargs, signer))
        return call_id

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 10.0) -> tuple[int, Any, int, Any]:
        """(kind, codec, call_id, value); ERROR values are (type, args, traceback).

        A backend's notice (an ERROR with call id 0, doc/protocol.md §5) is not a
        reply: it is kept in ``notices`` and the next message is read."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                raise TimeoutError(f"no reply within {timeout} s")
            m = protocol.unpack(self.sock.recv_multipart(), self.signer)
            codec = get_codec(m.codec_id)
            if m.kind == Kind.ERROR:
                value = protocol.decode_error(codec, m.body)
                if m.call_id == 0:
                    self.notices.append(value)
                    continue
                return m.kind, codec, m.call_id, value
            if m.kind == Kind.PONG:
                return m.kind, codec, m.call_id, None
            return m.kind, codec, m.call_id, codec.decode(m.body)

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
        return not self.sock.poll(int(timeout * 1000))

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
