"""Per-call cost of choosing a backend, at 1 to 10,000 backends (issue 14).

Drives the client's sans-I/O dispatcher alone (no sockets): for each fleet size,
every call is one ``pick`` + ``sent`` + ``answered`` with a load report, as the
client core does per call; prints microseconds per call and the ratio to 10
backends (the goal: 1,000 backends cost at most 2x 10).

    python bench/dispatch.py            # --calls 200000 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taskit._client.dispatch import Dispatcher  # noqa: E402

SIZES = (1, 10, 100, 1_000, 10_000)


def per_call_us(n: int, calls: int) -> float:
    d = Dispatcher(prefetch=8, seed=1)
    for i in range(n):
        d.up(i, 4)
    pick, sent, answered = d.pick, d.sent, d.answered
    inflight = []
    t0 = time.perf_counter()
    for _ in range(calls):
        slot = pick()
        if slot is None:  # every backend full: the oldest call is answered first
            answered(inflight.pop(0), 0.001, 3, 4)
            slot = pick()
        sent(slot)
        inflight.append(slot)
        if len(inflight) > 64:
            answered(inflight.pop(0), 0.001, 3, 4)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    us = {n: min(per_call_us(n, args.calls) for _ in range(3)) for n in SIZES}
    result = {f"us_per_call_{n}": round(v, 3) for n, v in us.items()}
    result["ratio_1000_vs_10"] = round(us[1_000] / us[10], 2)
    result["ratio_10000_vs_10"] = round(us[10_000] / us[10], 2)
    if args.json:
        print(json.dumps(result))
        return
    for n in SIZES:
        print(f"{n:>6} backends: {us[n]:6.2f} us per call (pick + sent + answered)")
    r1, r2 = result["ratio_1000_vs_10"], result["ratio_10000_vs_10"]
    print(f"1,000 vs 10: {r1}x   10,000 vs 10: {r2}x")


if __name__ == "__main__":
    main()
