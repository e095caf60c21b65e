"""Issue 11, item 1: a client that floods a backend, never reads its replies and
resets its connection (then does it again) must not be able to abort the backend.

libzmq 4.3.5 aborts (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``)
when a ZMTP heartbeat timer fires on a connection whose input was stopped (the
request queue full) and which then failed (the reset). A default BackEnd used to
enable ZMTP heartbeats and died within seconds of this; it now has none (dead
clients are found by TCP keepalive instead). Real processes on loopback: the
backend and the attacker are child processes, each ended by pid.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time

import pytest

from taskit.frontend import FrontEnd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A default BackEnd (bar the free port) with one task the attacker calls.
BACKEND = r"""
import os, sys
from taskit.backend import BackEnd
def add(a, b):
    return a + b
be = BackEnd({"add": add}, port=0).start()
print(be.port, flush=True)
sys.stdin.buffer.read()  # EOF: the test is over (or died)
os._exit(0)
"""

# For argv[2] seconds: connect, send argv[3] calls at once (more than the backend's
# request queue holds; never read a reply), wait until replies are coming back,
# close with linger 0 -- the unread replies in the kernel's buffer make the close
# a TCP RST -- and start again. Prints the number of rounds at the end.
ATTACKER = r"""
import sys, time
import zmq
from taskit import protocol
from taskit.codecs import MsgpackCodec
endpoint, seconds, PER_ROUND = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
body = protocol.encode_call(MsgpackCodec, "add", (1, 2), {})
frame = protocol.pack_one(protocol.Kind.CALL, MsgpackCodec.wire_id, 1, 0, 0, body)
ctx = zmq.Context()
rounds = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    for _ in range(PER_ROUND):
        s.send(frame, zmq.NOBLOCK)
    s.poll(200)  # until replies arrive (never read), or 0.2 s
    s.close()
    rounds += 1
print(rounds, flush=True)
"""

FLOOD_SECONDS = 30.0
PER_ROUND = 200_000  # calls per connection: more than the backend's request queue holds


def _child(source: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", source, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _line(proc: subprocess.Popen, timeout: float) -> bytes:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
    return proc.stdout.readline().strip()


def _end(proc: subprocess.Popen) -> bytes:
    """Stop ``proc`` (EOF on stdin, then SIGKILL by pid) and return its stderr
    (empty when it was already ended)."""
    if proc.stderr.closed:
        return b""
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)
    err = proc.stderr.read()
    for f in (proc.stdout, proc.stderr):
        f.close()
    return err


@pytest.mark.slow
@pytest.mark.timeout(FLOOD_SECONDS + 90)
def test_flood_and_reset_clients_cannot_abort_a_default_backend():
    backend = _child(BACKEND)
    attacker = None
    try:
        port = _line(backend, 30)
        assert port.isdigit(), _end(backend).decode(errors="replace")
        endpoint = f"tcp://127.0.0.1:{int(port)}"
        attacker = _child(ATTACKER, endpoint, str(FLOOD_SECONDS), str(PER_ROUND))
        with FrontEnd([endpoint], connect_timeout=10, timeout=60) as fe:
            assert fe.work("add", 1, 1) == 2
            rounds = b""
            # Bounded: the attacker ends itself after FLOOD_SECONDS, then prints how
            # many rounds it made (the finally below kills it at the latest). The old
            # default backend died within seconds.
            deadline = time.monotonic() + FLOOD_SECONDS + 30
            while not rounds and backend.poll() is None and time.monotonic() < deadline:
                # <status> is answered on the backend's I/O thread, past its queue
                assert fe.send_signal(endpoint, "<status>", timeout=30).isdigit()
                rounds = _line(attacker, 1.0)
            assert backend.poll() is None, (
                f"the backend died (exit status {backend.returncode}): "
                + _end(backend).decode(errors="replace")[-500:]
            )
            assert rounds.isdigit(), _end(attacker).decode(errors="replace")[-500:]
            assert int(rounds) >= 3  # it did connect, flood and reset, again and again
            assert fe.work("add", 2, 3) == 5
    finally:
        if attacker is not None:
            _end(attacker)
        _end(backend)
