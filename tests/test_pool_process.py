"""WorkerPool with real worker processes: errors, deaths, parent death, resizing."""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import CancelledError

import pytest

from taskit.errors import (
    PoolShutdownError,
    RemoteTaskError,
    RemoteTraceback,
    UnknownTargetError,
    UnpicklableError,
    WorkerInitError,
    WorkerLostError,
    WorkerStartError,
)
from taskit.pool import Job, SimpleJob, SuicideJob, WorkerPool, current_toolbox, start_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


# --- job functions (module level: they travel by pickle) -----------------------


def sub(a, b):
    return a - b


def pid():
    return os.getpid()


def boom(msg):
    raise ValueError(msg)


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from .args
        super().__init__(f"{a}-{b}")


def raise_unpicklable():
    raise Unpicklable(1, 2)


def return_unpicklable():
    return lambda: None


def exit_now(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def segfault():
    ctypes.string_at(0)


def sleep_then(path, seconds, value):
    """Tell the test we started (file), then work for a while."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return value


def wait_for_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return int(f.read())
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


def toolbox_pid():
    return current_toolbox(), os.getpid()


class Counter:
    def __init__(self):
        self.count = 0


def make_counter():
    return Counter()


class CountJob(Job):
    def run(self, toolbox):
        toolbox.count += 1
        return toolbox.count - 1


class Attrs:
    def __init__(self):
        self.seen = 0

    def echo(self, arguments):
        self.seen += 1
        return arguments, self.seen

    def whoami(self, arguments):
        return os.getpid()


def bad_init():
    raise OSError("no resource")


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(2, kind="process", name="taskit-ptest")
    yield p
    p.shutdown(wait=True, cancel_pending=True)


def alive(pid_):
    """True while ``pid_`` runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid_}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid_, 0)
        except ProcessLookupError:
            return False
        return True


