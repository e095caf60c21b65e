"""taskit._client.connection: the client's DEALER set-up (real sockets, no backend needed)."""

from __future__ import annotations

import pytest
import zmq

from taskit._client.connection import (
    MONITOR_EVENTS,
    UP_EVENT,
    DealerSettings,
    close_dealer,
    curve_keys,
    open_dealer,
)


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
