"""taskit FrontEnd/BackEnd vs the raw pyzmq + msgpack floor, measured in one run.

    python bench/rpc.py            # figures and ratios (taskit / floor)
    python bench/rpc.py --json     # one JSON object: sync_median_ratio, sync_p99_ratio,
                                   #   pipelined_ratio, echo_ratio (+ details)
    python bench/rpc.py --quick    # fewer calls, one round

Same arrangement for both sides: the server runs in a child process
(``sys.executable bench/rpc.py --serve floor|taskit``) on a random 127.0.0.1
port, and the client in this process. The floor is the least an RPC over
ZeroMQ can do: a DEALER client and a one-thread ROUTER loop that
msgpack-decodes ``[name, args, kwargs]``, calls the function and
msgpack-encodes the result, both using pyzmq's cheapest calls (a plain
``recv`` per frame, the base ``send``: ``recv_multipart``/``send_multipart``
cost a getsockopt and a wrapper call per frame, which would flatter taskit).
taskit is ``BackEnd(...)`` with its defaults and ``FrontEnd(codec=MsgpackCodec)``.

Measured (the sides alternate in small chunks, so noise hits them alike):

- sync latency of ``add(1, 2)``: median and p99 over every round's samples
  (ratio taskit/floor: lower is better, target <= 1.5);
- pipelined throughput of 20,000 ``add`` calls: the floor keeps 1000 in flight;
  taskit uses ``submit`` (all at once) and ``map`` (its own window); best round
  (ratio taskit/floor: higher is better, target >= 0.5; ``pipelined_ratio`` is
  the better of submit and map, both are printed);
- 1 MiB ``echo`` throughput, sync calls, best round (ratio: higher is better,
  target >= 0.8).

Attribution rows (not targets): a third server speaks taskit's frames with the
floor's loop, so the cost of the wire format itself (raw client + raw server),
of the FrontEnd alone (FrontEnd + raw server) and of the BackEnd alone (raw
client + BackEnd; sync and pipelined) are each shown against the floor. One more row measures the
client design the FrontEnd rejected -- a dedicated I/O thread fed through a
wake-up pipe, callers waiting on an Event -- against the same raw server.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
MiB = 1024 * 1024

__all__: list[str] = []


def add(a: int, b: int) -> int:
    return a + b


def echo(x: Any) -> Any:
    return x


FUNCS = {"add": add, "echo": echo}


# -- servers (child processes) ---------------------------------------------------


def _exit_on_eof() -> None:
    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, name="rpc-bench-stdin", daemon=True).start()


def _serve_floor() -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port(f"tcp://{HOST}")
    _exit_on_eof()
    print(f"PORT {port}", flush=True)
    packb, unpackb = msgpack.Packer(use_bin_type=True).pack, msgpack.unpackb
    # the leanest pyzmq calls: one plain recv per frame (recv_multipart adds a
    # getsockopt per frame) and the base send (no sugar wrapper)
    recv, send, more = sock.recv, zmq.backend.Socket.send.__get__(sock), zmq.SNDMORE
    while True:
        ident = recv()
        name, args, kwargs = unpackb(recv())
        send(ident, more)
        send(packb(FUNCS[name](*args, **kwargs)))


def _serve_wire() -> None:
    """The floor's loop speaking taskit's frames: isolates the FrontEnd's own cost.

    As lean as the floor's loop: one plain ``recv`` per frame (the bench's clients
    always send 3 frames; ``recv_multipart`` would add a getsockopt per frame) and
    pyzmq's base ``send`` (no sugar wrapper)."""
    import msgpack
    import zmq

    from taskit.protocol import HEADER, MAGIC, Kind

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port(f"tcp://{HOST}")
    _exit_on_eof()
    print(f"PORT {port}", flush=True)
    packb, unpackb = msgpack.Packer(use_bin_type=True).pack, msgpack.unpackb
    recv, unpack, pack = sock.recv, HEADER.unpack, HEADER.pack
    send = zmq.backend.Socket.send.__get__(sock)
    more = zmq.SNDMORE
    result = int(Kind.RESULT)
    while True:
        ident = recv()
        recv()  # magic
        _, codec, call_id = unpack(recv())
        name, args, kwargs = unpackb(recv())
        send(ident, more)
        send(MAGIC, more)
        send(pack(result, codec, call_id), more)
        send(packb(FUNCS[name](*args, **kwargs)))


def _serve_taskit() -> None:
    from taskit.backend import BackEnd

    backend = BackEnd(FUNCS, host=HOST, port=0)
    backend.start()
    print(f"PORT {backend.port}", flush=True)
    try:
        sys.stdin.buffer.read()
    finally:
        backend.stop_server()
    os._exit(0)


class Server:
    """A server child process; :meth:`stop` always ends it (by pid)."""

    def __init__(self, kind: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(READY_TIMEOUT):
                raise RuntimeError("bench server did not start")
            line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"bench server failed to start: {line!r}")
        return int(line.split()[1])

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        for step in (None, self.proc.terminate, self.proc.kill):
            if step is not None:
                step()
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.proc.stdout:
            self.proc.stdout.close()


