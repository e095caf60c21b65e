"""TaskIt ReSync: hand a result (or an error) from one thread to another.

A :class:`Mediator` is a one-slot hand-off: a worker fills it with
:meth:`~Mediator.set_result` or :meth:`~Mediator.set_error`, and a waiting
thread takes the outcome out with :meth:`~Mediator.get` -- which returns the
value or raises the error. Because ``get`` empties the slot, one Mediator can
carry a series of results (a basic producer/consumer channel), exactly as in
TaskIt 4.0. Filling a slot that is already full raises
:class:`ResultAlreadySetError` instead of silently overwriting the first
outcome.

A :class:`Resyncer` runs one call on its own thread and lets any number of
threads ``get`` its outcome, any number of times.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from taskit.errors import ResultAlreadySetError, ResyncError, ResyncWaitTimeout
from taskit.threaded import _start_daemon

__all__ = ["Mediator", "Resyncer", "ResyncWaitTimeout", "ResultAlreadySetError", "ResyncError"]


def _check_error(e: Any) -> BaseException | type[BaseException]:
    if isinstance(e, BaseException) or (isinstance(e, type) and issubclass(e, BaseException)):
        return e
    raise TypeError(
        f"set_error() takes an exception class or instance, not {type(e).__name__}: "
        "pass e.g. ValueError('why') or ValueError"
    )


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
    return timeout


class Mediator:
    """A thread-safe one-slot hand-off of a result or an error between threads.

    Any number of threads may call any method at once. Each outcome set is
    delivered to exactly one :meth:`get` call, in the order getters take it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._full = False
        self._ok = True
        self._value: Any = None

    def _put(self, ok: bool, value: Any) -> None:
        with self._cond:
            if self._full:
                kind = "a result" if self._ok else "an error"
                raise ResultAlreadySetError(
                    f"this Mediator already holds {kind} that no one has taken with get(); "
                    "call get() before setting another outcome, or use one Mediator per result"
                )
            self._full, self._ok, self._value = True, ok, value
            self._cond.notify()

    def set_result(self, res: Any) -> None:
        """Fill the slot with ``res``; one waiting (or the next) :meth:`get` returns it.

        Raises :class:`ResultAlreadySetError` when the slot is already full.
        Never blocks.
        """
        self._put(True, res)

    def set_error(self, e: BaseException | type[BaseException]) -> None:
        """Fill the slot with an error; :meth:`get` raises it.

        ``e`` is an exception instance or class (a class is instantiated with no
        arguments when raised). Raises ``TypeError`` for anything else and
        :class:`ResultAlreadySetError` when the slot is already full. Never blocks.
        """
        self._put(False, _check_error(e))

    def ready(self) -> bool:
        """True when an outcome is waiting to be taken (a snapshot; never blocks)."""
        with self._cond:
            return self._full

    def get(self, timeout: float | None = None) -> Any:
        """Take the outcome out of the slot: return the result or raise the error.

        Blocks until an outcome is set, or at most ``timeout`` seconds (``0``
        only checks), then raises :class:`ResyncWaitTimeout` (also a builtin
        ``TimeoutError``). Afterwards the slot is empty and may be set again.
        """
        timeout = _check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._full, timeout):
                raise ResyncWaitTimeout()
            self._full = False
            ok, value = self._ok, self._value
            self._value = None  # do not keep the result (or a traceback) alive
        if ok:
            return value
        raise value


class Resyncer:
    """Run ``func(*args, **kw)`` on its own thread and collect its outcome later.

    ``start()`` launches the call; ``get(timeout)`` waits for it and returns
    its result or raises its exception. Unlike a bare :class:`Mediator`, the
    outcome is kept: any number of threads may ``get`` it, any number of times.
    Thread-safe.
    """

    def __init__(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        if not callable(func):
            raise TypeError(f"Resyncer needs a callable, not {type(func).__name__}")
        self.func = func
        self.args = args
        self.kw = kw
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._ok = True
        self._value: Any = None

    def _run(self) -> None:
        try:
            value = self.func(*self.args, **self.kw)
        except BaseException as e:  # noqa: BLE001 -- every outcome must reach get()
            self._ok, self._value = False, e
        else:
            self._ok, self._value = True, value
        finally:
            self._done.set()

    def start(self) -> Resyncer:
        """Start the call on a new daemon thread and return ``self`` (so
        ``Resyncer(f, x).start().get()`` reads naturally).

        Raises :class:`ResyncError` if already started. Never blocks.
        """
        with self._lock:
            if self._thread is not None:
                raise ResyncError("this Resyncer was already started; create a new one per call")
            name = f"taskit-resync-{getattr(self.func, '__name__', 'call')}"
            self._thread = _start_daemon(name, self._run)
        return self

    def started(self) -> bool:
        """True once :meth:`start` was called."""
        return self._thread is not None

    def done(self) -> bool:
        """True once the call has finished (returned or raised); never blocks."""
        return self._done.is_set()

    def get(self, timeout: float | None = None) -> Any:
        """Return the call's result or raise its exception.

        Blocks until the call finishes, or at most ``timeout`` seconds, then
        raises :class:`ResyncWaitTimeout`. Raises :class:`ResyncError` when
        :meth:`start` was never called (waiting would hang forever).
        """
        timeout = _check_timeout(timeout)
        if self._thread is None:
            raise ResyncError("get() before start(): call start() first")
        if not self._done.wait(timeout):
            raise ResyncWaitTimeout()
        if self._ok:
            return self._value
        raise self._value
