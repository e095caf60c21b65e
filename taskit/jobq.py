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
"""

from __future__ import annotations

import functools
import logging
import operator
import reprlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
_STAGE_QUEUE_SIZE = 1024  # capacity of the queues between stages (jobq's value)
_SLOT_CAPACITY = 64  # items a generator may run ahead of the coordinator, per element

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


class _EmptyRstType:
    """The type of :data:`EmptyRst` (a single instance, compared with ``is``)."""

    _instance: _EmptyRstType | None = None

    def __new__(cls) -> _EmptyRstType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "jobq.EmptyRst"

    def __reduce__(self) -> str:
        return "EmptyRst"


EmptyRst = _EmptyRstType()
"""Return this from a stage function to pass nothing to the next stage."""

# Private control-flow signals: never visible to users, never confused with data
# (any user value, including None, False, 0 or EmptyRst, is a normal element).


class _Closed(Exception):
    """The channel is closed and drained: end of stream."""


class _Aborted(Exception):
    """The pipeline was stopped (join timeout): drop everything, exit."""


class _Retired(Exception):
    """This worker thread was retired by set_thread_num."""


_NOTHING = object()  # "the call produced no single value to pass on"

# results that are certainly not iterators: skips the (slower) ABC check on the hot path
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), tuple, list, dict, set})


class _Channel:
    """A bounded FIFO between threads that can be *closed* (end of stream:
    getters drain what is left, then stop) and *aborted* (every waiter wakes
    up and stops at once). ``queue.Queue`` has neither, hence this class.
    """

    __slots__ = (
        "capacity",
        "_items",
        "_lock",
        "_not_empty",
        "_not_full",
        "_closed",
        "_aborted",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._aborted = False

    def qsize(self) -> int:
        return len(self._items)

    def put(self, item: Any, deadline: float | None = None) -> bool:
        """Append ``item``, blocking while full. False if ``deadline`` (a
        ``time.monotonic()`` value) passed first. Raises _Aborted/_Closed."""
        with self._lock:
            while len(self._items) >= self.capacity:
                if self._aborted:
                    raise _Aborted
                if self._closed:
                    raise _Closed
                if deadline is None:
                    self._not_full.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._not_full.wait(left)
            if self._aborted:
                raise _Aborted
            if self._closed:
                raise _Closed
            self._items.append(item)
            self._not_empty.notify()
            return True

    def get(self, worker: _Worker | None = None) -> Any:
        """Take the oldest item, blocking while empty. Raises _Aborted,
        _Retired (``worker`` was retired) or _Closed (closed and drained)."""
        with self._lock:
            while True:
                if self._aborted:
                    raise _Aborted
                if worker is not None and worker.retired:
                    raise _Retired
                if self._items:
                    item = self._items.popleft()
                    self._not_full.notify()
                    return item
                if self._closed:
                    raise _Closed
                self._not_empty.wait()

    def get_all(self) -> list[Any]:
        """Like :meth:`get` (no worker), but take every item that is there."""
        with self._lock:
            while True:
                if self._aborted:
                    raise _Aborted
                items = self._items
                if items:
                    batch = list(items)
                    items.clear()
                    self._not_full.notify_all()
                    return batch
                if self._closed:
                    raise _Closed
                self._not_empty.wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()  # a put racing with close must not sleep forever

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            self._items.clear()  # dropped: nobody will consume them
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def wake_getters(self) -> None:
        """Make blocked getters re-check their worker's ``retired`` flag."""
        with self._lock:
            self._not_empty.notify_all()


class _Worker:
    """One thread of a stage, with counters only that thread writes."""

    __slots__ = ("index", "thread", "retired", "n_in", "n_out", "errors")

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.retired = False
        self.n_in = 0
        self.n_out = 0
        self.errors = 0


