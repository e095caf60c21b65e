"""examples/pool.py runs as written and shows what it claims."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pool_example_runs():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "pool.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "submit: 49" in text
    assert "map:    [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in text
    assert "SimpleJob put on the queue: 1024" in text
    assert "crash -> WorkerLostError" in text
    assert "still working: [0, 1, 4, 9, 16]" in text
    assert "hello taskit from process" in text
