"""TaskIt 4.0 compatibility: the three names the original took from ``_thread``.

New code should use :mod:`threading` directly; these exist so that code written
for TaskIt 4.0 keeps working.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["threaded", "allocate_lock", "error"]

#: A new plain (non-reentrant) lock, exactly ``_thread.allocate_lock``.
allocate_lock = threading.Lock

#: The error ``_thread`` raises (e.g. releasing an unlocked lock); it is ``RuntimeError``.
error = RuntimeError

_counter = itertools.count(1)


def threaded(
    func: Callable[..., Any],
    args: tuple[Any, ...] | list[Any] = (),
    kw: Mapping[str, Any] | None = None,
) -> threading.Thread:
    """Run ``func(*args, **kw)`` on a new thread and return that (started) thread.

    The thread is a daemon, like ``_thread.start_new_thread`` threads: it never
    keeps the interpreter alive. An exception in ``func`` goes to
    :func:`threading.excepthook` (printed to stderr by default).

    Raises ``TypeError`` when ``args`` is not a tuple or list (a string would
    otherwise be silently split into characters) or ``kw`` is not a mapping.
    Does not block. Thread-safe.
    """
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"threaded(): args must be a tuple or list, not {type(args).__name__}")
    if kw is not None and not isinstance(kw, Mapping):
        raise TypeError(f"threaded(): kw must be a mapping, not {type(kw).__name__}")
    return _start_daemon(f"taskit-threaded-{next(_counter)}", func, tuple(args), dict(kw or {}))


def _start_daemon(
    name: str,
    target: Callable[..., Any],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> threading.Thread:
    """Start and return a daemon thread running ``target(*args, **kwargs)``.

    The one place the local half starts a fire-and-forget thread
    (:func:`threaded`, :mod:`taskit.simple`, :class:`taskit.resync.Resyncer`).
    """
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, name=name, daemon=True)
    thread.start()
    return thread