# -- clients -----------------------------------------------------------------------


class FloorClient:
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
        self.packb = msgpack.Packer(use_bin_type=True).pack
        self.unpackb = msgpack.unpackb
        self.send = zmq.backend.Socket.send.__get__(self.sock)  # no sugar wrapper

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


class WireClient(FloorClient):
    """The floor client speaking taskit's frames: isolates the BackEnd's own cost."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        from taskit.protocol import HEADER, MAGIC

        self.magic, self.header = MAGIC, HEADER
        # as lean as the floor: one plain recv per frame (replies from the bench's
        # servers always have 3 frames)

    def call(self, name: str, *args: Any) -> Any:
        send, recv, more = self.send, self.sock.recv, self.zmq.SNDMORE
        send(self.magic, more)
        send(self.header.pack(1, 2, 1), more)
        send(self.packb([name, args, {}]))
        recv()
        recv()
        return self.unpackb(recv())

    def pipelined(self, n: int, window: int = 1000) -> list[Any]:
        send, recv, packb, unpackb = self.send, self.sock.recv, self.packb, self.unpackb
        magic, header, more = self.magic, self.header.pack, self.zmq.SNDMORE
        out = []
        sent = 0
        while sent < min(window, n):
            send(magic, more)
            send(header(1, 2, sent), more)
            send(packb(["add", (sent, 1), {}]))
            sent += 1
        while len(out) < n:
            recv()
            recv()
            out.append(unpackb(recv()))
            if sent < n:
                send(magic, more)
                send(header(1, 2, sent), more)
                send(packb(["add", (sent, 1), {}]))
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
                sock.send_multipart(self.outbox.popleft())
            if sock in events:
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = sock.recv_multipart()
                    slot = self.waiting.pop(self.header.unpack(frames[1])[2])
                    slot[1] = self.unpackb(frames[2])
                    slot[0].set()

    def call(self, name: str, *args: Any) -> Any:
        self.ids += 1
        slot: list = [threading.Event(), None]
        self.waiting[self.ids] = slot
        self.outbox.append(
            [self.magic, self.header.pack(1, 2, self.ids), self.packb([name, args, {}])]
        )
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = {kind: Server(kind) for kind in ("floor", "taskit", "wire")}
    payload = os.urandom(MiB)
    kinds = ("floor", "taskit", "frontend_only", "backend_only", "frames_only", "io_thread_design")
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    thr = {
        "floor": 0.0,
        "submit": 0.0,
        "map": 0.0,
        "frontend_only_map": 0.0,
        "frames_only": 0.0,
        "backend_only": 0.0,
    }
    mib: dict[str, float] = {"floor": 0.0, "taskit": 0.0, "frontend_only": 0.0}
    try:
        clients: dict[str, Any] = {
            "floor": FloorClient(servers["floor"].port),
            "taskit": TaskitClient(servers["taskit"].port),
            "frontend_only": TaskitClient(servers["wire"].port),
            "backend_only": WireClient(servers["taskit"].port),
            "frames_only": WireClient(servers["wire"].port),
            "io_thread_design": IOThreadClient(servers["wire"].port),
        }
        try:
            for c in clients.values():  # warm up: connections, caches, allocators
                latencies(c.call, 300)
            for kind in mib:
                echo_rate(clients[kind].call, 3, payload)
            chunk = 250  # interleave the sides in small chunks so noise hits all alike
            for _ in range(args.rounds):
                for _ in range(max(1, args.sync // chunk)):
                    for kind in kinds:
                        lat[kind] += latencies(clients[kind].call, chunk)
                thr["floor"] = max(thr["floor"], rate(clients["floor"].pipelined, args.calls))
                thr["submit"] = max(thr["submit"], rate(clients["taskit"].submit, args.calls))
                thr["map"] = max(thr["map"], rate(clients["taskit"].map, args.calls))
                thr["frontend_only_map"] = max(
                    thr["frontend_only_map"], rate(clients["frontend_only"].map, args.calls)
                )
                thr["frames_only"] = max(
                    thr["frames_only"], rate(clients["frames_only"].pipelined, args.calls)
                )
                thr["backend_only"] = max(
                    thr["backend_only"], rate(clients["backend_only"].pipelined, args.calls)
                )
                for _ in range(max(1, args.echo // 10)):
                    for kind in mib:
                        mib[kind] = max(mib[kind], echo_rate(clients[kind].call, 10, payload))
        finally:
            for c in clients.values():
                c.close()
    finally:
        for s in servers.values():
            s.stop()
    us = {k: (statistics.median(v) * 1e6, pct(v, 0.99) * 1e6) for k, v in lat.items()}
    best_pipe = max(thr["submit"], thr["map"])
    floor_med, floor_p99 = us["floor"]
    return {
        "sync_median_ratio": round(us["taskit"][0] / floor_med, 3),
        "sync_p99_ratio": round(us["taskit"][1] / floor_p99, 3),
        "pipelined_ratio": round(best_pipe / thr["floor"], 3),
        "echo_ratio": round(mib["taskit"] / mib["floor"], 3),
        "details": {
            "sync_median_us": {k: round(v[0], 1) for k, v in us.items()},
            "sync_p99_us": {k: round(v[1], 1) for k, v in us.items()},
            "frontend_only_sync_median_ratio": round(us["frontend_only"][0] / floor_med, 3),
            "backend_only_sync_median_ratio": round(us["backend_only"][0] / floor_med, 3),
            "frames_only_sync_median_ratio": round(us["frames_only"][0] / floor_med, 3),
            "io_thread_design_sync_median_ratio": round(us["io_thread_design"][0] / floor_med, 3),
            "pipelined_calls_per_s": {k: round(v) for k, v in thr.items()},
            "pipelined_submit_ratio": round(thr["submit"] / thr["floor"], 3),
            "pipelined_map_ratio": round(thr["map"] / thr["floor"], 3),
            "frontend_only_pipelined_ratio": round(thr["frontend_only_map"] / thr["floor"], 3),
            "frames_only_pipelined_ratio": round(thr["frames_only"] / thr["floor"], 3),
            "backend_only_pipelined_ratio": round(thr["backend_only"] / thr["floor"], 3),
            "echo_1mib_mib_per_s": {k: round(v, 1) for k, v in mib.items()},
            "frontend_only_echo_ratio": round(mib["frontend_only"] / mib["floor"], 3),
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
    lines = [
        "taskit FrontEnd/BackEnd vs raw pyzmq + msgpack (servers in child processes)",
        f"  sync add(1, 2) median  floor {d['sync_median_us']['floor']:8.1f} us   "
        f"taskit {d['sync_median_us']['taskit']:8.1f} us   ratio {r['sync_median_ratio']:.2f}"
        "  (target <= 1.5)",
        f"  sync add(1, 2) p99     floor {d['sync_p99_us']['floor']:8.1f} us   "
        f"taskit {d['sync_p99_us']['taskit']:8.1f} us   ratio {r['sync_p99_ratio']:.2f}",
        f"  pipelined {d['params']['calls']} calls  "
        f"floor {d['pipelined_calls_per_s']['floor']:7d}/s"
        f"   submit {d['pipelined_calls_per_s']['submit']:7d}/s "
        f"({d['pipelined_submit_ratio']:.2f})"
        f"   map {d['pipelined_calls_per_s']['map']:7d}/s ({d['pipelined_map_ratio']:.2f})"
        f"   ratio {r['pipelined_ratio']:.2f}  (target >= 0.5)",
        "  where the sync time goes (median, ratio to the floor):",
    ]
    med, rat = d["sync_median_us"], d
    for label, key in (
        ("raw client + raw server, taskit frames", "frames_only"),
        ("FrontEnd   + raw server, taskit frames", "frontend_only"),
        ("raw client + BackEnd", "backend_only"),
        ("I/O-thread client design + raw server", "io_thread_design"),
    ):
        lines.append(f"    {label:40} {med[key]:8.1f} us   {rat[key + '_sync_median_ratio']:.2f}")
    lines += [
        "  pipelined, raw server speaking taskit frames (ratio to the floor): raw client "
        f"{d['pipelined_calls_per_s']['frames_only']}/s ({d['frames_only_pipelined_ratio']:.2f}),"
        f" FrontEnd.map {d['pipelined_calls_per_s']['frontend_only_map']}/s "
        f"({d['frontend_only_pipelined_ratio']:.2f})",
        "  pipelined, raw client (taskit frames) + BackEnd: "
        f"{d['pipelined_calls_per_s']['backend_only']}/s ({d['backend_only_pipelined_ratio']:.2f})",
        f"  1 MiB echo             floor {d['echo_1mib_mib_per_s']['floor']:7.1f} MiB/s "
        f"taskit {d['echo_1mib_mib_per_s']['taskit']:7.1f} MiB/s ratio {r['echo_ratio']:.2f}"
        "  (target >= 0.8)",
        "    FrontEnd + raw server, taskit frames   "
        f"{d['echo_1mib_mib_per_s']['frontend_only']:7.1f} MiB/s  "
        f"{d['frontend_only_echo_ratio']:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", choices=("floor", "taskit", "wire"), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer calls, one round")
    p.add_argument("--sync", type=int, default=3000, help="sync calls per round and side")
    p.add_argument("--calls", type=int, default=20000, help="pipelined calls")
    p.add_argument("--echo", type=int, default=100, help="1 MiB echoes per round and side")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.serve:
        {"floor": _serve_floor, "taskit": _serve_taskit, "wire": _serve_wire}[args.serve]()
        return
    if args.quick:
        args.sync, args.calls, args.echo, args.rounds = 1000, 20000, 30, 1
    result = run(args)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
