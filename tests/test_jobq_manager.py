"""taskit.jobq: JobManager (put/join/set_thread_num), probes and stat(),
timeouts, backpressure, limit_job_speed and bounded memory.

Timing checks use generous bounds (the CI machine is shared); everything that
can be synchronised is synchronised with events and queues.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
import tracemalloc

import pytest

from taskit import jobq
from taskit.errors import JobWorkerError, JobWorkerNotFound, TaskItError

WAIT = 10  # seconds: upper bound for anything that should happen "soon"


# events a failing test might leave unset: set at teardown so no thread stays blocked
_UNBLOCK: list[threading.Event] = []


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    for event in _UNBLOCK:
        event.set()
    _UNBLOCK.clear()
    deadline = time.monotonic() + WAIT
    for t in threading.enumerate():
        if t.name.startswith("taskit-jobq-"):
            t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threading.enumerate() if t.name.startswith("taskit-jobq-")]
    assert alive == []


class Gate:
    """A stage function that reports each element it starts and holds it
    until the test lets one through (``release()``) or all (``open()``)."""

    def __init__(self) -> None:
        self.entered: queue.Queue = queue.Queue()
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()
        _UNBLOCK.append(self.opened)
        self.threads: dict = {}

    def __call__(self, x):
        self.threads[x] = threading.get_ident()
        self.entered.put(x)
        deadline = time.monotonic() + WAIT
        while not self.opened.is_set() and time.monotonic() < deadline:
            if self.permits.acquire(timeout=0.05):
                break
        return x

    def wait_entered(self, n: int = 1) -> list:
        return [self.entered.get(timeout=WAIT) for _ in range(n)]

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def open(self) -> None:
        self.opened.set()


def _pass(x):
    return x


def run_in_thread(*args, **kw) -> threading.Thread:
    t = threading.Thread(target=jobq.run, args=args, kwargs=kw, name="test-run")
    t.start()
    return t


# --- probe / stat: jobq's TestProbe, synchronised ----------------------------


def _gated_probe(n_items, n_worker, keep_order):
    gate = Gate()
    gate.__name__ = "_sleep_1"
    probe: dict = {}
    runner = run_in_thread(
        range(n_items), [(gate, n_worker), _pass], probe=probe, keep_order=keep_order
    )
    return gate, probe, runner


def test_probe_single_thread():
    gate, probe, runner = _gated_probe(3, 1, False)
    gate.wait_entered()
    st = jobq.stat(probe)
    assert st["doing"] == 1  # working on the 1st
    assert 0 <= st["workers"][0]["input"]["size"] <= st["workers"][0]["input"]["capa"]
    assert st["workers"][0]["input"]["capa"] > 0
    gate.release()
    gate.wait_entered()
    st = jobq.stat(probe)["workers"][0]
    assert st["in"] - st["out"] == 1  # working on the 2nd
    gate.release(2)
    runner.join(WAIT)
    assert not runner.is_alive()
    st = jobq.stat(probe)
    assert st["doing"] == 0
    assert st["in"] == st["out"] == 6  # 3 elements x 2 stages
    assert len(st["workers"]) == 2
    w0 = st["workers"][0]
    assert w0["name"].endswith(":_sleep_1")
    assert w0["input"] == {"size": 0, "capa": jobq.DEFAULT_QUEUE_SIZE}
    assert w0["nr_worker"] == 1


@pytest.mark.parametrize("keep_order", [False, True])
def test_probe_3_threads(keep_order):
    gate, probe, runner = _gated_probe(10, 3, keep_order)
    gate.wait_entered(3)
    st = jobq.stat(probe)
    assert st["doing"] == 3
    assert st["workers"][0]["nr_worker"] == 3
    assert ("coordinator" in st["workers"][0]) is keep_order
    gate.release(3)
    gate.wait_entered(3)
    st0 = jobq.stat(probe)["workers"][0]
    assert st0["in"] - st0["out"] == 3
    gate.open()
    runner.join(WAIT)
    assert not runner.is_alive()
    st = jobq.stat(probe)
    assert st["doing"] == 0 and st["in"] == st["out"] == 20
    assert len(st["workers"]) == 2


def test_stat():
    jm = jobq.JobManager([_pass])
    for i in range(3):
        jm.put(i)
    jm.join()
    st = jm.stat()
    # taskit counts user-stage calls; jobq also counted its hidden terminal stage
    assert st["in"] == st["out"] == 3 and st["doing"] == 0 and st["errors"] == 0


def test_stat_names_builtins_partials_and_objects():
    import functools

    rst: list = []

    class Callable:
        def __call__(self, x):
            return x

    jm = jobq.JobManager([rst.append, functools.partial(max, 0), Callable()])
    names = [w["name"] for w in jm.stat()["workers"]]
    jm.join()
    assert names[0] == "builtin:append"
    assert names[1] == "functools.partial(builtins:max)"
    assert names[2].endswith(":Callable")


def test_stat_on_an_unused_probe_raises():
    with pytest.raises(ValueError, match="probe"):
        jobq.stat({})


# --- JobManager -------------------------------------------------------------


def test_manager():
    """jobq's test_manager: three 0.1 s jobs on one thread take about 0.3 s."""

    def _sleep(x):
        time.sleep(0.1)  # simulated work
        return x

    rst = []
    t0 = time.monotonic()
    jm = jobq.JobManager([_sleep, rst.append])
    for i in range(3):
        jm.put(i)
    jm.join()
    assert rst == [0, 1, 2]
    assert 0.29 <= time.monotonic() - t0 < 3


