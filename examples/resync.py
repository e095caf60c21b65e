#!/usr/bin/env python3
"""Every feature of taskit.resync, run as a script: ``python examples/resync.py``.

No sleeps: the "slow" worker waits for an Event, which is how the timeout is
shown without making the script slow.
"""

from __future__ import annotations

import sys
import threading

from taskit.log import ERROR, INFO, FileLogger
from taskit.resync import Mediator, ResultAlreadySetError, Resyncer, ResyncWaitTimeout
from taskit.simple import taskit


class ExampleLogger(FileLogger):
    def _time(self) -> str:  # no clock in the output, so it reads the same every run
        return "resync"


log = ExampleLogger(sys.stdout, flush=1)
mediator = Mediator()
go = threading.Event()


@taskit
def worker(*args: int) -> None:
    """Hands its arguments back through the mediator once ``go`` is set."""
    go.wait(10)
    mediator.set_result(args)


def error_maker() -> None:
    raise ValueError("Why *did* you call this!?")


def main() -> None:
    log(INFO, "Starting worker(5, 6) and letting it run")
    go.set()
    worker.ignore(5, 6)
    log(INFO, f"mediator.get() -> {mediator.get()}")

    go.clear()
    log(INFO, "Starting worker(6, 7), which waits for a signal")
    worker.ignore(6, 7)
    try:
        mediator.get(0.2)
    except ResyncWaitTimeout as e:
        log(ERROR, f"mediator.get(0.2) raised ResyncWaitTimeout: {e}")
    go.set()
    log(INFO, f"after the signal, mediator.get(10) -> {mediator.get(10)}")

    mediator.set_error(KeyError("some key"))
    try:
        mediator.get()
    except KeyError as e:
        log(ERROR, f"set_error(instance): get() raised {e!r}")
    mediator.set_error(ZeroDivisionError)
    try:
        mediator.get()
    except ZeroDivisionError as e:
        log(ERROR, f"set_error(class): get() raised {e!r}")

    mediator.set_result("first")
    log(INFO, f"ready() after set_result: {mediator.ready()}")
    try:
        mediator.set_result("second")
    except ResultAlreadySetError:
        log(ERROR, "set_result twice raised ResultAlreadySetError")
    log(INFO, f"get() still gives {mediator.get()!r}; ready() now {mediator.ready()}")

    log(INFO, "Producer/consumer: three consumer threads share the mediator")
    taken: list[int] = []
    took_one = threading.Semaphore(0)  # the slot holds one value: wait until it is taken

    def consumer() -> None:
        taken.append(mediator.get(10))
        took_one.release()

    consumers = [threading.Thread(target=consumer) for _ in range(3)]
    for t in consumers:
        t.start()
    for n in range(3):
        mediator.set_result(n)
        took_one.acquire(timeout=10)
    for t in consumers:
        t.join(10)
    log(INFO, f"consumers took {sorted(taken)}")

    resync = Resyncer(error_maker).start()
    try:
        resync.get()
    except ValueError as e:
        log(ERROR, f"Resyncer(error_maker).start().get() raised {e!r}")

    resync = Resyncer(len, "Python+TaskIt").start()
    log(INFO, f"Resyncer(len, 'Python+TaskIt') -> {resync.get()} (again: {resync.get()})")

    gate = threading.Event()
    slow = Resyncer(gate.wait, 10).start()
    try:
        slow.get(timeout=0.1)
    except ResyncWaitTimeout:
        log(ERROR, f"slow Resyncer: get(timeout=0.1) timed out; done() = {slow.done()}")
    gate.set()
    log(INFO, f"slow Resyncer after the gate opened -> {slow.get(10)}; done() = {slow.done()}")
    log(INFO, "done")


if __name__ == "__main__":
    main()