class _Slot:
    """The output of one element in an ordered stage: filled by the worker
    that runs it, emptied in input order by the stage's coordinator.

    ``items`` holds what a generator yielded so far (made on first use: most
    elements give one ``value``, set with ``done``)."""

    __slots__ = ("items", "value", "done", "owner")

    def __init__(self, owner: int = 0) -> None:
        self.items: deque[Any] | None = None
        self.value: Any = _NOTHING
        self.done = False
        self.owner = owner


def _callable_name(func: Any) -> str:
    """``module:name`` for stats; robust to builtins, partials and objects."""
    if isinstance(func, functools.partial):
        return f"functools.partial({_callable_name(func.func)})"
    module = getattr(func, "__module__", None) or "builtin"
    name = getattr(func, "__name__", None) or getattr(func, "__qualname__", None)
    if name is None:  # a callable object: name its class
        name = type(func).__name__
    return f"{module}:{name}"


def _check_thread_num(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what} must be an int >= 1, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}; a stage needs at least one thread")
    return n


def _parse_spec(spec: Any, position: int) -> tuple[Callable[[Any], Any], int, Any]:
    """Normalise a worker spec to ``(func, n, dispatcher)`` or raise."""
    if isinstance(spec, tuple):
        if not 1 <= len(spec) <= 3:
            raise ValueError(
                f"worker #{position}: a tuple spec is (func, n) or (func, n, dispatcher),"
                f" got {len(spec)} items"
            )
        func, n, dispatcher = spec + (1, None)[len(spec) - 1 :]
    else:
        func, n, dispatcher = spec, 1, None
    if not callable(func):
        raise TypeError(f"worker #{position}: {func!r} is not callable")
    n = _check_thread_num(n, f"worker #{position} thread count")
    if dispatcher is not None and not callable(dispatcher):
        raise TypeError(f"worker #{position}: dispatcher {dispatcher!r} is not callable")
    return func, n, dispatcher


