"""WorkerPool with thread workers, and the classic workerpool interfaces."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest

from taskit.errors import PoolShutdownError, WorkerInitError
from taskit.pool import (
    EquippedWorker,
    Job,
    SimpleJob,
    SuicideJob,
    TerminationNotice,
    WorkerPool,
    current_toolbox,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sub(a, b):
    return a - b


def double(x):
    return x * 2


def add(*args):
    return sum(args)


@pytest.fixture
def pool():
    p = WorkerPool(2, name="taskit-test-pool")
    yield p
    p.shutdown(wait=True, cancel_pending=True)


class Gate:
    """Jobs that block until released, and report when they have started."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def job(self, value=None):
        self.started.release()
        assert self.release.wait(30), "gate never opened"
        return value

    def wait_started(self, n=1):
        for _ in range(n):
            assert self.started.acquire(timeout=30), "job did not start"


# --- submitting and results -----------------------------------------------------


def test_submit_positional_and_keyword(pool):
    assert pool.submit(sub, 5, 2).result(10) == 3
    assert pool.submit(sub, a=5, b=2).result(10) == 3
    assert pool.submit(add, 1, 2).result(10) == 3


def test_map_returns_results_in_input_order(pool):
    assert pool.map(double, [1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
    assert pool.map(add, [1, 2, 3], [4, 5, 6]) == [5, 7, 9]
    assert pool.map(add, [1, 2, 3], [10]) == [11]  # shortest iterable wins
    assert pool.map(double, []) == []


def test_map_unordered_gives_every_result(pool):
    assert sorted(pool.map(double, range(100), ordered=False)) == [2 * i for i in range(100)]


def test_map_raises_the_first_error_and_cancels_the_rest():
    gate = Gate()

    def f(x):
        if x == 0:
            raise ValueError("zero")
        return gate.job(x)

    with WorkerPool(1) as p:
        with pytest.raises(ValueError, match="zero"):
            p.map(f, range(5))
        gate.release.set()
        assert p.join(10)
        # the worker may have taken call 1 already; calls 2..4 were cancelled, not run
        assert p.stats()["completed"] <= 1


def test_map_timeout_raises_timeouterror(pool):
    gate = Gate()
    with pytest.raises(TimeoutError):
        pool.map(gate.job, range(4), timeout=0.05)
    gate.release.set()
    assert pool.join(10)


def test_a_raising_job_reaches_its_future_and_the_worker_survives():
    with WorkerPool(1) as p:
        f = p.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            f.result(10)
        assert p.submit(sub, 3, 1).result(10) == 2
        st = p.stats()
        assert st["failed"] == 1 and st["completed"] == 1 and st["workers"] == 1


def test_join_waits_for_every_job_even_failed_ones():
    # workerpool's test_wait, with failing jobs mixed in (they used to hang join)
    results: queue.Queue = queue.Queue()

    def maybe_fail(i):
        if i % 3 == 0:
            raise RuntimeError(i)
        return i

    with WorkerPool(5) as p:
        for i in range(100):
            p.put(SimpleJob(results, maybe_fail, [i]))
        assert p.join(30) is True
        assert results.qsize() == 66
        assert p.stats()["failed"] == 34


def test_join_timeout_returns_false_while_busy(pool):
    gate = Gate()
    pool.submit(gate.job)
    gate.wait_started()
    assert pool.join(0) is False
    t = time.monotonic()
    assert pool.join(0.05) is False
    assert time.monotonic() - t < 5
    gate.release.set()
    assert pool.join(10) is True


def test_submit_from_many_threads():
    with WorkerPool(3) as p:
        futures = []
        lock = threading.Lock()

        def client(k):
            mine = [p.submit(sub, i, k) for i in range(200)]
            with lock:
                futures.extend(mine)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert p.join(30)
        assert len(futures) == 800 and all(f.done() for f in futures)
        assert p.stats()["completed"] == 800


# --- classic job interface ------------------------------------------------------


def test_simplejob_argument_kinds():
    q: queue.Queue = queue.Queue()
    with WorkerPool(1) as p:
        p.put(SimpleJob(q, sub, [5, 2]))
        p.put(SimpleJob(q, sub, (7, 2)))
        f = p.put(SimpleJob(q, sub, {"a": 9, "b": 2}))
        assert f.result(10) == 7
    assert [q.get_nowait() for _ in range(3)] == [3, 5, 7]
    with pytest.raises(TypeError, match="list/tuple"):
        SimpleJob(q, sub, 5)
    with pytest.raises(TypeError, match="callable"):
        SimpleJob(q, 5, [])


def test_job_return_hook_can_be_overridden():
    seen = []

    class Collect(SimpleJob):
        def _return(self, r):
            seen.append(r)

    with WorkerPool(1) as p:
        p.put(Collect(None, double, [21]))
        assert p.join(10)
    assert seen == [42]


def test_put_rejects_non_jobs(pool):
    with pytest.raises(TypeError, match="Job"):
        pool.put(42)


class Counter:
    def __init__(self):
        self.count = 0
        self.thread = threading.current_thread().name


class CountJob(Job):
    def __init__(self, results):
        self.results = results

    def run(self, toolbox):
        self.results.put(toolbox.count)
        toolbox.count += 1


def test_equipped_toolbox_is_per_worker_and_kept_across_jobs():
    # workerpool's test_equipped: one worker, 10 jobs -> 0..9 in order
    results: queue.Queue = queue.Queue()
    with WorkerPool(1, toolbox_factory=Counter) as p:
        for _ in range(10):
            p.put(CountJob(results))
        assert p.join(10)
    assert [results.get_nowait() for _ in range(10)] == list(range(10))


def test_toolbox_is_created_in_the_worker_thread():
    with WorkerPool(2, toolbox_factory=Counter, name="tbx") as p:
        names = set(
            p.map(lambda _: (current_toolbox().thread, threading.current_thread().name), range(50))
        )
    for creator, runner in names:
        assert creator == runner and creator.startswith("tbx-")


def test_equippedworker_via_worker_factory_and_simplejob_with_toolbox():
    q: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    with WorkerPool(1, worker_factory=lambda jobs: EquippedWorker(jobs, Counter)) as p:
        p.put(CountJob(results))
        p.put(SimpleJob(q, sub, [3, 1]))  # used to raise TypeError on an EquippedWorker
        p.put(CountJob(results))
        assert p.join(10)
    assert q.get_nowait() == 2
    assert [results.get_nowait(), results.get_nowait()] == [0, 1]


def test_current_toolbox_outside_a_worker_raises():
    with pytest.raises(LookupError):
        current_toolbox()


def test_failing_toolbox_factory_fails_jobs_instead_of_hanging():
    def broken():
        raise OSError("no database")

    with WorkerPool(1, toolbox_factory=broken) as p:
        f = p.submit(sub, 1, 1)
        with pytest.raises(WorkerInitError) as info:
            f.result(10)
        assert isinstance(info.value.__cause__, OSError)
        assert p.join(10)


def test_initializer_runs_once_per_worker_in_the_worker():
    seen = []
    with WorkerPool(
        3,
        initializer=lambda tag: seen.append((tag, threading.current_thread().name)),
        initargs=("init",),
        name="ini",
    ) as p:
        p.map(double, range(30))
    assert len(seen) == 3 and all(tag == "init" and name.startswith("ini-") for tag, name in seen)


def test_suicidejob_and_terminationnotice_stop_one_worker_each():
    class Quit(Job):
        def run(self):
            raise TerminationNotice()

    with WorkerPool(3) as p:
        assert p.put(SuicideJob()).result(10) is None
        assert p.put(Quit()).result(10) is None
        assert p.join(10)
        assert p.size() == 1
        assert p.submit(sub, 2, 1).result(10) == 1
        assert p.stats()["workers"] == 1


# --- sizing ----------------------------------------------------------------------


def test_grow_shrink_size():
    with WorkerPool(1) as p:
        assert p.size() == 1
        p.grow()
        assert p.size() == 2
        p.shrink()
        p.shrink()
        assert p.size() == 0
        with pytest.raises(IndexError, match="empty"):
            p.shrink()
        p.resize(4)
        assert p.size() == 4
        with pytest.raises(IndexError):
            p.shrink(5)
        with pytest.raises(ValueError):
            p.grow(-1)


def test_a_pool_of_size_zero_runs_nothing_until_it_grows():
    # workerpool's test_changesize, then grow again
    with WorkerPool(5) as p:
        for _ in range(5):
            p.grow()
        assert p.size() == 10
        for _ in range(10):
            p.shrink()
        assert p.size() == 0
        assert p.join(10)
        futures = [p.submit(double, i) for i in range(5)]
        assert p.join(0.1) is False
        assert not any(f.done() for f in futures)
        assert p.stats()["queued"] == 5
        p.grow(1)
        assert [f.result(10) for f in futures] == [0, 2, 4, 6, 8]


def test_shrunk_worker_finishes_its_current_job_and_takes_no_other():
    gate = Gate()
    with WorkerPool(1) as p:
        running = p.submit(gate.job, "current")
        gate.wait_started()
        queued = p.submit(double, 4)
        p.shrink()
        gate.release.set()
        assert running.result(10) == "current"
        assert p.join(0.2) is False  # the retired worker did not take the queued job
        assert not queued.done()
        p.grow()
        assert queued.result(10) == 8


def test_no_job_waits_while_a_worker_is_idle():
    gate = Gate()
    with WorkerPool(2) as p:
        blocked = p.submit(gate.job)
        gate.wait_started()
        assert p.submit(double, 5).result(10) == 10  # the idle worker took it
        assert not blocked.done()
        st = p.stats()
        assert st["running"] == 1 and st["idle"] == 1
        gate.release.set()


def test_resize_under_load_loses_and_duplicates_nothing():
    seen = []
    lock = threading.Lock()
    concurrent = [0, 0]  # now, max

    def job(i):
        with lock:
            concurrent[0] += 1
            concurrent[1] = max(concurrent[1], concurrent[0])
        seen.append(i)
        with lock:
            concurrent[0] -= 1
        return i

    rnd = random.Random(7)
    with WorkerPool(2) as p:
        futures = []
        for i in range(3000):
            futures.append(p.submit(job, i))
            if i % 97 == 0:
                p.resize(rnd.randint(0, 4))
        p.resize(3)
        assert [f.result(30) for f in futures] == list(range(3000))
        assert p.join(30)
        assert p.stats()["workers"] == 3
    assert sorted(seen) == list(range(3000))


# --- bounded queue ---------------------------------------------------------------


def test_maxjobs_bounds_the_queue():
    gate = Gate()
    with WorkerPool(1, maxjobs=1) as p:
        p.submit(gate.job)
        gate.wait_started()
        p.submit(double, 1)  # fills the queue
        with pytest.raises(queue.Full):
            p.put(SimpleJob(None, double, [2]), block=False)
        with pytest.raises(queue.Full):
            p.put(SimpleJob(None, double, [2]), timeout=0.05)
        unblocked = threading.Event()

        def blocked_submit():
            p.submit(double, 3)
            unblocked.set()

        t = threading.Thread(target=blocked_submit)
        t.start()
        assert not unblocked.wait(0.1)  # still blocked: the queue is full
        gate.release.set()
        assert unblocked.wait(10)
        t.join(10)
        assert p.join(10)
        assert p.stats()["completed"] == 3


# --- shutdown --------------------------------------------------------------------


def test_shutdown_drains_queued_jobs_by_default():
    with WorkerPool(1) as p:
        futures = [p.submit(double, i) for i in range(50)]
        p.shutdown(wait=True)
        assert [f.result(0) for f in futures] == [2 * i for i in range(50)]
        assert p.size() == 0 and p.stats()["workers"] == 0
        with pytest.raises(PoolShutdownError):
            p.submit(double, 1)
        with pytest.raises(PoolShutdownError):
            p.grow()
        p.shutdown()  # twice is fine


def test_shutdown_cancel_pending_cancels_queued_jobs_and_finishes_running_ones():
    gate = Gate()
    p = WorkerPool(1)
    running = p.submit(gate.job, "done")
    gate.wait_started()
    queued = [p.submit(double, i) for i in range(5)]
    threading.Timer(0.05, gate.release.set).start()
    p.shutdown(wait=True, cancel_pending=True)
    assert running.result(0) == "done"
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(0)
    assert p.join(0) is True
    assert p.stats()["workers"] == 0


def test_shutdown_of_an_empty_pool_cancels_what_can_never_run():
    p = WorkerPool(0)
    f = p.submit(double, 1)
    p.shutdown(wait=True)
    assert f.cancelled()
    assert p.join(0)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_shutdown_after_shrinking_to_zero_cancels_the_queue(kind):
    gate = Gate() if kind == "thread" else None
    p = WorkerPool(1, kind=kind)
    if gate:
        running = p.submit(gate.job, "ran")
        gate.wait_started()
    p.shrink(1)
    queued = [p.submit(double, i) for i in range(3)]
    if gate:
        gate.release.set()
        assert running.result(10) == "ran"
    p.shutdown(wait=True)
    assert all(f.cancelled() for f in queued)
    assert p.join(10) is True


def test_context_manager_and_stats_keys():
    with WorkerPool(2) as p:
        p.map(double, range(10))
        st = p.stats()
    assert {"workers", "idle", "queued", "running", "completed", "failed"} <= set(st)
    assert st["completed"] == 10
    assert p.stats()["workers"] == 0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        WorkerPool(1, kind="fiber")
    with pytest.raises(ValueError, match="size"):
        WorkerPool(-1)
    with pytest.raises(ValueError, match="maxjobs"):
        WorkerPool(1, maxjobs=-2)
    with pytest.raises(TypeError, match="callable"):
        WorkerPool(1, toolbox_factory=3)


def test_a_forgotten_pool_does_not_hang_interpreter_exit():
    code = (
        "from taskit.pool import WorkerPool\n"
        "p = WorkerPool(3)\n"
        "print(p.submit(pow, 2, 10).result())\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1024"
