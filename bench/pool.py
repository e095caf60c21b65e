"""taskit's WorkerPool against concurrent.futures, measured in one run.

Prints, for thread and process pools of the same size:

* submit -> result latency: one tiny call at a time, median of many;
* map throughput: 20,000 tiny calls through ``map``;
* worker start-up cost of each multiprocessing start method (why the process
  pool uses ``forkserver``);

as ratios taskit / stdlib (below 1.0 means taskit is faster). Absolute times
on a shared machine are noise; the ratios are the result.

    python bench/pool.py [--jobs 20000] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taskit.pool import WorkerPool  # noqa: E402


def tiny(x: int) -> int:
    return x + 1


def _latency(submit, n: int) -> float:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        submit(tiny, i).result()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def _map_time(mapper, n: int) -> float:
    t = time.perf_counter()
    out = list(mapper(tiny, range(n)))
    elapsed = time.perf_counter() - t
    assert out[-1] == n, "wrong results"
    return elapsed


def _compare(kind: str, workers: int, jobs: int, repeat: int) -> tuple[float, float]:
    std_cls = cf.ThreadPoolExecutor if kind == "thread" else cf.ProcessPoolExecutor
    lat_n = 2000 if kind == "thread" else 500
    std_lat, tk_lat, std_map, tk_map = [], [], [], []
    for _ in range(repeat):
        # Alternate, so drift on a shared machine hits both alike.
        with std_cls(workers) as ex:
            list(ex.map(tiny, range(workers * 4)))  # start every worker
            std_lat.append(_latency(ex.submit, lat_n))
            std_map.append(_map_time(ex.map, jobs))
        with WorkerPool(workers, kind=kind) as pool:
            pool.map(tiny, range(workers * 4))
            tk_lat.append(_latency(pool.submit, lat_n))
            tk_map.append(_map_time(pool.map, jobs))
    sl, tl = min(std_lat), min(tk_lat)
    sm, tm = min(std_map), min(tk_map)
    std_name = std_cls.__name__
    print(f"{kind} pool, {workers} workers ({std_name} vs WorkerPool, best of {repeat}):")
    print(
        f"  submit->result latency: {std_name} {sl * 1e6:8.1f} us   taskit {tl * 1e6:8.1f} us"
        f"   ratio {tl / sl:5.2f}"
    )
    print(
        f"  map of {jobs} tiny jobs: {std_name} {jobs / sm:8.0f}/s   taskit {jobs / tm:8.0f}/s"
        f"   time ratio {tm / sm:5.2f}"
    )
    return tl / sl, tm / sm


def _start_cost(workers: int) -> None:
    print(f"process start-up: {workers} workers, first result (why forkserver):")
    base = None
    for method in ("fork", "forkserver", "spawn"):
        if method not in mp.get_all_start_methods():
            continue
        ctx = mp.get_context(method)
        if method == "forkserver":
            # The fork server itself starts once per parent process; count it apart.
            with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                ex.submit(tiny, 0).result()
        t = time.perf_counter()
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            list(ex.map(tiny, range(workers * 2)))
        elapsed = time.perf_counter() - t
        base = base or elapsed
        print(f"  {method:10s} {elapsed * 1e3:7.1f} ms   ratio to fork {elapsed / base:5.2f}")
    t = time.perf_counter()
    with WorkerPool(workers, kind="process") as pool:
        pool.map(tiny, range(workers * 2))
    print(f"  taskit     {(time.perf_counter() - t) * 1e3:7.1f} ms   (forkserver)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t_lat, t_map = _compare("thread", args.workers, args.jobs, args.repeat)
    p_lat, p_map = _compare("process", args.workers, args.jobs, args.repeat)
    _start_cost(args.workers)
    print(
        "targets: thread map time ratio <= 1.20 -> "
        f"{'met' if t_map <= 1.2 else 'NOT met'}; process map time ratio <= 1.00 -> "
        f"{'met' if p_map <= 1.0 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
