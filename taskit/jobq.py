"""Pipelines: push a stream of elements through a chain of functions, each
stage with its own threads (jobq's model and API, with its defects fixed).

::

    from taskit import jobq

    jobq.run(range(3), [add1, (multi2, 2), print], keep_order=True)  # 2 4 6

A *stage* (worker spec) is ``func``, ``(func, n)`` or ``(func, n, dispatcher)``:
``func(element)`` runs in ``n`` threads of the stage; what it returns goes to
the next stage, except:

- ``EmptyRst``: nothing is passed on (``None`` *is* passed on);
- an iterator (e.g. a generator): each item it yields is passed on (items that
  are ``EmptyRst`` are skipped); other iterables such as lists are one value.

Ordering: with one thread a stage is FIFO. ``keep_order=True`` keeps every
stage's output in input order whatever the thread count (a generator's items
stay together). ``dispatcher(element) -> int`` sends an element to thread
``index % n`` of its stage, so elements with the same index run in order on
one thread while others run concurrently; the stage output keeps input order.

Errors: a stage function (or generator, or dispatcher) that raises is logged
on the ``taskit.jobq`` logger with its traceback; that element is dropped
(items a generator yielded before failing are kept), the pipeline goes on, and
``stat()`` counts it under ``errors``.

Memory: every queue is bounded (the head by ``queue_size``, the others by
1024), so a slow stage blocks the ones before it and, through ``put``, the
producer: memory does not grow with the input length.

Threads are daemon threads named ``taskit-jobq-...``: an abandoned pipeline
never blocks interpreter exit.

This module is the public API and wires the stages together; how a stage runs
its threads and keeps its output in order is :mod:`taskit._pipeline.stage`'s
concern, the queues between threads :mod:`taskit._pipeline.channel`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from taskit._pipeline.channel import Aborted, Channel, Closed
from taskit._pipeline.stage import STAGE_QUEUE_SIZE, EmptyRst, Stage, ThreadSet, callable_name
from taskit.errors import JobWorkerError, JobWorkerNotFound

__all__ = [
    "run",
    "stat",
    "EmptyRst",
    "JobManager",
    "limit_job_speed",
    "JobWorkerError",
    "JobWorkerNotFound",
    "DEFAULT_QUEUE_SIZE",
]

logger = logging.getLogger("taskit.jobq")

DEFAULT_QUEUE_SIZE = 1024


def _check_thread_num(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what} must be an int >= 1, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}; a stage needs at least one thread")
    return n


def _parse_spec(spec: Any, position: int) -> tuple[Callable[[Any], Any], int, Any]:
    """Normalise a worker spec to ``(func, n, dispatcher)`` or raise."""
    if not isinstance(spec, tuple):
        spec = (spec,)
    if not 1 <= len(spec) <= 3:
        raise ValueError(
            f"worker #{position}: a tuple spec is (func, n) or (func, n, dispatcher),"
            f" got {len(spec)} items"
        )
    func, n, dispatcher = spec + (None, 1, None)[len(spec) :]  # pad with the defaults
    if not callable(func):
        raise TypeError(f"worker #{position}: {func!r} is not callable")
    n = _check_thread_num(n, f"worker #{position} thread count")
    if dispatcher is not None and not callable(dispatcher):
        raise TypeError(f"worker #{position}: dispatcher {dispatcher!r} is not callable")
    return func, n, dispatcher


def _deadline(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` value ``timeout`` seconds from now (a negative
    timeout counts as 0); ``None`` (wait forever) stays ``None``."""
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), never
    negative; ``None`` (no deadline) stays ``None``."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class JobManager:
    """A running pipeline fed with :meth:`put` and finished with :meth:`join`.

    ``workers`` are stage specs (see the module doc); ``queue_size`` bounds the
    input queue (``put`` blocks when it is full); ``probe`` is an optional dict
    that :func:`stat` can read; ``keep_order`` keeps every stage's output in
    input order; ``probe["manager"]`` is set to this object. Threads start at
    construction. Raises ``TypeError`` / ``ValueError`` for malformed specs.
    ``put``, ``join``, ``set_thread_num`` and ``stat`` may be called from any
    thread. Usable as a context manager
    (``join()`` on normal exit, ``join(timeout=0)`` when an exception escapes).
    """

    def __init__(
        self,
        workers: Iterable[Any],
        queue_size: int = DEFAULT_QUEUE_SIZE,
        probe: dict[str, Any] | None = None,
        keep_order: bool = False,
    ) -> None:
        specs = [_parse_spec(spec, i) for i, spec in enumerate(workers)]
        if not specs:
            raise ValueError("workers is empty: give at least one stage function")
        queue_size = _check_thread_num(queue_size, "queue_size")
        if probe is not None and not isinstance(probe, dict):
            raise TypeError(f"probe must be a dict (or None), got {type(probe).__name__}")
        self.keep_order = bool(keep_order)
        self._lock = threading.Lock()
        self._closing = False
        self._aborted = False
        self._threads = ThreadSet()
        self._head = Channel(queue_size)
        # stage i writes the queue stage i + 1 reads; the last one writes nowhere
        between = [Channel(STAGE_QUEUE_SIZE) for _ in specs[1:]]
        inqs = [self._head, *between]
        outqs: list[Channel | None] = [*between, None]
        self._stages = [
            Stage(self._threads, i, func, n, dispatcher, self.keep_order, inqs[i], outqs[i])
            for i, (func, n, dispatcher) in enumerate(specs)
        ]
        self.probe = probe
        if probe is not None:
            probe["manager"] = self
        for stage in self._stages:
            stage.start()

    # -- feeding -------------------------------------------------------------

    def put(self, args: Any) -> None:
        """Feed one element (any value). Blocks while the input queue is full.

        Raises :class:`JobWorkerError` once :meth:`join` has begun.
        """
        try:
            self._head.put(args)
        except (Closed, Aborted):
            raise JobWorkerError(
                "this JobManager is joined and takes no more input; create a new one"
            ) from None

    def _put_until(self, args: Any, deadline: float | None) -> bool:
        try:
            return self._head.put(args, deadline)
        except (Closed, Aborted):
            return False

    # -- finishing -----------------------------------------------------------

    def join(self, timeout: float | None = None) -> None:
        """Close the input and wait until every element went through all stages.

        ``timeout`` (seconds): ``None`` waits for the end; otherwise ``join``
        returns at the deadline (``0`` returns at once), after which every
        thread quits as soon as its current element is done and whatever is
        still queued is dropped. Calling it again is harmless.
        """
        deadline = _deadline(timeout)
        with self._lock:
            if self._aborted:
                return
            if not self._closing:
                self._closing = True
                self._head.close()
        last = self._stages[-1]
        try:
            # the last stage finishes only after all upstream stages did
            if not last.finished.wait(_remaining(deadline)):
                self._abort()
                return
            for t in self._threads.snapshot():
                if t is not threading.current_thread():
                    t.join(_remaining(deadline))
        except BaseException:  # e.g. Ctrl-C while waiting: stop the pipeline too
            self._abort()
            raise

    def _abort(self) -> None:
        with self._lock:
            self._closing = True
            self._aborted = True
        self._head.abort()
        for stage in self._stages:
            stage.abort()
        for stage in self._stages:
            stage.finished.set()
        logger.debug("jobq pipeline stopped at its deadline; queued elements dropped")

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.join(timeout=0 if exc_type is not None else None)

    # -- control and stats ---------------------------------------------------

    def set_thread_num(self, worker: Callable[[Any], Any], n: int) -> None:
        """Set the number of threads of the stage running ``worker``.

        ``worker`` is matched by equality (a freshly fetched bound method
        matches). Growing starts the threads before returning; shrinking lets
        the retired threads finish their current element, then exit without
        taking another. Raises ``TypeError``/``ValueError`` if ``n`` is not an
        int >= 1, :class:`JobWorkerNotFound` if no stage runs ``worker``,
        :class:`JobWorkerError` for a stage with a dispatcher. Does nothing
        once :meth:`join` has begun.
        """
        n = _check_thread_num(n, "n")
        with self._lock:
            if self._closing:
                return
            for stage in self._stages:
                if stage.func == worker:
                    break
            else:
                raise JobWorkerNotFound(
                    f"{callable_name(worker)} is not a stage of this JobManager;"
                    " pass the function given in workers"
                )
            if stage.dispatcher is not None:
                raise JobWorkerError(
                    f"stage {stage.name} has a dispatcher: its thread count is fixed"
                    " (changing it would break the dispatcher's index mapping)"
                )
            stage.set_thread_num(n)

    def stat(self) -> dict[str, Any]:
        """A snapshot: ``{'in', 'out', 'doing', 'errors', 'workers': [...]}``.

        ``in``/``out`` count stage-function calls started/finished over all
        stages, ``doing = in - out``; one entry per stage in ``workers`` with
        ``name``, ``input`` ``{'size', 'capa'}``, ``nr_worker``, ``in``,
        ``out``, ``errors``, plus ``coordinator`` (ordered stages) and
        ``dispatcher`` (per-thread queues) where they apply.
        """
        stages = [stage.stat() for stage in self._stages]
        n_in = sum(s["in"] for s in stages)
        n_out = sum(s["out"] for s in stages)
        return {
            "in": n_in,
            "out": n_out,
            "doing": n_in - n_out,
            "errors": sum(s["errors"] for s in stages),
            "workers": stages,
        }


