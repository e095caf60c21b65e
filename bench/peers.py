"""taskit's RPC against its peers, as ratios to a raw pyzmq + msgpack floor.

One process run measures every library against a server of its own running
in a child process (``sys.executable bench/peers.py --serve LIB``, random
127.0.0.1 port, stopped by pid at the end), all serving ``add(a, b)`` and
``echo(x)``:

* sync latency: ``add(1, 2)`` back to back, one call in flight, median and
  p99 over N calls after a warm-up; and the median of a 64 KiB ``echo``;
* throughput: 20,000 ``add`` calls kept W in flight through the library's
  own async API on one connection (floor, taskit ``submit``, zerorpc
  ``async``, rpyc ``async_``), or, for Pyro5, which has no async call on one
  proxy, spread over T threads each with its own proxy.

The floor is a DEALER client and a single-threaded ROUTER loop that
msgpack-decodes ``[name, args]``, calls the function and msgpack-encodes the
result: the least any RPC over ZeroMQ can do. Pyro5 uses its msgpack
serializer, like the floor, taskit and zerorpc (rpyc has only its own). A
library that is not installed, whose server does not come up, or that fails
while measured is skipped with the reason printed. Each figure is the best
of R rounds (lowest latency, highest throughput); a round visits every
library in turn so a burst of noise on a shared machine hits them alike.
Absolute times are noise there: quote the ratios.

    python bench/peers.py            # full run: 3000 calls, 3 rounds
    python bench/peers.py --quick    # short run: 500 calls, 1 round
    python bench/peers.py --json     # one JSON object on stdout

The peers are not taskit dependencies: ``pip install Pyro5 rpyc zerorpc``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    # Run as a script from a checkout, taskit is importable without install.
    sys.path.insert(0, ROOT)

from _child import BenchError, ChildServer, announce, usage, wait_eof  # noqa: E402 (after the sys.path set-up)

LIBS = ("floor", "taskit", "zerorpc", "pyro5", "rpyc")
MODULES = {
    "floor": ("zmq", "msgpack"),
    "taskit": ("taskit", "zmq", "msgpack"),
    "zerorpc": ("zerorpc",),
    "pyro5": ("Pyro5", "msgpack"),
    "rpyc": ("rpyc",),
}
DISTS = {
    "floor": "pyzmq",
    "taskit": "taskit",
    "zerorpc": "zerorpc",
    "pyro5": "Pyro5",
    "rpyc": "rpyc",
}
HOST = "127.0.0.1"
CALL_TIMEOUT = 30.0  # seconds any single call may take before the library is given up


PAYLOAD = b"x" * 65536


def add(a: int, b: int) -> int:
    return a + b


def echo(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------
# Servers: each runs in a child process, prints "PORT n" once listening, and
# exits when its stdin reaches EOF (the parent closes it, or dies).


def _serve_floor() -> None:
    import msgpack
    import zmq

    funcs = {"add": add, "echo": echo}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port(f"tcp://{HOST}")
    announce(port)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while True:
        ident, body = sock.recv_multipart()
        name, args = unpackb(body)
        sock.send_multipart([ident, packb(funcs[name](*args))])


def _serve_taskit() -> None:
    from taskit.backend import BackEnd

    backend = BackEnd({"add": add, "echo": echo}, host=HOST, port=0)
    backend.start()
    announce(backend.port, exit_on_eof=False)
    try:
        wait_eof()
    finally:
        close = getattr(backend, "close", None) or backend.stop_server
        close()
    os._exit(0)


def _serve_zerorpc() -> None:
    import zerorpc

    class Methods:
        def add(self, a: int, b: int) -> int:
            return a + b

        def echo(self, x: Any) -> Any:
            return x

    server = zerorpc.Server(Methods())
    bound = server.bind(f"tcp://{HOST}:*")
    port = int(bound[0].addr.rsplit(":", 1)[1])
    announce(port)
    server.run()


def _serve_pyro5() -> None:
    from Pyro5.api import Daemon, expose

    @expose
    class Calc:
        def add(self, a: int, b: int) -> int:
            return a + b

        def echo(self, x: Any) -> Any:
            return x

    daemon = Daemon(host=HOST, port=0)
    daemon.register(Calc, "calc")
    announce(daemon.sock.getsockname()[1])
    daemon.requestLoop()


def _serve_rpyc() -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class CalcService(rpyc.Service):
        def exposed_add(self, a: int, b: int) -> int:
            return a + b

        def exposed_echo(self, x: Any) -> Any:
            return x

    server = ThreadedServer(CalcService, hostname=HOST, port=0)
    announce(server.port)
    server.start()


SERVERS: dict[str, Callable[[], None]] = {
    "floor": _serve_floor,
    "taskit": _serve_taskit,
    "zerorpc": _serve_zerorpc,
    "pyro5": _serve_pyro5,
    "rpyc": _serve_rpyc,
}


# --------------------------------------------------------------------------
# Clients. Each has call() (sync), start()/finish(handle) (one call in
# flight asynchronously), close(); throughput() may be overridden.


class Client:
    how = ""

    def call(self) -> Any:
        raise NotImplementedError

    def echo(self, payload: bytes) -> Any:
        raise NotImplementedError

    def start(self) -> Any:
        raise NotImplementedError

    def finish(self, handle: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def throughput(self, n: int, window: int, deadline: float) -> float:
        """Keep up to ``window`` calls in flight; return calls per second."""
        pending: deque[Any] = deque()
        start, finish = self.start, self.finish
        total = 0
        t0 = time.perf_counter()
        for i in range(n):
            if len(pending) >= window:
                total += finish(pending.popleft())
            pending.append(start())
            if i % 1000 == 0 and time.monotonic() > deadline:
                raise BenchError("throughput run exceeded its time budget")
        while pending:
            total += finish(pending.popleft())
        elapsed = time.perf_counter() - t0
        if total != 3 * n:
            raise BenchError(f"wrong results: sum {total} != {3 * n}")
        return n / elapsed


class FloorClient(Client):
    def __init__(self, port: int, window: int) -> None:
        import msgpack
        import zmq

        self.how = f"DEALER->ROUTER, {window} in flight"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A bounded wait instead of a hang if the server goes away.
        self._sock.setsockopt(zmq.RCVTIMEO, int(CALL_TIMEOUT * 1000))
        self._sock.setsockopt(zmq.SNDTIMEO, int(CALL_TIMEOUT * 1000))
        self._sock.connect(f"tcp://{HOST}:{port}")
        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb
        self._again = zmq.Again

    def call(self) -> Any:
        # Encoded per call, as every library does, not a cached request.
        self._sock.send(self._packb(["add", [1, 2]]))
        return self.finish(None)

    def echo(self, payload: bytes) -> Any:
        self._sock.send(self._packb(["echo", [payload]]))
        return self.finish(None)

    def start(self) -> Any:
        self._sock.send(self._packb(["add", [1, 2]]))
        return None

    def finish(self, handle: Any) -> Any:
        try:
            return self._unpackb(self._sock.recv())
        except self._again:
            raise BenchError("floor server did not answer in time") from None

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


class TaskitClient(Client):
    def __init__(self, port: int, window: int) -> None:
        from taskit import codecs, frontend

        self.how = f"FrontEnd.submit, {window} futures in flight"
        # timeout: a lost reply fails the bench run instead of hanging it.
        self._fe = frontend.FrontEnd(
            [(HOST, port)], codec=codecs.MsgpackCodec, timeout=CALL_TIMEOUT
        )

    def call(self) -> Any:
        return self._fe.work("add", 1, 2)

    def echo(self, payload: bytes) -> Any:
        return self._fe.work("echo", payload)

    def start(self) -> Any:
        return self._fe.submit("add", 1, 2)

    def finish(self, handle: Any) -> Any:
        return handle.result(timeout=CALL_TIMEOUT)

    def map_throughput(self, n: int, deadline: float) -> float:
        """``FrontEnd.map`` over n calls (its own window); calls per second."""
        total = 0
        t0 = time.perf_counter()
        results = self._fe.map("add", itertools.repeat(1, n), itertools.repeat(2, n))
        for i, value in enumerate(results):
            total += value
            if i % 1000 == 0 and time.monotonic() > deadline:
                raise BenchError("map run exceeded its time budget")
        elapsed = time.perf_counter() - t0
        if total != 3 * n:
            raise BenchError(f"wrong results: sum {total} != {3 * n}")
        return n / elapsed

    def close(self) -> None:
        close = getattr(self._fe, "close", None)
        if close is not None:
            close()


class ZerorpcClient(Client):
    def __init__(self, port: int, window: int) -> None:
        import zerorpc

        self.how = f"Client(..., async=True) (gevent), {window} in flight"
        self._c = zerorpc.Client(timeout=CALL_TIMEOUT)
        self._c.connect(f"tcp://{HOST}:{port}")
        # zerorpc 0.6 spells the flag `async` (a keyword since Python 3.7).
        self._async = {"async": True}

    def call(self) -> Any:
        return self._c("add", 1, 2)

    def echo(self, payload: bytes) -> Any:
        return self._c("echo", payload)

    def start(self) -> Any:
        return self._c("add", 1, 2, **self._async)

    def finish(self, handle: Any) -> Any:
        return handle.get(timeout=CALL_TIMEOUT)

    def close(self) -> None:
        self._c.close()


class Pyro5Client(Client):
    def __init__(self, port: int, window: int, threads: int) -> None:
        from Pyro5 import api

        # msgpack like the floor, taskit and zerorpc (Pyro5's default is serpent).
        api.config.SERIALIZER = "msgpack"
        self._api = api
        self._uri = f"PYRO:calc@{HOST}:{port}"
        self._threads = threads
        self.how = f"{threads} threads, a Proxy each, sync calls (no async call on one proxy)"
        self._proxy = self._new_proxy()

    def _new_proxy(self) -> Any:
        proxy = self._api.Proxy(self._uri)
        proxy._pyroTimeout = CALL_TIMEOUT
        proxy._pyroBind()
        return proxy

    def call(self) -> Any:
        return self._proxy.add(1, 2)

    def echo(self, payload: bytes) -> Any:
        return self._proxy.echo(payload)

    def close(self) -> None:
        self._proxy._pyroRelease()

    def throughput(self, n: int, window: int, deadline: float) -> float:
        return _threaded_throughput(self._new_proxy, n, self._threads, deadline)


def _threaded_throughput(
    connect: Callable[[], Any], n: int, threads: int, deadline: float
) -> float:
    """n sync calls split over ``threads`` threads, each with its own connection."""
    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    proxies = [connect() for _ in range(threads)]
    for p in proxies:
        p.add(1, 2)  # connected and warm before the clock starts
    barrier = threading.Barrier(threads + 1)
    totals = [0] * threads
    errors: list[BaseException] = []

    def run(i: int) -> None:
        proxy = proxies[i]
        # Pyro5 proxies belong to the thread that created them.
        claim = getattr(proxy, "_pyroClaimOwnership", None)
        if claim is not None:
            claim()
        barrier.wait(CALL_TIMEOUT)
        total = 0
        try:
            for k in range(per[i]):
                total += proxy.add(1, 2)
                if k % 500 == 0 and time.monotonic() > deadline:
                    raise BenchError("throughput run exceeded its time budget")
        except BaseException as e:
            errors.append(e)
        totals[i] = total

    workers = [
        threading.Thread(target=run, args=(i,), name=f"peers-client-{i}") for i in range(threads)
    ]
    try:
        for w in workers:
            w.start()
        barrier.wait(CALL_TIMEOUT)
        t0 = time.perf_counter()
        for w in workers:
            w.join(max(1.0, deadline - time.monotonic() + CALL_TIMEOUT))
        elapsed = time.perf_counter() - t0
    finally:
        for p in proxies:
            claim = getattr(p, "_pyroClaimOwnership", None)
            if claim is not None:
                claim()
            p._pyroRelease()
    if any(w.is_alive() for w in workers):
        raise BenchError("client threads did not finish in time")
    if errors:
        raise BenchError(f"{type(errors[0]).__name__}: {errors[0]}")
    if sum(totals) != 3 * n:
        raise BenchError(f"wrong results: sum {sum(totals)} != {3 * n}")
    return n / elapsed


class RpycClient(Client):
    def __init__(self, port: int, window: int) -> None:
        import rpyc

        self.how = f"rpyc.async_(root.add), {window} in flight on one connection"
        self._conn = rpyc.connect(HOST, port, config={"sync_request_timeout": CALL_TIMEOUT})
        # Looked up once: each `root.add` attribute access is itself a round trip.
        self._add = self._conn.root.add
        self._echo = self._conn.root.echo
        self._async_add = rpyc.async_(self._add)

    def call(self) -> Any:
        return self._add(1, 2)

    def echo(self, payload: bytes) -> Any:
        return self._echo(payload)

    def start(self) -> Any:
        return self._async_add(1, 2)

    def finish(self, handle: Any) -> Any:
        handle.set_expiry(CALL_TIMEOUT)
        return handle.value

    def close(self) -> None:
        self._conn.close()


def _open_client(lib: str, port: int, args: argparse.Namespace) -> Client:
    if lib == "floor":
        return FloorClient(port, args.window)
    if lib == "taskit":
        return TaskitClient(port, args.window)
    if lib == "zerorpc":
        return ZerorpcClient(port, args.window)
    if lib == "pyro5":
        return Pyro5Client(port, args.window, args.threads)
    if lib == "rpyc":
        return RpycClient(port, args.window)
    raise ValueError(lib)


# --------------------------------------------------------------------------
# Measuring


def _latency(
    call: Callable[[], Any], expect: Any, n: int, warmup: int, deadline: float
) -> tuple[float, float]:
    """Median and p99 of n sync calls, in microseconds; every result is checked."""
    for _ in range(warmup):
        if call() != expect:
            raise BenchError("a call did not return the expected value")
    samples = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        result = call()
        samples.append(clock() - t0)
        if result != expect:
            raise BenchError("a call did not return the expected value")
        if i % 100 == 0 and time.monotonic() > deadline:
            raise BenchError("latency run exceeded its time budget")
    samples.sort()
    median = statistics.median(samples) / 1000
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000
    return median, p99


def _skip_reason(lib: str) -> str | None:
    for mod in MODULES[lib]:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install {DISTS.get(lib, mod)})"
    if lib == "taskit":
        for mod in ("taskit.backend", "taskit.frontend"):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} does not exist yet"
    return None


def _version(lib: str) -> str:
    try:
        return importlib.metadata.version(DISTS[lib])
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    libs = [lib for lib in LIBS if lib in args.libs]
    if "floor" not in libs:
        libs.insert(0, "floor")
    results: dict[str, dict[str, Any]] = {}
    servers: dict[str, ChildServer] = {}
    best: dict[str, dict[str, Any]] = {}
    try:
        for lib in libs:
            reason = _skip_reason(lib)
            if reason is None:
                try:
                    servers[lib] = ChildServer(__file__, lib)
                except BenchError as e:
                    reason = str(e)
            if reason is not None:
                results[lib] = {"skipped": reason}
                _log(f"skip {lib}: {reason}")
        for rnd in range(args.rounds):
            for lib in libs:
                if lib not in servers or "skipped" in results.get(lib, {}):
                    continue
                _log(f"round {rnd + 1}/{args.rounds}: {lib}")
                try:
                    figures = _measure(lib, servers[lib], args)
                except Exception as e:  # any failure of a peer skips it, never the bench
                    reason = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                    results[lib] = {"skipped": f"failed while measuring: {reason}"}
                    _log(f"skip {lib}: {reason}")
                    continue
                cpu = figures.pop("cpu")
                b = best.setdefault(lib, dict(figures, rounds=[], cpu_totals={}))
                # Every round's figures are kept too: their spread shows the noise.
                b["rounds"].append({k: v for k, v in figures.items() if k != "throughput_method"})
                for key in ("add_median_us", "add_p99_us", "echo64k_median_us"):
                    b[key] = min(b[key], figures[key])
                for key in ("throughput_calls_per_s", "map_calls_per_s"):
                    if key in figures:
                        b[key] = max(b[key], figures[key])
                # CPU time: summed over every round, divided by every call at the end
                for phase, (n, client, server) in cpu.items():
                    tot = b["cpu_totals"].setdefault(phase, [0, 0.0, 0.0])
                    tot[0] += n
                    tot[1] += client
                    tot[2] += server
    finally:
        for server in servers.values():
            server.stop()
    floor = best.get("floor")
    if floor is None:
        raise SystemExit(f"the floor could not be measured: {results.get('floor')}")
    for b in best.values():
        b["cpu_us_per_call"] = _cpu_per_call(b.pop("cpu_totals"))
    for lib in libs:
        if lib in best and "skipped" not in results.get(lib, {}):
            b = best[lib]
            b["add_median_ratio"] = b["add_median_us"] / floor["add_median_us"]
            b["add_p99_ratio"] = b["add_p99_us"] / floor["add_p99_us"]
            b["echo64k_ratio"] = b["echo64k_median_us"] / floor["echo64k_median_us"]
            b["throughput_ratio"] = b["throughput_calls_per_s"] / floor["throughput_calls_per_s"]
            if "map_calls_per_s" in b:
                b["map_ratio"] = b["map_calls_per_s"] / floor["throughput_calls_per_s"]
            fc = floor["cpu_us_per_call"]
            # map is compared with the floor's throughput run, as its calls/s are
            b["cpu_ratio"] = {
                phase: round(v["total"] / fc["throughput" if phase == "map" else phase]["total"], 3)
                for phase, v in b["cpu_us_per_call"].items()
            }
            b["version"] = _version(lib)
            results[lib] = b
    return {
        "params": {
            "sync_calls": args.calls,
            "warmup": args.warmup,
            "echo64k_calls": args.echo_calls,
            "throughput_calls": args.throughput_calls,
            "window": args.window,
            "threads": args.threads,
            "rounds": args.rounds,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "results": {lib: results[lib] for lib in libs if lib in results},
    }


def _measure(lib: str, server: ChildServer, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.budget
    client = _open_client(lib, server.port, args)
    cpu: dict[str, tuple[int, float, float]] = {}  # phase -> (calls, client s, server s)

    def measured(phase: str, calls: int, fn: Callable[[], Any]) -> Any:
        s0, c0 = server.usage(), usage()
        out = fn()
        c, s = usage() - c0, server.usage() - s0
        cpu[phase] = (calls, c.cpu, s.cpu)
        return out

    try:
        gc.collect()
        median, p99 = measured(
            "add",
            args.calls + args.warmup,
            lambda: _latency(client.call, 3, args.calls, args.warmup, deadline),
        )
        echo_warmup = max(3, args.warmup // 20)
        echo_median, _ = measured(
            "echo64k",
            args.echo_calls + echo_warmup,
            lambda: _latency(
                lambda: client.echo(PAYLOAD), PAYLOAD, args.echo_calls, echo_warmup, deadline
            ),
        )
        gc.collect()
        deadline = time.monotonic() + args.budget
        n = args.throughput_calls
        rate = measured("throughput", n, lambda: client.throughput(n, args.window, deadline))
        figures = {
            "add_median_us": median,
            "add_p99_us": p99,
            "echo64k_median_us": echo_median,
            "throughput_calls_per_s": rate,
            "throughput_method": client.how,
        }
        map_throughput = getattr(client, "map_throughput", None)
        if map_throughput is not None:
            gc.collect()
            deadline = time.monotonic() + args.budget
            figures["map_calls_per_s"] = measured("map", n, lambda: map_throughput(n, deadline))
    finally:
        client.close()
    figures["cpu"] = cpu
    return figures


def _cpu_per_call(totals: dict[str, list]) -> dict[str, dict[str, float]]:
    """phase -> client, server and total CPU us per call (process CPU time / calls)."""
    out = {}
    for phase, (n, client, server) in totals.items():
        c, s = client / n * 1e6, server / n * 1e6
        out[phase] = {"client": round(c, 1), "server": round(s, 1), "total": round(c + s, 1)}
    return out


NAMES = {
    "floor": "raw zmq+msgpack",
    "taskit": "taskit",
    "zerorpc": "zerorpc",
    "pyro5": "Pyro5",
    "rpyc": "rpyc",
}


def _table(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [
        f"add(1, 2) sync latency over {p['sync_calls']} calls (after {p['warmup']} warm-up), "
        f"64 KiB echo over {p['echo64k_calls']} calls,",
        f"throughput of {p['throughput_calls']} add calls; best of {p['rounds']} round(s); "
        "every server a child process on 127.0.0.1.",
        "'x' columns are ratios to the floor measured in this run:",
        "latency lib/floor (lower is better), throughput lib/floor (higher is better).",
        "",
        f"{'library':<17}{'median us':>10}{'p99 us':>9}{'median x':>9}{'p99 x':>7}"
        f"{'echo64k us':>11}{'echo x':>7}{'calls/s':>9}{'thru x':>7}",
    ]
    notes = []
    for lib, r in report["results"].items():
        name = NAMES[lib]
        if "skipped" in r:
            lines.append(f"{name:<17}skipped: {r['skipped']}")
            continue
        lines.append(
            f"{name:<17}{r['add_median_us']:>10.1f}{r['add_p99_us']:>9.1f}"
            f"{r['add_median_ratio']:>9.2f}{r['add_p99_ratio']:>7.2f}"
            f"{r['echo64k_median_us']:>11.1f}{r['echo64k_ratio']:>7.2f}"
            f"{r['throughput_calls_per_s']:>9.0f}{r['throughput_ratio']:>7.2f}"
        )
        notes.append(f"  {name} {r['version']}: {r['throughput_method']}")
        if "map_calls_per_s" in r:
            lines.append(
                f"{name + ' (map)':<17}{'':>53}{r['map_calls_per_s']:>9.0f}{r['map_ratio']:>7.2f}"
            )
            notes.append(f"  {name} (map): FrontEnd.map('add', ...) with its own window")
    lines += ["", "throughput driven by:"] + notes
    lines += [
        "",
        "CPU us per call, client + server (process CPU time over every round's calls, warm-up",
        "included, / calls; every thread of each process); 'x': total / the floor's total:",
        f"{'library':<17}{'add c+s':>16}{'x':>6}{'echo64k c+s':>20}{'x':>6}"
        f"{'throughput c+s':>18}{'x':>6}",
    ]
    for lib, r in report["results"].items():
        if "skipped" in r:
            continue
        cells = []
        for phase in ("add", "echo64k", "throughput", "map"):
            c = r["cpu_us_per_call"].get(phase)
            cells.append(
                None
                if c is None
                else (f"{c['client']:.0f}+{c['server']:.0f}", r["cpu_ratio"][phase])
            )
        line = f"{NAMES[lib]:<17}"
        for (text, ratio), width in zip(cells[:3], (16, 20, 18), strict=True):
            line += f"{text:>{width}}{ratio:>6.2f}"
        lines.append(line)
        if cells[3] is not None:
            text, ratio = cells[3]
            lines.append(f"{NAMES[lib] + ' (map)':<17}{'':>48}{text:>18}{ratio:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (fewer calls, one round)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    parser.add_argument("--calls", type=int, help="sync calls measured (default 3000, quick 500)")
    parser.add_argument(
        "--warmup", type=int, help="sync calls before measuring (default 300, quick 100)"
    )
    parser.add_argument(
        "--echo-calls", type=int, help="64 KiB echo calls measured (default 300, quick 100)"
    )
    parser.add_argument(
        "--throughput-calls",
        type=int,
        help="calls in the throughput run (default 20000, quick 5000)",
    )
    parser.add_argument(
        "--window", type=int, default=1000, help="calls kept in flight (default 1000)"
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="client threads where a peer needs them (default 4)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds over all libraries; best figure kept (default 3, quick 1)",
    )
    parser.add_argument(
        "--budget", type=float, default=90.0, help="seconds per library per phase before giving up"
    )
    parser.add_argument(
        "--libs", default=",".join(LIBS), help=f"comma-separated subset of {','.join(LIBS)}"
    )
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        SERVERS[args.serve]()
        return 0
    quick = args.quick
    args.calls = args.calls or (500 if quick else 3000)
    args.echo_calls = args.echo_calls or (100 if quick else 300)
    args.warmup = args.warmup if args.warmup is not None else (100 if quick else 300)
    args.throughput_calls = args.throughput_calls or (5000 if quick else 20000)
    args.rounds = args.rounds or (1 if quick else 3)
    args.libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    unknown = set(args.libs) - set(LIBS)
    if unknown:
        parser.error(f"unknown libraries {sorted(unknown)}; choose from {','.join(LIBS)}")
    report = run(args)
    if args.json:
        print(json.dumps(report))  # libraries in run order
    else:
        print(_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
