"""taskit.jobq.run: jobq's documented examples, its own test cases (pykit
jobq/test/test_jobq.py, see reference/seed-pools.md 2.7) and the defects of
jobq that taskit corrects (dispatcher errors/generators, keep_order with a
dispatcher, private sentinels)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from taskit import jobq
from taskit.jobq import EmptyRst


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every pipeline a test starts has stopped all its threads by the end."""
    yield
    deadline = time.monotonic() + 10
    for t in threading.enumerate():
        if t.name.startswith("taskit-jobq-"):
            t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threading.enumerate() if t.name.startswith("taskit-jobq-")]
    assert alive == []


# jobq's test helpers
def add1(x):
    return x + 1


def multi2(x):
    return x * 2


def multi2_sleep(x):
    time.sleep(0.02)  # simulated work, so several threads really overlap
    return x * 2


def discard_even(x):
    return EmptyRst if x % 2 == 0 else x


def printarg(args):
    print(args)


def printed(capsys) -> list[str]:
    return capsys.readouterr().out.split()


# --- the README's examples, exactly -----------------------------------------


def test_readme_add1_printarg(capsys):
    jobq.run([0, 1, 2], [add1, printarg])
    assert printed(capsys) == ["1", "2", "3"]


def test_readme_add1_multi2_printarg(capsys):
    jobq.run((0, 1, 2), [add1, multi2, printarg])
    assert printed(capsys) == ["2", "4", "6"]


def test_readme_two_threads_unordered(capsys):
    jobq.run(range(3), [add1, (multi2, 2), printarg])
    assert sorted(printed(capsys)) == ["2", "4", "6"]


def test_readme_two_threads_keep_order(capsys):
    for _ in range(5):
        jobq.run(range(3), [add1, (multi2_sleep, 2), printarg], keep_order=True)
        assert printed(capsys) == ["2", "4", "6"]


def test_readme_drop_even_number(capsys):
    def drop_even_number(i):
        if i % 2 == 0:
            return jobq.EmptyRst
        return i

    jobq.run(range(10), [drop_even_number, printarg])
    assert printed(capsys) == ["1", "3", "5", "7", "9"]


def test_readme_job_manager_echo(capsys):
    def _echo(args):
        print(args)
        return args

    jm = jobq.JobManager([_echo])
    for i in range(3):
        jm.put(i)
    jm.join()
    assert printed(capsys) == ["0", "1", "2"]


def test_readme_dispatcher_partial_order():
    """Same dispatcher index -> same thread, executed in order; others run
    concurrently; the stage output keeps the input order."""
    seen: dict[int, list[int]] = {}
    lock = threading.Lock()
    out: list[int] = []

    def work(x):
        with lock:
            seen.setdefault(threading.get_ident(), []).append(x)
        return x

    def dispatch(args):
        return hash(args) % 5

    jobq.run(range(200), [(work, 5, dispatch), out.append])
    assert out == list(range(200))
    assert len(seen) == 5
    for items in seen.values():
        assert items == sorted(items)
        assert len({hash(x) % 5 for x in items}) == 1


def test_readme_worker_iter():
    out = []

    def worker_iter(args):
        yield from args

    jobq.run([[1, 2], [3], []], [worker_iter, out.append])
    assert out == [1, 2, 3]


def test_none_is_passed_on_emptyrst_is_not():
    out = []
    jobq.run(range(3), [lambda x: None, out.append])
    assert out == [None, None, None]
    out.clear()
    jobq.run(range(3), [lambda x: EmptyRst, out.append])
    assert out == []
    assert repr(EmptyRst) == "jobq.EmptyRst"


# --- jobq's TestJobQ ----------------------------------------------------------


@pytest.mark.parametrize(
    "inp, workers, expected",
    [
        ([0, 1, 2], [add1], [1, 2, 3]),
        ([0, 1, 2], [add1, multi2], [2, 4, 6]),
        (range(3), [add1, (multi2, 1)], [2, 4, 6]),
        (range(100), [add1, (multi2, 1), discard_even], []),
        (range(100), [add1, discard_even], list(range(1, 101, 2))),
        (range(10240), [add1, multi2], list(range(2, 20482, 2))),
    ],
)
def test_sequential(inp, workers, expected):
    rst = []
    jobq.run(inp, workers + [rst.append])
    assert rst == expected


@pytest.mark.parametrize(
    "inp, workers, expected",
    [
        (list(range(100)), [add1, (multi2_sleep, 10)], list(range(2, 202, 2))),
        (range(100), [add1, (multi2_sleep, 10)], list(range(2, 202, 2))),
        (range(10240), [add1, (multi2, 4)], list(range(2, 20482, 2))),
    ],
)
@pytest.mark.parametrize("keep_order", [False, True])
def test_concurrent(inp, workers, expected, keep_order):
    rst = []
    jobq.run(inp, workers + [rst.append], keep_order=keep_order)
    if keep_order:
        assert rst == expected
    else:
        assert sorted(rst) == expected