def stat(probe: dict[str, Any]) -> dict[str, Any]:
    """Stats of the pipeline ``probe`` was passed to (running or finished);
    see :meth:`JobManager.stat`. Raises ``ValueError`` for an unused probe."""
    manager = probe.get("manager") if isinstance(probe, dict) else None
    if not isinstance(manager, JobManager):
        raise ValueError("this probe was not passed to jobq.run() or JobManager(probe=...)")
    return manager.stat()


def run(
    input: Iterable[Any],
    workers: Iterable[Any],
    keep_order: bool = False,
    timeout: float | None = None,
    probe: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> None:
    """Push every element of ``input`` through the stages ``workers``; return
    when all are done, or when ``timeout`` seconds (counted from the call,
    feeding included) have passed: then threads quit after their current
    element and the rest is dropped (``timeout=0`` returns at once).

    ``input`` is read lazily (backpressure: it is never read further ahead
    than the queues hold). If iterating it raises, the elements already read
    are drained and the exception is re-raised. ``progress=True`` shows a
    tqdm bar of elements through the first stage (see :mod:`taskit.progress`).
    Returns ``None``: results exist only as the stages' side effects.
    """
    deadline = _deadline(timeout)
    manager = JobManager(workers, queue_size=queue_size, probe=probe, keep_order=keep_order)
    bar = None
    if progress:
        from taskit.progress import progress_bar

        try:
            total: int | None = len(input)  # type: ignore[arg-type]
        except TypeError:
            total = None
        bar = progress_bar(total=total, enabled=True, desc="jobq")
        manager._stages[0].on_done = bar.update
    try:
        try:
            for element in input:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not manager._put_until(element, deadline):
                    break
        except Exception:
            manager.join(_remaining(deadline))
            raise
        except BaseException:  # KeyboardInterrupt: stop now, do not drain
            manager.join(timeout=0)
            raise
        manager.join(_remaining(deadline))
    finally:
        if bar is not None:
            bar.close()


class limit_job_speed:  # noqa: N801 -- jobq's public name
    """A pass-through stage that caps throughput at ``max_job_speed`` jobs/s.

    Use it as a stage: ``run(src, [fetch, limit_job_speed(100), store])``.
    ``max_job_speed`` is a number, or a callable read on each job (to change
    the rate while running). Each call counts ``job_step`` jobs and is paced so
    that job k is released ``job_step / speed`` seconds after job k-1 (idle
    time is not saved up for a later burst); the first job waits one step, so
    300 jobs at 100/s take about 3 s. The measured speed is logged at DEBUG
    every 5 s. Thread-safe: with several threads the cap is shared. A speed
    that is not a positive number (or a callable that raises) is logged and
    that job passes unlimited. Raises ``TypeError``/``ValueError`` for a bad
    constant speed or step.
    """

    tick_time = 5.0

    def __init__(self, max_job_speed: float | Callable[[], float], job_step: float = 1) -> None:
        if not callable(max_job_speed):
            self._check_speed(max_job_speed)
        if isinstance(job_step, bool) or not isinstance(job_step, (int, float)) or job_step <= 0:
            raise ValueError(f"job_step must be a positive number, got {job_step!r}")
        self.max_job_speed = max_job_speed
        self.job_step = job_step
        self.__name__ = "limit_job_speed"
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time at which the last admitted job was released
        self._tick_start = time.monotonic()
        self._tick_count = 0.0

    @staticmethod
    def _check_speed(speed: Any) -> float:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise TypeError(f"max_job_speed must be a number or a callable, got {speed!r}")
        if not speed > 0:
            raise ValueError(f"max_job_speed must be > 0 jobs per second, got {speed!r}")
        return float(speed)

    def __call__(self, args: Any) -> Any:
        try:
            speed = self.max_job_speed
            speed = self._check_speed(speed() if callable(speed) else speed)
        except Exception:
            logger.warning("limit_job_speed: bad max_job_speed, job not limited", exc_info=True)
            return args
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + self.job_step / speed
            wake = self._next
            self._tick_count += self.job_step
            if now - self._tick_start >= self.tick_time:
                logger.debug(
                    "limit_job_speed: %.1f jobs/s (max %.1f)",
                    self._tick_count / (now - self._tick_start),
                    speed,
                )
                self._tick_start, self._tick_count = now, 0.0
        delay = wake - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing is this stage's purpose, not synchronisation
        return args
