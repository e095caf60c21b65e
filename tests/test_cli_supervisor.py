"""taskit.supervisor: real child processes restarted, left alone, or stopped."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from taskit.supervisor import Supervisor

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def wait_until(predicate, timeout=20.0):
    """Poll an external process state (there is no event to wait on) within a bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists": look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


LONG_RUNNING = "import time; time.sleep(120)"  # bounded, and ended by the supervisor


def test_a_child_that_exits_cleanly_is_not_restarted_and_run_returns(tmp_path):
    log = tmp_path / "runs"
    code = f"open({str(log)!r}, 'a').write('x')"
    sup = Supervisor({"a": [sys.executable, "-c", code]}, first_backoff=0.01)
    assert sup.run() == 0
    assert log.read_text() == "x"


def test_a_child_that_dies_is_restarted_with_backoff(tmp_path):
    log = tmp_path / "runs"
    # exits 1 on its first two runs, then 0
    code = (
        f"p = {str(log)!r}; open(p, 'a').write('x'); "
        "import sys; sys.exit(1 if len(open(p).read()) < 3 else 0)"
    )
    sup = Supervisor({"a": [sys.executable, "-c", code]}, first_backoff=0.01, max_backoff=0.05)
    started = time.monotonic()
    assert sup.run() == 0
    assert log.read_text() == "xxx"
    assert time.monotonic() - started < 30


def test_killed_child_is_replaced_and_stop_ends_every_child():
    sup = Supervisor(
        {"a": [sys.executable, "-c", LONG_RUNNING], "b": [sys.executable, "-c", LONG_RUNNING]},
        first_backoff=0.01,
        grace=10,
    )
    result = []
    runner = threading.Thread(target=lambda: result.append(sup.run()), name="taskit-test-sup")
    runner.start()
    try:
        pids = wait_until(lambda: all(sup.pids.values()) and dict(sup.pids))
        os.kill(pids["a"], signal.SIGKILL)
        new = wait_until(lambda: sup.pids["a"] not in (None, pids["a"]) and sup.pids["a"])
        assert new != pids["a"] and alive(new)
        assert sup.pids["b"] == pids["b"]  # the other one was left alone
    finally:
        sup.stop()
        runner.join(30)
    assert not runner.is_alive() and result == [0]
    assert not alive(new) and not alive(pids["b"])


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    ready = tmp_path / "ready"
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(ready)!r}, 'w').close(); time.sleep(120)"
    )
    sup = Supervisor({"stubborn": [sys.executable, "-c", code]}, grace=0.3)
    runner = threading.Thread(target=sup.run, name="taskit-test-sup")
    runner.start()
    try:
        pid = wait_until(lambda: sup.pids["stubborn"])
        wait_until(ready.exists)  # its SIGTERM handler is in place
    finally:
        sup.stop()
        runner.join(30)
    assert not runner.is_alive()
    assert not alive(pid)


def test_a_supervisor_needs_commands():
    with pytest.raises(ValueError):
        Supervisor({})


def run_in_thread(sup):
    result = []
    runner = threading.Thread(target=lambda: result.append(sup.run()), name="taskit-test-sup")
    runner.start()
    return runner, result


def test_a_child_that_cannot_start_stops_every_child_and_run_returns_1(tmp_path, caplog):
    """A port taken at first start: a few tries, then an error and exit status 1
    (it used to be retried forever, backing off to 30 s)."""
    runs, b_pid = tmp_path / "runs", tmp_path / "b.pid"
    # 'a' dies young every time, once 'b' is surely up (so b is there to be stopped)
    dies = (
        "import os, sys, time; t = time.monotonic() + 30\n"
        f"while not os.path.exists({str(b_pid)!r}) and time.monotonic() < t: time.sleep(0.01)\n"
        f"open({str(runs)!r}, 'a').write('x'); sys.exit(1)"
    )
    lives = f"import os, time; open({str(b_pid)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    sup = Supervisor(
        {"a": [sys.executable, "-c", dies], "b": [sys.executable, "-c", lives]},
        first_backoff=0.01,
        grace=10,
    )
    runner, result = run_in_thread(sup)
    try:
        runner.join(60)
        assert not runner.is_alive(), "the supervisor kept retrying a child that cannot start"
    finally:
        sup.stop()
        runner.join(30)
    assert result == [1]
    assert runs.read_text() == "x" * 5  # start_tries=5 by default
    assert not alive(int(b_pid.read_text()))
    assert any("a cannot start" in r.getMessage() for r in caplog.records)


def test_a_child_that_was_up_once_is_restarted_without_a_limit(tmp_path):
    runs = tmp_path / "runs"
    # The first run stays up past min_uptime, every later one dies at once. A start
    # of Python on a busy machine plus the supervisor's 1 s poll stays well under
    # min_uptime: each later run surely counts as a young death.
    code = (
        f"import sys, time; p = {str(runs)!r}; open(p, 'a').write('x')\n"
        "if len(open(p).read()) == 1: time.sleep(4.5)\n"
        "sys.exit(1)"
    )
    sup = Supervisor(
        {"a": [sys.executable, "-c", code]}, min_uptime=4, first_backoff=0.01, max_backoff=0.02
    )
    runner, result = run_in_thread(sup)
    try:
        # 1 + start_tries (5) + 1 runs: one more young death than a never-up child gets
        wait_until(
            lambda: not runner.is_alive() or runs.exists() and len(runs.read_text()) >= 7,
            timeout=60,
        )
        assert runner.is_alive(), f"gave up after {len(runs.read_text())} runs, result {result}"
    finally:
        sup.stop()
        runner.join(30)
    assert result == [0]
