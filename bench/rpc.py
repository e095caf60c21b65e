"""taskit FrontEnd/BackEnd vs the raw pyzmq + msgpack floor, measured in one run.

    python bench/rpc.py            # figures and ratios (taskit / floor)
    python bench/rpc.py --json     # one JSON object: sync_median_ratio, sync_p99_ratio,
                                   #   pipelined_ratio, echo_ratio, cpu_*_ratio (+ strict_*
                                   #   and details, among them cpu_us_per_call)
    python bench/rpc.py --quick    # fewer calls, one round

Same arrangement for every side: the server runs in a child process
(``sys.executable bench/rpc.py --serve KIND``) on a random 127.0.0.1 port, and
the client in this process. taskit is ``BackEnd(...)`` with its defaults and
``FrontEnd(codec=MsgpackCodec)``.

Two floors, both a DEALER client and a one-thread ROUTER loop that
msgpack-decodes ``[name, args, kwargs]``, calls the function and
msgpack-encodes the result:

- **the floor** (the targets' yardstick): raw pyzmq + msgpack written the way
  their documentation shows -- ``recv_multipart``/``send_multipart`` on the
  ROUTER, ``send``/``recv`` on the DEALER, ``msgpack.packb``/``unpackb``. This
  is the floor of ``bench/peers.py`` too, and it is the one the project's
  reference figures for these machines describe (~105 us per sync call, ~63k
  pipelined calls/s);
- **the strict floor**: the same loops hand-tuned below what anyone writes --
  a plain ``recv`` per frame, the unwrapped base ``send``, a reused
  ``msgpack.Packer`` -- about 4x the floor's pipelined rate on one frame per
  message. Its ratios (``strict_*``) show how far taskit is from the limit;
  taskit's wire format alone (one frame a message, 28 bytes of header) costs
  little of that rate.

Measured (the sides alternate in small chunks, so noise hits them alike):

- sync latency of ``add(1, 2)``: median and p99 over every round's samples
  (ratio taskit/floor: lower is better, target <= 1.5);
- pipelined throughput of 20,000 ``add`` calls: the floors keep 1000 in
  flight; taskit uses ``submit`` (all at once) and ``map`` (its own window);
  best round (ratio taskit/floor: higher is better, target >= 0.5;
  ``pipelined_ratio`` is the better of submit and map, both are printed);
- 1 MiB ``echo`` throughput, sync calls, best round (ratio: higher is better,
  target >= 0.8), each side's client a fresh process making
  ``work("echo", b"x" * 2**20)``, as a user's program does. Not from this
  long-lived process: the floor's ``msgpack.packb`` frees a 2 MiB buffer per
  call, which raises glibc's malloc thresholds for the whole process, and then
  the FrontEnd's 1 MiB bodies no longer fault in fresh pages (~470 minor page
  faults per call in a fresh process: glibc trims the heap top after each
  call). The in-process figure is kept as ``warm_echo`` (it shows the protocol
  without the page faults, not what a user gets);
- CPU time per call on each side: this process's CPU time (every thread:
  ``time.process_time``) and the child server's own (it reports it on a
  stdin query, see ``_child.py``) over each measured stretch, divided by its
  calls, with minor page faults per call; ``cpu_*_ratio``: taskit's total
  (client + server) over the floor's. Steadier than wall time on a shared
  machine, and the figure to drive down.

Attribution rows (not targets), against the strict floor: a server speaks
taskit's frames with the strict floor's loop, so the cost of the wire format
itself (lean client + lean server), of the FrontEnd alone (FrontEnd + lean
server) and of the BackEnd alone (lean client + BackEnd; sync and pipelined)
are each shown. One more row measures the client design the FrontEnd rejected
-- a dedicated I/O thread fed through a wake-up pipe, callers waiting on an
Event -- against the same lean server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _child import ChildServer, Usage, announce, usage, wait_eof  # noqa: E402 (after the sys.path set-up)

HOST = "127.0.0.1"
MiB = 1024 * 1024

__all__: list[str] = []


def add(a: int, b: int) -> int:
    return a + b


def echo(x: Any) -> Any:
    return x


FUNCS = {"add": add, "echo": echo}


# -- servers (child processes) ---------------------------------------------------


def _serve_floor() -> None:
    """The floor: raw pyzmq + msgpack as their documentation shows them."""
    import msgpack

    sock = _router()
    while True:
        ident, body = sock.recv_multipart()
        name, args, kwargs = msgpack.unpackb(body)
        sock.send_multipart([ident, msgpack.packb(FUNCS[name](*args, **kwargs))])


def _serve_strict() -> None:
    """The strict floor: pyzmq's leanest calls -- one plain recv per frame
    (recv_multipart adds a getsockopt per frame), the base send (no sugar wrapper),
    a reused Packer."""
    import msgpack
    import zmq

    sock = _router()
    packb, unpackb = msgpack.Packer(use_bin_type=True).pack, msgpack.unpackb
    recv, send, more = sock.recv, zmq.backend.Socket.send.__get__(sock), zmq.SNDMORE
    while True:
        ident = recv()
        name, args, kwargs = unpackb(recv())
        send(ident, more)
        send(packb(FUNCS[name](*args, **kwargs)))


def _router() -> Any:
    """A bound ROUTER on a random port, announced on stdout; the child ends with stdin."""
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    announce(sock.bind_to_random_port(f"tcp://{HOST}"))
    return sock


def _serve_wire() -> None:
    """The strict floor's loop speaking taskit's wire protocol v2: isolates the
    FrontEnd's own cost. One frame per message: a single CALL is answered through
    the ``protocol.HEAD`` fast path (one unpack, one pack); a batch item by item in
    one reply frame. Answers the handshake (HELLO -> WELCOME, unsigned), the PINGs a
    FrontEnd sends to a backend silent or idle for a while (PONG) and CANCELs
    (NOT_CANCELLED: it runs each call as it reads it), as a BackEnd does; the load
    fields are 0."""
    import msgpack
    import zmq

    from taskit import protocol
    from taskit.protocol import HEAD, HEAD_SIZE, Kind

    sock = _router()
    packb, unpackb = msgpack.Packer(use_bin_type=True).pack, msgpack.unpackb
    recv, unpack_head, pack_one = sock.recv, HEAD.unpack_from, protocol.pack_one
    send = zmq.backend.Socket.send.__get__(sock)
    more = zmq.SNDMORE
    result, call = int(Kind.RESULT), int(Kind.CALL)
    started = protocol.new_nonce()

    def answer(kind: int, codec: int, call_id: int, body: Any) -> tuple:
        if kind == call:
            name, args, kwargs = unpackb(body)[:3]
            return (result, codec, call_id, 0, 0, packb(FUNCS[name](*args, **kwargs)))
        if kind == Kind.HELLO:
            hello = protocol.parse_handshake(body, Kind.HELLO)
            welcome = protocol.welcome_body(
                client_nonce=hello["nonce"],
                server_nonce=protocol.new_nonce(),
                name="bench-wire",
                pid=os.getpid(),
                started=started,
                codec_ids=[1, 2],
                signed=False,
                workers=1,
                max_pending=None,
                max_message_size=None,
            )
            return (Kind.WELCOME, 1, call_id, 0, 0, welcome)
        if kind == Kind.PING:
            return (Kind.PONG, codec, call_id, 0, 0, b"")
        return (Kind.NOT_CANCELLED, 0, call_id, 0, 0, b"")  # a CANCEL

    while True:
        ident = recv()
        frame = recv()
        _, _, _, kind, codec, _, call_id, _, _, blen = unpack_head(frame)
        send(ident, more)
        if HEAD_SIZE + blen == len(frame):  # one item: the hot path
            if kind == call:
                name, args, kwargs = unpackb(memoryview(frame)[HEAD_SIZE:])[:3]
                out = FUNCS[name](*args, **kwargs)
                send(pack_one(result, codec, call_id, 0, 0, packb(out)), copy=blen < 65536)
            else:
                send(pack_one(*answer(kind, codec, call_id, frame[HEAD_SIZE:])))
            continue
        items = [answer(i.kind, i.codec_id, i.call_id, i.body) for i in protocol.parse(frame)]
        send(protocol.pack_items(items))


def _serve_taskit() -> None:
    from taskit.backend import BackEnd

    backend = BackEnd(FUNCS, host=HOST, port=0)
    backend.start()
    announce(backend.port, exit_on_eof=False)
    try:
        wait_eof()
    finally:
        backend.stop_server()
    os._exit(0)


SERVERS = {
    "floor": _serve_floor,
    "strict": _serve_strict,
    "taskit": _serve_taskit,
    "wire": _serve_wire,
}


# -- clients -----------------------------------------------------------------------


class FloorClient:
    """The floor's client: pyzmq's and msgpack's documented calls."""

    def __init__(self, port: int) -> None:
        import msgpack
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(f"tcp://{HOST}:{port}")
        self.packb, self.unpackb = msgpack.packb, msgpack.unpackb
        self.send = self.sock.send

    def call(self, name: str, *args: Any) -> Any:
        self.send(self.packb([name, args, {}]))
        return self.unpackb(self.sock.recv())

    def pipelined(self, n: int, window: int = 1000) -> list[Any]:
        send, recv, packb, unpackb = self.send, self.sock.recv, self.packb, self.unpackb
        out = []
        sent = 0
        while sent < min(window, n):
            send(packb(["add", (sent, 1), {}]))
            sent += 1
        while len(out) < n:
            out.append(unpackb(recv()))
            if sent < n:
                send(packb(["add", (sent, 1), {}]))
                sent += 1
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class StrictClient(FloorClient):
    """The strict floor's client: the base send (no sugar wrapper), a reused Packer."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        import msgpack

        self.packb = msgpack.Packer(use_bin_type=True).pack
        self.send = self.zmq.backend.Socket.send.__get__(self.sock)


class WireClient(StrictClient):
    """The strict floor's client speaking taskit's frames (wire protocol v2, one
    frame a message, no handshake: a keyless backend takes calls without one):
    isolates the BackEnd's cost. Replies may come several to a frame (a BackEnd
    packs the replies it has ready together)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        from taskit.protocol import HEAD, ITEM

        self.head, self.item = HEAD, ITEM

    def call(self, name: str, *args: Any) -> Any:
        body = self.packb([name, args, {}])
        self.send(self.head.pack(b"TK", 2, 0, 1, 2, 0, 1, 0, 0, len(body)) + body)
        frame = self.sock.recv()
        return self.unpackb(frame[28:])

    def pipelined(self, n: int, window: int = 1000) -> list[Any]:
        send, recv, packb, unpackb = self.send, self.sock.recv, self.packb, self.unpackb
        head, unpack_item = self.head.pack, self.item.unpack_from
        out: list[Any] = []
        sent = 0
        while sent < min(window, n):
            body = packb(["add", (sent, 1), {}])
            send(head(b"TK", 2, 0, 1, 2, 0, sent + 1, 0, 0, len(body)) + body)
            sent += 1
        while len(out) < n:
            frame = recv()
            pos, end = 4, len(frame)
            while pos < end:
                blen = unpack_item(frame, pos)[6]
                pos += 24
                out.append(unpackb(frame[pos : pos + blen]))
                pos += blen
                if sent < n:
                    body = packb(["add", (sent, 1), {}])
                    send(head(b"TK", 2, 0, 1, 2, 0, sent + 1, 0, 0, len(body)) + body)
                    sent += 1
        return out


