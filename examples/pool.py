"""The worker-pool core in a few lines: threads, processes, jobs, resizing.

Run it:  python examples/pool.py
"""

from __future__ import annotations

import os
import queue
import threading

from taskit.errors import WorkerLostError
from taskit.pool import Job, SimpleJob, WorkerPool, current_toolbox, start_workers


def square(x: int) -> int:
    return x * x


def crash() -> None:
    os._exit(1)  # a worker process dies in the middle of a job


class Connection:
    """Stands for a per-worker resource (a DB connection, an HTTP session...)."""

    def __init__(self) -> None:
        self.owner = threading.current_thread().name
        self.uses = 0


class FetchJob(Job):
    """workerpool-style job: gets its worker's toolbox."""

    def __init__(self, key: str) -> None:
        self.key = key

    def run(self, toolbox: Connection) -> str:
        toolbox.uses += 1
        return f"{self.key} via {toolbox.owner} (use {toolbox.uses})"


class Greeter:
    """Attributes for start_workers: its public methods are the job targets."""

    def hello(self, arguments: dict) -> str:
        return f"hello {arguments['name']} from process {os.getpid()}"


def main() -> None:
    # Threads: futures, map in input order, a resizable pool.
    with WorkerPool(4, name="demo") as pool:
        print("submit:", pool.submit(square, 7).result())
        print("map:   ", pool.map(square, range(10)))
        pool.grow(2)
        pool.shrink(3)
        print("size after grow(2), shrink(3):", pool.size())

        # Classic jobs: a result queue (SimpleJob), or a per-worker toolbox.
        results: queue.Queue = queue.Queue()
        pool.put(SimpleJob(results, pow, [2, 10]))
        pool.join()
        print("SimpleJob put on the queue:", results.get())
    with WorkerPool(2, toolbox_factory=Connection, name="fetch") as pool:
        for key in ("a", "b", "c"):
            print("FetchJob:", pool.put(FetchJob(key)).result())
        print(
            "current_toolbox() from a plain function:",
            pool.submit(lambda: current_toolbox().owner).result(),
        )

    # Processes: a crash fails only its own job; the worker is replaced.
    with WorkerPool(2, kind="process") as procs:
        doomed = procs.submit(crash)
        try:
            doomed.result()
        except WorkerLostError as e:
            print("crash ->", type(e).__name__)
        print("still working:", procs.map(square, range(5)), "stats:", procs.stats())

    # The multiprocess worker library's model: named targets, False stops a worker.
    jobs = start_workers(2, Greeter())
    print(jobs.put({"target": "hello", "arguments": {"name": "taskit"}}).result())
    jobs.put(False)
    jobs.close()


if __name__ == "__main__":
    main()
