"""``start_workers()``: the multiprocess worker library's model, over a WorkerPool.

``n`` workers, each with its own copy of an attributes object, fed through a
:class:`StartedWorkers` handle with ``{"target": "method_name", "arguments":
...}`` dicts; ``False`` stops one worker. Import these names from
:mod:`taskit.pool`, where the handle keeps the library's name, ``JobQueue``.

Worker processes unpickle :class:`_Constant` and :func:`_call_target` from
this module, so it imports the pool only inside :func:`start_workers`: a
worker loads none of the pool's parent-side machinery.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Protocol

from taskit._pool.classic import Job, SuicideJob
from taskit._pool.toolbox import current_toolbox
from taskit.errors import UnknownTargetError

__all__ = ["start_workers", "StartedWorkers", "JobQueue"]


class WorkerPoolLike(Protocol):
    """What a StartedWorkers handle uses of its :class:`~taskit.pool.WorkerPool`."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future: ...
    def put(self, job: Job, block: bool = True, timeout: float | None = None) -> Future: ...
    def join(self, timeout: float | None = None) -> bool: ...
    def stats(self) -> dict[str, int]: ...
    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None: ...


log = logging.getLogger("taskit.pool")


class _Constant:
    """A picklable factory returning its (per-worker unpickled) object."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def _call_target(target: str, arguments: Any) -> Any:
    """Run ``attributes.<target>(arguments)`` on the calling worker's attributes."""
    attributes = current_toolbox()
    if isinstance(attributes, dict):
        method = attributes.get(target)
    elif target.startswith("_"):
        method = None  # dunder and private methods are not jobs
    else:
        method = getattr(attributes, target, None)
    if not callable(method):
        raise UnknownTargetError(
            f"unknown target {target!r}: the worker attributes "
            f"({type(attributes).__name__}) have no such public method"
        )
    return method(arguments)


class StartedWorkers:
    """The job queue :func:`start_workers` returns.

    ``put({"target": "method_name", "arguments": x})`` runs
    ``attributes.method_name(x)`` in one of the worker processes and returns a
    :class:`~concurrent.futures.Future` of its return value (the original
    library had no result channel). ``put(False)`` -- the object ``False``
    itself, not an equal value like ``0`` -- stops one worker after the jobs
    queued before it; it is the only stop signal, and a job whose *arguments*
    are ``False`` is an ordinary job. Anything else that is not such a dict
    (``0``, ``None``, a dict without ``target``) fails only its own future with
    :class:`TypeError` and is logged; no worker dies.
    """

    def __init__(self, pool: WorkerPoolLike) -> None:
        self.pool = pool

    def put(self, job: Any, block: bool = True, timeout: float | None = None) -> Future:
        if job is False:
            return self.pool.put(SuicideJob(), block, timeout)
        if not isinstance(job, dict) or not isinstance(job.get("target"), str):
            fut: Future = Future()
            fut.set_exception(
                TypeError(
                    'a job is a dict {"target": "method_name", "arguments": ...}, '
                    f"or False to stop one worker; got {job!r}"
                )
            )
            log.error("start_workers: rejected malformed job %r", job)
            return fut
        return self.pool.submit(_call_target, job["target"], job.get("arguments"))

    def put_nowait(self, job: Any) -> Future:
        """``put(job, block=False)``, as on a multiprocessing queue."""
        return self.put(job, block=False)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every job put so far is done; see :meth:`WorkerPool.join`."""
        return self.pool.join(timeout)

    def workers(self) -> int:
        """How many workers are still running."""
        return self.pool.stats()["workers"]

    def close(self, wait: bool = True) -> None:
        """Run what is queued, then stop every worker (no ``False`` needed)."""
        self.pool.shutdown(wait=wait)

    def __enter__(self) -> StartedWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# The multiprocess worker library's name for it, public in taskit.pool.
JobQueue = StartedWorkers


def start_workers(
    n: int, attributes: Any, kind: str = "process", name: str = "taskit-workers", **pool_kw: Any
) -> JobQueue:
    """Start ``n`` workers, each with its own copy of ``attributes``; return their queue.

    ``attributes`` is an instance whose public methods are the jobs' targets
    (or a dict of name -> callable). With ``kind="process"`` it must pickle:
    each child gets its own copy, so state changes stay in that worker.
    Children exit when this process dies; :meth:`JobQueue.close` stops them
    cleanly. (The multiprocess worker library's model.)
    """
    from taskit._pool.pool import WorkerPool  # here, not at the top: see the module doc

    if isinstance(attributes, type):
        raise TypeError("start_workers needs an attributes *instance* (e.g. Attrs()), not a class")
    pool = WorkerPool(n, kind=kind, toolbox_factory=_Constant(attributes), name=name, **pool_kw)
    return StartedWorkers(pool)


start_workers.__module__ = "taskit.pool"  # its public home, as before the move (api.md)
