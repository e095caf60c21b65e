"""One queued call of a :class:`~taskit.pool.WorkerPool`, whatever runs it.

Both the pool (thread workers) and the process engine handle the same
record, so it lives here, below both of them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

__all__ = ["WorkItem"]


class WorkItem:
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
