"""taskit.resync: Mediator (one-slot hand-off) and Resyncer (a call on its own thread)."""

from __future__ import annotations

import queue
import threading

import pytest

from taskit import errors
from taskit.resync import Mediator, ResultAlreadySetError, Resyncer, ResyncError, ResyncWaitTimeout

WAIT = 10  # generous bound for anything that should happen "now"


def run_in_thread(func, *args):
    """Start func(*args) on a thread; return (thread, queue receiving ('ok'|'err', value))."""
    out: queue.Queue = queue.Queue()

    def target():
        try:
            out.put(("ok", func(*args)))
        except BaseException as e:  # noqa: BLE001
            out.put(("err", e))

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


# --- errors ------------------------------------------------------------------


def test_resync_wait_timeout_is_reexported_and_a_timeout_error():
    assert ResyncWaitTimeout is errors.ResyncWaitTimeout
    e = ResyncWaitTimeout()
    assert isinstance(e, TimeoutError)
    assert isinstance(e, errors.TaskItError)
    assert str(e) == "Could not acquire lock within the time allotted"


# --- Mediator ----------------------------------------------------------------


def test_set_result_then_get_returns_it():
    m = Mediator()
    m.set_result((5, 6))
    assert m.get() == (5, 6)


def test_get_blocks_until_another_thread_sets_the_result():
    m = Mediator()
    t, out = run_in_thread(m.get)
    m.set_result("late")
    assert out.get(timeout=WAIT) == ("ok", "late")
    t.join(WAIT)


def test_set_error_with_instance_is_raised_by_get():
    m = Mediator()
    err = ValueError("bad", 7)
    m.set_error(err)
    with pytest.raises(ValueError) as info:
        m.get()
    assert info.value is err


def test_set_error_with_class_is_instantiated_by_get():
    m = Mediator()
    m.set_error(KeyError)
    with pytest.raises(KeyError):
        m.get(0)


def test_set_error_rejects_non_exceptions():
    m = Mediator()
    for bad in ("oops", 3, int, None):
        with pytest.raises(TypeError, match="exception class or instance"):
            m.set_error(bad)
    assert not m.ready()  # nothing was stored


def test_get_with_timeout_raises_resync_wait_timeout():
    m = Mediator()
    with pytest.raises(ResyncWaitTimeout):
        m.get(0.05)
    with pytest.raises(TimeoutError):  # catchable as the builtin too
        m.get(0)


def test_negative_timeout_is_a_value_error():
    with pytest.raises(ValueError, match="timeout"):
        Mediator().get(-1)


def test_get_with_timeout_returns_when_set_in_time():
    m = Mediator()
    t, out = run_in_thread(m.get, WAIT)
    m.set_result(1)
    assert out.get(timeout=WAIT) == ("ok", 1)
    t.join(WAIT)


def test_setting_twice_raises_and_keeps_the_first_outcome():
    m = Mediator()
    m.set_result("first")
    with pytest.raises(ResultAlreadySetError, match="get"):
        m.set_result("second")
    with pytest.raises(ResultAlreadySetError):
        m.set_error(ValueError("second"))
    assert m.get() == "first"


def test_error_then_set_also_refused():
    m = Mediator()
    m.set_error(OSError("first"))
    with pytest.raises(ResultAlreadySetError, match="an error"):
        m.set_result(2)
    with pytest.raises(OSError, match="first"):
        m.get()


def test_get_empties_the_slot_so_the_mediator_is_reusable():
    m = Mediator()
    assert not m.ready()
    m.set_result(1)
    assert m.ready()
    assert m.get() == 1
    assert not m.ready()
    with pytest.raises(ResyncWaitTimeout):
        m.get(0.01)  # consumed: a second get waits for a new outcome
    m.set_error(ValueError)
    with pytest.raises(ValueError):
        m.get()
    m.set_result(2)
    assert m.get() == 2


def test_many_getters_each_receive_exactly_one_value():
    m = Mediator()
    n = 30
    results: queue.Queue = queue.Queue()
    threads = [
        threading.Thread(target=lambda: results.put(m.get(WAIT)), daemon=True) for _ in range(n)
    ]
    for t in threads:
        t.start()
    received = []
    for i in range(n):
        m.set_result(i)
        received.append(results.get(timeout=WAIT))  # wait until someone took it
    for t in threads:
        t.join(WAIT)
    assert sorted(received) == list(range(n))
    assert results.empty()