def wait_dead(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


# --- results and errors ----------------------------------------------------------


def test_jobs_run_in_other_processes(pool):
    assert pool.submit(sub, 5, 2).result(30) == 3
    assert pool.submit(sub, a=5, b=2).result(30) == 3
    pids = set(pool.map(lambda_free_pid, range(20)))
    assert os.getpid() not in pids
    assert pids <= set(pool.worker_pids())
    assert pool.map(sub, [1, 2, 3], [4, 5, 6]) == [-3, -3, -3]


def lambda_free_pid(_):
    return os.getpid()


def test_remote_exception_keeps_its_type_and_carries_the_remote_traceback(pool):
    f = pool.submit(boom, "bad input")
    with pytest.raises(ValueError, match="bad input") as info:
        f.result(30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in boom" in str(cause) and "ValueError: bad input" in str(cause)
    assert info.value.remote_traceback == str(cause)


def test_exception_that_cannot_come_back_becomes_remotetaskerror(pool):
    with pytest.raises(RemoteTaskError) as info:
        pool.submit(raise_unpicklable).result(30)
    assert info.value.type.endswith("Unpicklable")
    assert "1-2" in str(info.value) and "raise_unpicklable" in info.value.remote_traceback


def test_unpicklable_function_or_result_is_a_clear_error_not_a_hang(pool):
    f = pool.submit(lambda: 1)
    assert f.done()
    with pytest.raises(UnpicklableError, match="module-level function"):
        f.result(0)
    with pytest.raises(UnpicklableError, match="result"):
        pool.submit(return_unpicklable).result(30)
    assert pool.submit(sub, 2, 1).result(30) == 1
    assert pool.join(30)


def test_join_never_hangs_after_failing_jobs(pool):
    futures = [pool.submit(boom, str(i)) for i in range(20)] + [pool.submit(sub, 1, 1)]
    assert pool.join(30) is True
    assert all(f.done() for f in futures)


def test_stats_count_completed_and_failed():
    with WorkerPool(1, kind="process") as p:
        p.map(sub, range(10), range(10))
        p.submit(boom, "x").exception(30)
        assert p.join(30)
        st = p.stats()
    assert st["completed"] == 10 and st["failed"] == 1
    assert st["workers"] == 1 and st["idle"] == 1 and st["queued"] == 0 and st["running"] == 0


# --- worker death ------------------------------------------------------------------


@pytest.mark.parametrize(
    "crash", [exit_now, kill_self, segfault], ids=["os._exit", "SIGKILL", "segfault"]
)
def test_a_dying_worker_fails_only_its_job_and_is_replaced(crash):
    with WorkerPool(2, kind="process") as p:
        before = set(p.worker_pids()) or set(p.map(lambda_free_pid, range(4)))
        args = (3,) if crash is exit_now else ()
        f = p.submit(crash, *args)
        with pytest.raises(WorkerLostError, match="only this job failed"):
            f.result(30)
        assert p.map(sub, range(20), range(20)) == [0] * 20
        assert p.size() == 2 and p.stats()["workers"] == 2
        assert set(p.worker_pids()) != before


def test_external_sigkill_mid_job(tmp_path):
    with WorkerPool(1, kind="process") as p:
        path = str(tmp_path / "started")
        f = p.submit(sleep_then, path, 60, "never")
        victim = wait_for_file(path)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="SIGKILL while running this job"):
            f.result(30)
        assert p.submit(sub, 9, 2).result(30) == 7
        assert victim not in p.worker_pids()


def test_jobs_a_dead_worker_had_not_started_run_elsewhere():
    with WorkerPool(1, kind="process") as p:
        p.map(sub, range(2000), range(2000))  # teach it jobs are tiny, so it batches
        futures = [p.submit(sub, i, 0) for i in range(50)]
        crash = p.submit(exit_now, 1)
        after = [p.submit(sub, i, 0) for i in range(50)]
        with pytest.raises(WorkerLostError):
            crash.result(30)
        assert [f.result(30) for f in futures + after] == list(range(50)) * 2


def test_jobs_behind_a_long_job_move_to_an_idle_worker(tmp_path):
    with WorkerPool(2, kind="process") as p:
        p.map(sub, range(4000), range(4000))  # tiny jobs: the pool now sends batches
        path = str(tmp_path / "started")
        slow = p.submit(sleep_then, path, 5, "slow")
        quick = [p.submit(sub, i, 0) for i in range(40)]
        t = time.monotonic()
        assert [f.result(30) for f in quick] == list(range(40))
        # none of them waited for the 5 s job, though some were sent behind it
        assert not slow.done() and time.monotonic() - t < 4
        os.kill(wait_for_file(path), signal.SIGKILL)  # end the slow job now
        with pytest.raises(WorkerLostError):
            slow.result(30)


# --- per-worker state ---------------------------------------------------------------


def test_toolbox_is_built_in_each_worker_process():
    with WorkerPool(2, kind="process", toolbox_factory=os.getpid) as p:
        for toolbox, worker_pid in p.map(lambda_free_toolbox, range(20)):
            assert toolbox == worker_pid != os.getpid()


def lambda_free_toolbox(_):
    return toolbox_pid()


def test_equipped_jobs_in_a_process_worker_count_in_order():
    with WorkerPool(1, kind="process", toolbox_factory=make_counter) as p:
        futures = [p.put(CountJob()) for _ in range(10)]
        assert [f.result(30) for f in futures] == list(range(10))


def test_failing_initializer_fails_jobs_with_workeriniterror():
    with WorkerPool(1, kind="process", initializer=bad_init) as p:
        with pytest.raises(WorkerInitError, match="no resource"):
            p.submit(sub, 1, 1).result(30)


def test_workers_dying_before_any_job_stop_being_replaced_and_fail_the_jobs():
    # The job reaches each worker before it dies: it must not restart them forever.
    with WorkerPool(2, kind="process", initializer=exit_now, initargs=(4,)) as p:
        futures = [p.submit(sub, 3, 1) for _ in range(3)]
        for f in futures:
            with pytest.raises(WorkerStartError, match="before running any job.*initializer"):
                f.result(60)
        with pytest.raises(WorkerStartError):
            p.submit(sub, 3, 1).result(60)  # later jobs too, at once


def test_unpicklable_initializer_is_refused_at_construction():
    with pytest.raises(UnpicklableError, match="module-level"):
        WorkerPool(1, kind="process", initializer=lambda: None)


def test_fork_start_method_is_refused():
    with pytest.raises(ValueError, match="multithreaded"):
        WorkerPool(1, kind="process", start_method="fork")


# --- sizing and shutdown -------------------------------------------------------------


def test_resize_under_load():
    with WorkerPool(1, kind="process") as p:
        futures = []
        for i in range(400):
            futures.append(p.submit(sub, i, 0))
            if i == 100:
                p.grow(2)
            elif i == 200:
                p.shrink(2)
            elif i == 300:
                p.resize(2)
        assert [f.result(30) for f in futures] == list(range(400))
        assert p.join(30)
        assert p.size() == 2 and p.stats()["workers"] == 2


def test_shrunk_process_finishes_its_current_job(tmp_path):
    with WorkerPool(2, kind="process") as p:
        path = str(tmp_path / "started")
        f = p.submit(sleep_then, path, 0.3, "finished")
        busy = wait_for_file(path)
        p.shrink(1)  # the idle worker goes first
        assert f.result(30) == "finished"
        assert p.worker_pids() == [busy]
        p.shrink(1)
        futures = [p.submit(sub, 1, 0) for _ in range(3)]
        assert p.join(0.2) is False and p.stats()["queued"] == 3
        p.grow(1)
        assert [x.result(30) for x in futures] == [1, 1, 1]


def test_shutdown_cancel_pending(tmp_path):
    p = WorkerPool(1, kind="process")
    path = str(tmp_path / "started")
    running = p.submit(sleep_then, path, 0.3, "done")
    wait_for_file(path)
    queued = [p.submit(sub, i, 0) for i in range(5)]
    pids = p.worker_pids()
    p.shutdown(wait=True, cancel_pending=True)
    assert running.result(0) == "done"
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(0)
    assert wait_dead(pids)
    with pytest.raises(PoolShutdownError):
        p.submit(sub, 1, 1)


def test_shutdown_drains_queued_jobs():
    p = WorkerPool(2, kind="process")
    futures = [p.submit(sub, i, 0) for i in range(100)]
    p.shutdown(wait=True)
    assert [f.result(0) for f in futures] == list(range(100))
    assert p.stats()["workers"] == 0


# --- what crosses the process boundary, by module path ----------------------------


def test_a_spawned_worker_finds_the_child_loop_and_every_pickled_piece_by_name():
    # spawn starts a fresh interpreter: the child loop (taskit._pool.child), the
    # classic jobs and start_workers' target runner all resolve by module path there.
    with WorkerPool(1, kind="process", start_method="spawn", name="spawned") as pool:
        assert pool.put(SimpleJob(None, sub, [7, 2])).result(60) == 5
        assert pool.submit(pid).result(60) != os.getpid()
        assert pool.put(SuicideJob()).result(60) is None  # TerminationNotice, in the child
    with start_workers(1, Attrs(), start_method="spawn") as jobs:
        assert jobs.put({"target": "echo", "arguments": 3}).result(60) == (3, 1)


# --- the multiprocess worker library's model ------------------------------------


def test_start_workers_runs_named_targets_and_false_stops_one_worker():
    jobs = start_workers(2, Attrs())
    try:
        assert jobs.put({"target": "echo", "arguments": {"k": "v"}}).result(30)[0] == {"k": "v"}
        # arguments may be False: only the object False itself is the stop signal
        assert jobs.put({"target": "echo", "arguments": False}).result(30)[0] is False
        with pytest.raises(TypeError, match="target"):
            jobs.put(0).result(0)  # 0 == False, but it is a malformed job, not a pill
        with pytest.raises(UnknownTargetError, match="nope"):
            jobs.put({"target": "nope", "arguments": 1}).result(30)
        with pytest.raises(UnknownTargetError):
            jobs.put({"target": "__init__", "arguments": 1}).result(30)
        assert jobs.workers() == 2
        jobs.put(False).result(30)
        assert jobs.workers() == 1
        pids = {jobs.put({"target": "whoami", "arguments": None}).result(30) for _ in range(5)}
        assert len(pids) == 1 and os.getpid() not in pids
    finally:
        jobs.close()
    assert jobs.workers() == 0


# --- parent death -------------------------------------------------------------------

PARENT = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests.test_pool_process import sleep_then
from taskit.pool import WorkerPool
pool = WorkerPool(2, kind="process")
if {busy!r}:
    pool.submit(sleep_then, {path!r}, 120, None)
    while not os.path.exists({path!r}):
        time.sleep(0.01)
print(" ".join(map(str, pool.worker_pids())), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-job"])
def test_workers_exit_when_the_parent_is_sigkilled(busy):
    with tempfile.TemporaryDirectory() as tmp:
        code = PARENT.format(root=ROOT, busy=busy, path=os.path.join(tmp, "started"))
        env = dict(os.environ, PYTHONPATH=ROOT)
        parent = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            line = parent.stdout.readline()
            pids = [int(x) for x in line.split()]
            assert len(pids) == 2 and all(alive(p) for p in pids)
        finally:
            parent.kill()
            parent.wait(30)
            parent.stdout.close()
        assert wait_dead(pids), f"orphaned workers still alive: {pids}"


def parent_death_signal():
    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    return value.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_workers_ask_the_kernel_for_sigkill_when_their_parent_dies(pool):
    assert set(pool.map(lambda_free_pdeathsig, range(4))) == {signal.SIGKILL}


def lambda_free_pdeathsig(_):
    return parent_death_signal()


def test_a_forgotten_process_pool_does_not_hang_exit():
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "from tests.test_pool_process import sub\n"
        "from taskit.pool import WorkerPool\n"
        "p = WorkerPool(2, kind='process')\n"
        "print(p.submit(sub, 5, 2).result(), ' '.join(map(str, p.worker_pids())))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result, *pids = out.stdout.split()
    assert result == "3"
    assert wait_dead([int(p) for p in pids])


def test_suicidejob_in_a_process_pool_shrinks_it():
    with WorkerPool(2, kind="process") as p:
        assert p.put(SuicideJob()).result(30) is None
        assert p.size() == 1
        assert p.submit(sub, 4, 1).result(30) == 3
        assert p.stats()["workers"] == 1


def test_jobs_sent_behind_a_suicidejob_are_kept_for_the_next_worker():
    with WorkerPool(1, kind="process") as p:
        p.map(sub, range(2000), range(2000))  # tiny jobs: the next ones travel in one batch
        stop = p.put(SuicideJob())
        after = [p.submit(sub, i, 0) for i in range(20)]
        assert stop.result(30) is None
        assert p.size() == 0
        assert p.join(0.2) is False and not any(f.done() for f in after)
        p.grow(1)
        assert [f.result(30) for f in after] == list(range(20))


def test_maxjobs_bounds_the_queue_of_a_process_pool(tmp_path):
    with WorkerPool(1, kind="process", maxjobs=2) as p:
        path = str(tmp_path / "started")
        first = p.submit(sleep_then, path, 0.5, "first")
        wait_for_file(path)  # it left the queue: two places are free
        queued = [p.submit(sub, 1, 0), p.submit(sub, 2, 0)]
        with pytest.raises(queue.Full):
            p.put(SuicideJob(), block=False)
        assert first.result(30) == "first"
        assert [f.result(30) for f in queued] == [1, 2]


def test_join_from_a_callback_raises_instead_of_deadlocking(pool, tmp_path):
    seen = []
    f = pool.submit(sleep_then, str(tmp_path / "started"), 0.3, "ok")

    def callback(_):
        try:
            pool.join(1)
        except RuntimeError as e:
            seen.append(str(e))

    f.add_done_callback(callback)  # the job takes 0.3 s: attached before it is done
    assert f.result(30) == "ok"
    assert pool.join(30)
    assert len(seen) == 1 and "deadlock" in seen[0]
