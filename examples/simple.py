#!/usr/bin/env python3
"""Every feature of taskit.simple, run as a script: ``python examples/simple.py``.

Each threaded call is waited for (by joining the thread it returns, or through
its Future) so the output comes out in a fixed order.
"""

from __future__ import annotations

import sys
import threading

from taskit.log import ERROR, INFO, FileLogger
from taskit.simple import Task, null_cb, taskit


class ExampleLogger(FileLogger):
    """A FileLogger that stamps each line with its thread instead of the time
    (overriding ``_time``), to show where each callback runs."""

    def _time(self) -> str:
        if threading.current_thread() is threading.main_thread():
            return "main thread"
        return "task thread"


log = ExampleLogger(sys.stdout, flush=1)


@taskit
def multiply(a: int, b: int = 2) -> int:
    """Multiply two numbers (slowly, in a real program)."""
    return a * b


@taskit
def fail(why: str) -> None:
    """Always raises ValueError."""
    raise ValueError(why)


class Greeter(Task):
    """A Task written as a subclass: override work()."""

    def work(self, name: str) -> str:
        return f"hello, {name}"


def cb(result: object) -> None:
    log(INFO, f"cb got {result!r}")


def error_cb(e: Exception) -> None:
    log(ERROR, f"error_cb got {e!r}")


def main() -> None:
    log(
        INFO,
        f"multiply is a Task: {isinstance(multiply, Task)}, "
        f"named {multiply.__name__!r}: {multiply.__doc__}",
    )
    log(INFO, f"multiply.work(3, 4) -> {multiply.work(3, 4)}")
    log(INFO, f"multiply(3) -> {multiply(3)} (calling the task calls the function)")

    log(INFO, "multiply.callback(cb, error_cb, 5, b=6)")
    multiply.callback(cb, error_cb, 5, b=6).join()

    log(INFO, "fail.callback(cb, error_cb, 'bad input')")
    fail.callback(cb, error_cb, "bad input").join()

    log(INFO, "fail.callback(cb, None, 'logged') -- the traceback goes to stderr via logging")
    fail.callback(cb, None, "logged").join()

    log(INFO, "fail.callback(cb, False, 'silenced') -- nothing is reported")
    fail.callback(cb, False, "silenced").join()

    done = threading.Event()

    @taskit
    def chore() -> None:
        done.set()

    log(INFO, "chore.ignore() -- runs, result dropped")
    chore.ignore()
    log(INFO, f"chore ran: {done.wait(10)}")
    fail.ignore("dropped").join()
    log(INFO, "fail.ignore('dropped') -- error dropped")

    future = multiply.submit(7, 6)
    log(INFO, f"multiply.submit(7, 6).result() -> {future.result(timeout=10)}")
    try:
        fail.submit("via future").result(timeout=10)
    except ValueError as e:
        log(ERROR, f"fail.submit(...).result() raised {e!r}")

    greeter = Greeter()
    log(INFO, f"Greeter().work('world') -> {greeter.work('world')}")
    greeter.callback(cb, error_cb, "thread").join()

    log(INFO, f"null_cb(42) -> {null_cb(42)}")
    log(INFO, "done")


if __name__ == "__main__":
    main()
