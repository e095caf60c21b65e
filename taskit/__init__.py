"""taskit: hand work off to a thread, a pool of processes, or a backend on a
distant machine -- simply, fast and under control.

The public names are imported lazily, so ``import taskit`` stays cheap and the
local half never pulls in ZeroMQ.
"""

from __future__ import annotations

import importlib
from typing import Any

from taskit.errors import *  # noqa: F401,F403
from taskit.errors import __all__ as _error_names

__version__ = "5.0.0.dev0"

# public name -> module that defines it
_LAZY = {
    "taskit": "taskit.simple",
    "Task": "taskit.simple",
    "null_cb": "taskit.simple",
    "Mediator": "taskit.resync",
    "Resyncer": "taskit.resync",
    "WorkerPool": "taskit.pool",
    "Job": "taskit.pool",
    "SimpleJob": "taskit.pool",
    "start_workers": "taskit.pool",
    "JobManager": "taskit.jobq",
    "BackEnd": "taskit.backend",
    "FrontEnd": "taskit.frontend",
    "AsyncFrontEnd": "taskit.aio",
    "DEFAULT_PORT": "taskit.common",
}

__all__ = ["__version__", *_error_names, *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
