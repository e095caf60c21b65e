"""taskit against its peers (zerorpc, Pyro5, rpyc) and a raw pyzmq floor, in one run.

Every system serves the same two functions, ``add(a, b)`` and ``echo(x)``,
from a child process on 127.0.0.1, and is called from this process one call
at a time (each peer's ordinary synchronous call). Printed per system: the
median and p99 latency of ``add(1, 2)``, the median of a 64 KiB ``echo``, and
each as a ratio to the raw floor measured in the same run (a ROUTER child and
a DEALER client exchanging msgpack, no framework) — absolute times on a shared
machine are noise, ratios are the figure to quote.

A peer that is not installed is skipped (``pip install Pyro5 rpyc zerorpc``).

    python bench/peers.py [--calls 2000] [--echo-calls 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOST = "127.0.0.1"
PAYLOAD = b"x" * 65536


def add(a: int, b: int) -> int:
    return a + b


def echo(x: Any) -> Any:
    return x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- servers (each runs in a spawned child; `ready` is set once it listens) --------


def serve_floor(port: int, ready: Any) -> None:
    import msgpack
    import zmq

    funcs = {"add": add, "echo": echo}
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(f"tcp://{HOST}:{port}")
    ready.set()
    while True:
        ident, body = sock.recv_multipart(copy=False)
        name, args = msgpack.unpackb(body.buffer)
        sock.send_multipart([ident, msgpack.packb(funcs[name](*args))], copy=False)


def serve_taskit(port: int, ready: Any) -> None:
    from taskit.backend import BackEnd

    backend = BackEnd({"add": add, "echo": echo}, HOST, port)
    backend.start()
    ready.set()
    backend.main() if not getattr(backend, "running", False) else _block()


def _block() -> None:
    import threading

    threading.Event().wait()


def serve_zerorpc(port: int, ready: Any) -> None:
    import zerorpc

    class Api:
        def add(self, a: int, b: int) -> int:
            return a + b

        def echo(self, x: Any) -> Any:
            return x

    server = zerorpc.Server(Api())
    server.bind(f"tcp://{HOST}:{port}")
    ready.set()
    server.run()


def serve_pyro5(port: int, ready: Any) -> None:
    import Pyro5.api

    @Pyro5.api.expose
    class Api:
        def add(self, a: int, b: int) -> int:
            return a + b

        def echo(self, x: Any) -> Any:
            return x

    daemon = Pyro5.api.Daemon(host=HOST, port=port)
    daemon.register(Api, "bench")
    ready.set()
    daemon.requestLoop()


def serve_rpyc(port: int, ready: Any) -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class Api(rpyc.Service):
        def exposed_add(self, a: int, b: int) -> int:
            return a + b

        def exposed_echo(self, x: Any) -> Any:
            return x

    server = ThreadedServer(Api, hostname=HOST, port=port)
    ready.set()
    server.start()


# --- clients: (add, echo, close) ---------------------------------------------------

Client = tuple[Callable[[int, int], Any], Callable[[Any], Any], Callable[[], None]]


def client_floor(port: int) -> Client:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://{HOST}:{port}")

    def call(name: str, *args: Any) -> Any:
        sock.send(msgpack.packb([name, args]), copy=False)
        return msgpack.unpackb(sock.recv(copy=False).buffer)

    def close() -> None:
        sock.close(0)
        ctx.term()

    return (lambda a, b: call("add", a, b)), (lambda x: call("echo", x)), close


def client_taskit(port: int) -> Client:
    from taskit.frontend import FrontEnd

    fe = FrontEnd([(HOST, port)], codec="msgpack")
    return (lambda a, b: fe.work("add", a, b)), (lambda x: fe.work("echo", x)), fe.close


def client_zerorpc(port: int) -> Client:
    import zerorpc

    c = zerorpc.Client()
    c.connect(f"tcp://{HOST}:{port}")
    return c.add, c.echo, c.close


def client_pyro5(port: int) -> Client:
    import Pyro5.api

    Pyro5.api.config.SERIALIZER = "msgpack"  # same codec as the others (serpent mangles bytes)
    proxy = Pyro5.api.Proxy(f"PYRO:bench@{HOST}:{port}")
    return proxy.add, proxy.echo, proxy._pyroRelease


def client_rpyc(port: int) -> Client:
    import rpyc

    conn = rpyc.connect(HOST, port)
    root = conn.root
    add_, echo_ = root.add, root.echo  # one remote lookup, not one per call
    return add_, echo_, conn.close


SYSTEMS = {
    "raw pyzmq+msgpack (floor)": (None, serve_floor, client_floor),
    "taskit": ("taskit.backend", serve_taskit, client_taskit),
    "zerorpc": ("zerorpc", serve_zerorpc, client_zerorpc),
    "Pyro5": ("Pyro5", serve_pyro5, client_pyro5),
    "rpyc": ("rpyc", serve_rpyc, client_rpyc),
}


def _installed(module: str | None) -> bool:
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _timed(func: Callable[[], Any], n: int) -> list[float]:
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        func()
        samples.append(clock() - t0)
    return samples


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def measure(name: str, calls: int, echo_calls: int) -> dict[str, float]:
    module, serve, connect = SYSTEMS[name]
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ready = ctx.Event()
    child = ctx.Process(target=serve, args=(port, ready), daemon=True, name=f"bench-{name}")
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"{name} server did not start")
        add_, echo_, close = connect(port)
        try:
            for _ in range(max(50, calls // 10)):  # warm up connections and caches
                assert add_(1, 2) == 3
            if echo_(PAYLOAD) != PAYLOAD:
                raise RuntimeError(f"{name}: echo does not give the payload back")
            lat = _timed(lambda: add_(1, 2), calls)
            big = _timed(lambda: echo_(PAYLOAD), echo_calls)
        finally:
            close()
    finally:
        child.terminate()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    return {
        "add_median_us": statistics.median(lat) * 1e6,
        "add_p99_us": _p99(lat) * 1e6,
        "echo64k_median_us": statistics.median(big) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="add(1, 2) calls per system")
    parser.add_argument("--echo-calls", type=int, default=300, help="64 KiB echo calls per system")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    for name, (module, _, _) in SYSTEMS.items():
        if not _installed(module):
            results[name] = None
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(name, args.calls, args.echo_calls)
    floor = results["raw pyzmq+msgpack (floor)"]
    for name, r in results.items():
        if r is not None:
            r["add_median_ratio"] = r["add_median_us"] / floor["add_median_us"]
            r["add_p99_ratio"] = r["add_p99_us"] / floor["add_p99_us"]
            r["echo64k_ratio"] = r["echo64k_median_us"] / floor["echo64k_median_us"]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{args.calls} sync add(1, 2) calls and {args.echo_calls} 64 KiB echoes per system, "
          "server in a child process, ratios to the floor measured in this run")
    print(f"{'system':28} {'add median':>11} {'add p99':>9} {'64K echo':>9}   "
          f"{'x floor':>7} {'p99 x':>6} {'echo x':>6}")
    for name, r in results.items():
        if r is None:
            print(f"{name:28} skipped: not installed")
            continue
        print(f"{name:28} {r['add_median_us']:9.0f}us {r['add_p99_us']:7.0f}us "
              f"{r['echo64k_median_us']:7.0f}us   {r['add_median_ratio']:7.2f} "
              f"{r['add_p99_ratio']:6.2f} {r['echo64k_ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
