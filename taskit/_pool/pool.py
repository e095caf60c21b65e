"""``WorkerPool``: run callables and Job objects on threads or processes.

The pool owns one FIFO queue of :class:`~taskit._pool.work_item.WorkItem`
records, the target size, the counters behind ``join`` and ``stats``, and the
life cycle (shutdown, and stopping forgotten pools at interpreter exit). Its
workers are the threads of :mod:`taskit._pool.threads`, or, with
``kind="process"``, the worker processes that :mod:`taskit._pool.processes`
manages. The contract users see is :mod:`taskit.pool`'s docstring.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, as_completed
from concurrent.futures import TimeoutError as _FuturesTimeout
from typing import Any

from taskit._pool.classic import Job
from taskit._pool.threads import STOP, WAKE, Worker
from taskit._pool.work_item import WorkItem
from taskit.errors import PoolShutdownError, WaitTimeoutError

__all__ = ["WorkerPool", "default_size"]

_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _stop_pools_at_exit() -> None:
    # Worker threads are daemons, so a forgotten pool never hangs the interpreter;
    # process workers are told to stop here, before multiprocessing's own exit hook.
    for pool in list(_live_pools):
        try:
            pool.shutdown(wait=False, cancel_pending=True)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class WorkerPool:
    """A resizable pool of thread or process workers fed from one FIFO queue.

    ``size``: number of workers (default :func:`default_size`); 0 is allowed.
    ``kind``: ``"thread"`` or ``"process"``. ``maxjobs``: capacity of the
    queue of waiting jobs (0 = unbounded); when full, ``submit``/``put``
    block. ``initializer(*initargs)`` and then ``toolbox_factory()`` run once
    per worker, inside that worker; with a toolbox, Jobs run as
    ``job.run(toolbox=...)`` and :func:`current_toolbox` returns it.
    ``worker_factory(pool)`` (threads only) builds a :class:`Worker`.
    ``start_method`` (processes only): ``"forkserver"`` (default on POSIX) or
    ``"spawn"``; ``"fork"`` is refused because the pool's parent is
    multithreaded.

    Every method is thread-safe. Use it as a context manager, or call
    :meth:`shutdown`.
    """

    __module__ = "taskit.pool"  # its public home, as before the move (reprs, api.md)

    def __init__(
        self,
        size: int | None = None,
        kind: str = "thread",
        maxjobs: int = 0,
        toolbox_factory: Callable[[], Any] | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        name: str = "taskit-pool",
        worker_factory: Callable[[WorkerPool], Worker] | None = None,
        start_method: str | None = None,
    ) -> None:
        if kind not in ("thread", "process"):
            raise ValueError(f"kind must be 'thread' or 'process', not {kind!r}")
        if size is None:
            size = default_size(kind)
        _check_count(size, "size")
        if not isinstance(maxjobs, int) or maxjobs < 0:
            raise ValueError(f"maxjobs must be an int >= 0 (0 = unbounded), not {maxjobs!r}")
        for label, f in (("toolbox_factory", toolbox_factory), ("initializer", initializer)):
            if f is not None and not callable(f):
                raise TypeError(f"{label} must be callable")
        if worker_factory is not None and not callable(worker_factory):
            raise TypeError("worker_factory must be callable")
        if worker_factory is not None and kind != "thread":
            raise ValueError("worker_factory builds thread workers; it needs kind='thread'")
        self.kind = kind
        self.name = name
        self._toolbox_factory = toolbox_factory
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._worker_factory = worker_factory or Worker
        self._maxjobs = maxjobs
        self._slots = threading.Semaphore(maxjobs) if maxjobs else None
        self._lock = threading.Lock()
        self._idle_cond = threading.Condition(self._lock)  # for join()
        # Jobs accepted, and jobs finished outside thread workers' own counters
        # (process pools, cancellations); see _unfinished().
        self._submitted = 0
        self._finished = 0
        self._joiners = 0
        self._shutdown = False
        self._thread_seq = 0
        self._target = 0
        # thread workers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: set[Worker] = set()
        self._to_retire = 0
        self._markers = 0
        self._retired_completed = 0
        self._retired_failed = 0
        # process workers
        self._proc = None
        if kind == "process":
            from taskit._pool.processes import ProcessEngine

            self._proc = ProcessEngine(self, start_method)
        _live_pools.add(self)
        if size:
            self.grow(size)
            if self._proc is not None:
                self._proc.wait_started(60)  # so worker_pids() and stats() see them

    # -- submitting work ----------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; return its :class:`~concurrent.futures.Future`.

        Thread-safe. Blocks only while a bounded queue (``maxjobs``) is full.
        Raises :class:`~taskit.errors.PoolShutdownError` after :meth:`shutdown`.
        With ``kind="process"``, a function or arguments that cannot be pickled
        give a future failed with :class:`~taskit.errors.UnpicklableError`.
        """
        return self._enqueue(fn, args, kwargs, False, True, None)

    def put(self, job: Job, block: bool = True, timeout: float | None = None) -> Future:
        """Queue a :class:`Job` (workerpool's interface); return a future of ``job.run()``.

        With ``block=False`` or a ``timeout``, raises :class:`queue.Full` when a
        bounded queue stays full. Raises ``PoolShutdownError`` after shutdown.
        """
        run = getattr(job, "run", None)
        if not callable(run):
            raise TypeError(f"put() takes a Job (an object with run()), got {type(job).__name__}")
        return self._enqueue(run, (), {}, True, block, timeout)

    def _enqueue(
        self, fn: Callable, args: tuple, kwargs: dict, is_job: bool, block: bool, timeout
    ) -> Future:
        slots = self._slots
        if slots is not None and not slots.acquire(block, timeout):
            raise queue.Full(f"{self.name}: the job queue is full (maxjobs={self._maxjobs})")
        fut: Future = Future()
        item = WorkItem(fut, fn, args, kwargs, is_job)
        proc = self._proc
        if proc is not None and not proc.encode(item):
            # Cannot be sent to a process: the future already carries the error.
            if slots is not None:
                slots.release()
            if self._shutdown:
                raise PoolShutdownError(f"{self.name} is shut down; create a new pool")
            return fut
        with self._lock:
            if self._shutdown:
                if slots is not None:
                    slots.release()
                raise PoolShutdownError(f"{self.name} is shut down; create a new pool")
            self._submitted += 1
            if proc is None:
                self._queue.put(item)
            else:
                proc.enqueue(item)
        return fut

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        ordered: bool = True,
    ) -> list[Any]:
        """Run ``fn`` over the zipped iterables; return the list of results.

        Stops at the shortest iterable, like the builtin. Blocks until every
        call is done: results in input order (``ordered=True``) or in
        completion order. Raises the first exception a call raised, or
        :class:`~taskit.errors.WaitTimeoutError` (a ``TimeoutError``) when
        ``timeout`` seconds pass first; either way the calls not yet started
        are cancelled.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:  # seconds until the deadline; None: no limit
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        submit = self.submit
        futures = [submit(fn, *args) for args in zip(*iterables, strict=False)]
        try:
            if ordered:
                out = []
                for f in futures:
                    try:
                        out.append(f.result(left()))
                    except _FuturesTimeout as e:
                        if f.done() and not f.cancelled() and f.exception() is e:
                            raise  # the job's own TimeoutError
                        raise self._map_timeout(futures, timeout) from None
                return out
            out, finished = [], as_completed(futures, timeout=left())
            while True:
                try:
                    f = next(finished)
                except StopIteration:
                    return out
                except _FuturesTimeout:
                    raise self._map_timeout(futures, timeout) from None
                out.append(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _map_timeout(self, futures: list[Future], timeout: float | None) -> WaitTimeoutError:
        late = sum(1 for f in futures if not f.done())
        return WaitTimeoutError(
            f"{self.name}.map: {late} of {len(futures)} calls not done within {timeout:g} s; "
            "those not started are cancelled"
        )

    # -- waiting and stopping --------------------------------------------------------

    def join(self, timeout: float | None = None) -> bool:
        """Block until every queued job has finished (succeeded, failed or cancelled).

        Returns ``True`` when the pool is idle, ``False`` if ``timeout`` seconds
        passed first (``timeout=0`` only checks). Never hangs on a failed job.
        Raises :class:`RuntimeError` when called from a process pool's future
        callback (it runs in the manager thread, which join would wait for).
        """
        if self._proc is not None and self._proc.is_manager_thread():
            raise RuntimeError(
                f"{self.name}.join() called from a future callback would deadlock: callbacks "
                "of a process pool run in its manager thread; wait elsewhere"
            )
        with self._idle_cond:
            self._joiners += 1
            try:
                return self._idle_cond.wait_for(lambda: self._unfinished() == 0, timeout)
            finally:
                self._joiners -= 1

    wait = join  # workerpool's deprecated alias

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting jobs and stop every worker; safe to call twice.

        Queued jobs still run first unless ``cancel_pending`` (their futures are
        then cancelled); running jobs always finish. With ``wait``, blocks until
        every worker has exited. A pool with no worker left cancels what is
        queued, since nothing could ever run it.
        """
        cancelled: list[WorkItem] = []
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            if first:
                self._target = 0
                if self._proc is None:
                    # Retiring workers take no more jobs: with none staying, nothing
                    # could ever run what is queued.
                    if cancel_pending or len(self._workers) <= self._to_retire:
                        cancelled = self._drain_queue()
                    n_stop = len(self._workers)
                    self._markers += n_stop
                    for _ in range(n_stop):
                        self._queue.put(STOP)
        for item in cancelled:
            self._cancel_item(item)
        _live_pools.discard(self)
        if self._proc is not None:
            if first:
                self._proc.shutdown(cancel_pending)
            if wait:
                self._proc.wait_stopped()
            return
        if wait:
            me = threading.current_thread()
            for w in list(self._workers):
                if w is not me:
                    w.join()

    def close(self) -> None:
        """Same as ``shutdown(wait=True)``."""
        self.shutdown(wait=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)

    # -- sizing --------------------------------------------------------------------------

    def size(self) -> int:
        """The target number of workers: what grow/shrink/resize set, 0 after shutdown."""
        return self._target

    def grow(self, n: int = 1) -> None:
        """Add ``n`` workers now. Raises ``PoolShutdownError`` after shutdown."""
        _check_count(n, "n")
        with self._lock:
            if self._shutdown:
                raise PoolShutdownError(f"{self.name} is shut down; it cannot grow")
            self._target += n
            if self._proc is not None:
                self._proc.set_target(self._target)
                return
            # Cancel pending retirements first rather than stopping and starting threads.
            keep = min(self._to_retire, n)
            self._to_retire -= keep
            new = [self._worker_factory(self) for _ in range(n - keep)]
            for w in new:
                if not isinstance(w, Worker):
                    raise TypeError("worker_factory must return a taskit.pool.Worker")
                self._workers.add(w)
        for w in new:
            w.start()

    def shrink(self, n: int = 1) -> None:
        """Retire ``n`` workers; each finishes its current job, then exits.

        ``size()`` drops at once. Queued jobs stay queued for the other
        workers. Raises :class:`IndexError` when the pool has fewer than ``n``
        workers, ``PoolShutdownError`` after shutdown.
        """
        _check_count(n, "n")
        with self._lock:
            if self._shutdown:
                raise PoolShutdownError(f"{self.name} is shut down; it cannot shrink")
            if n > self._target:
                if self._target == 0:
                    raise IndexError("pool is already empty")
                raise IndexError(f"cannot shrink by {n}: the pool has {self._target} workers")
            self._target -= n
            if self._proc is not None:
                self._proc.set_target(self._target)
                return
            self._to_retire += n
            # Idle workers sleep in get(): a marker wakes one so it sees it is retired.
            self._markers += n
            for _ in range(n):
                self._queue.put(WAKE)

    def resize(self, n: int) -> None:
        """Grow or shrink to exactly ``n`` workers."""
        _check_count(n, "n")
        with self._lock:
            delta = n - self._target
        if delta > 0:
            self.grow(delta)
        elif delta < 0:
            self.shrink(-delta)

    # -- observing ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """A snapshot: ``workers`` alive, ``idle``, ``queued`` jobs, ``running``
        jobs, ``completed`` and ``failed`` jobs so far (and ``size``, the target)."""
        if self._proc is not None:
            return self._proc.stats()
        with self._lock:
            workers = list(self._workers)
            completed = self._retired_completed
            failed = self._retired_failed
            queued = max(0, self._queue.qsize() - self._markers)
            target = self._target
        running = 0
        for w in workers:
            completed += w.completed
            failed += w.failed
            running += w.busy
        return {
            "workers": len(workers),
            "idle": len(workers) - running,
            "queued": queued,
            "running": running,
            "completed": completed,
            "failed": failed,
            "size": target,
        }

    def worker_pids(self) -> list[int]:
        """Process ids of the live worker processes (empty for a thread pool)."""
        return self._proc.pids() if self._proc is not None else []

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"size={self._target}"
        return f"<WorkerPool {self.name!r} kind={self.kind} {state}>"

    # -- worker callbacks (internal) --------------------------------------------------------

    def _next_thread_name(self) -> str:
        with _name_lock:
            self._thread_seq += 1
            return f"{self.name}-{self._thread_seq}"

    def _unfinished(self) -> int:
        """Jobs accepted and not finished (lock held)."""
        n = self._submitted - self._finished
        for w in list(self._workers):
            n -= w.completed + w.failed + w.skipped
        return n

    def _job_done(self, n: int = 1) -> None:
        with self._lock:
            self._finished += n
            if self._joiners:
                self._idle_cond.notify_all()

    def _wake_joiners(self) -> None:
        # A worker just finished a job: join() re-checks the count. The worker
        # bumps its counter before reading _joiners, and join() registers
        # before counting, so no wake-up is lost.
        with self._lock:
            self._idle_cond.notify_all()

    def _claim_retirement(self) -> bool:
        with self._lock:
            if self._to_retire:
                self._to_retire -= 1
                return True
            return False

    def _marker_taken(self, marker: object) -> bool:
        """A worker took a marker; True when it must exit."""
        with self._lock:
            self._markers -= 1
            if marker is STOP:
                return True
            if self._to_retire:
                self._to_retire -= 1
                return True
            return False

    def _terminated_by_job(self) -> None:
        with self._lock:
            if self._target:
                self._target -= 1

    def _worker_exited(self, w: Worker) -> None:
        with self._lock:
            self._workers.discard(w)
            self._retired_completed += w.completed
            self._retired_failed += w.failed
            self._finished += w.completed + w.failed + w.skipped
            if self._joiners:
                self._idle_cond.notify_all()

    def _drain_queue(self) -> list[WorkItem]:
        """Take every job out of the thread queue (lock held)."""
        items: list[WorkItem] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is WAKE or item is STOP:
                self._markers -= 1
            else:
                items.append(item)

    def _cancel_item(self, item: WorkItem) -> None:
        if self._slots is not None:
            self._slots.release()
        item.future.cancel()
        self._job_done()


_name_lock = threading.Lock()


def _check_count(n: Any, label: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{label} must be an int >= 0, not {n!r}")


def default_size(kind: str) -> int:
    """Default worker count: ``cpu_count()`` processes, ``min(32, cpu_count() + 4)`` threads."""
    cpus = os.cpu_count() or 1
    return cpus if kind == "process" else min(32, cpus + 4)
