"""The package's public face and the dependency direction DESIGN.md promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import taskit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_resolves():
    for name in taskit.__all__:
        assert getattr(taskit, name) is not None, name
    assert taskit.DEFAULT_PORT == 54543


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        taskit.nope  # noqa: B018


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return set(json.loads(out.stdout))


LOCAL_HALF = ["simple", "resync", "log", "threaded", "pool", "jobq"]
# and the private modules that taskit.pool loads only on demand, or a worker process loads
LOCAL_HALF += ["_pool.processes", "_pool.child", "_pool.start_workers"]


@pytest.mark.parametrize("module", LOCAL_HALF)
def test_the_local_half_never_imports_the_distributed_half(module):
    loaded = _modules_loaded_by(f"import taskit.{module}")
    distributed = {"zmq", "taskit.protocol", "taskit.backend", "taskit.frontend", "taskit.aio"}
    assert not loaded & distributed


@pytest.mark.parametrize("module", ["_pool.child", "_pool.start_workers"])
def test_a_worker_process_loads_none_of_the_pools_parent_side(module):
    # A worker imports the child loop by name, and unpickles start_workers' jobs
    # from _pool.start_workers: neither may drag in the pool or its manager.
    loaded = _modules_loaded_by(f"import taskit.{module}")
    assert not loaded & {"taskit.pool", "taskit._pool.pool", "taskit._pool.processes"}


def test_the_frontend_never_imports_the_backend():
    loaded = _modules_loaded_by("import taskit.frontend, taskit.aio")
    assert "taskit.backend" not in loaded
    assert "taskit.pool" not in loaded


def test_errors_import_nothing_from_taskit():
    loaded = _modules_loaded_by("import taskit.errors")
    assert {m for m in loaded if m.startswith("taskit.")} == {"taskit.errors"}


def _generated_api_reference() -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "doc", "gen_api.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_api_reference_shows_signatures_as_python_writes_them():
    text = _generated_api_reference()
    assert "host: str = '127.0.0.1'" in text  # string defaults quoted
    assert "pool: Any = 'thread'" in text
    assert "Message(kind: int, codec_id: int, call_id: int, body: bytes)" in text
    assert "ForwardRef" not in text
    assert "codec: Any = JSONCodec" in text  # classes and functions by name
    assert "logger: Callable[[str, Any], Any] = null_logger" in text


def test_doc_api_md_is_what_the_generator_writes():
    with open(os.path.join(ROOT, "doc", "api.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == _generated_api_reference(), (
        "doc/api.md is out of date: run python doc/gen_api.py > doc/api.md"
    )


def test_ci_tests_every_python_the_package_claims():
    import re

    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()
    floor = re.search(r'requires-python = ">=3\.(\d+)"', pyproject).group(1)
    with open(os.path.join(ROOT, "noxfile.py"), encoding="utf-8") as f:
        noxfile = f.read()
    pythons = re.findall(r'"3\.(\d+)"', re.search(r"PYTHONS = \[(.*?)\]", noxfile).group(1))
    assert pythons[0] == floor, "noxfile.PYTHONS must start at requires-python's floor"
    minors = [int(p) for p in pythons]
    assert minors == list(range(minors[0], minors[-1] + 1)), "no version skipped"
    for p in pythons:
        assert f'"Programming Language :: Python :: 3.{p}"' in pyproject
