"""AsyncFrontEnd against a raw zmq.asyncio floor (and the threaded FrontEnd), in one run.

Both servers run in child processes on 127.0.0.1: a taskit ``BackEnd`` and a
single-threaded raw ROUTER loop (msgpack ``[name, args]`` in, msgpack result
out). The clients run in this process under one asyncio event loop:

* sync latency: ``await add(1, 2)`` back to back, one call in flight —
  median and p99 over N calls, after a warm-up;
* pipelined throughput: M calls in flight at once (``asyncio.gather``).

The floor is a ``zmq.asyncio`` DEALER with a reader task matching replies to
futures by id — the least an asyncio RPC client over ZeroMQ can do — talking
to the raw server. Printed as ratios taskit / floor (latency: lower is
better; throughput: higher is better). The threaded ``FrontEnd`` against the
same BackEnd is shown for reference.

    python bench/aio.py [--calls 2000] [--pipelined 20000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOST = "127.0.0.1"

_SERVERS = {
    "raw": """
import sys, msgpack, zmq
sock = zmq.Context().socket(zmq.ROUTER)
port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
funcs = {"add": lambda a, b: a + b}
while True:
    ident, cid, body = sock.recv_multipart()
    name, args = msgpack.unpackb(body)
    sock.send_multipart([ident, cid, msgpack.packb(funcs[name](*args))])
""",
    "taskit": """
import sys
sys.path.insert(0, sys.argv[1])
from taskit.backend import BackEnd
be = BackEnd({"add": lambda a, b: a + b}, "127.0.0.1", 0).start()
print(be.port, flush=True)
sys.stdin.read()
""",
}


def _start(kind: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVERS[kind], ROOT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


class _RawAsyncClient:
    """The floor: DEALER + one reader task + futures by call id, nothing else."""

    def __init__(self, port: int) -> None:
        import msgpack
        import zmq
        import zmq.asyncio

        self._pack, self._unpack = msgpack.packb, msgpack.unpackb
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.connect(f"tcp://{HOST}:{port}")
        self._ids = itertools.count()
        self._pending: dict[bytes, asyncio.Future[Any]] = {}
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            cid, body = await self._sock.recv_multipart()
            fut = self._pending.pop(cid, None)
            if fut is not None and not fut.done():
                fut.set_result(self._unpack(body))

    def submit(self, name: str, *args: Any) -> asyncio.Future[Any]:
        cid = next(self._ids).to_bytes(8, "big")
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        self._sock.send_multipart([cid, self._pack([name, args])])
        return fut

    async def close(self) -> None:
        self._reader.cancel()
        self._sock.close(0)
        self._ctx.term()


async def _latency(submit: Any, calls: int) -> list[float]:
    for _ in range(max(50, calls // 10)):
        assert await submit("add", 1, 2) == 3
    samples = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        await submit("add", 1, 2)
        samples.append(clock() - t0)
    return samples


async def _throughput(submit: Any, n: int) -> float:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(submit("add", i, 1) for i in range(n)))
    elapsed = time.perf_counter() - t0
    assert results[-1] == n
    return n / elapsed


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _measure_async(raw_port: int, taskit_port: int, calls: int, n: int) -> dict:
    from taskit.aio import AsyncFrontEnd

    out: dict[str, dict[str, float]] = {}
    floor = _RawAsyncClient(raw_port)
    try:
        lat = await _latency(floor.submit, calls)
        out["floor"] = {
            "median_us": statistics.median(lat) * 1e6,
            "p99_us": _p99(lat) * 1e6,
            "calls_per_s": await _throughput(floor.submit, n),
        }
    finally:
        await floor.close()
    async with AsyncFrontEnd([(HOST, taskit_port)], codec="msgpack") as fe:
        lat = await _latency(fe.submit, calls)
        out["AsyncFrontEnd"] = {
            "median_us": statistics.median(lat) * 1e6,
            "p99_us": _p99(lat) * 1e6,
            "calls_per_s": await _throughput(fe.submit, n),
        }
    return out


def _measure_threaded(taskit_port: int, calls: int, n: int) -> dict[str, float]:
    from taskit.frontend import FrontEnd

    with FrontEnd([(HOST, taskit_port)], codec="msgpack") as fe:
        for _ in range(max(50, calls // 10)):
            fe.work("add", 1, 2)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fe.work("add", 1, 2)
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = list(fe.map("add", range(n), [1] * n))
        rate = n / (time.perf_counter() - t0)
        assert results[-1] == n
    return {
        "median_us": statistics.median(lat) * 1e6,
        "p99_us": _p99(lat) * 1e6,
        "calls_per_s": rate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="sync calls per round")
    parser.add_argument("--pipelined", type=int, default=20000, help="calls in flight at once")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    raw, raw_port = _start("raw")
    backend, taskit_port = _start("taskit")
    best: dict[str, dict[str, float]] = {}
    try:
        for _ in range(args.rounds):
            figures = asyncio.run(_measure_async(raw_port, taskit_port, args.calls, args.pipelined))
            figures["FrontEnd (threads)"] = _measure_threaded(
                taskit_port, args.calls, args.pipelined
            )
            for name, f in figures.items():
                b = best.setdefault(name, dict(f))
                b["median_us"] = min(b["median_us"], f["median_us"])
                b["p99_us"] = min(b["p99_us"], f["p99_us"])
                b["calls_per_s"] = max(b["calls_per_s"], f["calls_per_s"])
    finally:
        for proc in (raw, backend):
            proc.kill()
            proc.wait()
    floor = best["floor"]
    for f in best.values():
        f["median_ratio"] = f["median_us"] / floor["median_us"]
        f["p99_ratio"] = f["p99_us"] / floor["p99_us"]
        f["throughput_ratio"] = f["calls_per_s"] / floor["calls_per_s"]
    if args.json:
        print(json.dumps(best, indent=1))
        return 0
    print(
        f"add(1, 2): {args.calls} sync calls and {args.pipelined} in flight, best of "
        f"{args.rounds}; servers in child processes; ratios to the zmq.asyncio floor"
    )
    print(
        f"{'client':22} {'median':>9} {'p99':>9} {'calls/s':>9}  {'median x':>8} "
        f"{'p99 x':>6} {'thru x':>6}"
    )
    for name, f in best.items():
        print(
            f"{name:22} {f['median_us']:7.0f}us {f['p99_us']:7.0f}us {f['calls_per_s']:9.0f}  "
            f"{f['median_ratio']:8.2f} {f['p99_ratio']:6.2f} {f['throughput_ratio']:6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
