"""The machinery of a pipeline stage: the threads that run one stage function
between two closable bounded channels, and what keeps its output in order.

A :class:`Stage` runs in one of three modes: *plain* (its threads share the
input channel and write the output channel directly), *ordered* (each element
gets a slot when it is taken; a coordinator thread forwards the slots in input
order) and *dispatch* (a dispatcher thread routes each element to one thread's
own channel; a coordinator restores the order). Control flow between threads
goes through :mod:`taskit._pipeline.channel`'s exceptions, never through sentinel
values that a user's data could collide with.

Private to :mod:`taskit._pipeline`: :mod:`~taskit._pipeline.manager`
validates the specs and wires the stages together; :mod:`taskit.jobq` is the
public API.
"""

from __future__ import annotations

import functools
import logging
import operator
import reprlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from taskit._pipeline.channel import Aborted, Channel, Closed, Retired

__all__ = [
    "STAGE_QUEUE_SIZE",
    "EmptyRst",
    "Stage",
    "ThreadSet",
    "callable_name",
]

# the user-facing logger: errors in stages are reported as jobq's
logger = logging.getLogger("taskit.jobq")

STAGE_QUEUE_SIZE = 1024  # capacity of the queues between stages (jobq's value)
_SLOT_CAPACITY = 64  # items a generator may run ahead of the coordinator, per element

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


class _EmptyRstType:
    """The type of :data:`EmptyRst` (a single instance, compared with ``is``)."""

    # its public home: pickles and tracebacks name taskit.jobq.EmptyRst
    __module__ = "taskit.jobq"

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

_NOTHING = object()  # "the call produced no single value to pass on"

# results that are certainly not iterators: skips the (slower) ABC check on the hot path
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), tuple, list, dict, set})


def callable_name(func: Any) -> str:
    """``module:name`` for stats; robust to builtins, partials and objects."""
    if isinstance(func, functools.partial):
        return f"functools.partial({callable_name(func.func)})"
    module = getattr(func, "__module__", None) or "builtin"
    name = getattr(func, "__name__", None) or getattr(func, "__qualname__", None)
    if name is None:  # a callable object: name its class
        name = type(func).__name__
    return f"{module}:{name}"


