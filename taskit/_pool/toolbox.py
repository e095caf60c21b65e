"""Per-worker set-up, the same in a worker thread and a worker process.

A worker runs the pool's ``initializer(*initargs)`` and then its
``toolbox_factory()`` once, inside itself; :func:`current_toolbox` then
returns that toolbox to any code the worker runs. Import
:func:`current_toolbox` from :mod:`taskit.pool`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["current_toolbox", "call_initializers"]

_local = threading.local()


def current_toolbox() -> Any:
    """The toolbox of the worker running the caller (thread or process worker).

    Lets plain functions given to :meth:`WorkerPool.submit` reach the per-worker
    resource that ``toolbox_factory`` built. Raises :class:`LookupError` when the
    caller is not a pool worker with a toolbox.
    """
    try:
        return _local.toolbox
    except AttributeError:
        raise LookupError(
            "current_toolbox() was called outside a pool worker that has a toolbox; "
            "pass toolbox_factory= to WorkerPool"
        ) from None


def call_initializers(
    initializer: Callable[..., Any] | None,
    initargs: tuple,
    toolbox_factory: Callable[[], Any] | None,
) -> Any:
    """Run a worker's initializer then its toolbox factory, in the worker itself."""
    if initializer is not None:
        initializer(*initargs)
    if toolbox_factory is None:
        return None
    toolbox = _local.toolbox = toolbox_factory()
    return toolbox