def test_manager_as_context_manager():
    rst = []
    with jobq.JobManager([(lambda x: x * 2, 2), rst.append], keep_order=True) as jm:
        for i in range(50):
            jm.put(i)
    assert rst == [2 * i for i in range(50)]


def test_put_after_join_raises():
    jm = jobq.JobManager([_pass])
    jm.join()
    jm.join()  # again: harmless
    with pytest.raises(JobWorkerError, match="no more input"):
        jm.put(1)
    assert issubclass(JobWorkerError, TaskItError)


@pytest.mark.parametrize(
    "timeout, min_elapsed, max_elapsed",
    [(0.2, 0.19, 3), (0, 0.0, 1)],  # jobq treated timeout=0 as 'no timeout'
    ids=["deadline", "zero-is-immediate"],
)
def test_join_timeout_returns_at_deadline(timeout, min_elapsed, max_elapsed):
    gate = Gate()
    jm = jobq.JobManager([gate])
    for i in range(3):
        jm.put(i)
    gate.wait_entered()
    t0 = time.monotonic()
    jm.join(timeout=timeout)
    elapsed = time.monotonic() - t0
    assert min_elapsed <= elapsed < max_elapsed
    with pytest.raises(JobWorkerError):
        jm.put(9)
    gate.open()  # the in-flight element finishes, nothing else starts
    for t in threading.enumerate():
        if t.name.startswith("taskit-jobq-"):
            t.join(WAIT)
    assert list(gate.threads) == [0]


def test_put_blocks_when_queue_full_backpressure():
    gate = Gate()
    jm = jobq.JobManager([gate], queue_size=2)
    jm.put(0)
    gate.wait_entered()  # the worker holds 0; the queue is empty
    jm.put(1)
    jm.put(2)  # the queue is now full
    done = threading.Event()

    def third():
        jm.put(3)
        done.set()

    t = threading.Thread(target=third, name="test-put")
    t.start()
    assert not done.wait(0.3)  # blocked by backpressure
    gate.release()
    assert done.wait(WAIT)
    gate.open()
    jm.join()
    t.join(WAIT)
    assert sorted(gate.threads) == [0, 1, 2, 3]


def test_run_reads_input_lazily():
    gate = Gate()
    produced = itertools.count()
    too_far = threading.Event()
    last = [0]

    def source():
        for i in range(10_000):
            last[0] = next(produced)
            if i > 4 + 2:  # queue_size 4, one element in the worker, one in hand
                too_far.set()
            yield i

    runner = run_in_thread(source(), [gate], queue_size=4)
    gate.wait_entered()
    assert not too_far.wait(0.3)
    gate.open()
    runner.join(WAIT)
    assert not runner.is_alive()
    assert last[0] == 9_999


# --- set_thread_num ----------------------------------------------------------


def test_set_thread_num_validation():
    rst: list = []
    jm = jobq.JobManager([_pass, rst.append])
    for bad in (0, -1):
        with pytest.raises(ValueError):
            jm.set_thread_num(_pass, bad)
    for bad in (1.1, "2", None, True):
        with pytest.raises(TypeError):
            jm.set_thread_num(_pass, bad)
    with pytest.raises(JobWorkerNotFound, match="not a stage"):
        jm.set_thread_num(lambda x: x, 2)
    assert issubclass(JobWorkerNotFound, JobWorkerError)
    jm.join()
    jm.set_thread_num(lambda x: x, 2)  # after join: silently nothing
    jm.set_thread_num(_pass, 5)
    assert jm.stat()["workers"][0]["nr_worker"] == 1