class _Stage:
    """One stage: ``func`` run by ``n`` threads between ``inq`` and ``outq``.

    Modes: *plain* (threads share inq and write outq directly), *ordered*
    (keep_order: threads take elements under a lock, each into a slot, and a
    coordinator thread forwards slots in order) and *dispatch* (a dispatcher
    thread routes each element to one thread's own channel; a coordinator
    restores order). The last stage needs no coordinator: its output is
    discarded, so there is nothing to order.
    """

    def __init__(
        self,
        manager: JobManager,
        index: int,
        func: Callable[[Any], Any],
        n: int,
        dispatcher: Callable[[Any], Any] | None,
        keep_order: bool,
        inq: _Channel,
        outq: _Channel | None,
    ) -> None:
        self.manager = manager
        self.index = index
        self.func = func
        self.dispatcher = dispatcher
        self.inq = inq
        self.outq = outq
        self.target = n
        self.name = _callable_name(func)
        self.on_done: Callable[[int], None] | None = None
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        self.live = 0  # threads of this stage not yet exited (all kinds)
        self._next_index = 0
        self._aborted = False
        # counters folded in from exited workers (guarded by self.lock)
        self._done_in = self._done_out = self._done_errors = 0
        self._dispatch_errors = 0  # written by the dispatcher thread only
        self.finished = threading.Event()  # all output produced (or aborted)
        self.ordered = (keep_order or dispatcher is not None) and outq is not None
        self.slots: _Channel | None = None
        if self.ordered:
            self.slots = _Channel(_STAGE_QUEUE_SIZE)
            self._slot_lock = threading.Lock()
            self._coord_cv = threading.Condition(self._slot_lock)
            self._room_cv = threading.Condition(self._slot_lock)
            self._head: _Slot | None = None
        self._take_lock = threading.Lock()  # ordered mode: take + enqueue slot atomically
        self.channels: list[_Channel] = []
        if dispatcher is not None:
            self.channels = [_Channel(_STAGE_QUEUE_SIZE) for _ in range(n)]
            self._completed = [0] * n  # written by worker i only
            self._forwarded = [0] * n  # written by the coordinator only

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        with self.lock:
            if self.dispatcher is not None:
                for i in range(self.target):
                    self._spawn(self._run_dispatched, i)
                self._spawn_helper(self._run_dispatcher, "dispatch")
            else:
                body = self._run_ordered if self.ordered else self._run_plain
                for _ in range(self.target):
                    self._spawn(body, None)
            if self.ordered:
                self._spawn_helper(self._run_coordinator, "coord")

    def _spawn(self, body: Callable[[_Worker], None], index: int | None) -> _Worker:
        # caller holds self.lock
        w = _Worker(self._next_index if index is None else index)
        self._next_index += 1
        w.thread = threading.Thread(
            target=body,
            args=(w,),
            name=f"taskit-jobq-{self.index}-{getattr(self.func, '__name__', 'stage')}-{w.index}",
            daemon=True,
        )
        self.workers.append(w)
        self.live += 1
        self.manager._register(w.thread)
        w.thread.start()
        return w

    def _spawn_helper(self, body: Callable[[], None], role: str) -> None:
        t = threading.Thread(target=body, name=f"taskit-jobq-{self.index}-{role}", daemon=True)
        self.live += 1
        self.manager._register(t)
        t.start()

    def _exit(self, w: _Worker | None, closes_output: bool = False) -> None:
        """Bookkeeping when any thread of this stage ends.

        With ``closes_output``, the last element thread out closes what it
        writes to (the next stage's input, or the slots of the coordinator).
        Non-retired threads only stop at end of stream and set_thread_num keeps
        at least one, so "no element thread left" means no more output can come.
        """
        with self.lock:
            if w is not None:
                self._done_in += w.n_in
                self._done_out += w.n_out
                self._done_errors += w.errors
                self.workers.remove(w)
            self.live -= 1
            last = self.live == 0
            no_workers = not self.workers
        if closes_output and no_workers and not self._aborted:
            if self.ordered:
                assert self.slots is not None
                self.slots.close()
            elif self.outq is not None:
                self.outq.close()
        self.manager._unregister(threading.current_thread())
        if last:
            self.finished.set()

    def set_thread_num(self, n: int) -> None:
        with self.lock:
            active = [w for w in self.workers if not w.retired]
            body = self._run_ordered if self.ordered else self._run_plain
            for _ in range(n - len(active)):
                self._spawn(body, None)
            for w in active[: max(0, len(active) - n)]:  # the oldest go first
                w.retired = True
            self.target = n
        self.inq.wake_getters()  # a retired thread waiting for input leaves now

    def abort(self) -> None:
        self._aborted = True
        for ch in (self.inq, self.outq, self.slots, *self.channels):
            if ch is not None:
                ch.abort()
        if self.ordered:
            with self._slot_lock:
                self._coord_cv.notify_all()
                self._room_cv.notify_all()

    # -- running one element -------------------------------------------------

    def _emit(self, value: Any) -> None:
        if self.outq is not None:
            self.outq.put(value)

    def _call(self, w: _Worker, item: Any, sink: Callable[[Any], None]) -> Any:
        """Run ``func(item)``. Iterator results go item by item to ``sink``;
        a single value is returned (``_NOTHING`` when there is none). Errors are
        logged and counted; only _Aborted propagates."""
        w.n_in += 1
        try:
            rst = self.func(item)
            if type(rst) not in _PLAIN_TYPES and isinstance(rst, Iterator):
                for value in rst:
                    if value is not EmptyRst:
                        sink(value)
                return _NOTHING
            return _NOTHING if rst is EmptyRst else rst
        except _Aborted:
            raise
        except BaseException:
            # a stage must survive anything its function does; the element is dropped
            w.errors += 1
            logger.error(
                "jobq stage %s raised on element %s; element dropped",
                self.name,
                _repr.repr(item),
                exc_info=True,
            )
            return _NOTHING
        finally:
            w.n_out += 1
            if self.on_done is not None:
                self.on_done(1)

    def _run_plain(self, w: _Worker) -> None:
        get, call, emit = self.inq.get, self._call, self._emit
        try:
            while True:
                item = get(w)
                value = call(w, item, emit)
                if value is not _NOTHING:
                    emit(value)
        except (_Closed, _Retired, _Aborted):
            pass
        finally:
            self._exit(w, closes_output=True)

    def _run_ordered(self, w: _Worker) -> None:
        assert self.slots is not None
        get, call, slots = self.inq.get, self._call, self.slots
        try:
            while True:
                with self._take_lock:
                    # taking and queueing the slot together is what fixes the order
                    item = get(w)
                    slot = _Slot()
                    slots.put(slot)
                value = call(w, item, functools.partial(self._push, slot))
                self._finish_slot(slot, value)
        except (_Closed, _Retired, _Aborted):
            pass
        finally:
            self._exit(w, closes_output=True)

    # -- dispatcher mode -----------------------------------------------------

    def _run_dispatcher(self) -> None:
        assert self.dispatcher is not None
        n = len(self.channels)
        try:
            while True:
                item = self.inq.get()
                try:
                    index = operator.index(self.dispatcher(item)) % n
                except BaseException:
                    self._dispatch_errors += 1
                    logger.error(
                        "jobq dispatcher of stage %s raised on element %s (it must return"
                        " an int); element dropped",
                        self.name,
                        _repr.repr(item),
                        exc_info=True,
                    )
                    continue
                slot = None
                if self.ordered:
                    assert self.slots is not None
                    slot = _Slot(index)
                    self.slots.put(slot)
                self.channels[index].put((item, slot))
        except (_Closed, _Aborted):
            pass
        finally:
            if not self._aborted:
                for ch in self.channels:
                    ch.close()
                if self.slots is not None:
                    self.slots.close()
            self._exit(None)

    def _run_dispatched(self, w: _Worker) -> None:
        chan = self.channels[w.index]
        call = self._call
        try:
            while True:
                item, slot = chan.get()
                if slot is None:  # last stage: results are discarded
                    call(w, item, self._emit)
                    continue
                value = call(w, item, functools.partial(self._push, slot))
                self._finish_slot(slot, value)
                self._completed[w.index] += 1
        except (_Closed, _Aborted):
            pass
        finally:
            self._exit(w)

    # -- ordered output ------------------------------------------------------

    def _push(self, slot: _Slot, value: Any) -> None:
        """Add one generator item to ``slot``, waiting while the slot is full."""
        with self._slot_lock:
            if slot.items is None:
                slot.items = deque()
            while len(slot.items) >= _SLOT_CAPACITY and not self._aborted:
                self._room_cv.wait()
            if self._aborted:
                raise _Aborted
            slot.items.append(value)
            if slot is self._head:
                self._coord_cv.notify()

    def _finish_slot(self, slot: _Slot, value: Any) -> None:
        with self._slot_lock:
            slot.value = value
            slot.done = True
            if slot is self._head:
                self._coord_cv.notify()

    def _run_coordinator(self) -> None:
        assert self.slots is not None
        emit = self._emit
        try:
            while True:
                for slot in self.slots.get_all():
                    while True:
                        with self._slot_lock:
                            while not slot.items and not slot.done and not self._aborted:
                                self._head = slot
                                self._coord_cv.wait()
                            if self._aborted:
                                raise _Aborted
                            items = slot.items
                            if not items:  # done: generator items (if any) all went out
                                value = slot.value
                                break
                            was_full = len(items) >= _SLOT_CAPACITY
                            value = items.popleft()
                            if was_full:
                                self._room_cv.notify_all()
                        emit(value)
                    if value is not _NOTHING:
                        emit(value)
                    if self.dispatcher is not None:
                        self._forwarded[slot.owner] += 1
        except (_Closed, _Aborted):
            pass
        finally:
            if not self._aborted and self.outq is not None:
                self.outq.close()
            self._exit(None)

    # -- stats ---------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        with self.lock:
            n_in = self._done_in + sum(w.n_in for w in self.workers)
            n_out = self._done_out + sum(w.n_out for w in self.workers)
            errors = self._done_errors + sum(w.errors for w in self.workers)
        entry: dict[str, Any] = {
            "name": self.name,
            "input": {"size": self.inq.qsize(), "capa": self.inq.capacity},
            "nr_worker": self.target,
            "in": n_in,
            "out": n_out,
            "errors": errors + self._dispatch_errors,
        }
        if self.slots is not None:
            entry["coordinator"] = {
                "size": self.slots.qsize(),
                "capa": self.slots.capacity,
            }
        if self.dispatcher is not None:
            entry["dispatcher"] = [
                {
                    "input": {"size": ch.qsize(), "capa": ch.capacity},
                    "output": {
                        "size": self._completed[i] - self._forwarded[i] if self.ordered else 0,
                        "capa": self.slots.capacity if self.slots is not None else 0,
                    },
                }
                for i, ch in enumerate(self.channels)
            ]
        return entry


