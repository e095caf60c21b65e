"""A tiny raw protocol-v2 backend for client tests over real sockets: a ROUTER on a
thread speaking frames via taskit.protocol (handshake, sessions, batches, CANCEL),
with knobs to misbehave (no WELCOME, another version, other codecs, a v1 reply).
Not taskit's BackEnd: the client is tested against the contract, not the engine."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from taskit import protocol
from taskit.codecs import Signer, get_codec
from taskit.protocol import Kind, Session


class Responder:
    """Serves ``tasks`` (name -> function) on 127.0.0.1; ``endpoint`` to connect to.

    ``mode``: "ok", "silent" (never answers HELLO), "v1" (answers anything with a v1
    ERROR), "version" (WELCOME says version 3). ``codecs``: accepted codec ids.
    A task named "hold" (its argument other than 0) waits until :attr:`release` is set,
    so a CANCEL finds it queued; "block" likewise but counts as running (a CANCEL
    answers NOT_CANCELLED). Both return their argument.
    """

    def __init__(self, tasks=None, mode="ok", codecs=(1, 2), key=None, load=(0, 0)):
        self.tasks = {"add": lambda a, b: a + b, "echo": lambda x: x, **(tasks or {})}
        self.mode, self.codecs, self.load = mode, list(codecs), load
        self.signer = Signer(key) if key is not None else None
        self.sessions: dict[bytes, Session] = {}
        self.frames: list[bytes] = []  # every frame received
        self.batches: list[int] = []  # items per CALL frame received
        self.budgets: list[int] = []  # each CALL's a
        self.held: dict[tuple[bytes, int], tuple[Any, list]] = {}  # queued "hold" calls
        self.ran: list[int] = []  # call ids run
        self.cancelled: list[int] = []
        self.replayed = 0
        self.release = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> Responder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, ident: bytes, items: list, session: Session | None) -> None:
        self._sock.send_multipart([ident, protocol.pack_items(items, session)])

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if self.release.is_set() and self.held:
                for (ident, call_id), (session, item) in list(self.held.items()):
                    del self.held[(ident, call_id)]
                    self._send(ident, [self._run(item)], session)
            if not poller.poll(20):
                continue
            ident, *frames = self._sock.recv_multipart()
            self.frames.append(frames[0])
            if self.mode == "v1":
                self._sock.send_multipart([ident, protocol.V1_MAGIC, bytes(10), b"[]"])
                continue
            self._serve(ident, frames[0])

    def _serve(self, ident: bytes, frame: bytes) -> None:
        signer = self.signer
        head = protocol.peek(frame)
        if head is None:
            return
        if head[0] == Kind.HELLO:
            zero = Session(signer, outgoing=b"B") if signer else None
            try:
                (hello,) = protocol.parse(frame, zero)
            except protocol.SignatureError:
                return self._refuse(
                    ident, head[2], protocol.KEY_DIFFERS if signer else protocol.NO_KEY_HERE
                )
            info = protocol.parse_handshake(hello.body, Kind.HELLO)
            if self.mode == "silent":
                return
            server_nonce = protocol.new_nonce()
            body = protocol.welcome_body(
                client_nonce=info["nonce"],
                server_nonce=server_nonce,
                name=self.endpoint,
                pid=1234,
                started=bytes(16),
                codec_ids=self.codecs,
                signed=signer is not None,
                workers=3,
                max_pending=50,
                max_message_size=None,
            )
            if self.mode == "version":
                body = body.replace(b'"version":2', b'"version":3')
            self._send(ident, [(Kind.WELCOME, 1, hello.call_id, *self.load, body)], zero)
            if signer:
                cn = bytes.fromhex(info["nonce"])
                self.sessions[ident] = Session(signer, cn, server_nonce, outgoing=b"B")
            return
        session = self.sessions.get(ident) if signer else None
        if signer and session is None:
            return self._refuse(ident, head[2], protocol.NO_SESSION)
        try:
            items = protocol.parse(frame, session)
        except protocol.ReplayError:
            self.replayed += 1
            return
        except protocol.SignatureError:
            return self._refuse(
                ident, head[2], protocol.KEY_DIFFERS if signer else protocol.NO_KEY_HERE
            )
        calls = [i for i in items if i.kind == Kind.CALL]
        if calls:
            self.batches.append(len(calls))
        replies = []
        for item in items:
            if item.kind == Kind.CALL:
                self.budgets.append(item.a)
                task = protocol.decode_call(get_codec(item.codec_id), item.body)[0]
                args = protocol.decode_call(get_codec(item.codec_id), item.body)[1]
                held = task in ("hold", "block") and args != [0]
                if held and not self.release.is_set():
                    self.held[(ident, item.call_id)] = (session, item)
                    continue
                replies.append(self._run(item))
            elif item.kind == Kind.PING:
                replies.append((Kind.PONG, item.codec_id, item.call_id, *self.load, b""))
            elif item.kind == Kind.CANCEL:
                held = self.held.get((ident, item.call_id))
                if held is not None and self._task(held[1]) == "hold":
                    del self.held[(ident, item.call_id)]
                    self.cancelled.append(item.call_id)
                    replies.append((Kind.CANCELLED, 0, item.call_id, *self.load, b""))
                else:
                    replies.append((Kind.NOT_CANCELLED, 0, item.call_id, *self.load, b""))
        if replies:
            self._send(ident, replies, session)

    def _refuse(self, ident: bytes, call_id: int, why: str) -> None:
        """The unsigned JSON ERROR Unauthenticated a backend answers what it cannot verify."""
        body = get_codec("json").encode([protocol.UNAUTHENTICATED, [why], ""])
        self._send(ident, [(Kind.ERROR, 1, call_id, 0, 0, body)], None)

    @staticmethod
    def _task(item: Any) -> str:
        return protocol.decode_call(get_codec(item.codec_id), item.body)[0]

    def _run(self, item: Any) -> tuple:
        codec = get_codec(item.codec_id)
        task, args, kwargs, _ = protocol.decode_call(codec, item.body)
        self.ran.append(item.call_id)
        try:
            if task in ("hold", "block"):
                value = args[0] if args else None
            else:
                value = self.tasks[task](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the task's error goes back
            cid, body = protocol.encode_error(codec, type(e).__name__, [str(e)])
            return (Kind.ERROR, cid, item.call_id, *self.load, body)
        return (Kind.RESULT, item.codec_id, item.call_id, *self.load, codec.encode(value))


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (bounded; for state another thread sets)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()