class ThreadSet:
    """The live threads of one pipeline, so that ``join`` can wait for them.
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def add(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.add(thread)

    def discard(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.discard(thread)

    def snapshot(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)


class _Worker:
    """One thread of a stage, with counters only that thread writes."""

    __slots__ = ("index", "retired", "n_in", "n_out", "errors")

    def __init__(self, index: int) -> None:
        self.index = index
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


class Stage:
    """One stage: ``func`` run by ``n`` threads between ``inq`` and ``outq``
    (``None`` for the last stage), in the mode the module doc describes.

    The last stage needs no coordinator: its output is discarded, so there is
    nothing to order. Every thread it starts is added to ``threads`` and
    removed when it ends; ``finished`` is set once all its output is produced
    (or it was aborted). ``set_thread_num``, ``abort`` and ``stat`` may be
    called from any thread.
    """

    def __init__(
        self,
        threads: ThreadSet,
        index: int,
        func: Callable[[Any], Any],
        n: int,
        dispatcher: Callable[[Any], Any] | None,
        keep_order: bool,
        inq: Channel,
        outq: Channel | None,
    ) -> None:
        self.threads = threads
        self.index = index
        self.func = func
        self.dispatcher = dispatcher
        self.inq = inq
        self.outq = outq
        self.target = n
        self.name = callable_name(func)
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
        self.slots: Channel | None = None
        if self.ordered:
            self.slots = Channel(STAGE_QUEUE_SIZE)
            self._slot_lock = threading.Lock()
            self._coord_cv = threading.Condition(self._slot_lock)
            self._room_cv = threading.Condition(self._slot_lock)
            self._head: _Slot | None = None
            self._take_lock = threading.Lock()  # take + enqueue slot atomically
        self.channels: list[Channel] = []
        if dispatcher is not None:
            self.channels = [Channel(STAGE_QUEUE_SIZE) for _ in range(n)]
            self._completed = [0] * n  # written by worker i only
            self._forwarded = [0] * n  # written by the coordinator only

    # -- lifecycle -----------------------------------------------------------

    @property
    def _shared_body(self) -> Callable[[_Worker], None]:
        """What the threads that share ``inq`` run (dispatched threads each
        have their own channel). A property, not an attribute: a stored bound
        method would make the stage a reference cycle."""
        return self._run_ordered if self.ordered else self._run_plain

    def start(self) -> None:
        with self.lock:
            if self.dispatcher is not None:
                for i in range(self.target):
                    self._spawn(self._run_dispatched, i)
                self._start_thread(self._run_dispatcher, (), "dispatch")
            else:
                for _ in range(self.target):
                    self._spawn(self._shared_body)
            if self.ordered:
                self._start_thread(self._run_coordinator, (), "coord")

    def _spawn(self, body: Callable[[_Worker], None], index: int | None = None) -> None:
        # caller holds self.lock
        w = _Worker(self._next_index if index is None else index)
        self._next_index += 1
        self.workers.append(w)
        self._start_thread(body, (w,), f"{getattr(self.func, '__name__', 'stage')}-{w.index}")

    def _start_thread(self, target: Callable[..., None], args: tuple[Any, ...], role: str) -> None:
        # caller holds self.lock
        t = threading.Thread(
            target=target, args=args, name=f"taskit-jobq-{self.index}-{role}", daemon=True
        )
        self.live += 1
        self.threads.add(t)
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
            output = self.slots if self.ordered else self.outq
            if output is not None:
                output.close()
        self.threads.discard(threading.current_thread())
        if last:
            self.finished.set()

    def set_thread_num(self, n: int) -> None:
        """Grow (threads start before returning) or shrink (the oldest threads
        finish their current element, then exit) to ``n`` threads. Not for a
        stage with a dispatcher."""
        with self.lock:
            active = [w for w in self.workers if not w.retired]
            for _ in range(n - len(active)):
                self._spawn(self._shared_body)
            for w in active[: max(0, len(active) - n)]:  # the oldest go first
                w.retired = True
            self.target = n
        self.inq.wake_getters()  # a retired thread waiting for input leaves now

    def abort(self) -> None:
        """Make every thread of this stage stop as soon as it can; queued
        elements are dropped."""
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

    def _log_dropped(self, who: str, item: Any, hint: str = "") -> None:
        logger.error(
            "jobq %s raised on element %s%s; element dropped",
            who,
            _repr.repr(item),
            hint,
            exc_info=True,
        )

    def _call(self, w: _Worker, item: Any, sink: Callable[[Any], None]) -> Any:
        """Run ``func(item)``. Iterator results go item by item to ``sink``;
        a single value is returned (``_NOTHING`` when there is none). Errors are
        logged and counted; only Aborted propagates."""
        w.n_in += 1
        try:
            rst = self.func(item)
            if type(rst) not in _PLAIN_TYPES and isinstance(rst, Iterator):
                for value in rst:
                    if value is not EmptyRst:
                        sink(value)
                return _NOTHING
            return _NOTHING if rst is EmptyRst else rst
        except Aborted:
            raise
        except BaseException:
            # a stage must survive anything its function does; the element is dropped
            w.errors += 1
            self._log_dropped(f"stage {self.name}", item)
            return _NOTHING
        finally:
            w.n_out += 1
            if self.on_done is not None:
                self.on_done(1)

    def _call_into(self, w: _Worker, item: Any, slot: _Slot) -> None:
        """Run ``func(item)`` with its output going to ``slot`` (ordered modes)."""
        value = self._call(w, item, functools.partial(self._push, slot))
        with self._slot_lock:
            slot.value = value
            slot.done = True
            if slot is self._head:
                self._coord_cv.notify()

    def _run_plain(self, w: _Worker) -> None:
        get, call, emit = self.inq.get, self._call, self._emit
        try:
            while True:
                item = get(w)
                value = call(w, item, emit)
                if value is not _NOTHING:
                    emit(value)
        except (Closed, Retired, Aborted):
            pass
        finally:
            self._exit(w, closes_output=True)

    def _run_ordered(self, w: _Worker) -> None:
        assert self.slots is not None
        get, call_into, slots = self.inq.get, self._call_into, self.slots
        try:
            while True:
                with self._take_lock:
                    # taking and queueing the slot together is what fixes the order
                    item = get(w)
                    slot = _Slot()
                    slots.put(slot)
                call_into(w, item, slot)
        except (Closed, Retired, Aborted):
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
                    self._log_dropped(
                        f"dispatcher of stage {self.name}", item, " (it must return an int)"
                    )
                    continue
                slot = None
                if self.ordered:
                    assert self.slots is not None
                    slot = _Slot(index)
                    self.slots.put(slot)
                self.channels[index].put((item, slot))
        except (Closed, Aborted):
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
        try:
            while True:
                item, slot = chan.get()
                if slot is None:  # last stage: results are discarded
                    self._call(w, item, self._emit)
                    continue
                self._call_into(w, item, slot)
                self._completed[w.index] += 1
        except (Closed, Aborted):
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
                raise Aborted
            slot.items.append(value)
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
                                raise Aborted
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
        except (Closed, Aborted):
            pass
        finally:
            if not self._aborted and self.outq is not None:
                self.outq.close()
            self._exit(None)

    # -- stats ---------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        """This stage's entry in ``JobManager.stat()['workers']``."""
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