class JobManager:
    """A running pipeline fed with :meth:`put` and finished with :meth:`join`.

    ``workers`` are stage specs (see the module doc); ``queue_size`` bounds the
    input queue (``put`` blocks when it is full); ``probe`` is an optional dict
    that :func:`stat` can read; ``keep_order`` keeps every stage's output in
    input order; ``probe["manager"]`` is set to this object. Threads start at
    construction. Raises ``TypeError`` /
    ``ValueError`` for malformed specs. ``put``, ``join``, ``set_thread_num``
    and ``stat`` may be called from any thread. Usable as a context manager
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
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._head = _Channel(queue_size)
        self._stages: list[_Stage] = []
        inq = self._head
        for i, (func, n, dispatcher) in enumerate(specs):
            outq = _Channel(_STAGE_QUEUE_SIZE) if i < len(specs) - 1 else None
            self._stages.append(_Stage(self, i, func, n, dispatcher, self.keep_order, inq, outq))
            inq = outq  # type: ignore[assignment]
        self.probe = probe
        if probe is not None:
            probe["manager"] = self
        for stage in self._stages:
            stage.start()

    def _register(self, thread: threading.Thread) -> None:
        with self._threads_lock:
            self._threads.add(thread)

    def _unregister(self, thread: threading.Thread) -> None:
        with self._threads_lock:
            self._threads.discard(thread)

    def _live_threads(self) -> list[threading.Thread]:
        with self._threads_lock:
            return list(self._threads)

    # -- feeding -------------------------------------------------------------

    def put(self, args: Any) -> None:
        """Feed one element (any value). Blocks while the input queue is full.

        Raises :class:`JobWorkerError` once :meth:`join` has begun.
        """
        try:
            self._head.put(args)
        except (_Closed, _Aborted):
            raise JobWorkerError(
                "this JobManager is joined and takes no more input; create a new one"
            ) from None

    def _put_until(self, args: Any, deadline: float | None) -> bool:
        try:
            return self._head.put(args, deadline)
        except (_Closed, _Aborted):
            return False

    # -- finishing -----------------------------------------------------------

    def join(self, timeout: float | None = None) -> None:
        """Close the input and wait until every element went through all stages.

        ``timeout`` (seconds): ``None`` waits for the end; otherwise ``join``
        returns at the deadline (``0`` returns at once), after which every
        thread quits as soon as its current element is done and whatever is
        still queued is dropped. Calling it again is harmless.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._lock:
            if self._aborted:
                return
            if not self._closing:
                self._closing = True
                self._head.close()
        last = self._stages[-1]
        try:
            # the last stage finishes only after all upstream stages did
            if deadline is None:
                last.finished.wait()
            elif not last.finished.wait(max(0.0, deadline - time.monotonic())):
                self._abort()
                return
            for t in self._live_threads():
                if t is not threading.current_thread():
                    t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
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
                    f"{_callable_name(worker)} is not a stage of this JobManager;"
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
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
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
            manager.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            raise
        except BaseException:  # KeyboardInterrupt: stop now, do not drain
            manager.join(timeout=0)
            raise
        manager.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
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
