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
    assert "Item(kind: int, codec_id: int, call_id: int, a: int, b: int, body: Any)" in text
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


def _taskit_imports() -> dict[str, set[str]]:
    """Module -> the taskit modules it imports, read from the source with ``ast``:
    every import statement counts, at module level, inside functions and under
    ``TYPE_CHECKING`` (a cycle there is still two files that need each other)."""
    import ast
    from pathlib import Path

    pkg_dir = Path(ROOT) / "taskit"
    files = {}
    for path in pkg_dir.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path

    def module_of(dotted: str) -> str | None:
        # "taskit.protocol.Kind" -> "taskit.protocol": the longest prefix that is a file
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, base] if base else here)
                # "from taskit import protocol" imports a module; "from taskit.x import f" not
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                mod = module_of(target)
                if mod is not None and mod != name:
                    deps.add(mod)
        graph[name] = deps
    return graph


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path back to its start) per back edge met in a depth-first walk."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                walk(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            walk(mod)
    return cycles


def test_the_import_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _import_cycles(graph) == [["a", "b", "c", "a"]]
    assert _import_cycles({"a": {"b"}, "b": set()}) == []
    imports = _taskit_imports()
    assert "taskit._wire" in imports["taskit._server.loop"]  # a from-import of names
    assert "taskit.protocol" in imports["taskit._server.handler"]  # "from taskit import x"


def test_no_import_cycles_anywhere_in_taskit():
    cycles = _import_cycles(_taskit_imports())
    assert not cycles, "import cycles in taskit/ (count every import statement):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_the_server_engine_never_imports_a_face_or_the_client():
    imports = _taskit_imports()
    faces = {"taskit.backend", "taskit.frontend", "taskit.aio", "taskit.cli"}
    for mod, deps in imports.items():
        if mod.startswith("taskit._server"):
            assert not deps & faces, (mod, deps & faces)
            assert not any(d.startswith("taskit._client") for d in deps), mod
