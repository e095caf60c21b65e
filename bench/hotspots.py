"""Where taskit's time goes, one side at a time: profiles per call, not guesses.

    python bench/hotspots.py frontend sync      # FrontEnd.work against a lean server
    python bench/hotspots.py frontend submit    # 1000 FrontEnd.submit, then the results
    python bench/hotspots.py frontend map       # FrontEnd.map over 20,000 calls
    python bench/hotspots.py backend sync       # BackEnd fed sync calls by a lean client
    python bench/hotspots.py backend pipelined  # BackEnd fed 20,000 pipelined calls
        --seconds S   how long to sample (default 8)
        --perf        perf record -e cpu-clock of every thread of the profiled process
                      (native and kernel, libzmq's I/O thread included), by thread and
                      library, instead of py-spy
    python bench/hotspots.py echo1m [--warm] [-n N]
        the stages of a 1 MiB echo, FrontEnd + BackEnd(codecs=[MsgpackCodec]), each
        side's own functions wrapped in timers (wall, thread CPU, page faults of the
        thread), from a fresh client process; --warm: after one msgpack.packb of
        1 MiB, which raises glibc's malloc thresholds (see doc/comparison.md)

The lean peers are bench/rpc.py's: a server speaking taskit's frames with the
strict floor's loop, and a client likewise, so only one side is taskit. The
default profiler is ``py-spy record --nonblocking --gil`` at 1 kHz (``pip
install py-spy``): the samples taken while a thread holds the GIL, i.e. runs
Python, divided by the calls made meanwhile, per function (self time). A
pyzmq call shows as time in the Python function that makes it. Needs Linux
(/proc) and, to attach to a process, ptrace rights (root, or
kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import rpc  # noqa: E402 (after the sys.path set-up; bench/ is the script's folder)
from _child import ChildServer, announce, usage, wait_eof  # noqa: E402

MiB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")

__all__: list[str] = []


# -- timers for the 1 MiB stages ----------------------------------------------------

STAGES: dict[str, list[int]] = {}  # name -> [wall ns, thread CPU ns, page faults, entries]


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` adding its wall time, thread CPU time and the thread's page faults to
    STAGES[name] at each call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        try:
            return fn(*args, **kwargs)
        finally:
            acc = STAGES.setdefault(name, [0, 0, 0, 0])
            acc[0] += time.perf_counter_ns() - t0
            acc[1] += time.thread_time_ns() - c0
            acc[2] += resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0
            acc[3] += 1

    return wrapper


def time_codec() -> None:
    from taskit.codecs import MsgpackCodec

    encode, decode = MsgpackCodec.encode, MsgpackCodec.decode
    MsgpackCodec.encode = staticmethod(timed("MsgpackCodec.encode", encode))  # type: ignore[method-assign]
    MsgpackCodec.decode = staticmethod(timed("MsgpackCodec.decode", decode))  # type: ignore[method-assign]


def threads_cpu(pid: int | str = "self") -> dict[str, float]:
    """CPU seconds of each thread of a process, by name (from /proc: clock ticks)."""
    names = {t.native_id: t.name for t in threading.enumerate()} if pid == "self" else {}
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        name = names.get(int(tid), comm)
        if name.startswith("Thread-"):  # pyzmq's garbage collector (frees zero-copy frames)
            name = "pyzmq gc"
        name = re.sub(r":\d+$", "", name)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def _serve_staged() -> None:
    """A BackEnd(codecs=[MsgpackCodec]) serving echo, its stages timed; a report
    query answers what they cost since the previous one (JSON)."""
    time_codec()
    from taskit._server import handler, loop
    from taskit.backend import BackEnd
    from taskit.codecs import MsgpackCodec

    cls = handler.RequestHandler
    cls.handle = timed("handle (parse + decode)", cls.handle)  # type: ignore[method-assign]
    cls.result_item = timed("result_item (encode)", cls.result_item)  # type: ignore[method-assign]
    sl = loop.ServerLoop
    sl._send_locked = timed("_send_locked (pack, 2 sends)", sl._send_locked)  # type: ignore[method-assign]
    sl._run_inline = timed("_run_inline (task, encode, send)", sl._run_inline)  # type: ignore[method-assign]
    backend = BackEnd(rpc.FUNCS, host=rpc.HOST, port=0, codecs=[MsgpackCodec])
    backend.start()
    last = [threads_cpu()]

    def report() -> str:
        now = threads_cpu()
        threads = {k: v - last[0].get(k, 0.0) for k, v in now.items()}
        text = json.dumps({"stages": STAGES, "threads": threads})
        STAGES.clear()
        last[0] = now
        return text

    announce(backend.port, exit_on_eof=False, report=report)
    wait_eof()
    backend.stop_server()
    os._exit(0)


def echo1m(n: int, warm: bool) -> None:
    time_codec()
    from taskit._client import connection, core
    from taskit.codecs import MsgpackCodec
    from taskit.frontend import FrontEnd

    conn = connection.Connections
    conn.flush = timed("flush (pack, 1 send)", conn.flush)  # type: ignore[method-assign]
    conn.receive = timed("receive (1 recv, on_message)", conn.receive)  # type: ignore[method-assign]
    core.ClientCore.on_message = timed("on_message (decode)", core.ClientCore.on_message)  # type: ignore[method-assign]
    server = ChildServer(__file__, "staged")
    try:
        fe = FrontEnd([(rpc.HOST, server.port)], codec=MsgpackCodec)
        try:
            work = timed("FrontEnd.work (the call)", fe.work)
            payload = b"x" * MiB
            if warm:
                import msgpack

                msgpack.packb(payload)  # frees a 2 MiB buffer: glibc's thresholds go up
            for _ in range(5):
                work("echo", payload)
            STAGES.clear()
            server.report()
            s0, c0, t0 = server.usage(), usage(), threads_cpu()
            w = time.perf_counter()
            for _ in range(n):
                if len(work("echo", payload)) != MiB:
                    raise AssertionError("echo returned a different payload")
            w = time.perf_counter() - w
            t1, c, s = threads_cpu(), usage() - c0, server.usage() - s0
            remote = json.loads(server.report())
        finally:
            fe.close()
    finally:
        server.stop()
    how = "after one msgpack.packb of 1 MiB" if warm else "fresh client process"
    print(
        f"1 MiB echo, {n} calls, {how}: {w / n * 1e6:.0f} us per call; client CPU "
        f"{c.cpu / n * 1e6:.0f} us, {c.minflt / n:.0f} page faults; server CPU "
        f"{s.cpu / n * 1e6:.0f} us, {s.minflt / n:.0f} page faults"
    )
    mine = {k: v - t0.get(k, 0.0) for k, v in t1.items()}
    for side, stages, threads in (
        ("client", STAGES, mine),
        ("server", remote["stages"], remote["threads"]),
    ):
        print(f"  {side} stage, per call:                       wall us   CPU us   faults")
        for name, (wall, cpu, faults, _) in stages.items():
            print(f"    {name:44}{wall / n / 1e3:8.0f} {cpu / n / 1e3:8.0f} {faults / n:8.0f}")
        busy = sorted(((v, k) for k, v in threads.items() if v > 0), reverse=True)
        print(
            f"  {side} threads, CPU us per call: "
            + ", ".join(f"{k} {v / n * 1e6:.0f}" for v, k in busy)
        )


# -- sampling profiles -------------------------------------------------------------


def _workload(side: str, load: str, port: int) -> tuple[Any, Callable[[], Any], int]:
    """(client, one step, calls per step)."""
    if side == "frontend":
        c = rpc.TaskitClient(port)
        if load == "sync":
            return c, lambda: c.call("add", 1, 2), 1
        if load == "submit":
            return c, lambda: c.submit(1000), 1000
        return c, lambda: c.map(20000), 20000
    c = rpc.WireClient(port)
    if load == "sync":
        return c, lambda: c.call("add", 1, 2), 1
    return c, lambda: c.pipelined(20000), 20000


def profile(side: str, load: str, seconds: float, use_perf: bool) -> None:
    server = ChildServer(rpc.__file__, "wire" if side == "frontend" else "taskit")
    out = tempfile.NamedTemporaryFile(suffix=".prof", delete=False).name
    try:
        client, step, per = _workload(side, load, server.port)
        try:
            for _ in range(max(1, 2000 // per)):  # warm-up: quick tasks qualify to run inline
                step()
            pid = os.getpid() if side == "frontend" else server.proc.pid
            if use_perf:
                cmd = ["perf", "record", "-F", "2000", "-e", "cpu-clock", "-p", str(pid)]
                cmd += ["-o", out, "--", "sleep", str(seconds)]
            else:
                cmd = ["py-spy", "record", "--pid", str(pid), "-r", "1000", "--nonblocking"]
                cmd += ["--gil", "-f", "raw", "-o", out, "-d", str(int(seconds))]
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attaching
            s0, c0 = server.usage(), usage()
            t0 = time.perf_counter()
            calls = 0
            while time.perf_counter() - t0 < seconds - 1.5:  # inside the sampling window
                step()
                calls += per
            wall = time.perf_counter() - t0
            c, s = usage() - c0, server.usage() - s0
            spy.wait(60 + seconds)
        finally:
            client.close()
    finally:
        server.stop()
    cc, sc = c.cpu / calls * 1e6, s.cpu / calls * 1e6
    print(
        f"{side} {load}: {calls} calls in {wall:.1f} s ({calls / wall:.0f}/s); CPU us per call:"
        f" client {cc:.1f}, server {sc:.1f}"
    )
    try:
        if use_perf:
            _perf_report(out, cc if side == "frontend" else sc)
        else:
            _spy_report(out, calls)
    finally:
        os.unlink(out)


def _perf_report(path: str, cpu_us: float) -> None:
    print(f"  perf cpu-clock samples of the profiled process, as us of its {cpu_us:.1f} per call:")
    for sort in ("comm,dso", "dso,sym"):
        text = subprocess.run(
            ["perf", "report", "-i", path, "--stdio", "--sort", sort, "--percent-limit", "0.7"],
            capture_output=True,
            text=True,
        ).stdout
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                share = float(line.split("%")[0])
                print(f"    {share * cpu_us / 100:7.2f}  {line.strip()[:110]}")
        print("    --")


def _spy_report(path: str, calls: int, top: int = 20) -> None:
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            leaf = stack.split(";")[-1]
            name, _, where = leaf.partition(" (")
            own[f"{name} ({os.path.basename(where.split(':')[0])})"] += n
    us = 1000.0 / calls  # one sample is 1 ms of one thread holding the GIL
    print(f"  GIL held: {total * us:.1f} us per call; by function (self time), us per call:")
    for name, n in own.most_common(top):
        print(f"    {n * us:6.2f}  {name}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", choices=["staged"], help=argparse.SUPPRESS)
    p.add_argument("side", nargs="?", choices=["frontend", "backend", "echo1m"])
    p.add_argument("load", nargs="?", choices=["sync", "submit", "map", "pipelined"])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--perf", action="store_true")
    p.add_argument("--warm", action="store_true")
    p.add_argument("-n", type=int, default=500, help="1 MiB echoes (echo1m)")
    args = p.parse_args(argv)
    if args.serve:
        _serve_staged()
    elif args.side == "echo1m":
        echo1m(args.n, args.warm)
    elif args.side is None or args.load is None:
        p.error("give a side and a load, or echo1m")
    elif (args.side, args.load) in (
        ("frontend", "pipelined"),
        ("backend", "submit"),
        ("backend", "map"),
    ):
        p.error("frontend takes sync, submit or map; backend takes sync or pipelined")
    else:
        profile(args.side, args.load, max(3.0, args.seconds), args.perf)


if __name__ == "__main__":
    main()