def test_racing_setters_exactly_one_wins():
    m = Mediator()
    n = 30
    barrier = threading.Barrier(n)
    outcomes: queue.Queue = queue.Queue()

    def setter(i):
        barrier.wait(WAIT)
        try:
            m.set_result(i)
            outcomes.put(("won", i))
        except ResultAlreadySetError:
            outcomes.put(("lost", i))

    threads = [threading.Thread(target=setter, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    got = [outcomes.get_nowait() for _ in range(n)]
    winners = [i for kind, i in got if kind == "won"]
    assert len(winners) == 1
    assert m.get(0) == winners[0]


def test_waiters_with_timeouts_and_without_all_served():
    # Impatient waiters give up with ResyncWaitTimeout; patient ones get one value each.
    m = Mediator()
    taken: queue.Queue = queue.Queue()
    patient = [
        threading.Thread(target=lambda: taken.put(m.get(WAIT)), daemon=True) for _ in range(5)
    ]
    for t in patient:
        t.start()
    impatient = [run_in_thread(m.get, 0.01) for _ in range(5)]
    for _, out in impatient:
        kind, value = out.get(timeout=WAIT)
        assert kind == "err" and isinstance(value, ResyncWaitTimeout)
    values = []
    for i in range(5):
        m.set_result(i)
        values.append(taken.get(timeout=WAIT))
    for t in patient:
        t.join(WAIT)
    assert sorted(values) == list(range(5))


# --- Resyncer ----------------------------------------------------------------


def test_resyncer_start_returns_self_and_get_returns_result():
    r = Resyncer(len, "Python+TaskIt")
    assert not r.started()
    assert r.start() is r
    assert r.started()
    assert r.get(WAIT) == 13
    assert r.done()


def test_resyncer_passes_args_and_kwargs():
    r = Resyncer(lambda a, b=0, *, c: (a, b, c), 1, b=2, c=3).start()
    assert r.get() == (1, 2, 3)


def test_resyncer_reraises_the_exception():
    def boom():
        raise ValueError("Why *did* you call this!?")

    r = Resyncer(boom).start()
    with pytest.raises(ValueError, match="Why"):
        r.get(WAIT)
    with pytest.raises(ValueError):  # the outcome is kept
        r.get(0)


def test_resyncer_delivers_base_exceptions_instead_of_hanging():
    def leave():
        raise SystemExit(3)

    r = Resyncer(leave).start()
    with pytest.raises(SystemExit):
        r.get(WAIT)


def test_resyncer_get_times_out_while_running():
    gate = threading.Event()
    r = Resyncer(gate.wait, WAIT).start()
    try:
        with pytest.raises(ResyncWaitTimeout):
            r.get(0.05)
        assert not r.done()
    finally:
        gate.set()
    assert r.get(WAIT) is True


def test_resyncer_runs_on_a_named_daemon_thread():
    r = Resyncer(threading.current_thread).start()
    t = r.get(WAIT)
    assert t is not threading.current_thread()
    assert t.name.startswith("taskit-resync-")
    assert t.daemon


def test_resyncer_get_before_start_is_a_clear_error():
    with pytest.raises(ResyncError, match="start"):
        Resyncer(len, "x").get()


def test_resyncer_cannot_start_twice():
    r = Resyncer(len, "x").start()
    with pytest.raises(ResyncError, match="already started"):
        r.start()
    assert r.get(WAIT) == 1


def test_resyncer_needs_a_callable():
    with pytest.raises(TypeError, match="callable"):
        Resyncer(42)


def test_many_threads_get_the_same_resyncer_result():
    gate = threading.Event()
    marker = object()

    def slow():
        gate.wait(WAIT)
        return marker

    r = Resyncer(slow).start()
    getters = [run_in_thread(r.get, WAIT) for _ in range(30)]
    gate.set()
    for t, out in getters:
        assert out.get(timeout=WAIT) == ("ok", marker)
        t.join(WAIT)
    calls = []
    r2 = Resyncer(lambda: calls.append(1) or len(calls)).start()
    assert [r2.get(WAIT) for _ in range(5)] == [1] * 5  # the function ran once
