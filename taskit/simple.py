"""Same-process tasks: run a function now, on a thread with callbacks, or
fire-and-forget.

``@taskit`` turns a function into a :class:`Task` instance with four ways to
run it::

    @taskit
    def add(a, b):
        return a + b

    add.work(1, 2)                      # 3, in this thread (so does add(1, 2))
    add.callback(print, on_error, 1, 2) # on a new thread: print(3)
    add.ignore(1, 2)                    # on a new thread, outcome dropped
    add.submit(1, 2).result()           # a concurrent.futures.Future

Each ``callback``/``ignore``/``submit`` starts its own named daemon thread
(``taskit-simple-<name>``). A thread per call, rather than a shared pool,
keeps TaskIt 4.0's semantics: calls never queue behind one another, so a
task may wait for another task without deadlocking; daemon threads never
hold up interpreter exit. Use :mod:`taskit.pool` when the number of
concurrent calls must be bounded.

Errors of a ``callback`` call go to ``error_cb(exc)``; with ``error_cb=None``
the traceback is logged at ERROR on the ``taskit.simple`` stdlib logger
(printed to stderr when logging is not configured); with ``error_cb=False``
they are silenced. An exception raised by ``cb`` or ``error_cb`` themselves
is always logged there too, never lost.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

from taskit.threaded import _start_daemon

__all__ = ["null_cb", "taskit", "Task"]

_log = logging.getLogger("taskit.simple")
_counter = itertools.count(1)

ErrorCallback = Callable[[Exception], Any] | None | Literal[False]


def null_cb(arg: Any) -> None:
    """A callback that does nothing."""


class Task:
    """A unit of work that can be run in the caller's thread or on another.

    Subclass and override :meth:`work`, or build one from a function with
    :func:`taskit`. All methods are thread-safe as long as ``work`` is: many
    threads may use one Task at once, each call gets its own thread.
    """

    def work(self, *args: Any, **kw: Any) -> Any:
        """Do the task in the calling thread and return its result (blocks).

        The base class does nothing and returns None: override it.
        """
        return None

    def __call__(self, *args: Any, **kw: Any) -> Any:
        """Same as :meth:`work`: a task can be called like the function it wraps."""
        return self.work(*args, **kw)

    def _name(self) -> str:
        return getattr(self, "__name__", type(self).__name__)

    def _start(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        return _start_daemon(f"taskit-simple-{self._name()}-{next(_counter)}", target, args)

    def _do_cb(
        self, cb: Callable[[Any], Any], error_cb: ErrorCallback, args: tuple, kw: dict
    ) -> None:
        try:
            result = self.work(*args, **kw)
        except Exception as e:
            if error_cb is None:
                _log.error("task %s raised (no error_cb given)", self._name(), exc_info=e)
            elif error_cb is not False:
                try:
                    error_cb(e)
                except Exception:
                    _log.exception("error callback %r of task %s raised", error_cb, self._name())
            return
        try:
            cb(result)
        except Exception:
            _log.exception("callback %r of task %s raised", cb, self._name())

    def callback(
        self, cb: Callable[[Any], Any], error_cb: ErrorCallback, *args: Any, **kw: Any
    ) -> threading.Thread:
        """Run ``work(*args, **kw)`` on a new daemon thread, then ``cb(result)``
        on that thread -- or, when ``work`` raises an ``Exception``,
        ``error_cb(exc)``; ``error_cb=None`` logs the traceback on
        ``taskit.simple``; ``error_cb=False`` ignores the error.

        Returns the started thread (join it to wait). Never blocks.
        Raises ``TypeError`` at once when ``cb`` or ``error_cb`` cannot be called.
        """
        if not callable(cb):
            raise TypeError(f"cb must be callable, not {type(cb).__name__}")
        if error_cb is not None and error_cb is not False and not callable(error_cb):
            raise TypeError(
                f"error_cb must be callable, None (log the error) or False (ignore it), "
                f"not {error_cb!r}"
            )
        return self._start(self._do_cb, cb, error_cb, args, kw)

    def ignore(self, *args: Any, **kw: Any) -> threading.Thread:
        """Run ``work(*args, **kw)`` on a new daemon thread, dropping its result
        and any error: ``callback(null_cb, False, ...)``. Returns the thread."""
        return self.callback(null_cb, False, *args, **kw)

    def _run_future(self, future: Future, args: tuple, kw: dict) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = self.work(*args, **kw)
        except BaseException as e:  # noqa: BLE001 -- the future must always complete
            future.set_exception(e)
        else:
            future.set_result(result)

    def submit(self, *args: Any, **kw: Any) -> Future:
        """Run ``work(*args, **kw)`` on a new daemon thread and return a
        :class:`concurrent.futures.Future` of its outcome (``result()`` returns
        the value or raises the exception). Never blocks.

        The future can be cancelled only until the thread picks it up.
        """
        future: Future = Future()
        self._start(self._run_future, future, args, kw)
        return future


class _FunctionTask(Task):
    """The Task :func:`taskit` builds: ``work`` calls the wrapped function."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def work(self, *args: Any, **kw: Any) -> Any:
        return self.func(*args, **kw)

    def __get__(self, obj: Any, objtype: Any = None) -> Task:
        # Decorating a method: bind it, like a function would be.
        bind = getattr(type(self.func), "__get__", None)
        if obj is None or bind is None:
            return self
        return _FunctionTask(bind(self.func, obj, objtype))

    def __repr__(self) -> str:
        return f"<taskit Task {getattr(self, '__qualname__', self._name())}>"


def taskit(func: Callable[..., Any]) -> Task:
    """Make a :class:`Task` instance whose ``work`` calls ``func``; usable as a
    decorator.

    The result keeps ``func``'s name, docstring and module (``help()`` and
    ``__wrapped__`` work) and calling it directly calls ``func``. Raises
    ``TypeError`` when ``func`` is not callable.
    """
    if not callable(func):
        raise TypeError(f"taskit() needs a callable, not {type(func).__name__}")
    return _FunctionTask(func)
