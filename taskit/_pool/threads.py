"""The thread workers of a :class:`~taskit.pool.WorkerPool`.

Each :class:`Worker` is a daemon thread that runs the pool's initializer and
toolbox factory, then takes :class:`~taskit._pool.work_item.WorkItem` records
from the pool's FIFO queue until it is retired or the pool shuts down. The
pool wakes or stops an idle worker by queueing one of the private markers
:data:`WAKE` and :data:`STOP`. Import the classes from :mod:`taskit.pool`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from taskit._pool.classic import TerminationNotice
from taskit._pool.toolbox import call_initializers
from taskit.errors import WorkerInitError

__all__ = ["Worker", "EquippedWorker", "WAKE", "STOP"]

log = logging.getLogger("taskit.pool")

# Private markers: never reachable by user code, so no payload collides with them.
WAKE = object()  # wakes an idle worker so it can see it has been retired
STOP = object()  # shutdown: the worker that takes it exits


class WorkerPool(Protocol):
    """What a thread worker uses of its :class:`~taskit.pool.WorkerPool` (which
    imports this module; a Protocol keeps the import one-way)."""

    _queue: queue.SimpleQueue
    _slots: threading.Semaphore | None
    _to_retire: int
    _joiners: int
    _initializer: Callable[..., Any] | None
    _initargs: tuple
    _toolbox_factory: Callable[[], Any] | None

    def _next_thread_name(self) -> str: ...
    def _claim_retirement(self) -> bool: ...
    def _marker_taken(self, marker: object) -> bool: ...
    def _wake_joiners(self) -> None: ...
    def _terminated_by_job(self) -> None: ...
    def _worker_exited(self, w: Worker) -> None: ...


class Worker(threading.Thread):
    """A worker thread of a thread pool (workerpool's ``Worker``).

    ``jobs`` is the :class:`WorkerPool` it serves (workerpool passed the pool as
    the job queue too). Pass ``worker_factory=lambda pool: Worker(pool)`` or a
    subclass to :class:`WorkerPool` to customise it. A daemon thread: a pool
    that is never shut down does not keep the interpreter alive.
    """

    __module__ = "taskit.pool"  # its public home, as before the move (reprs, api.md)

    toolbox_factory: Callable[[], Any] | None = None

    def __init__(self, jobs: WorkerPool, name: str | None = None) -> None:
        super().__init__(name=name or jobs._next_thread_name(), daemon=True)
        self.jobs = jobs
        self.toolbox: Any = None
        # Written only by this thread; stats() sums them without a lock.
        self.completed = 0
        self.failed = 0
        self.skipped = 0  # cancelled before it started
        self._exited = False
        self.busy = False

    def run(self) -> None:
        pool = self.jobs
        init_error: BaseException | None = None
        try:
            factory = self.toolbox_factory or pool._toolbox_factory
            self.toolbox = call_initializers(pool._initializer, pool._initargs, factory)
        except BaseException as e:  # noqa: BLE001 - reported on every job instead
            log.exception("%s: initializer/toolbox_factory failed", self.name)
            init_error = e
        equipped = (self.toolbox_factory or pool._toolbox_factory) is not None
        try:
            self._loop(pool, equipped, init_error)
        finally:
            if not self._exited:
                pool._worker_exited(self)

    def _loop(self, pool: WorkerPool, equipped: bool, init_error: BaseException | None) -> None:
        get = pool._queue.get
        release = pool._slots.release if pool._slots is not None else None
        toolbox = self.toolbox
        while True:
            if pool._to_retire and pool._claim_retirement():
                return
            item = get()
            if item is WAKE or item is STOP:
                if pool._marker_taken(item):
                    return
                continue
            if release is not None:
                release()
            fut = item.future
            if not fut.set_running_or_notify_cancel():
                self.skipped += 1
                if pool._joiners:
                    pool._wake_joiners()
                continue
            self.busy = True
            try:
                if init_error is not None:
                    raise WorkerInitError(
                        f"worker {self.name} could not start: initializer or toolbox_factory "
                        f"raised {init_error!r}; fix it and recreate the pool"
                    ) from init_error
                if item.is_job and equipped:
                    result = item.fn(toolbox=toolbox)
                else:
                    result = item.fn(*item.args, **item.kwargs)
            except TerminationNotice:
                self.completed += 1
                self.busy = False
                pool._terminated_by_job()
                # Leave the pool before resolving, so the caller sees the smaller pool.
                pool._worker_exited(self)
                self._exited = True
                fut.set_result(None)
                return
            except BaseException as e:  # noqa: BLE001 - a job never kills its worker
                self.failed += 1
                fut.set_exception(e)
                if item.is_job:
                    # Nobody may be waiting on a put() future: log so it is never silent.
                    log.error("job %r raised", item.fn, exc_info=e)
            else:
                self.completed += 1
                fut.set_result(result)
            item = fut = None  # drop references before blocking again
            self.busy = False
            # No lock per job: join() sums the workers' counters; wake it only if waiting.
            if pool._joiners:
                pool._wake_joiners()


class EquippedWorker(Worker):
    """A worker thread with its own toolbox (workerpool's ``EquippedWorker``).

    ``toolbox_factory()`` is called once, *in the worker thread* (workerpool
    called it in the thread that grew the pool), so thread-affine resources
    such as database connections work; each Job then runs as
    ``job.run(toolbox=toolbox)``.
    """

    __module__ = "taskit.pool"  # its public home, as before the move (reprs, api.md)

    def __init__(
        self, jobs: WorkerPool, toolbox_factory: Callable[[], Any], name: str | None = None
    ) -> None:
        if not callable(toolbox_factory):
            raise TypeError("toolbox_factory must be callable")
        super().__init__(jobs, name=name)
        self.toolbox_factory = toolbox_factory
