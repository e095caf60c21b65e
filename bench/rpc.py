"""taskit FrontEnd/BackEnd vs the raw pyzmq + msgpack floor, measured in one run.

    python bench/rpc.py            # figures and ratios (taskit / floor)
    python bench/rpc.py --json     # one JSON object: sync_median_ratio, sync_p99_ratio,
                                   #   pipelined_ratio, echo_ratio (+ strict_* and details)
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
  target >= 0.8).

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

from _child import ChildServer, announce  # noqa: E402 (after the sys.path set-up)

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
        sys.stdin.buffer.read()
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


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time (user + system) so far, from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = {kind: ChildServer(__file__, kind) for kind in ("floor", "strict", "taskit", "wire")}
    payload = os.urandom(MiB)
    kinds = (
        "floor",
        "strict",
        "taskit",
        "frontend_only",
        "backend_only",
        "frames_only",
        "io_thread_design",
    )
    lat: dict[str, list[float]] = {k: [] for k in kinds}
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
    # the server child each pipelined figure runs against: its CPU time per call
    server_of = {"floor": "floor", "strict": "strict", "submit": "taskit", "map": "taskit"}
    server_of.update(frontend_only_map="wire", frames_only="wire", backend_only="taskit")
    cpu_us: dict[str, float] = {}
    mib = dict.fromkeys(("floor", "strict", "taskit", "frontend_only"), 0.0)
    try:
        clients: dict[str, Any] = {
            "floor": FloorClient(servers["floor"].port),
            "strict": StrictClient(servers["strict"].port),
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
                for key, (client, method) in pipes.items():
                    pid = servers[server_of[key]].proc.pid
                    cpu0 = cpu_seconds(pid)
                    thr[key] = max(thr[key], rate(getattr(clients[client], method), args.calls))
                    cpu1 = cpu_seconds(pid)
                    if cpu0 is not None and cpu1 is not None:
                        us_call = (cpu1 - cpu0) / args.calls * 1e6
                        cpu_us[key] = min(cpu_us.get(key, us_call), us_call)
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
    strict_med, strict_p99 = us["strict"]

    def vs_strict(key: str) -> float:
        return round(us[key][0] / strict_med, 3)

    return {
        "sync_median_ratio": round(us["taskit"][0] / floor_med, 3),
        "sync_p99_ratio": round(us["taskit"][1] / floor_p99, 3),
        "pipelined_ratio": round(best_pipe / thr["floor"], 3),
        "echo_ratio": round(mib["taskit"] / mib["floor"], 3),
        "strict_sync_median_ratio": vs_strict("taskit"),
        "strict_sync_p99_ratio": round(us["taskit"][1] / strict_p99, 3),
        "strict_pipelined_ratio": round(best_pipe / thr["strict"], 3),
        "strict_echo_ratio": round(mib["taskit"] / mib["strict"], 3),
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
            # the server process's CPU time per pipelined call (best round; /proc ticks)
            "server_cpu_us_per_call": {k: round(v, 1) for k, v in cpu_us.items()},
            "frontend_only_echo_ratio": round(mib["frontend_only"] / mib["strict"], 3),
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
        "  server CPU per pipelined call (us): "
        + ", ".join(f"{k} {v:.1f}" for k, v in d["server_cpu_us_per_call"].items()),
        f"  1 MiB echo, FrontEnd + lean server: {mib['frontend_only']:.1f} MiB/s "
        f"({d['frontend_only_echo_ratio']:.2f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
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
    if args.quick:
        args.sync, args.calls, args.echo, args.rounds = 1000, 20000, 30, 1
    result = run(args)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
