"""The local examples run as scripts and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_simple_example():
    proc = run_example("simple.py")
    lines = proc.stdout.splitlines()
    expected = [
        "INFO (main thread)\tmultiply is a Task: True, named 'multiply': "
        "Multiply two numbers (slowly, in a real program).",
        "INFO (main thread)\tmultiply.work(3, 4) -> 12",
        "INFO (main thread)\tmultiply(3) -> 6 (calling the task calls the function)",
        "INFO (main thread)\tmultiply.callback(cb, error_cb, 5, b=6)",
        "INFO (task thread)\tcb got 30",
        "INFO (main thread)\tfail.callback(cb, error_cb, 'bad input')",
        "ERROR (task thread)\terror_cb got ValueError('bad input')",
        "INFO (main thread)\tfail.callback(cb, None, 'logged') "
        "-- the traceback goes to stderr via logging",
        "INFO (main thread)\tfail.callback(cb, False, 'silenced') -- nothing is reported",
        "INFO (main thread)\tchore.ignore() -- runs, result dropped",
        "INFO (main thread)\tchore ran: True",
        "INFO (main thread)\tfail.ignore('dropped') -- error dropped",
        "INFO (main thread)\tmultiply.submit(7, 6).result() -> 42",
        "ERROR (main thread)\tfail.submit(...).result() raised ValueError('via future')",
        "INFO (main thread)\tGreeter().work('world') -> hello, world",
        "INFO (task thread)\tcb got 'hello, thread'",
        "INFO (main thread)\tnull_cb(42) -> None",
        "INFO (main thread)\tdone",
    ]
    assert lines == expected
    # error_cb=None: the traceback reaches stderr through logging; False and ignore stay silent
    assert "Traceback" in proc.stderr
    assert "ValueError: logged" in proc.stderr
    assert "silenced" not in proc.stderr and "dropped" not in proc.stderr


def test_resync_example():
    proc = run_example("resync.py")
    lines = [
        line.removeprefix("INFO (resync)\t").removeprefix("ERROR (resync)\t")
        for line in proc.stdout.splitlines()
    ]
    assert lines == [
        "Starting worker(5, 6) and letting it run",
        "mediator.get() -> (5, 6)",
        "Starting worker(6, 7), which waits for a signal",
        "mediator.get(0.2) raised ResyncWaitTimeout: "
        "Could not acquire lock within the time allotted",
        "after the signal, mediator.get(10) -> (6, 7)",
        "set_error(instance): get() raised KeyError('some key')",
        "set_error(class): get() raised ZeroDivisionError()",
        "ready() after set_result: True",
        "set_result twice raised ResultAlreadySetError",
        "get() still gives 'first'; ready() now False",
        "Producer/consumer: three consumer threads share the mediator",
        "consumers took [0, 1, 2]",
        "Resyncer(error_maker).start().get() raised ValueError('Why *did* you call this!?')",
        "Resyncer(len, 'Python+TaskIt') -> 13 (again: 13)",
        "slow Resyncer: get(timeout=0.1) timed out; done() = False",
        "slow Resyncer after the gate opened -> True; done() = True",
        "done",
    ]
    assert proc.stdout.count("ERROR (resync)") == 6
    assert proc.stderr == ""
