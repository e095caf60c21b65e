"""Jobs and per-worker state shared by thread and process workers.

workerpool's job interface (:class:`Job`, :class:`SimpleJob`,
:class:`SuicideJob`, :class:`TerminationNotice`) with its defects fixed, and
the per-worker toolbox. Import these names from :mod:`taskit.pool`; this
module is separate so that worker processes import only what they run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = [
    "TerminationNotice",
    "Job",
    "SuicideJob",
    "SimpleJob",
    "current_toolbox",
    "default_size",
]


# --- the queue item of every pool -------------------------------------------


class _WorkItem:
    """One queued call: the future and what to run (``is_job``: a Job's ``run``)."""

    # payload/jid/sent are only set by the process engine (unset slots cost nothing).
    __slots__ = ("future", "fn", "args", "kwargs", "is_job", "payload", "jid", "sent")
    payload: bytes
    jid: int
    sent: bool

    def __init__(self, future: Future, fn: Callable, args: tuple, kwargs: dict, is_job: bool):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.is_job = is_job


# --- the classic job interface (workerpool semantics, defects fixed) -------


class TerminationNotice(Exception):
    """Raised by a job to make the worker running it exit (workerpool semantics).

    The job's future resolves to ``None`` and the pool's size drops by one;
    the worker is not replaced.
    """


class Job:
    """A unit of work: subclass and override :meth:`run`.

    ``run()`` is called with no argument, or as ``run(toolbox=...)`` when the
    pool has a ``toolbox_factory``. Its return value becomes the result of the
    future that :meth:`WorkerPool.put` returned.
    """

    def run(self, toolbox: Any = None) -> Any:
        return None


class SuicideJob(Job):
    """A job that stops the worker that takes it (after the jobs queued before it)."""

    def run(self, toolbox: Any = None, **kw: Any) -> Any:
        raise TerminationNotice()


class SimpleJob(Job):
    """Call ``method`` with ``args`` and put the return value on ``result``.

    ``args`` as a list or tuple is passed positionally, as a dict by keyword;
    any other type raises :class:`TypeError` when the job is created (the seed
    library failed later, killing its worker). ``result`` is anything with a
    ``put`` method (``None`` to only use the future); override :meth:`_return`
    to deliver the value elsewhere. Works with and without a toolbox.
    """

    def __init__(self, result: Any, method: Callable[..., Any], args: Any = ()) -> None:
        if not callable(method):
            raise TypeError(f"SimpleJob needs a callable method, got {type(method).__name__}")
        if not isinstance(args, (list, tuple, dict)):
            raise TypeError(
                "SimpleJob args must be a list/tuple (positional) or a dict (keyword), "
                f"got {type(args).__name__}; wrap a single argument as [arg]"
            )
        self.result = result
        self.method = method
        self.args = args

    def run(self, toolbox: Any = None) -> Any:
        if isinstance(self.args, dict):
            r = self.method(**self.args)
        else:
            r = self.method(*self.args)
        self._return(r)
        return r

    def _return(self, r: Any) -> None:
        if self.result is not None:
            self.result.put(r)


# --- per-worker state --------------------------------------------------------

_local = threading.local()


def current_toolbox() -> Any:
    """The toolbox of the worker running the caller (thread or process worker).

    Lets plain functions given to :meth:`WorkerPool.submit` reach the per-worker
    resource that ``toolbox_factory`` built. Raises :class:`LookupError` when the
    caller is not a pool worker with a toolbox.
    """
    try:
        return _local.toolbox
    except AttributeError:
        raise LookupError(
            "current_toolbox() was called outside a pool worker that has a toolbox; "
            "pass toolbox_factory= to WorkerPool"
        ) from None


def default_size(kind: str) -> int:
    """Default worker count: ``cpu_count()`` processes, ``min(32, cpu_count() + 4)`` threads."""
    cpus = os.cpu_count() or 1
    return cpus if kind == "process" else min(32, cpus + 4)


def _call_initializers(
    initializer: Callable[..., Any] | None,
    initargs: tuple,
    toolbox_factory: Callable[[], Any] | None,
) -> Any:
    """Run a worker's initializer then its toolbox factory, in the worker itself."""
    if initializer is not None:
        initializer(*initargs)
    if toolbox_factory is None:
        return None
    toolbox = _local.toolbox = toolbox_factory()
    return toolbox
