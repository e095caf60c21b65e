"""Soak test: N FrontEnds x M backends on loopback, with random backend kills and restarts.

    python bench/soak.py                          # 3 frontends x 3 backends, 20 s, retries=1
    python bench/soak.py -n 4 -m 2 --duration 60 --retries 0
    python bench/soak.py --json                   # one JSON object

Each backend is a child process (``sys.executable bench/soak.py --serve PORT``)
serving ``add``. Each FrontEnd has a driver thread keeping ``--window`` calls
in flight and checking every result. A chaos thread SIGKILLs a random
backend every 0.5-2 s and restarts it on the same port after 0.2-1 s. At the
end, every backend is restarted, the drivers stop sending and every call is
given a bounded time to settle.

Printed: calls sent, answered (with the right result), failed (raised a
taskit error -- ``BackendLostError`` without retries, ``BackendNotAvailableError``
when every backend was down for longer than the connect timeout), wrong
(answered with a wrong result) and lost (never settled). lost and wrong must
be 0; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

__all__: list[str] = []


def _serve(port: int) -> None:
    from taskit.backend import BackEnd

    def add(a: int, b: int) -> int:
        return a + b

    backend = BackEnd({"add": add}, host="127.0.0.1", port=port, codecs=["json", "msgpack"])
    backend.start()
    print("READY", flush=True)
    sys.stdin.buffer.read()  # EOF: the soak ended, or died
    os._exit(0)


class Backend:
    """One backend child process on a fixed port; restartable; stopped by pid."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        for _ in range(50):  # the port may linger briefly after a kill
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", str(self.port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
                ok = bool(sel.select(30)) and proc.stdout.readline().strip() == b"READY"  # type: ignore[union-attr]
            if ok:
                self.proc = proc
                return
            proc.kill()
            proc.wait()
            time.sleep(0.1)  # back off before binding again (not a synchronisation)
        raise RuntimeError(f"backend on port {self.port} would not start")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass


class Driver:
    """Keeps ``window`` calls in flight on one FrontEnd and counts their outcomes."""

    def __init__(self, fe: Any, window: int, seed: int) -> None:
        self.fe = fe
        self.window = threading.BoundedSemaphore(window)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent = self.answered = self.failed = self.wrong = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.outstanding: set[Future] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="soak-driver", daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.window.acquire(timeout=0.5):
                continue
            a, b = self.rng.randrange(1 << 30), self.rng.randrange(1 << 30)
            try:
                fut = self.fe.submit("add", a, b)
            except Exception as e:  # noqa: BLE001 - counted, the soak goes on
                with self.lock:
                    self.sent += 1
                    self.failed += 1
                    self.errors[type(e).__name__] += 1
                self.window.release()
                continue
            with self.lock:
                self.sent += 1
                self.outstanding.add(fut)
            fut.add_done_callback(lambda f, want=a + b: self.settle(f, want))

    def settle(self, fut: Future, want: int) -> None:
        exc = fut.exception()
        with self.lock:
            self.outstanding.discard(fut)
            if exc is not None:
                self.failed += 1
                self.errors[type(exc).__name__] += 1
            elif fut.result() == want:
                self.answered += 1
            else:
                self.wrong += 1
        self.window.release()


def chaos(backends: list[Backend], stop: threading.Event, rng: random.Random) -> None:
    while not stop.wait(rng.uniform(0.5, 2.0)):
        victim = rng.choice(backends)
        victim.kill()
        if stop.wait(rng.uniform(0.2, 1.0)):
            break
        victim.start()


def count(drivers: list[Driver]) -> dict[str, Any]:
    totals: dict[str, Any] = {"sent": 0, "answered": 0, "failed": 0, "wrong": 0, "lost": 0}
    errors: collections.Counter[str] = collections.Counter()
    for d in drivers:
        with d.lock:
            totals["sent"] += d.sent
            totals["answered"] += d.answered
            totals["failed"] += d.failed
            totals["wrong"] += d.wrong
            totals["lost"] += len(d.outstanding)  # never settled
            errors.update(d.errors)
    totals["errors"] = dict(errors)
    return totals


def run(args: argparse.Namespace) -> dict[str, Any]:
    from taskit.codecs import MsgpackCodec
    from taskit.frontend import FrontEnd

    rng = random.Random(args.seed)
    ports: list[int] = []
    while len(ports) < args.backends:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    backends = [Backend(p) for p in ports]
    frontends: list[Any] = []
    drivers: list[Driver] = []
    stop_chaos = threading.Event()
    chaos_thread = threading.Thread(
        target=chaos, args=(backends, stop_chaos, rng), name="soak-chaos", daemon=True
    )
    try:
        for b in backends:
            b.start()
        for i in range(args.frontends):
            fe = FrontEnd(
                [b.endpoint for b in backends],
                codec=MsgpackCodec,
                retries=args.retries,
                connect_timeout=args.connect_timeout,
                heartbeat_interval=0.25,
                heartbeat_timeout=1.0,
            )
            frontends.append(fe)
            drivers.append(Driver(fe, args.window, args.seed + i))
        t0 = time.monotonic()
        for d in drivers:
            d.thread.start()
        chaos_thread.start()
        stop_at = t0 + args.duration
        while time.monotonic() < stop_at:
            time.sleep(min(1.0, max(0.0, stop_at - time.monotonic())))  # the soak's clock
        stop_chaos.set()
        chaos_thread.join()
        for b in backends:
            if not b.alive:
                b.start()
        for d in drivers:
            d.stop.set()
        for d in drivers:
            d.thread.join(10)
        # every call must settle: answered, or failed with a taskit error
        settle_by = time.monotonic() + args.connect_timeout + 15
        for d in drivers:
            for fut in list(d.outstanding):
                try:
                    fut.exception(max(0.0, settle_by - time.monotonic()))
                except TimeoutError:
                    pass
        elapsed = time.monotonic() - t0
        totals = count(drivers)  # before closing: close() would fail what is left
    finally:
        stop_chaos.set()
        for fe in frontends:
            fe.close()
        for b in backends:
            b.stop()
    totals.update(
        {
            "kills": sum(b.kills for b in backends),
            "seconds": round(elapsed, 1),
            "calls_per_s": round(totals["sent"] / elapsed),
            "params": {
                "frontends": args.frontends,
                "backends": args.backends,
                "duration": args.duration,
                "retries": args.retries,
                "window": args.window,
                "seed": args.seed,
            },
        }
    )
    return totals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("-n", "--frontends", type=int, default=3)
    p.add_argument("-m", "--backends", type=int, default=3)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of chaos")
    p.add_argument("--retries", type=int, default=1, help="FrontEnd(retries=...)")
    p.add_argument("--window", type=int, default=200, help="calls in flight per frontend")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return 0
    r = run(args)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{args.frontends} frontends x {args.backends} backends, {r['seconds']} s, "
            f"{r['kills']} backend kills, retries={args.retries}\n"
            f"  sent {r['sent']}  answered {r['answered']}  failed {r['failed']}  "
            f"wrong {r['wrong']}  lost {r['lost']}   ({r['calls_per_s']} calls/s)\n"
            f"  failures by type: {r['errors'] or 'none'}"
        )
    return 1 if r["lost"] or r["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
