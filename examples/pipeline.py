"""Pipelines with taskit.jobq: the jobq README's examples, then a small
"fetch -> parse -> store" pipeline with threads, order, a rate limit and stats.

Run: python examples/pipeline.py
"""

from __future__ import annotations

import logging
import time

from taskit import jobq


def add1(args):
    return args + 1


def multi2(args):
    return args * 2


def printarg(args):
    print(args)


def drop_even_number(i):
    if i % 2 == 0:
        return jobq.EmptyRst  # pass nothing on
    return i


def readme_examples() -> None:
    print("add1 -> printarg:")
    jobq.run([0, 1, 2], [add1, printarg])  # 1 2 3
    print("add1 -> multi2 -> printarg:")
    jobq.run((0, 1, 2), [add1, multi2, printarg])  # 2 4 6
    print("two multi2 threads, order kept:")
    jobq.run(range(3), [add1, (multi2, 2), printarg], keep_order=True)  # 2 4 6
    print("drop even numbers:")
    jobq.run(range(10), [drop_even_number, printarg])  # 1 3 5 7 9


# --- a realistic pipeline --------------------------------------------------------


def fetch(page: int) -> str:
    time.sleep(0.01)  # stands for network I/O: 4 threads overlap it
    return f"page {page}: " + " ".join(f"word{page % 7}" for _ in range(page % 5 + 1))


def split_words(text: str):
    # a generator: every yielded item goes to the next stage on its own
    _, words = text.split(": ", 1)
    yield from words.split()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    readme_examples()

    counts: dict[str, int] = {}

    def store(word: str) -> None:
        counts[word] = counts.get(word, 0) + 1  # one thread: no lock needed

    probe: dict = {}
    t0 = time.monotonic()
    jobq.run(
        range(100),
        [
            (fetch, 4),  # 4 threads
            jobq.limit_job_speed(500),  # at most 500 pages per second
            split_words,
            store,
        ],
        keep_order=True,
        probe=probe,
    )
    stats = jobq.stat(probe)
    print(f"word counts: {dict(sorted(counts.items()))}")
    print(
        f"{stats['in']} stage calls, {stats['errors']} errors, "
        f"{time.monotonic() - t0:.2f} s; stages: {[w['name'] for w in stats['workers']]}"
    )

    # feeding by hand, and resizing a stage while it runs
    seen: list[int] = []
    with jobq.JobManager([(fetch, 1), len, seen.append]) as jm:
        jm.set_thread_num(fetch, 8)
        for page in range(40):
            jm.put(page)
    print(f"JobManager processed {len(seen)} pages")


if __name__ == "__main__":
    main()
