"""Call the example backend (examples/worker.py) the TaskIt way.

Start the worker first, then run this::

    python examples/worker.py            # terminal 1 (127.0.0.1:54543)
    python examples/main.py              # terminal 2
    python examples/main.py HOST [PORT]  # another address

It calls ``wait-double`` with 1, 5 and 9**9999 by callback (the last cannot be
encoded -- JSON refuses integers of more than 4300 digits -- so it fails at
once with a clear EncodeError instead of reaching the backend), prints the
backend's job count, triggers ``get-error`` with an error callback, and stops
the backend.
"""

from __future__ import annotations

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taskit.common import DEFAULT_PORT  # noqa: E402
from taskit.errors import EncodeError  # noqa: E402
from taskit.frontend import BackendProcessingError, FrontEnd  # noqa: E402


def main(argv: list[str]) -> int:
    host = argv[1] if len(argv) > 1 else "127.0.0.1"
    port = int(argv[2]) if len(argv) > 2 else DEFAULT_PORT
    backend = (host, port)
    lock = threading.Lock()

    def show(*parts: object) -> None:
        with lock:  # callbacks run on other threads
            print(*parts, flush=True)

    def result_cb(result: object) -> None:
        show("Result:", result)

    def error_cb(exc: BackendProcessingError) -> None:
        show(f"Remote error! type={exc.type} args={list(exc.args)}")

    with FrontEnd([backend], timeout=30) as frontend:
        pending = []
        for n in (1, 5, 9**9999):
            try:
                pending.append(frontend.callback("wait-double", result_cb, None, n))
            except EncodeError as e:
                show("Cannot send that argument:", e)
        show("Jobs on the backend:", frontend.get_tasks(backend))
        pending.append(frontend.callback("get-error", result_cb, error_cb))
        for fut in pending:  # wait until every callback has run, then stop the backend
            fut.exception()
        show("Stopping the backend:", frontend.send_stop(backend))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
