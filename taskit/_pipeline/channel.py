"""The queue between pipeline threads: a bounded FIFO that can be closed (end
of stream) or aborted (stop now), and the private exceptions through which it
tells its users so.

Control flow goes through exceptions, never through sentinel values: any user
value, including ``None``, ``False``, ``0`` or ``EmptyRst``, is a normal
element. Private to :mod:`taskit._pipeline`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Aborted", "Channel", "Closed", "Retired"]


class Closed(Exception):
    """The channel is closed and drained: end of stream."""


class Aborted(Exception):
    """The pipeline was stopped (join timeout): drop everything, exit."""


class Retired(Exception):
    """This worker thread was retired by set_thread_num."""


class Channel:
    """A bounded FIFO between threads that can be *closed* (end of stream:
    getters drain what is left, then stop) and *aborted* (every waiter wakes
    up and stops at once). ``queue.Queue`` has neither, hence this class.
    Thread-safe.
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
        ``time.monotonic()`` value) passed first. Raises Aborted/Closed."""
        with self._lock:
            while True:
                if self._aborted:
                    raise Aborted
                if self._closed:
                    raise Closed
                if len(self._items) < self.capacity:
                    break
                if deadline is None:
                    self._not_full.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._not_full.wait(left)
            self._items.append(item)
            self._not_empty.notify()
            return True

    def get(self, worker: Any = None) -> Any:
        """Take the oldest item, blocking while empty. Raises Aborted, Retired
        (``worker``, any object with a ``retired`` flag, was retired) or Closed
        (closed and drained)."""
        # the hot path: this loop is written out here and in get_all, because
        # sharing it through a helper call costs ~7% of a get
        with self._lock:
            while True:
                if self._aborted:
                    raise Aborted
                if worker is not None and worker.retired:
                    raise Retired
                if self._items:
                    item = self._items.popleft()
                    self._not_full.notify()
                    return item
                if self._closed:
                    raise Closed
                self._not_empty.wait()

    def get_all(self) -> list[Any]:
        """Like :meth:`get` (no worker), but take every item that is there."""
        with self._lock:
            while True:
                if self._aborted:
                    raise Aborted
                items = self._items
                if items:
                    batch = list(items)
                    items.clear()
                    self._not_full.notify_all()
                    return batch
                if self._closed:
                    raise Closed
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
