"""A running pipeline: ``JobManager`` and the ``run()``/``stat()`` built on it.

Validates the stage specs, wires the stages of :mod:`taskit._pipeline.stage`
together with the channels of :mod:`taskit._pipeline.channel`, feeds the
head, and joins or aborts the whole. The contract users see is
:mod:`taskit.jobq`'s docstring; import these names from there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from taskit._pipeline.channel import Aborted, Channel, Closed
from taskit._pipeline.stage import STAGE_QUEUE_SIZE, Stage, ThreadSet, callable_name
from taskit.errors import JobWorkerError, JobWorkerNotFound

__all__ = ["JobManager", "run", "stat", "DEFAULT_QUEUE_SIZE"]

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

    __module__ = "taskit.jobq"  # its public home, as before the move (reprs, api.md)

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


# Their public home, as before the move (api.md, reprs).
run.__module__ = stat.__module__ = "taskit.jobq"
