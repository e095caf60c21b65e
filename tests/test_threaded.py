"""taskit.threaded: the TaskIt 4.0 compatibility names from _thread."""

from __future__ import annotations

import _thread
import queue
import threading

import pytest

from taskit.threaded import allocate_lock, error, threaded

WAIT = 10


def test_threaded_runs_func_with_args_and_kw_on_a_started_daemon_thread():
    out: queue.Queue = queue.Queue()
    t = threaded(lambda a, b, c=0: out.put((a, b, c, threading.current_thread())), (1, 2), {"c": 3})
    assert isinstance(t, threading.Thread)
    a, b, c, thread = out.get(timeout=WAIT)
    assert (a, b, c) == (1, 2, 3)
    assert thread is t and t is not threading.current_thread()
    assert t.daemon and t.name.startswith("taskit-threaded-")
    t.join(WAIT)
    assert not t.is_alive()


def test_threaded_kw_is_optional_and_lists_are_accepted():
    out: queue.Queue = queue.Queue()
    threaded(out.put, ["x"]).join(WAIT)
    threaded(out.put, ("y",), None).join(WAIT)
    assert [out.get_nowait(), out.get_nowait()] == ["x", "y"]


def test_threaded_rejects_bad_args_and_kw():
    with pytest.raises(TypeError, match="args must be a tuple"):
        threaded(print, "abc")
    with pytest.raises(TypeError, match="kw must be a mapping"):
        threaded(print, (), [("a", 1)])


def test_threaded_many_at_once():
    n = 30
    barrier = threading.Barrier(n + 1)
    threads = [threaded(barrier.wait, (WAIT,)) for _ in range(n)]
    barrier.wait(WAIT)  # only passes when all n threads run concurrently
    assert len({t.ident for t in threads}) == n
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)


def test_allocate_lock_and_error_match_thread_module():
    lock = allocate_lock()
    assert type(lock) is type(_thread.allocate_lock())
    assert lock.acquire(False)
    assert not lock.acquire(False)  # not reentrant
    lock.release()
    assert error is _thread.error is RuntimeError
    with pytest.raises(error):
        lock.release()  # releasing an unlocked lock
