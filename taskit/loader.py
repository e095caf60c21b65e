"""Find the tasks to serve from ``MODULE[:ATTR]``: an importable module, or a
``path/to/file.py``, and optionally one attribute of it.

Used by ``taskit backend``; usable by any program that serves tasks named on a
command line. Imports the user's module (its top-level code runs); nothing else.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from taskit.errors import TaskLoadError

__all__ = ["load_tasks", "describe_load_error"]


def _import_target(target: str) -> Any:
    """Import ``pkg.module`` or load ``path/to/file.py`` and return the module."""
    if target.endswith(".py") or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise TaskLoadError(
                f"no such file {target!r}; give a module name or a path to a .py file"
            )
        # Put the file's folder on sys.path so its own imports work, and register it
        # under its plain name so process-pool workers can import its functions too.
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TaskLoadError(f"cannot load {target!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules in the current folder are found
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        # Only our own lookup failing is a TaskLoadError; a missing dependency of the
        # module is the module's error and keeps its own message.
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise TaskLoadError(
                f"no module named {target!r}; check PYTHONPATH, or give a path to a .py file"
            ) from e
        raise


def load_tasks(spec: str) -> dict[str, Any]:
    """The tasks to serve for ``MODULE[:ATTR]`` (``MODULE`` may be ``path/to/file.py``).

    With ``ATTR``: a dict of tasks is served as is; a callable is served under
    its attribute name. Without: the module's ``tasks`` dict if it has one,
    else every public function defined in the module. Values of a tasks dict
    may be callables or ``(callable, pass_backend)`` pairs. Raises
    :class:`TaskLoadError` when nothing servable is found; errors raised by
    the module's own code while importing propagate (:func:`describe_load_error`
    says where, for a person).
    """
    target, _, attr = spec.partition(":")
    if not target:
        raise TaskLoadError(f"{spec!r} names no module; write MODULE, MODULE:ATTR or file.py")
    module = _import_target(target)
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise TaskLoadError(f"module {module.__name__!r} has no attribute {attr!r}") from None
        if isinstance(obj, dict):
            tasks = dict(obj)
        elif callable(obj):
            tasks = {attr: obj}
        else:
            raise TaskLoadError(
                f"{spec!r} is a {type(obj).__name__}; it must be a dict of tasks or a callable"
            )
    elif isinstance(getattr(module, "tasks", None), dict):
        tasks = dict(module.tasks)
    else:
        tasks = {
            name: obj
            for name, obj in vars(module).items()
            if not name.startswith("_")
            and inspect.isfunction(obj)
            and obj.__module__ == module.__name__
        }
    if not tasks:
        raise TaskLoadError(
            f"{spec!r} has no tasks: define a 'tasks' dict or public functions in it"
        )
    for name, value in tasks.items():
        func = value[0] if isinstance(value, tuple) and value else value
        if not isinstance(name, str) or not callable(func):
            raise TaskLoadError(f"task {name!r} in {spec!r} is not a callable")
    return tasks


def _own_frame(filename: str) -> bool:
    """False for a frame of the import machinery (``<frozen importlib._bootstrap>``)."""
    return not filename.startswith("<frozen ") and "importlib" not in Path(filename).parts


def describe_load_error(exc: BaseException) -> str:
    """What went wrong while :func:`load_tasks` ran the user's module, for a person:
    one line ``file:line: ErrorType: message`` (the innermost frame shown), then the
    frames of the module's own code, indented: those of load_tasks' caller and of
    the import machinery are left out. A SyntaxError shows its source line instead.
    """
    if isinstance(exc, SyntaxError):  # its location is the error's, not a frame's
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else "<unknown>"
        detail = traceback.format_exception_only(type(exc), exc)[:-1]
        lines = [line for chunk in detail for line in chunk.splitlines() if line.strip()]
        # the first line repeats the location; keep the source line and its caret
        body = [line for line in lines if not line.lstrip().startswith("File ")]
        return "\n".join([f"{where}: {type(exc).__name__}: {exc.msg}", *body])
    every = traceback.extract_tb(exc.__traceback__)
    # What ran before load_tasks (its caller) is not the module's; after it, leave
    # out the import machinery (taskit's own frames stay if the module called taskit).
    ours = [i for i, f in enumerate(every) if f.filename == __file__]
    frames = [f for f in every[ours[-1] + 1 if ours else 0 :] if _own_frame(f.filename)]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    head = f"{where}{''.join(traceback.format_exception_only(type(exc), exc)).strip()}"
    shown = traceback.format_list(frames)
    return "\n".join([head, *(line for chunk in shown for line in chunk.rstrip().splitlines())])
