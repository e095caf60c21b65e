"""The classic job interface: workerpool's jobs, with its defects fixed.

:class:`Job`, :class:`SimpleJob`, :class:`SuicideJob` and
:class:`TerminationNotice`, run by thread and process workers alike. Import
these names from :mod:`taskit.pool`; this module imports nothing, so worker
processes load only what they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TerminationNotice", "Job", "SuicideJob", "SimpleJob"]


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
