"""taskit's timeouts are ``TimeoutError`` on every Python it claims.

Before 3.11 ``concurrent.futures.TimeoutError`` is not the builtin
``TimeoutError``: a waiting that ran out must still be caught by
``except TimeoutError`` (the documented contract), and by
``except concurrent.futures.TimeoutError`` as before.
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from taskit import errors
from taskit.errors import CallTimeoutError, ResyncWaitTimeout, WaitTimeoutError
from taskit.frontend import FrontEnd
from taskit.pool import WorkerPool


def test_every_timeout_error_is_builtin_and_futures_timeouterror():
    timeouts = [
        getattr(errors, n)
        for n in errors.__all__
        if issubclass(getattr(errors, n), TimeoutError)
        or issubclass(getattr(errors, n), concurrent.futures.TimeoutError)
    ]
    assert {WaitTimeoutError, CallTimeoutError, ResyncWaitTimeout} <= set(timeouts)
    for cls in timeouts:
        assert issubclass(cls, TimeoutError), cls
        assert issubclass(cls, concurrent.futures.TimeoutError), cls
        assert issubclass(cls, errors.TaskItError), cls


def test_pool_map_timeout_is_a_waittimeouterror():
    release = threading.Event()
    with WorkerPool(1) as pool:
        with pytest.raises(WaitTimeoutError, match="not done within"):
            pool.map(release.wait, [30, 30], timeout=0.05)
        with pytest.raises(WaitTimeoutError):
            pool.map(release.wait, [30, 30], timeout=0.05, ordered=False)
        release.set()
        assert pool.join(30)


def raise_timeout():
    raise TimeoutError("the job's own")


def test_a_jobs_own_timeouterror_passes_through_map_unchanged():
    with WorkerPool(1) as pool:
        for ordered in (True, False):
            with pytest.raises(TimeoutError, match="the job's own") as info:
                pool.map(lambda _: raise_timeout(), [1], timeout=30, ordered=ordered)
            assert not isinstance(info.value, WaitTimeoutError)


def held_until(gate: threading.Event):
    """A task answering "late" once ``gate`` is set (bounded: 30 s), so a busy
    machine cannot let it finish before the test's short waits run out."""
    return lambda: gate.wait(30) and "late"


def test_frontend_future_wait_timeout_is_a_waittimeouterror(serve):
    gate = threading.Event()
    b = serve({"held": held_until(gate)})
    with FrontEnd([("127.0.0.1", b.port)]) as fe:
        fut = fe.submit("held")
        try:
            with pytest.raises(WaitTimeoutError, match="did not arrive within"):
                fut.result(timeout=0.05)
            with pytest.raises(WaitTimeoutError):
                fut.exception(timeout=0.05)
        finally:
            gate.set()
        assert fut.result(30) == "late"


def test_frontend_future_keeps_the_calls_own_calltimeouterror(serve):
    gate = threading.Event()
    b = serve({"held": held_until(gate)})
    try:
        with FrontEnd([("127.0.0.1", b.port)], timeout=0.05) as fe:
            fut = fe.submit("held")
            with pytest.raises(CallTimeoutError):
                fut.result(30)
            assert isinstance(fut.exception(30), CallTimeoutError)
    finally:
        gate.set()
