"""examples/main.py run as a script against a backend serving what examples/worker.py
serves (wait-double, get-error and the admin tasks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from taskit.backend import ADMIN_TASKS, BackEnd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_double(x):
    time.sleep(0.05)
    return 2 * x


def get_error():
    raise AssertionError("this task always fails")


def test_main_example():
    tasks = {"wait-double": wait_double, "get-error": get_error}
    tasks.update(ADMIN_TASKS)
    backend = BackEnd(tasks, host="127.0.0.1", port=0).start()
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "examples", "main.py"),
                "127.0.0.1",
                str(backend.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "Result: 2" in text and "Result: 10" in text
        assert "Cannot send that argument:" in text and "JSON" in text
        assert "Jobs on the backend:" in text
        assert "Remote error! type=AssertionError" in text
        assert "Stopping the backend:" in text
        assert backend.join(10)  # the example stopped it
    finally:
        backend.terminate_server()
        backend.close(timeout=5)
