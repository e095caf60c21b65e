#!/usr/bin/env python
"""The example backend, as TaskIt 4.0 shipped it: start it before examples/main.py.

    python examples/worker.py                  # 127.0.0.1:54543
    python examples/worker.py HOST [PORT]      # another address

It serves ``wait-double`` (sleeps up to a second, returns twice its
argument), ``get-error`` (fails an assertion) and the admin tasks (``<stop>``,
``<kill>``, ``<status>``), and logs every event to stdout with the Unix time.
Ctrl-C (or SIGTERM) stops it gracefully; so does ``examples/main.py``.
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taskit.backend import ADMIN_TASKS, build_backend  # noqa: E402
from taskit.log import INFO, FileLogger  # noqa: E402


def random_wait(number):
    time.sleep(random.random())
    return number * 2


def error_maker():
    raise AssertionError("Why ever did you call this!?")


class RTimeTermLogger(FileLogger):
    """A console logger stamping each line with the Unix time, for demonstrations."""

    def __init__(self, allowed=None, children=()):
        FileLogger.__init__(self, sys.stdout, allowed, 1, children)

    def _time(self):
        return f"{time.time():.3f}"


def main():
    log = RTimeTermLogger()
    log(INFO, "Starting...")
    tasks = {"wait-double": random_wait, "get-error": error_maker}
    tasks.update(ADMIN_TASKS)
    backend = build_backend(tasks, logger=log)
    backend.main()


if __name__ == "__main__":
    main()