class IOThreadClient(WireClient):
    """The design the FrontEnd does *not* use, measured for comparison: one thread
    owns the socket, callers hand calls to it through a wake-up pipe and wait on
    an Event for the reply (two thread hand-offs per call)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        import collections

        self.outbox: collections.deque = collections.deque()
        self.waiting: dict[int, list] = {}
        self.wake_r, self.wake_w = os.pipe()
        self.ids = 0
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="bench-io", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        zmq, sock = self.zmq, self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        while not self.stopping:
            events = dict(poller.poll(1000))
            if self.wake_r in events:
                os.read(self.wake_r, 4096)
            while self.outbox:
                sock.send(self.outbox.popleft())
            if sock in events:
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frame = sock.recv()
                    slot = self.waiting.pop(self.head.unpack_from(frame)[6])
                    slot[1] = self.unpackb(frame[28:])
                    slot[0].set()

    def call(self, name: str, *args: Any) -> Any:
        self.ids += 1
        slot: list = [threading.Event(), None]
        self.waiting[self.ids] = slot
        body = self.packb([name, args, {}])
        self.outbox.append(self.head.pack(b"TK", 2, 0, 1, 2, 0, self.ids, 0, 0, len(body)) + body)
        os.write(self.wake_w, b"x")
        slot[0].wait()
        return slot[1]

    def close(self) -> None:
        self.stopping = True
        os.write(self.wake_w, b"x")
        self.thread.join()
        os.close(self.wake_r)
        os.close(self.wake_w)
        super().close()


class TaskitClient:
    def __init__(self, port: int) -> None:
        from taskit.codecs import MsgpackCodec
        from taskit.frontend import FrontEnd

        self.fe = FrontEnd([(HOST, port)], codec=MsgpackCodec)

    def call(self, name: str, *args: Any) -> Any:
        return self.fe.work(name, *args)

    def submit(self, n: int) -> list[Any]:
        futures = [self.fe.submit("add", i, 1) for i in range(n)]
        return [f.result() for f in futures]

    def map(self, n: int) -> list[Any]:
        return list(self.fe.map("add", range(n), [1] * n))

    def close(self) -> None:
        self.fe.close()


# -- measurements ------------------------------------------------------------------

# the server each client talks to
SERVER_OF = {
    "floor": "floor",
    "strict": "strict",
    "taskit": "taskit",
    "frontend_only": "wire",
    "backend_only": "taskit",
    "frames_only": "wire",
    "io_thread_design": "wire",
}
CLIENTS: dict[str, Callable[[int], Any]] = {
    "floor": FloorClient,
    "strict": StrictClient,
    "taskit": TaskitClient,
    "frontend_only": TaskitClient,
    "backend_only": WireClient,
    "frames_only": WireClient,
    "io_thread_design": IOThreadClient,
}
ECHO_KINDS = ("floor", "strict", "taskit", "frontend_only")


class CPU:
    """Process CPU time per call on each side, summed over measured stretches: the
    client is this process (every thread), the server its child (every thread, as
    it reports it: see _child.py)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.client: dict[str, float] = {}
        self.server: dict[str, float] = {}
        self.faults: dict[str, list[int]] = {}  # key -> [client, server] minor faults

    def measure(self, key: str, server: ChildServer, calls: int, fn: Callable[[], Any]) -> Any:
        s0, c0 = server.usage(), usage()
        out = fn()
        c, s = usage() - c0, server.usage() - s0
        self.add(key, calls, c, s)
        return out

    def add(self, key: str, calls: int, client: Usage, server: Usage) -> None:
        self.calls[key] = self.calls.get(key, 0) + calls
        self.client[key] = self.client.get(key, 0.0) + client.cpu
        self.server[key] = self.server.get(key, 0.0) + server.cpu
        f = self.faults.setdefault(key, [0, 0])
        f[0] += client.minflt
        f[1] += server.minflt

    def per_call(self) -> dict[str, dict[str, float]]:
        """key -> client, server and total CPU us per call (and page faults per call)."""
        out = {}
        for key, n in self.calls.items():
            c, s = self.client[key] / n * 1e6, self.server[key] / n * 1e6
            out[key] = {
                "client": round(c, 1),
                "server": round(s, 1),
                "total": round(c + s, 1),
                "client_faults": round(self.faults[key][0] / n, 1),
                "server_faults": round(self.faults[key][1] / n, 1),
            }
        return out


