"""taskit.simple: taskit(), Task.work/callback/ignore/submit, null_cb."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

import pytest

from taskit.simple import Task, null_cb, taskit

WAIT = 10


@taskit
def add(a, b=0):
    """Add two numbers."""
    return a + b


@taskit
def fail(msg):
    raise ValueError(msg)


# --- taskit() and Task -------------------------------------------------------


def test_taskit_returns_a_task_instance_that_documents_itself():
    assert isinstance(add, Task)
    assert add.__name__ == "add"
    assert add.__doc__ == "Add two numbers."
    assert add.__module__ == __name__
    assert add.__wrapped__(1, 2) == 3
    assert "add" in repr(add)


def test_work_runs_in_the_calling_thread():
    here = taskit(threading.current_thread)
    assert here.work() is threading.current_thread()
    assert add.work(2, b=3) == 5


def test_calling_the_task_calls_the_function():
    assert add(4, 5) == 9
    with pytest.raises(ValueError, match="direct"):
        fail("direct")


def test_work_propagates_exceptions():
    with pytest.raises(ValueError, match="now"):
        fail.work("now")


def test_taskit_rejects_non_callables():
    with pytest.raises(TypeError, match="callable"):
        taskit("not a function")


def test_base_task_work_does_nothing_and_subclasses_override():
    assert Task().work(1, x=2) is None

    class Double(Task):
        def work(self, x):
            return 2 * x

    assert Double().work(4) == 8
    assert Double()(6) == 12  # calling any Task calls work()
    assert Double().submit(5).result(WAIT) == 10


def test_taskit_on_a_method_binds_self():
    class Counter:
        def __init__(self):
            self.n = 10

        @taskit
        def plus(self, k):
            return self.n + k

    c = Counter()
    assert c.plus.work(1) == 11
    assert c.plus(2) == 12
    assert c.plus.submit(3).result(WAIT) == 13
    assert isinstance(Counter.plus, Task)


def test_null_cb_accepts_one_argument_and_returns_none():
    assert null_cb(object()) is None
    with pytest.raises(TypeError):
        null_cb()


# --- callback ----------------------------------------------------------------


def test_callback_calls_cb_with_result_on_another_thread():
    got: queue.Queue = queue.Queue()
    t = add.callback(lambda r: got.put((r, threading.current_thread())), None, 2, b=5)
    assert isinstance(t, threading.Thread)
    result, thread = got.get(timeout=WAIT)
    assert result == 7
    assert thread is t and thread is not threading.current_thread()
    assert t.daemon and t.name.startswith("taskit-simple-add-")
    t.join(WAIT)


def test_callback_calls_error_cb_with_the_exception():
    got: queue.Queue = queue.Queue()
    add_called = []
    fail.callback(add_called.append, got.put, "broken").join(WAIT)
    e = got.get(timeout=WAIT)
    assert isinstance(e, ValueError) and e.args == ("broken",)
    assert add_called == []


def test_error_cb_none_logs_the_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="taskit.simple"):
        fail.callback(null_cb, None, "logged").join(WAIT)
    records = [r for r in caplog.records if r.name == "taskit.simple"]
    assert len(records) == 1
    rec = records[0]
    assert rec.levelno == logging.ERROR and "fail" in rec.getMessage()
    assert rec.exc_info and rec.exc_info[0] is ValueError
    assert "ValueError: logged" in caplog.text and "Traceback" in caplog.text


def test_error_cb_false_silences_the_error(caplog):
    with caplog.at_level(logging.DEBUG, logger="taskit.simple"):
        fail.callback(null_cb, False, "silent").join(WAIT)
    assert [r for r in caplog.records if r.name.startswith("taskit")] == []


def test_exception_in_cb_is_logged_not_lost(caplog):
    def bad_cb(result):
        raise RuntimeError(f"cb broke on {result}")

    with caplog.at_level(logging.ERROR, logger="taskit.simple"):
        add.callback(bad_cb, False, 1, 1).join(WAIT)
    records = [r for r in caplog.records if r.name == "taskit.simple"]
    assert len(records) == 1 and "callback" in records[0].getMessage()
    assert "cb broke on 2" in caplog.text


def test_exception_in_error_cb_is_logged(caplog):
    def bad_error_cb(e):
        raise RuntimeError("error_cb broke")

    with caplog.at_level(logging.ERROR, logger="taskit.simple"):
        fail.callback(null_cb, bad_error_cb, "x").join(WAIT)
    assert "error_cb broke" in caplog.text


def test_callback_rejects_non_callable_callbacks_immediately():
    with pytest.raises(TypeError, match="cb must be callable"):
        add.callback(None, None, 1)
    with pytest.raises(TypeError, match="error_cb"):
        add.callback(null_cb, "log it", 1)
    with pytest.raises(TypeError, match="error_cb"):
        add.callback(null_cb, True, 1)


def test_callback_returns_before_work_finishes():
    gate = threading.Event()
    got: queue.Queue = queue.Queue()
    t = taskit(gate.wait).callback(got.put, None, WAIT)
    assert got.empty()  # still blocked on the gate: callback() did not wait
    gate.set()
    assert got.get(timeout=WAIT) is True
    t.join(WAIT)


# --- ignore ------------------------------------------------------------------


def test_ignore_runs_the_work():
    ran = threading.Event()
    t = taskit(ran.set).ignore()
    assert ran.wait(WAIT)
    t.join(WAIT)


def test_ignore_drops_errors_silently(caplog):
    with caplog.at_level(logging.DEBUG, logger="taskit.simple"):
        fail.ignore("ignored").join(WAIT)
    assert [r for r in caplog.records if r.name.startswith("taskit")] == []


# --- submit ------------------------------------------------------------------


def test_submit_returns_a_future_with_the_result():
    f = add.submit(20, b=22)
    assert isinstance(f, Future)
    assert f.result(WAIT) == 42


def test_submit_future_carries_the_exception():
    f = fail.submit("in future")
    with pytest.raises(ValueError, match="in future"):
        f.result(WAIT)
    assert isinstance(f.exception(), ValueError)


def test_submit_future_carries_base_exceptions_too():
    def leave():
        raise SystemExit(2)

    f = taskit(leave).submit()
    assert isinstance(f.exception(WAIT), SystemExit)


def test_submit_future_times_out_while_running():
    from concurrent.futures import TimeoutError as FutureTimeout

    gate = threading.Event()
    f = taskit(gate.wait).submit(WAIT)
    try:
        with pytest.raises(FutureTimeout):
            f.result(0.05)
        assert f.running()
        assert not f.cancel()  # already running
    finally:
        gate.set()
    assert f.result(WAIT) is True


# --- concurrency -------------------------------------------------------------


def test_many_threads_share_one_task():
    n = 40
    barrier = threading.Barrier(n)

    @taskit
    def meet(i):
        barrier.wait(WAIT)  # every call must be running at once to pass
        return i * i

    results: queue.Queue = queue.Queue()
    errors: queue.Queue = queue.Queue()
    callers = [
        threading.Thread(target=meet.callback, args=(results.put, errors.put, i))
        for i in range(n // 2)
    ]
    for c in callers:
        c.start()
    futures = [meet.submit(i) for i in range(n // 2, n)]
    for c in callers:
        c.join(WAIT)
    got = sorted(results.get(timeout=WAIT) for _ in range(n // 2))
    got += sorted(f.result(WAIT) for f in futures)
    assert got == [i * i for i in range(n)]
    assert errors.empty()