def test_exception(caplog):
    def err_on_even(x):
        if x % 2 == 0:
            raise Exception("even number")
        return x

    rst = []
    probe: dict = {}
    with caplog.at_level(logging.ERROR, logger="taskit.jobq"):
        jobq.run(range(10), [err_on_even, rst.append], probe=probe)
    assert rst == [1, 3, 5, 7, 9]
    errors = [r for r in caplog.records if r.name == "taskit.jobq"]
    assert len(errors) == 5
    assert all(r.exc_info and r.exc_info[0] is Exception for r in errors)
    assert "even number" in caplog.text and "Traceback" in caplog.text
    assert "err_on_even" in errors[0].getMessage()
    st = jobq.stat(probe)
    assert st["errors"] == 5
    assert st["workers"][0]["errors"] == 5


def test_exception_keep_order_keeps_slots():
    def err_on_even(x):
        if x % 2 == 0:
            raise ValueError("even")
        time.sleep(0.001 * (x % 3))
        return x

    rst = []
    jobq.run(range(30), [(err_on_even, 3), rst.append], keep_order=True)
    assert rst == list(range(1, 30, 2))


@pytest.mark.parametrize("keep_order", [True, False])
def test_generator(keep_order):
    def gen(x):
        for i in range(3):
            yield i
            time.sleep(0.02)

    rst = []
    jobq.run(range(3), [(gen, 2), rst.append], keep_order=keep_order)
    if keep_order:
        assert rst == [0, 1, 2] * 3  # a generator's items stay together
    else:
        assert sorted(rst) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_generator_items_skip_emptyrst_and_other_iterators_fan_out():
    rst = []
    jobq.run([1], [lambda x: (v for v in [x, EmptyRst, x + 1]), rst.append])
    assert rst == [1, 2]
    rst.clear()
    jobq.run([1, 2], [lambda x: iter([x, x]), rst.append])  # any iterator fans out
    assert rst == [1, 1, 2, 2]
    rst.clear()
    jobq.run([1, 2], [lambda x: [x, x], rst.append])  # a list is one value
    assert rst == [[1, 1], [2, 2]]


@pytest.mark.parametrize("keep_order", [False, True])
def test_generator_that_raises_keeps_earlier_items_and_the_thread(keep_order, caplog):
    def gen(x):
        yield x * 10
        if x % 2:
            raise RuntimeError("odd")
        yield x * 10 + 1

    rst = []
    probe: dict = {}
    with caplog.at_level(logging.ERROR, logger="taskit.jobq"):
        jobq.run(range(6), [gen, rst.append], keep_order=keep_order, probe=probe)
    assert rst == [0, 1, 10, 20, 21, 30, 40, 41, 50]
    assert jobq.stat(probe)["errors"] == 3
    assert caplog.text.count("RuntimeError: odd") == 3


def test_inputs_of_any_iterable_kind():
    for inp, expected in [
        ([1, 2], [2, 3]),
        ((1, 2), [2, 3]),
        ({1: "a", 2: "b"}, [2, 3]),
        (iter([1, 2]), [2, 3]),
        ((x for x in [1, 2]), [2, 3]),
    ]:
        rst = []
        jobq.run(inp, [add1, rst.append])
        assert rst == expected


def test_any_user_value_is_a_normal_element():
    """jobq exported its end-of-stream sentinel ``Finish``; an input that was
    ``Finish`` killed a thread. taskit's sentinels are private."""
    assert not hasattr(jobq, "Finish")
    values = [None, False, 0, "", (), "Finish", "<stop>", 1]
    rst = []
    jobq.run(values, [lambda x: x, (lambda x: x, 3), rst.append], keep_order=True)
    assert rst == values


def test_input_iterator_raising_drains_then_reraises():
    rst = []

    def source():
        yield 1
        yield 2
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        jobq.run(source(), [(multi2_sleep, 2), rst.append])
    assert sorted(rst) == [2, 4]


def test_bad_worker_specs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        jobq.run([1], [])
    with pytest.raises(TypeError, match="not callable"):
        jobq.run([1], [42])
    with pytest.raises(ValueError, match=">= 1"):
        jobq.run([1], [(add1, 0)])
    with pytest.raises(TypeError, match="int"):
        jobq.run([1], [(add1, 1.5)])
    with pytest.raises(TypeError, match="dispatcher"):
        jobq.run([1], [(add1, 2, "x")])
    with pytest.raises(ValueError, match="tuple spec"):
        jobq.run([1], [(add1, 1, None, "extra")])
    with pytest.raises(TypeError, match="probe"):
        jobq.run([1], [add1], probe=[])
    rst = []
    jobq.run([1], [(add1,), rst.append])  # (func,) means one thread
    assert rst == [2]


# --- dispatcher: jobq's TestDispatcher and its defects fixed ------------------


def _by_thread_pipeline():
    by_tid: dict[int, list[int]] = {}
    lock = threading.Lock()
    ordered: list[int] = []

    def _collect_by_tid(x):
        with lock:
            by_tid.setdefault(threading.get_ident(), []).append(x)
        return x

    return by_tid, ordered, _collect_by_tid


def _check_affinity(by_tid, ordered):
    assert len(by_tid) == 3
    for items in by_tid.values():
        assert len({x % 3 for x in items}) == 1
        assert items == sorted(items)
    assert ordered == list(range(1000))


