"""taskit._client.connection: the client's DEALER set-up and the socket handling both
drivers share (real sockets; a ROUTER stands in for the backend)."""

from __future__ import annotations

import pytest
import zmq

from taskit._client.connection import (
    MONITOR_EVENTS,
    UP_EVENT,
    Connections,
    DealerSettings,
    Link,
    close_dealer,
    curve_keys,
    monitor_event,
    open_dealer,
)
from taskit._client.core import HANDSHAKE, UP, ClientCore
from taskit.protocol import Kind, pack_items, parse, parse_handshake, welcome_body


def test_curve_keys_rules():
    assert curve_keys(None, None, None) is None
    with pytest.raises(ValueError, match="need curve_serverkey"):
        curve_keys(None, b"x" * 40, None)
    if not zmq.has("curve"):
        pytest.skip("libzmq built without CURVE")
    server_public, _ = zmq.curve_keypair()
    server, public, secret = curve_keys(server_public.decode(), None, None)  # str accepted
    assert server == server_public and zmq.curve_public(secret) == public
    _, my_secret = zmq.curve_keypair()
    assert curve_keys(server_public, None, my_secret)[1] == zmq.curve_public(my_secret)
    with pytest.raises(ValueError, match="needs its curve_secretkey"):
        curve_keys(server_public, public, None)


def test_open_dealer_options_and_bad_endpoint():
    ctx = zmq.Context()
    try:
        settings = DealerSettings(connect_timeout=1.5)
        sock, monitor = open_dealer(ctx, "tcp://127.0.0.1:1", settings)
        assert sock.getsockopt(zmq.CONNECT_TIMEOUT) == 1500
        # no ZMTP heartbeats: their PINGs could abort the backend (libzmq 4.3.5), and a
        # TTL would arm a timer on its side; the client's PINGs are taskit messages
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert sock.getsockopt(zmq.HEARTBEAT_TTL) == 0
        assert sock.getsockopt(zmq.SNDHWM) == 0 and sock.getsockopt(zmq.IMMEDIATE) == 0
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 64 * 1024 * 1024
        close_dealer(sock, monitor)
        with pytest.raises(ValueError, match="cannot connect"):
            open_dealer(ctx, "bogus://x", settings)
        assert UP_EVENT & MONITOR_EVENTS
    finally:
        ctx.term()  # would hang if open_dealer had left a socket open


class _Driver(Connections):
    """The smallest driver: a plain context, nothing waited on (the test polls)."""

    def __init__(self, core: ClientCore) -> None:
        super().__init__(core, DealerSettings(), lambda *a, **k: self.notes.append(a[1]))
        self._ctx = zmq.Context()
        self.notes: list[str] = []
        self.watched: list[Link] = []
        self.redials: list[float] = []
        self.done: list = []

    def resolve(self, done: list) -> None:
        self.done.extend(done)

    def _watch(self, link: Link) -> None:
        self.watched.append(link)

    def _unwatch(self, link: Link) -> None:
        self.watched.remove(link)

    def _redial_later(self, link: Link, delay: float) -> None:
        self.redials.append(delay)


def _next_event(link: Link) -> int:
    assert link.monitor.poll(10_000), "no monitor event within 10 s"
    return monitor_event(link.monitor.recv_multipart())


def _welcome(router: zmq.Socket, endpoint: str) -> None:
    """Answer the HELLO waiting on ``router`` (a raw v2 backend's part)."""
    assert router.poll(10_000)
    ident, frame = router.recv_multipart()
    (hello,) = parse(frame)
    assert hello.kind == Kind.HELLO
    info = parse_handshake(hello.body, Kind.HELLO)
    body = welcome_body(
        client_nonce=info["nonce"],
        server_nonce=bytes(16),
        name=endpoint,
        pid=1,
        started=bytes(16),
        codec_ids=[1],
        signed=False,
        workers=2,
        max_pending=None,
        max_message_size=None,
    )
    router.send_multipart([ident, pack_items([(Kind.WELCOME, 1, hello.call_id, 0, 0, body)])])


def test_connections_serve_a_call_and_replace_a_dropped_socket():
    # One object does the socket handling of both drivers: up, handshake, send,
    # receive, and a dropped connection's socket replaced (its replies read first).
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    core = ClientCore(codec="json")
    core.add_backend(endpoint)
    io = _Driver(core)
    try:
        link = io.open(endpoint)
        assert io.watched == [link] and io.links == {endpoint: link}
        while not io.on_event(link, _next_event(link)) and not link.up:
            pass
        assert link.up and core.backends[endpoint].state == HANDSHAKE  # HELLO sent
        assert f"backend {endpoint} is up" in io.notes
        call = core.new_call("add", (1, 2))
        core.submit(call)
        io.flush()
        assert call.backend is None  # parked until the WELCOME
        _welcome(router, endpoint)
        assert link.raw.poll(10_000)
        io.receive(link, None)
        assert core.backends[endpoint].state == UP
        io.flush()
        assert router.poll(10_000)
        ident, frame = router.recv_multipart()
        (request,) = parse(frame)
        assert request.kind == Kind.CALL and request.call_id == call.id
        reply = (Kind.RESULT, 1, request.call_id, 5, 1, b"3")
        router.send_multipart([ident, pack_items([reply])])
        assert link.raw.poll(10_000)
        io.receive(link, None)
        assert [(c is call, ok, value) for c, ok, value in io.done] == [(True, True, 3)]
        snap = core.snapshot()[endpoint]
        assert (snap["queued"], snap["running"], snap["capacity"]["workers"]) == (5, 1, 2)

        router.close(0)  # the backend goes: the socket is replaced, not reused
        replaced = False
        for _ in range(10):  # bounded: a few events at most before DISCONNECTED
            replaced = io.on_event(link, _next_event(link))
            if replaced:
                break
        assert replaced and io.links[endpoint] is not link and io.watched == [io.links[endpoint]]
        assert f"backend {endpoint} disconnected" in io.notes
    finally:
        io.close_all()
        if not router.closed:
            router.close(0)
        io._ctx.term()  # would hang if a socket were left open
        ctx.term()
