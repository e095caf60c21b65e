"""Pipeline throughput: taskit.jobq against a plain loop and a bare stdlib
queue pipeline, measured in the same run, printed as ratios.

Scenario "trivial": 3 stages of trivial functions (add1 -> multi2 -> sub3),
elements/s through ``jobq.run`` (one thread per stage, with and without
``keep_order``; and 2 threads in the middle stage with ``keep_order``),
against

- ``loop``: ``for x in data: sub3(multi2(add1(x)))`` in one thread (the
  work itself, no hand-off: the ceiling a pipeline can only approach when
  stages do real work);
- ``queues``: the same 3 stages as 3 hand-written threads joined by
  ``queue.Queue(1024)``, no ordering, stats or error handling (the stdlib
  floor for moving elements between threads).

Scenario "io": the middle stage waits 1 ms per element (I/O stand-in) and gets
8 threads: what a pipeline is for; compared with the plain loop.

Ratios are elements/s relative to the loop (and to the queue floor); absolute
rates on a shared machine are noise.

    python bench/jobq.py [--n 100000] [--io-n 400] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from taskit import jobq  # noqa: E402


def add1(x: int) -> int:
    return x + 1


def multi2(x: int) -> int:
    return x * 2


def sub3(x: int) -> int:
    return x - 3


def io_wait(x: int) -> int:
    time.sleep(0.001)
    return x


def plain_loop(n: int, middle: Callable[[int], int]) -> None:
    for x in range(n):
        sub3(middle(add1(x)))


_END = object()


def queue_pipeline(n: int, middle: Callable[[int], int]) -> None:
    """Three threads and two bounded stdlib queues: the bare minimum."""
    q1: queue.Queue = queue.Queue(1024)
    q2: queue.Queue = queue.Queue(1024)

    def first() -> None:
        for x in range(n):
            q1.put(add1(x))
        q1.put(_END)

    def second() -> None:
        while (x := q1.get()) is not _END:
            q2.put(middle(x))
        q2.put(_END)

    def third() -> None:
        while (x := q2.get()) is not _END:
            sub3(x)

    threads = [
        threading.Thread(target=f, name=f"bench-q{i}") for i, f in enumerate((first, second, third))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def best_rate(fn: Callable[[], None], n: int, repeat: int) -> float:
    """Elements per second, best of ``repeat`` runs (least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="elements, trivial scenario")
    ap.add_argument("--io-n", type=int, default=400, help="elements, 1 ms I/O scenario")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    n, io_n, rep = args.n, args.io_n, args.repeat

    results: dict[str, Any] = {"n": n, "io_n": io_n}
    rows = [
        ("loop (1 thread, no hand-off)", lambda: plain_loop(n, multi2)),
        ("stdlib queue pipeline (3 threads)", lambda: queue_pipeline(n, multi2)),
        ("jobq.run 3 stages", lambda: jobq.run(range(n), [add1, multi2, sub3])),
        (
            "jobq.run 3 stages, keep_order",
            lambda: jobq.run(range(n), [add1, multi2, sub3], keep_order=True),
        ),
        (
            "jobq.run 3 stages, (multi2, 2), keep_order",
            lambda: jobq.run(range(n), [add1, (multi2, 2), sub3], keep_order=True),
        ),
    ]
    rates = {name: best_rate(fn, n, rep) for name, fn in rows}
    loop_rate = rates["loop (1 thread, no hand-off)"]
    floor_rate = rates["stdlib queue pipeline (3 threads)"]
    print(f"trivial stages, {n} elements, best of {rep}")
    print(f"  {'':44s} {'elements/s':>12s} {'vs loop':>8s} {'vs queues':>10s}")
    for name, rate in rates.items():
        print(f"  {name:44s} {rate:12,.0f} {rate / loop_rate:8.3f} {rate / floor_rate:10.2f}")
    results["trivial"] = {
        name: {"rate": rate, "vs_loop": rate / loop_rate, "vs_queues": rate / floor_rate}
        for name, rate in rates.items()
    }

    io_rows = [
        ("loop (1 thread)", lambda: plain_loop(io_n, io_wait)),
        ("jobq.run, (io_wait, 8)", lambda: jobq.run(range(io_n), [add1, (io_wait, 8), sub3])),
        (
            "jobq.run, (io_wait, 8), keep_order",
            lambda: jobq.run(range(io_n), [add1, (io_wait, 8), sub3], keep_order=True),
        ),
    ]
    io_rates = {name: best_rate(fn, io_n, rep) for name, fn in io_rows}
    io_loop = io_rates["loop (1 thread)"]
    print(f"\nmiddle stage waits 1 ms per element, {io_n} elements, best of {rep}")
    print(f"  {'':44s} {'elements/s':>12s} {'vs loop':>8s}")
    for name, rate in io_rates.items():
        print(f"  {name:44s} {rate:12,.0f} {rate / io_loop:8.2f}")
    results["io"] = {name: {"rate": r, "vs_loop": r / io_loop} for name, r in io_rates.items()}

    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
