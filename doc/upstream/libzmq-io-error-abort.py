"""libzmq 4.3.5 aborts a ROUTER's process: "Assertion failed: !_io_error
(src/stream_engine_base.cpp:310)", from a client that floods it and resets.

Standalone (Python 3, pyzmq; no other package). Two ways in, one cause:

  python libzmq-io-error-abort.py heartbeat   # ROUTER with ZMQ_HEARTBEAT_IVL, plain
                                              # pyzmq DEALER clients: aborts in seconds
  python libzmq-io-error-abort.py ping        # ROUTER without heartbeats, one client
                                              # sending ZMTP PINGs: aborts at once
  python libzmq-io-error-abort.py control     # ROUTER without heartbeats, plain
                                              # DEALER clients: survives

Cause (src/stream_engine_base.cpp, v4.3.5): when the session pipe is full the
engine stops reading (_input_stopped). If the peer then resets the connection,
the poller reports the error through in_event(), which finds _input_stopped,
removes the fd and sets _io_error -- but keeps the engine, waiting for
restart_input(). Anything that calls out_event() on that engine before it is
torn down hits zmq_assert (!_io_error) at line 310 and aborts the process:
  - the ZMQ_HEARTBEAT_IVL timer (timer_event -> out_event), "heartbeat" mode;
  - a ZMTP PING left in the engine's input buffer, decoded when the
    application drains the pipe (restart_input -> process_heartbeat_message
    -> out_event, to send the PONG), "ping" mode: the server has no heartbeat
    option set at all.
restart_output() checks _io_error first; these two paths do not.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time

import zmq


def slow_echo_server(ivl_ms: int, port_w: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    if ivl_ms:
        s.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl_ms)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    os.write(port_w, b"%d\n" % port)
    while True:  # a service slower than its client: its pipe fills up
        msg = s.recv_multipart()
        time.sleep(0.0005)
        s.send_multipart(msg)


def flood_and_reset(port: int) -> None:
    """Plain pyzmq DEALERs: flood, never read, close (unread replies -> TCP RST)."""
    ctx = zmq.Context()
    while True:
        c = ctx.socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        c.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(20000):
            try:
                c.send(b"x" * 1000, zmq.NOBLOCK)
            except zmq.Again:
                break
        c.poll(200)  # replies are arriving; never read them
        c.close()


def run_server_and_clients(ivl_ms: int, seconds: float = 30) -> int:
    r, w = os.pipe()
    server = os.fork()
    if server == 0:
        os.close(r)
        slow_echo_server(ivl_ms, w)
        os._exit(0)
    os.close(w)
    port = int(os.fdopen(r).readline())
    client = os.fork()
    if client == 0:
        flood_and_reset(port)
        os._exit(0)
    t0 = time.monotonic()
    pid = status = 0
    while not pid and time.monotonic() - t0 < seconds:
        pid, status = os.waitpid(server, os.WNOHANG)
        time.sleep(0.1)
    os.kill(client, signal.SIGKILL)
    os.waitpid(client, 0)
    if pid:
        print(f"server died after {time.monotonic() - t0:.1f} s, signal {os.WTERMSIG(status)}")
        return 1
    os.kill(server, signal.SIGKILL)
    os.waitpid(server, 0)
    print(f"server alive after {seconds:g} s")
    return 0


def frame(flags: int, body: bytes) -> bytes:
    assert len(body) < 256
    return bytes([flags, len(body)]) + body


def ping_then_reset() -> int:
    """One process: a ROUTER without heartbeats; a raw ZMTP 3.1 peer sends messages,
    each followed by a PING, until the ROUTER stops reading; RST; then drain."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" * 32
    ready = frame(4, b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER")
    c.sendall(greeting + ready)
    c.settimeout(1.0)
    got = b""
    while len(got) < 66 or len(got) < 66 + got[65]:  # the server's greeting and READY
        got += c.recv(4096)
    ping = frame(4, b"\x04PING\x00\x00")
    blob = (frame(0, b"x" * 100) + ping) * 5000
    try:
        for _ in range(100):  # until the ROUTER's pipe is full and TCP buffers too
            c.sendall(blob)
    except OSError:
        pass
    c.close()
    time.sleep(0.5)  # let the I/O thread see the reset (sets _io_error)
    n = 0
    while s.poll(1000):  # draining restarts input: the buffered PING -> out_event
        s.recv_multipart()
        n += 1
    print(f"server alive, drained {n} messages")
    return 0


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "heartbeat"
    print(f"libzmq {zmq.zmq_version()}, pyzmq {zmq.pyzmq_version()}, mode {mode}")
    if mode == "ping":
        return ping_then_reset()
    return run_server_and_clients(2000 if mode == "heartbeat" else 0)


if __name__ == "__main__":
    sys.exit(main())
