"""Every hot-path socket trick of taskit, once, and the library internals they rely on.

The client and the server send and receive each message with as few Python
calls as pyzmq allows. The tricks, and why each pays:

- **Unwrapped socket methods.** ``zmq.Socket.send``/``recv``/``get`` are the
  sugar layer's wrappers: each adds a Python call (and for ``send``, a flags
  enum round) per frame. :data:`base_send`, :data:`base_recv` and
  :data:`base_get` are the Cython methods underneath (``zmq.backend.Socket``),
  called as ``base_send(sock, data, flags, copy)``; bind one to a socket with
  ``base_send.__get__(sock)``.
- **Plain int flags.** ``zmq.NOBLOCK | zmq.SNDMORE`` is enum arithmetic each
  time; the ints below are computed once.
- **Zero copy for big frames.** A frame of :data:`ZERO_COPY` bytes or more is
  sent with ``copy=False`` (libzmq reads the bytes object itself) and received
  as a ``zmq.Frame`` whose buffer is read in place: below that size a copy is
  cheaper than the bookkeeping (pyzmq frees a zero-copy frame's bytes through
  its garbage-collector thread, a wake-up per frame), above it a copy costs
  more than the bytes, its buffer being over glibc's default mmap threshold
  (128 KiB: mapped, faulted in and unmapped each time). Measured
  (doc/comparison.md): an echo of 64-120 KiB costs less CPU copied, 128 KiB and
  more much less zero-copy.
- :data:`zmq_poll`: pyzmq's poll function, without the ``zmq.Poller`` object.
- :data:`FUTURE_RUNNING`: the state name of a running
  :class:`concurrent.futures.Future`, so a future can be created already
  running without taking its condition lock (``set_running_or_notify_cancel``);
  :data:`FUTURE_FIELDS`, the attributes ``Future.__init__`` sets, so a future can
  be created without its ``threading.Condition`` (most of a submit's cost) and
  make it only when a thread waits on it.

These rely on pyzmq's and CPython's internals (``zmq.backend.Socket``,
``concurrent.futures._base``); ``tests/test_wire.py`` fails loudly if a new
release changes them. Nothing else in taskit touches those internals.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import _base as _futures_base
from typing import Any

import zmq
from zmq.backend import zmq_poll as _zmq_poll

__all__ = [
    "base_send",
    "base_recv",
    "base_get",
    "zmq_poll",
    "NOBLOCK",
    "DONTWAIT",
    "MORE",
    "EVENTS",
    "POLLIN",
    "ZERO_COPY",
    "send_frames",
    "FUTURE_RUNNING",
    "FUTURE_PENDING",
    "FUTURE_FINISHED",
    "FUTURE_OVER",
    "FUTURE_FIELDS",
]

# Typed loosely: pyzmq's stubs overload them on literal flags, which int flags miss.
base_send: Callable[..., Any] = zmq.backend.Socket.send
base_recv: Callable[..., Any] = zmq.backend.Socket.recv
base_get: Callable[..., Any] = zmq.backend.Socket.get
zmq_poll: Callable[..., Any] = _zmq_poll

NOBLOCK = int(zmq.NOBLOCK)
DONTWAIT = int(zmq.DONTWAIT)
MORE = int(zmq.SNDMORE) | DONTWAIT  # another frame follows; never block
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)

ZERO_COPY = 128 * 1024  # frames at least this long are sent and read without a copy

FUTURE_RUNNING = getattr(_futures_base, "RUNNING", "RUNNING")
FUTURE_PENDING = getattr(_futures_base, "PENDING", "PENDING")
FUTURE_FINISHED = getattr(_futures_base, "FINISHED", "FINISHED")
# the states Future.done() answers True for
FUTURE_OVER = frozenset(
    (
        FUTURE_FINISHED,
        getattr(_futures_base, "CANCELLED", "CANCELLED"),
        getattr(_futures_base, "CANCELLED_AND_NOTIFIED", "CANCELLED_AND_NOTIFIED"),
    )
)
# What Future.__init__ sets: a subclass that skips it (to make its Condition only
# when a thread waits on it) sets these itself; tests/test_wire.py checks the list.
FUTURE_FIELDS = ("_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks")


def send_frames(send: Callable[..., Any], frames: list[bytes]) -> None:
    """Send one message's ``frames`` (three, or four when signed) without blocking,
    a big body without a copy.

    ``send`` is :data:`base_send` bound to a socket. Raises ``zmq.Again`` when
    the first frame cannot be queued (nothing is sent then: ZeroMQ queues a
    message whole or not at all). Unrolled: a loop costs as much as a send.
    """
    send(frames[0], MORE)
    send(frames[1], MORE)
    body = frames[2]
    last = len(frames) == 3
    send(body, DONTWAIT if last else MORE, len(body) < ZERO_COPY)
    if not last:
        send(frames[3], DONTWAIT)