def test_dispatcher_job_manager():
    by_tid, ordered, _collect_by_tid = _by_thread_pipeline()
    jm = jobq.JobManager([(_collect_by_tid, 3, lambda x: x % 3), (ordered.append, 1)])
    with pytest.raises(jobq.JobWorkerError):
        jm.set_thread_num(_collect_by_tid, 10)
    for i in range(1000):
        jm.put(i)
        st = jm.stat()["workers"][0]
        assert len(st["dispatcher"]) == 3
        for d in st["dispatcher"]:
            assert set(d) == {"input", "output"}
            assert 0 <= d["input"]["size"] <= d["input"]["capa"]
            assert d["input"]["capa"] > 0
            assert d["output"]["size"] >= 0
    jm.join()
    _check_affinity(by_tid, ordered)


def test_dispatcher_run():
    by_tid, ordered, _collect_by_tid = _by_thread_pipeline()
    jobq.run(range(1000), [(_collect_by_tid, 3, lambda x: x % 3), (ordered.append, 1)])
    _check_affinity(by_tid, ordered)


def test_dispatcher_negative_index_wraps():
    groups: dict[int, set] = {}
    lock = threading.Lock()

    def rec(x):
        with lock:
            groups.setdefault(threading.get_ident(), set()).add(x)
        return x

    out = []
    jobq.run(range(6), [(rec, 3, lambda x: -x), out.append])
    assert out == list(range(6))
    assert sorted(sorted(g) for g in groups.values()) == [[0, 3], [1, 4], [2, 5]]


def test_dispatcher_with_errors_keeps_order_and_finishes(caplog):
    """jobq: a failing element shifted every later output and join() hung."""

    def err_on_even(x):
        if x % 2 == 0:
            raise ValueError("even")
        return x

    out = []
    probe: dict = {}
    with caplog.at_level(logging.ERROR, logger="taskit.jobq"):
        jobq.run(range(100), [(err_on_even, 3, lambda x: x % 3), out.append], probe=probe)
    assert out == list(range(1, 100, 2))
    assert jobq.stat(probe)["errors"] == 50


def test_dispatcher_with_generators_keeps_all_items_in_order():
    """jobq: one result per input was assumed, so generator items were lost."""

    def gen(x):
        yield x * 100
        yield x * 100 + 1

    out = []
    jobq.run(range(8), [(gen, 3, lambda x: x), out.append])
    assert out == [v for x in range(8) for v in (x * 100, x * 100 + 1)]


def test_dispatcher_that_raises_drops_only_that_element(caplog):
    """jobq: the dispatcher thread died and every later element was lost."""

    def dispatch(x):
        if x == 3:
            raise KeyError("no route")
        if x == 5:
            return "not an int"
        return x

    out = []
    probe: dict = {}
    with caplog.at_level(logging.ERROR, logger="taskit.jobq"):
        jobq.run(range(10), [(add1, 2, dispatch), out.append], probe=probe)
    assert out == [1, 2, 3, 5, 7, 8, 9, 10]
    assert jobq.stat(probe)["errors"] == 2
    assert "dispatcher" in caplog.text and "no route" in caplog.text


def test_keep_order_with_dispatcher_does_not_hang():
    """jobq: keep_order=True plus a dispatcher stage hung with no output."""
    out = []
    jobq.run(
        range(300),
        [add1, (multi2, 3, lambda x: x % 3), (add1, 2), out.append],
        keep_order=True,
    )
    assert out == [2 * (x + 1) + 1 for x in range(300)]


def test_dispatcher_as_last_stage():
    seen: dict[int, list[int]] = {}
    lock = threading.Lock()

    def last(x):
        with lock:
            seen.setdefault(x % 4, []).append(x)

    jobq.run(range(200), [add1, (last, 4, lambda x: x)])
    assert sorted(v for items in seen.values() for v in items) == list(range(1, 201))
    for items in seen.values():
        assert items == sorted(items)


# --- progress -------------------------------------------------------------------


def test_progress_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    import io
    import sys

    class _TTY(io.StringIO):
        def isatty(self):
            return True

    err = _TTY()
    monkeypatch.setattr(sys, "stderr", err)
    rst = []
    jobq.run(range(10), [add1, rst.append], progress=True)
    assert rst == list(range(1, 11))
    assert "10/10" in err.getvalue()


def test_progress_is_silent_off_a_terminal(capsys):
    rst = []
    jobq.run(range(10), [add1, rst.append], progress=True)
    assert rst == list(range(1, 11))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("spec", [("gen", 3), ("gen", 3, "dispatch")])
def test_long_generators_stream_in_order(spec):
    """Each element's generator runs in its worker thread and is streamed
    (bounded per element) to the next stage in input order."""

    def gen(x):
        for i in range(2000):
            yield (x, i)

    func_spec = (gen, 3) if len(spec) == 2 else (gen, 3, lambda x: x)
    out = []
    jobq.run(range(5), [func_spec, out.append], keep_order=True)
    assert out == [(x, i) for x in range(5) for i in range(2000)]