def latencies(call: Callable[..., Any], n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        r = call("add", 1, 2)
        out.append(clock() - t)
        if r != 3:
            raise AssertionError(f"add(1, 2) returned {r!r}")
    return out


def rate(fn: Callable[[int], list[Any]], n: int) -> float:
    t = time.perf_counter()
    results = fn(n)
    elapsed = time.perf_counter() - t
    if results[:1] != [1] or results[-1] != n or len(results) != n:
        raise AssertionError("pipelined results are wrong")
    return n / elapsed


def echo_rate(call: Callable[..., Any], n: int, payload: bytes) -> float:
    t = time.perf_counter()
    for _ in range(n):
        if len(call("echo", payload)) != len(payload):
            raise AssertionError("echo returned a different payload")
    return n * len(payload) / (time.perf_counter() - t) / MiB


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def _echo_client(kind: str, port: int, n: int) -> None:
    """``--echo-client``: one side's 1 MiB echo in a fresh process, as a user's program
    makes it: ``work("echo", b"x" * 2**20)`` with nothing else run before in the
    process. Warms up, says READY, waits for a line on stdin, makes ``n`` calls, and
    prints ``elapsed cpu minflt`` (this process's usage over the n calls)."""
    client = CLIENTS[kind](port)
    try:
        payload = b"x" * MiB
        for _ in range(3):
            client.call("echo", payload)
        print("READY", flush=True)
        sys.stdin.readline()
        u0, t = usage(), time.perf_counter()
        for _ in range(n):
            if len(client.call("echo", payload)) != MiB:
                raise AssertionError("echo returned a different payload")
        elapsed, u = time.perf_counter() - t, usage() - u0
        print(f"{elapsed} {u.cpu} {u.minflt}", flush=True)
    finally:
        client.close()


def fresh_echo(kind: str, server: ChildServer, n: int, cpu: CPU) -> float:
    """MiB/s of ``n`` 1 MiB echoes made by a fresh client process (see _echo_client);
    both sides' CPU and page faults go to ``cpu`` under ``echo_<kind>``."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, __file__, "--echo-client", kind, str(server.port), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"echo client {kind} did not start")
        s0 = server.usage()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline().split()
        s = server.usage() - s0
        if len(line) != 3:
            raise RuntimeError(f"echo client {kind} failed")
        elapsed, ccpu, cflt = float(line[0]), float(line[1]), int(line[2])
        cpu.add(f"echo_{kind}", n, Usage(ccpu, cflt, 0), s)
        proc.wait(30)
        return n / elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = {kind: ChildServer(__file__, kind) for kind in ("floor", "strict", "taskit", "wire")}
    payload = b"x" * MiB
    kinds = tuple(SERVER_OF)
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    cpu = CPU()
    # throughput figure -> (client, its pipelined method)
    pipes = {
        "floor": ("floor", "pipelined"),
        "strict": ("strict", "pipelined"),
        "submit": ("taskit", "submit"),
        "map": ("taskit", "map"),
        "frontend_only_map": ("frontend_only", "map"),
        "frames_only": ("frames_only", "pipelined"),
        "backend_only": ("backend_only", "pipelined"),
    }
    thr = dict.fromkeys(pipes, 0.0)
    mib = dict.fromkeys(ECHO_KINDS, 0.0)  # fresh client process: the user's path
    warm = dict.fromkeys(ECHO_KINDS, 0.0)  # this process, its heap warmed by every side
    try:
        clients: dict[str, Any] = {k: CLIENTS[k](servers[SERVER_OF[k]].port) for k in kinds}
        try:
            for c in clients.values():  # warm up: connections, caches, allocators
                latencies(c.call, 300)
            for kind in warm:
                echo_rate(clients[kind].call, 3, payload)
            chunk = 250  # interleave the sides in small chunks so noise hits all alike
            for _ in range(args.rounds):
                for _ in range(max(1, args.sync // chunk)):
                    for kind in kinds:
                        server = servers[SERVER_OF[kind]]
                        call = clients[kind].call
                        lat[kind] += cpu.measure(
                            f"sync_{kind}", server, chunk, lambda call=call: latencies(call, chunk)
                        )
                for key, (client, method) in pipes.items():
                    fn = getattr(clients[client], method)
                    server = servers[SERVER_OF[client]]
                    n = args.calls
                    r = cpu.measure(f"pipe_{key}", server, n, lambda fn=fn, n=n: rate(fn, n))
                    thr[key] = max(thr[key], r)
                for kind in ECHO_KINDS:
                    server = servers[SERVER_OF[kind]]
                    mib[kind] = max(mib[kind], fresh_echo(kind, server, args.echo, cpu))
                for _ in range(max(1, args.echo // 10)):
                    for kind in warm:
                        call = clients[kind].call
                        r = cpu.measure(
                            f"warm_echo_{kind}",
                            servers[SERVER_OF[kind]],
                            10,
                            lambda call=call: echo_rate(call, 10, payload),
                        )
                        warm[kind] = max(warm[kind], r)
        finally:
            for c in clients.values():
                c.close()
    finally:
        for s in servers.values():
            s.stop()
    us = {k: (statistics.median(v) * 1e6, pct(v, 0.99) * 1e6) for k, v in lat.items()}
    best_pipe = max(thr["submit"], thr["map"])
    floor_med, floor_p99 = us["floor"]
    strict_med, strict_p99 = us["strict"]
    per_call = cpu.per_call()

    def vs_strict(key: str) -> float:
        return round(us[key][0] / strict_med, 3)

    def cpu_ratio(key: str, base: str) -> float:
        return round(per_call[key]["total"] / per_call[base]["total"], 3)

    return {
        "sync_median_ratio": round(us["taskit"][0] / floor_med, 3),
        "sync_p99_ratio": round(us["taskit"][1] / floor_p99, 3),
        "pipelined_ratio": round(best_pipe / thr["floor"], 3),
        "echo_ratio": round(mib["taskit"] / mib["floor"], 3),
        "strict_sync_median_ratio": vs_strict("taskit"),
        "strict_sync_p99_ratio": round(us["taskit"][1] / strict_p99, 3),
        "strict_pipelined_ratio": round(best_pipe / thr["strict"], 3),
        "strict_echo_ratio": round(mib["taskit"] / mib["strict"], 3),
        # CPU per call, both sides together, taskit / floor (lower is better)
        "cpu_sync_ratio": cpu_ratio("sync_taskit", "sync_floor"),
        "cpu_submit_ratio": cpu_ratio("pipe_submit", "pipe_floor"),
        "cpu_map_ratio": cpu_ratio("pipe_map", "pipe_floor"),
        "cpu_echo_ratio": cpu_ratio("echo_taskit", "echo_floor"),
        "details": {
            "sync_median_us": {k: round(v[0], 1) for k, v in us.items()},
            "sync_p99_us": {k: round(v[1], 1) for k, v in us.items()},
            # attribution: lean clients and servers, so against the strict floor
            "frontend_only_sync_median_ratio": vs_strict("frontend_only"),
            "backend_only_sync_median_ratio": vs_strict("backend_only"),
            "frames_only_sync_median_ratio": vs_strict("frames_only"),
            "io_thread_design_sync_median_ratio": vs_strict("io_thread_design"),
            "pipelined_calls_per_s": {k: round(v) for k, v in thr.items()},
            "pipelined_submit_ratio": round(thr["submit"] / thr["floor"], 3),
            "pipelined_map_ratio": round(thr["map"] / thr["floor"], 3),
            "frontend_only_pipelined_ratio": round(thr["frontend_only_map"] / thr["strict"], 3),
            "frames_only_pipelined_ratio": round(thr["frames_only"] / thr["strict"], 3),
            "backend_only_pipelined_ratio": round(thr["backend_only"] / thr["strict"], 3),
            "echo_1mib_mib_per_s": {k: round(v, 1) for k, v in mib.items()},
            "frontend_only_echo_ratio": round(mib["frontend_only"] / mib["strict"], 3),
            # the same echoes from this long-lived process, whose heap every side warmed
            # (what this bench reported before: it hides the FrontEnd's page faults)
            "warm_echo_1mib_mib_per_s": {k: round(v, 1) for k, v in warm.items()},
            "warm_echo_ratio": round(warm["taskit"] / warm["floor"], 3),
            # key -> {client, server, total: CPU us per call; client_faults, server_faults}
            # keys: sync_<client>, pipe_<figure>, echo_<client>, warm_echo_<client>
            "cpu_us_per_call": per_call,
            "params": {
                "sync": args.sync,
                "calls": args.calls,
                "echo": args.echo,
                "rounds": args.rounds,
            },
        },
    }


def report(r: dict[str, Any]) -> str:
    d = r["details"]
    med, p99, cps, mib = (
        d["sync_median_us"],
        d["sync_p99_us"],
        d["pipelined_calls_per_s"],
        d["echo_1mib_mib_per_s"],
    )
    cpu = d["cpu_us_per_call"]
    lines = [
        "taskit FrontEnd/BackEnd vs raw pyzmq + msgpack (servers in child processes)",
        "                          floor        taskit       ratio   target  | strict floor  ratio",
        f"  sync add(1, 2) median {med['floor']:8.1f} us  {med['taskit']:8.1f} us"
        f"  {r['sync_median_ratio']:8.2f}   <= 1.5  | {med['strict']:8.1f} us"
        f"  {r['strict_sync_median_ratio']:5.2f}",
        f"  sync add(1, 2) p99    {p99['floor']:8.1f} us  {p99['taskit']:8.1f} us"
        f"  {r['sync_p99_ratio']:8.2f}           | {p99['strict']:8.1f} us"
        f"  {r['strict_sync_p99_ratio']:5.2f}",
        f"  pipelined calls/s     {cps['floor']:11d}  {max(cps['submit'], cps['map']):11d}"
        f"  {r['pipelined_ratio']:8.2f}   >= 0.5  | {cps['strict']:11d}"
        f"  {r['strict_pipelined_ratio']:5.2f}",
        f"  1 MiB echo MiB/s      {mib['floor']:11.1f}  {mib['taskit']:11.1f}"
        f"  {r['echo_ratio']:8.2f}   >= 0.8  | {mib['strict']:11.1f}"
        f"  {r['strict_echo_ratio']:5.2f}",
        f"  ({d['params']['calls']} pipelined calls: submit {cps['submit']}/s "
        f"({d['pipelined_submit_ratio']:.2f}), map {cps['map']}/s "
        f"({d['pipelined_map_ratio']:.2f}); the better one is taskit's figure)",
        "  (1 MiB echo: each side's client is a fresh process, as a user's program; from this"
        f" warmed process: floor {d['warm_echo_1mib_mib_per_s']['floor']:.0f},"
        f" taskit {d['warm_echo_1mib_mib_per_s']['taskit']:.0f} MiB/s,"
        f" {d['warm_echo_ratio']:.2f})",
        "  where the sync time goes (median, ratio to the strict floor):",
    ]
    for label, key in (
        ("lean client + lean server, taskit frames", "frames_only"),
        ("FrontEnd    + lean server, taskit frames", "frontend_only"),
        ("lean client + BackEnd", "backend_only"),
        ("I/O-thread client design + lean server", "io_thread_design"),
    ):
        lines.append(f"    {label:42} {med[key]:8.1f} us   {d[key + '_sync_median_ratio']:.2f}")
    lines += [
        "  pipelined, lean server speaking taskit frames (ratio to the strict floor): lean "
        f"client {cps['frames_only']}/s ({d['frames_only_pipelined_ratio']:.2f}),"
        f" FrontEnd.map {cps['frontend_only_map']}/s ({d['frontend_only_pipelined_ratio']:.2f})",
        f"  pipelined, lean client (taskit frames) + BackEnd: {cps['backend_only']}/s "
        f"({d['backend_only_pipelined_ratio']:.2f})",
        f"  1 MiB echo, FrontEnd + lean server: {mib['frontend_only']:.1f} MiB/s "
        f"({d['frontend_only_echo_ratio']:.2f})",
        "  CPU us per call (process CPU time over the runs / calls), client + server = total;"
        " page faults per call:",
    ]
    rows = [
        ("sync add: floor", "sync_floor"),
        ("sync add: strict floor", "sync_strict"),
        ("sync add: FrontEnd + BackEnd", "sync_taskit"),
        ("sync add: FrontEnd + lean server", "sync_frontend_only"),
        ("sync add: lean client + BackEnd", "sync_backend_only"),
        ("sync add: lean client + lean server", "sync_frames_only"),
        ("pipelined: floor", "pipe_floor"),
        ("pipelined: strict floor", "pipe_strict"),
        ("pipelined: submit + BackEnd", "pipe_submit"),
        ("pipelined: map + BackEnd", "pipe_map"),
        ("pipelined: map + lean server", "pipe_frontend_only_map"),
        ("pipelined: lean client + BackEnd", "pipe_backend_only"),
        ("pipelined: lean client + lean server", "pipe_frames_only"),
        ("1 MiB echo: floor", "echo_floor"),
        ("1 MiB echo: strict floor", "echo_strict"),
        ("1 MiB echo: FrontEnd + BackEnd", "echo_taskit"),
        ("1 MiB echo: FrontEnd + lean server", "echo_frontend_only"),
        ("1 MiB echo, warmed process: floor", "warm_echo_floor"),
        ("1 MiB echo, warmed process: taskit", "warm_echo_taskit"),
    ]
    lines.append(f"    {'':38} {'client':>8} {'server':>8} {'total':>8}   faults c/s")
    for label, key in rows:
        c = cpu[key]
        lines.append(
            f"    {label:38} {c['client']:8.1f} {c['server']:8.1f} {c['total']:8.1f}"
            f"   {c['client_faults']:.0f}/{c['server_faults']:.0f}"
        )
    lines.append(
        f"  CPU ratios taskit/floor (total): sync {r['cpu_sync_ratio']:.2f}, submit"
        f" {r['cpu_submit_ratio']:.2f}, map {r['cpu_map_ratio']:.2f},"
        f" 1 MiB echo {r['cpu_echo_ratio']:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    p.add_argument("--echo-client", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer calls, one round")
    p.add_argument("--sync", type=int, default=3000, help="sync calls per round and side")
    p.add_argument("--calls", type=int, default=20000, help="pipelined calls")
    p.add_argument("--echo", type=int, default=100, help="1 MiB echoes per round and side")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.serve:
        SERVERS[args.serve]()
        return
    if args.echo_client:
        kind, port, n = args.echo_client
        _echo_client(kind, int(port), int(n))
        return
    if args.quick:
        args.sync, args.calls, args.echo, args.rounds = 1000, 20000, 30, 1
    result = run(args)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
