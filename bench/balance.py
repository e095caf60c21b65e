"""Balancing across backends of different speeds (issue 14).

Two backends of 4 workers each, one whose task takes 1 ms and one 10 ms (each
in a child process), and 2,000 calls from one FrontEnd by ``submit`` and by
``map``: the time taken as a ratio to the ideal, where every worker is busy
until the end (2,000 / (4/1 ms + 4/10 ms) = 455 ms). Goal: at most 1.3x.
Also: 4 clients (threads, one FrontEnd each) sharing the two backends, 500
calls each; and a third backend (1 ms) started mid-run, with the share of the
calls it took.

    python bench/balance.py            # --calls 2000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _child import ChildServer, announce  # noqa: E402

HOST = "127.0.0.1"
WORKERS = 4
SPEEDS = {"fast": 0.001, "slow": 0.010}


def _serve(seconds: float) -> None:
    from taskit.backend import BackEnd

    def work(i: int) -> tuple[int, int]:
        time.sleep(seconds)
        return i, os.getpid()

    backend = BackEnd({"work": work}, host=HOST, port=0, workers=WORKERS)
    backend.start()
    announce(backend.port, exit_on_eof=False)
    try:
        sys.stdin.buffer.read()
    finally:
        backend.stop_server()
    os._exit(0)


def ideal(calls: int, speeds: list[float]) -> float:
    return calls / sum(WORKERS / s for s in speeds)


def one_client(ports: list[int], calls: int, how: str) -> tuple[float, dict[int, int]]:
    from taskit.codecs import MsgpackCodec
    from taskit.frontend import FrontEnd

    fe = FrontEnd([(HOST, p) for p in ports], codec=MsgpackCodec)
    try:
        fe.work("work", -1)  # connected to at least one (as a user's first call)
        for _ in range(200):  # and to all, so the run compares balancing, not connecting
            if all(s["state"] == "up" for s in fe.backends_status().values()):
                break
            time.sleep(0.01)
        t0 = time.perf_counter()
        if how == "submit":
            futures = [fe.submit("work", i) for i in range(calls)]
            results = [f.result(60) for f in futures]
        else:
            results = list(fe.map("work", range(calls)))
        elapsed = time.perf_counter() - t0
    finally:
        fe.close()
    pids: dict[int, int] = {}
    for _, pid in results:
        pids[pid] = pids.get(pid, 0) + 1
    return elapsed, pids


def run(args: argparse.Namespace) -> dict[str, Any]:
    fast, slow = ChildServer(__file__, "fast"), ChildServer(__file__, "slow")
    out: dict[str, Any] = {}
    try:
        ports = [fast.port, slow.port]
        best = ideal(args.calls, [SPEEDS["fast"], SPEEDS["slow"]])
        for how in ("submit", "map"):
            elapsed, pids = one_client(ports, args.calls, how)
            out[f"{how}_ratio"] = round(elapsed / best, 2)
            out[f"{how}_slow_share"] = round(pids.get(_pid(slow), 0) / args.calls, 3)
        # 4 clients at once, a quarter of the calls each
        times: list[float] = []

        def client() -> None:
            times.append(one_client(ports, args.calls // 4, "submit")[0])

        threads = [threading.Thread(target=client) for _ in range(4)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        out["four_clients_ratio"] = round((time.perf_counter() - t0) / best, 2)
        out["four_clients_spread"] = round(max(times) / min(times), 2)
        # a third backend joins mid-run
        out.update(_joiner(ports, args.calls))
    finally:
        fast.stop()
        slow.stop()
    return out


def _pid(server: ChildServer) -> int:
    return server.proc.pid


def _joiner(ports: list[int], calls: int) -> dict[str, Any]:
    from taskit.codecs import MsgpackCodec
    from taskit.frontend import FrontEnd

    third: ChildServer | None = None
    fe = FrontEnd([(HOST, p) for p in ports], codec=MsgpackCodec)
    try:
        fe.work("work", -1)
        futures = [fe.submit("work", i) for i in range(calls)]
        third = ChildServer(__file__, "fast")
        fe.add_backends((HOST, third.port))
        t0 = time.perf_counter()
        results = [f.result(60) for f in futures]
        took = sum(1 for _, pid in results if pid == third.proc.pid)
        return {
            "joiner_share": round(took / calls, 3),
            "joiner_rest_s": round(time.perf_counter() - t0, 3),
        }
    finally:
        fe.close()
        if third is not None:
            third.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=sorted(SPEEDS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(SPEEDS[args.serve])
        return
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"2 backends (1 ms, 10 ms; {WORKERS} workers each), {args.calls} calls; ideal = 1.0")
    for key, value in result.items():
        print(f"  {key:22} {value}")


if __name__ == "__main__":
    main()