@pytest.mark.parametrize("keep_order", [False, True])
def test_set_thread_num_under_load(keep_order):
    rst: list = []
    jm = jobq.JobManager([_pass, rst.append], keep_order=keep_order)
    n = 5000 if keep_order else 10240
    for i in range(n):
        jm.put(i)
        if i % 91 != 0:
            jm.set_thread_num(_pass, i % 3 + 1)
    jm.join()
    if keep_order:
        assert rst == list(range(n))
    else:
        assert sorted(rst) == list(range(n))  # nothing lost or duplicated


def test_set_thread_num_concurrent_resizers_keep_order():
    rst: list = []
    jm = jobq.JobManager([_pass, rst.append], keep_order=True)
    stop = threading.Event()

    def resizer(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            jm.set_thread_num(_pass, rnd.randint(1, 4))
            stop.wait(0.005)

    resizers = [threading.Thread(target=resizer, args=(s,), name=f"test-rs{s}") for s in range(3)]
    for t in resizers:
        t.start()
    for i in range(5000):
        jm.put(i)
    jm.join()
    stop.set()
    for t in resizers:
        t.join(WAIT)
    assert rst == list(range(5000))


def test_set_thread_num_with_object_method():
    class X:
        def meth(self, x):
            return x

    x = X()
    jm = jobq.JobManager([x.meth])
    assert jm.stat()["workers"][0]["nr_worker"] == 1
    jm.set_thread_num(x.meth, 2)  # a fresh bound method: matched by equality
    assert jm.stat()["workers"][0]["nr_worker"] == 2
    names = [t.name for t in threading.enumerate() if t.name.startswith("taskit-jobq-0-meth")]
    assert len(names) == 2  # started before set_thread_num returned
    jm.join()


def test_shrink_lets_retired_threads_finish_but_take_no_more():
    """jobq's retired threads each took one more element."""
    gate = Gate()
    jm = jobq.JobManager([(gate, 3)])
    for i in range(3):
        jm.put(i)
    gate.wait_entered(3)  # three threads busy
    jm.set_thread_num(gate, 1)
    assert jm.stat()["workers"][0]["nr_worker"] == 1
    for i in range(3, 9):
        jm.put(i)
    gate.open()
    jm.join()
    late = {gate.threads[i] for i in range(3, 9)}
    assert len(late) == 1  # only the remaining thread took new elements


def test_grow_adds_threads_immediately():
    gate = Gate()
    jm = jobq.JobManager([gate])
    for i in range(4):
        jm.put(i)
    gate.wait_entered()
    jm.set_thread_num(gate, 4)
    assert sorted(gate.wait_entered(3)) == [1, 2, 3]  # 4 elements in flight at once
    gate.open()
    jm.join()


# --- run(timeout=...): jobq's TestTimeout, synchronised ------------------------


def _timeout_pipeline(block_from):
    got, rst = [], []
    release = threading.Event()
    _UNBLOCK.append(release)

    def slow(x):
        got.append(x)
        if x >= block_from:
            release.wait(WAIT)
        return x

    return got, rst, release, slow


def _join_jobq_threads():
    for t in threading.enumerate():
        if t.name.startswith("taskit-jobq-"):
            t.join(WAIT)


@pytest.mark.parametrize(
    "block_from, timeout, got_after, rst_after",
    [
        # the busy thread finished 0 and took nothing else; downstream had already quit
        (0, 0.2, [0], []),
        (1, 0.5, [0, 1], [0]),
    ],
    ids=["before-first-result", "after-first-result"],
)
def test_timeout_stops_the_pipeline(block_from, timeout, got_after, rst_after):
    got, rst, release, slow = _timeout_pipeline(block_from=block_from)
    t0 = time.monotonic()
    jobq.run(range(10), [slow, rst.append], timeout=timeout)
    assert timeout - 0.01 <= time.monotonic() - t0 < 3
    release.set()
    _join_jobq_threads()
    assert got == got_after
    assert rst == rst_after


def test_timeout_zero_returns_at_once():
    got, rst, release, slow = _timeout_pipeline(block_from=0)
    t0 = time.monotonic()
    jobq.run(range(10), [slow, rst.append], timeout=0)
    assert time.monotonic() - t0 < 1
    release.set()
    _join_jobq_threads()
    assert rst == []


def test_timeout_covers_an_endless_input():
    """jobq's deadline only started after the whole input was fed."""
    t0 = time.monotonic()
    jobq.run(itertools.count(), [lambda x: x + 1], timeout=0.3)
    assert 0.29 <= time.monotonic() - t0 < 5


def test_default_timeout_is_not_too_large():
    done = []

    def work(x):
        time.sleep(0.02)  # simulated work
        done.append(x)

    t0 = time.monotonic()
    jobq.run(range(1), [work])
    assert done == [0]  # the element ran to its end (no default deadline cut it)
    assert time.monotonic() - t0 < 10  # and run() returned once it was done


# --- limit_job_speed -------------------------------------------------------------


def _empty(x):
    return jobq.EmptyRst


def test_limit_job_speed():
    t0 = time.monotonic()
    jobq.run((i for i in range(60)), [(jobq.limit_job_speed(100, 1), 1), (_empty, 10)])
    assert 0.55 <= time.monotonic() - t0 < 5


def test_limit_job_speed_is_shared_by_threads():
    limiter = jobq.limit_job_speed(100)
    t0 = time.monotonic()
    jobq.run(range(60), [(limiter, 4), _empty])
    assert 0.55 <= time.monotonic() - t0 < 5


def test_limit_job_speed_callable_and_step():
    speed = [200.0]
    t0 = time.monotonic()
    jobq.run(range(40), [jobq.limit_job_speed(lambda: speed[0])])
    assert 0.18 <= time.monotonic() - t0 < 5
    t0 = time.monotonic()
    jobq.run(range(30), [jobq.limit_job_speed(100, job_step=2)])
    assert 0.55 <= time.monotonic() - t0 < 5


def test_limit_job_speed_passes_values_through():
    rst = []
    jobq.run([None, 0, "a"], [jobq.limit_job_speed(1000), rst.append])
    assert rst == [None, 0, "a"]


def test_limit_job_speed_bad_values(caplog):
    for bad in (0, -5):
        with pytest.raises(ValueError, match="> 0"):
            jobq.limit_job_speed(bad)
    with pytest.raises(TypeError):
        jobq.limit_job_speed("fast")
    with pytest.raises(ValueError):
        jobq.limit_job_speed(10, job_step=0)
    rst = []
    with caplog.at_level(logging.WARNING, logger="taskit.jobq"):
        jobq.run([1, 2], [jobq.limit_job_speed(lambda: 0), rst.append])
    assert rst == [1, 2]  # a bad dynamic speed does not stop the flow
    assert "bad max_job_speed" in caplog.text


# --- bounded memory ---------------------------------------------------------------


@pytest.mark.parametrize("keep_order, n", [(False, 100_000), (True, 40_000)])
def test_long_run_memory_is_bounded(keep_order, n):
    """Elements are ~250-byte strings made on the fly: holding the input, or
    queues that grow with it, would take n * 250 bytes (25 MB for 100,000)."""
    count = [0]

    def source():
        for i in range(n):
            yield f"{i:0250d}"

    def tally(s):
        count[0] += 1

    tracemalloc.start()
    try:
        jobq.run(source(), [str.upper, (str.lower, 2), tally], keep_order=keep_order)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count[0] == n
    print(f"n={n} keep_order={keep_order}: tracemalloc peak {peak} bytes")
    assert peak < 4_000_000, f"peak {peak} bytes"
    assert peak < n * 250 / 3


def test_context_manager_stops_at_once_on_error():
    gate = Gate()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="caller failed"):
        with jobq.JobManager([gate]) as jm:
            for i in range(5):
                jm.put(i)
            gate.wait_entered()
            raise RuntimeError("caller failed")
    assert time.monotonic() - t0 < WAIT / 2
    with pytest.raises(JobWorkerError):
        jm.put(9)
    gate.open()


def test_stage_raising_base_exception_is_contained(caplog):
    def picky(x):
        if x == 2:
            raise SystemExit("not in a worker thread")
        return x

    rst = []
    with caplog.at_level(logging.ERROR, logger="taskit.jobq"):
        jobq.run(range(5), [picky, rst.append])
    assert rst == [0, 1, 3, 4]
    assert "SystemExit" in caplog.text


def test_abandoned_pipeline_does_not_block_interpreter_exit():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import threading\n"
        "from taskit import jobq\n"
        "never = threading.Event()\n"
        "jm = jobq.JobManager([lambda x: never.wait(), print])\n"
        "jm.put(1)\n"
        "print('left without join')\n"
    )
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "left without join"
