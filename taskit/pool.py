"""The worker-pool core: run callables and Job objects on threads or processes.

One :class:`WorkerPool` serves local users and the backend:

* ``submit(fn, *args, **kwargs)`` returns a :class:`concurrent.futures.Future`;
  ``map`` returns the results as a list (input order by default);
  ``put(job)`` runs a workerpool-style :class:`Job`.
* Workers pull from one FIFO queue, so no job waits while a worker is idle and
  jobs *start* in submission order.
* ``grow``/``shrink``/``resize`` work while jobs run; a retired worker finishes
  the job it is running and takes no other. A pool of size 0 runs nothing until
  it grows.
* A job that raises never kills its worker and never stalls ``join``: the
  exception goes to the job's future (and is logged for jobs nobody waits on).
* ``kind="process"`` runs jobs in child processes (see :mod:`taskit._procpool`):
  a worker that dies fails only its own job with
  :class:`~taskit.errors.WorkerLostError` and is replaced, and the children
  exit on their own when this process dies, even by SIGKILL.

Lifecycle: use ``with WorkerPool(...)`` or call :meth:`WorkerPool.shutdown`.
A forgotten pool never hangs interpreter exit: thread workers are daemon
threads, and process workers are told to stop at exit (running jobs finish,
queued ones are cancelled). Future callbacks run in the worker thread (thread
pools) or in the pool's manager thread (process pools): keep them short. As
with any multiprocessing code, a script that starts a process pool must guard
its entry point with ``if __name__ == "__main__":`` (each worker imports the
main module again); without it, the pool's jobs fail at once with
:class:`~taskit.errors.WorkerStartError` saying so. Workers that keep dying
before their first job are likewise given up on after a few tries.

The classic interfaces are here too: workerpool's :class:`Job`,
:class:`SimpleJob`, :class:`SuicideJob`, :class:`TerminationNotice`,
:class:`Worker` and :class:`EquippedWorker` (one toolbox per worker, created
in that worker), and the multiprocess worker library's :func:`start_workers`.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, as_completed
from concurrent.futures import TimeoutError as _FuturesTimeout
from typing import Any

from taskit._jobs import (
    Job,
    SimpleJob,
    SuicideJob,
    TerminationNotice,
    _call_initializers,
    _WorkItem,
    current_toolbox,
    default_size,
)
from taskit._startworkers import JobQueue, _Constant
from taskit.errors import PoolShutdownError, WaitTimeoutError, WorkerInitError

__all__ = [
    "WorkerPool",
    "Job",
    "SimpleJob",
    "SuicideJob",
    "TerminationNotice",
    "Worker",
    "EquippedWorker",
    "JobQueue",
    "start_workers",
    "current_toolbox",
    "default_size",
]

log = logging.getLogger("taskit.pool")


# Private markers: never reachable by user code, so no payload collides with them.
_WAKE = object()  # wakes an idle worker so it can see it has been retired
_STOP = object()  # shutdown: the worker that takes it exits


# --- thread workers ------------------------------------------------------------


class Worker(threading.Thread):
    """A worker thread of a thread pool (workerpool's ``Worker``).

    ``jobs`` is the :class:`WorkerPool` it serves (workerpool passed the pool as
    the job queue too). Pass ``worker_factory=lambda pool: Worker(pool)`` or a
    subclass to :class:`WorkerPool` to customise it. A daemon thread: a pool
    that is never shut down does not keep the interpreter alive.
    """

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
            self.toolbox = _call_initializers(pool._initializer, pool._initargs, factory)
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
            if item is _WAKE or item is _STOP:
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

    def __init__(
        self, jobs: WorkerPool, toolbox_factory: Callable[[], Any], name: str | None = None
    ) -> None:
        if not callable(toolbox_factory):
            raise TypeError("toolbox_factory must be callable")
        super().__init__(jobs, name=name)
        self.toolbox_factory = toolbox_factory


# --- the pool ---------------------------------------------------------------------

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
            from taskit._procpool import ProcessEngine

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
        item = _WorkItem(fut, fn, args, kwargs, is_job)
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
        cancelled: list[_WorkItem] = []
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
                        self._queue.put(_STOP)
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
                self._queue.put(_WAKE)

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
            if marker is _STOP:
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

    def _drain_queue(self) -> list[_WorkItem]:
        """Take every job out of the thread queue (lock held)."""
        items: list[_WorkItem] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is _WAKE or item is _STOP:
                self._markers -= 1
            else:
                items.append(item)

    def _cancel_item(self, item: _WorkItem) -> None:
        if self._slots is not None:
            self._slots.release()
        item.future.cancel()
        self._job_done()


_name_lock = threading.Lock()


def _check_count(n: Any, label: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{label} must be an int >= 0, not {n!r}")


def start_workers(
    n: int, attributes: Any, kind: str = "process", name: str = "taskit-workers", **pool_kw: Any
) -> JobQueue:
    """Start ``n`` workers, each with its own copy of ``attributes``; return their queue.

    ``attributes`` is an instance whose public methods are the jobs' targets
    (or a dict of name -> callable). With ``kind="process"`` it must pickle:
    each child gets its own copy, so state changes stay in that worker.
    Children exit when this process dies; :meth:`JobQueue.close` stops them
    cleanly. (The multiprocess worker library's model; its queue is in
    :mod:`taskit._startworkers`.)
    """
    if isinstance(attributes, type):
        raise TypeError("start_workers needs an attributes *instance* (e.g. Attrs()), not a class")
    pool = WorkerPool(n, kind=kind, toolbox_factory=_Constant(attributes), name=name, **pool_kw)
    return JobQueue(pool)
