"""Regenerate doc/api.md from the code: every module's __all__, signatures and the
first paragraph of each docstring.

    python doc/gen_api.py > doc/api.md
"""

import enum
import importlib
import inspect
import os
import re
import struct
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEAD = """# API reference

Every public name of every module — each module's `__all__` — with its
signature and the first paragraph of its docstring (the docstrings state the
full contract: what blocks, what raises, thread-safety). Generated from the
code; the prose pages explain how the pieces fit: [index.md](index.md) (a
tour), [operations.md](operations.md) (the `taskit` command and services),
[protocol.md](protocol.md) (the wire format), [security.md](security.md).
Regenerate it after changing a public name: `python doc/gen_api.py > doc/api.md`.

Layout (imports only point down this list): `errors` ← the local half
(`simple`, `resync`, `log`, `threaded`, `pool`, `jobq`, `progress`) ← the
distributed half (`codecs`, `protocol`, `common`, `backend`, `frontend`, `aio`,
and the private client engine `taskit._client` shared by the two front
ends) ← operations (`cli`, `loader`, `ports`, `supervisor`). Names starting with `_` are
private and may change.

"""
MODS = [
    ("taskit", "The package: version, every exception, and lazy shortcuts to the main names."),
    ("taskit.simple", None),
    ("taskit.resync", None),
    ("taskit.log", None),
    ("taskit.threaded", None),
    ("taskit.pool", None),
    ("taskit.jobq", None),
    ("taskit.progress", None),
    ("taskit.errors", None),
    ("taskit.codecs", None),
    ("taskit.protocol", None),
    ("taskit.common", None),
    ("taskit.backend", None),
    ("taskit.frontend", None),
    ("taskit.aio", None),
    ("taskit.cli", None),
    ("taskit.loader", None),
    ("taskit.ports", None),
    ("taskit.supervisor", None),
]


def first(doc):
    if not doc:
        return ""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(para.split())
    text = re.sub(r":(class|func|meth|data|mod|attr|exc):`~?([^`]+)`", r"`\2`", text)
    return text.replace("``", "`")


class _Shown:
    """Put in a signature in place of an annotation or a default: prints as ``text``."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _annotation(a):
    # With `from __future__ import annotations` annotations are strings (shown
    # bare, as written); a NamedTuple's become ForwardRef('int') (shown as int).
    if isinstance(a, str):
        return _Shown(a)
    if isinstance(a, typing.ForwardRef):
        return _Shown(a.__forward_arg__)
    return _Shown(re.sub(r"ForwardRef\('([^']*)'\)", r"\1", inspect.formatannotation(a)))


def _default(v):
    # repr() as in Python (strings quoted), but classes, functions and objects by name.
    r = repr(v)
    r = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], r)
    r = re.sub(r"<function ([\w.<>]+) at 0x[0-9a-f]+>", r"\1", r)
    r = re.sub(r"<(\w+) object at 0x[0-9a-f]+>", r"\1()", r)
    return _Shown(r)


def sig(obj):
    try:
        s = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    empty = inspect.Parameter.empty
    params = [
        p.replace(
            annotation=p.annotation if p.annotation is empty else _annotation(p.annotation),
            default=p.default if p.default is empty else _default(p.default),
        )
        for p in s.parameters.values()
    ]
    ret = s.return_annotation
    return str(
        s.replace(
            parameters=params,
            return_annotation=ret if ret is s.empty else _annotation(ret),
        )
    )


def _own_and_private_bases(cls):
    """``cls``'s attributes, then those it inherits from private taskit classes
    (e.g. what both client faces share), each name once."""
    seen = set()
    for klass in cls.__mro__:
        if klass is not cls and not klass.__module__.startswith("taskit._"):
            continue
        for k, v in klass.__dict__.items():
            if k not in seen:
                seen.add(k)
                yield k, v


def members(cls):
    rows = []
    for k, v in _own_and_private_bases(cls):
        if k.startswith("_") and k not in ("__enter__", "__aenter__", "__iter__", "__call__"):
            continue
        if isinstance(v, property):
            rows.append((k, "property", first(v.__doc__)))
        elif isinstance(v, (staticmethod, classmethod)):
            f = v.__func__
            rows.append((k + sig(f), "method", first(f.__doc__)))
        elif k == "__enter__":
            rows.append(("with ...", "method", "a context manager: closes on exit."))
        elif k == "__aenter__":
            rows.append(("async with ...", "method", "an async context manager: closes on exit."))
        elif inspect.isfunction(v):
            prefix = (
                "async "
                if (inspect.iscoroutinefunction(v) or inspect.isasyncgenfunction(v))
                else ""
            )
            rows.append(
                (
                    prefix + k + sig(v).replace("(self, ", "(").replace("(self)", "()"),
                    "method",
                    first(v.__doc__),
                )
            )
    return rows


out = []
seen_exc = set()
for m, blurb in MODS:
    mod = importlib.import_module(m)
    out.append(f"## `{m}`\n")
    out.append((blurb or first(mod.__doc__)) + "\n")
    names = list(mod.__all__)
    if m == "taskit":
        errs = [
            n
            for n in names
            if inspect.isclass(getattr(mod, n)) and issubclass(getattr(mod, n), BaseException)
        ]
        names = [n for n in names if n not in errs]
        out.append(
            "Every exception of `taskit.errors` is also importable from `taskit` "
            "(`from taskit import BackendLostError`). The other names are loaded on first use:\n"
        )
    for name in names:
        obj = getattr(mod, name)
        qual = f"{m}.{name}"
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            if (
                obj.__module__ != m
                and m != "taskit.errors"
                and not obj.__module__.startswith("taskit._")
            ):
                out.append(f"- `{name}` — `{obj.__module__}.{name}`.")
                continue
            # By name, once: before 3.11 the timeouts also derive from
            # concurrent.futures.TimeoutError, a second "TimeoutError".
            bases = ", ".join(dict.fromkeys(b.__name__ for b in obj.__bases__))
            out.append(f"- **`{name}`**(`{bases}`) — {first(obj.__doc__)}")
        elif inspect.isclass(obj) and issubclass(obj, enum.Enum):
            # Members, not the signature: Enum's call signature and default
            # docstring differ between Python versions.
            doc = obj.__dict__.get("__doc__")
            doc = "" if doc in (None, "An enumeration.") else first(doc) + " "
            items = ", ".join(f"`{k.name} = {k.value!r}`" for k in obj)
            out.append(f"\n### `{name}` (`{obj.__mro__[1].__name__}`)\n\n{doc}Members: {items}.\n")
        elif inspect.isclass(obj):
            if obj.__module__ != m and not obj.__module__.startswith("taskit._"):
                out.append(f"- `{name}` — `{obj.__module__}.{name}`.")
                continue
            out.append(f"\n### `{name}{sig(obj)}`\n\n{first(obj.__doc__)}\n")
            for k, kind, doc in members(obj):
                out.append(f"- `{k}`{' (property)' if kind == 'property' else ''} — {doc}")
            out.append("")
        elif callable(obj):
            home = getattr(obj, "__module__", m)
            if home != m and not home.startswith("taskit._"):
                out.append(f"- `{name}` — `{home}.{name}`.")
                continue
            out.append(f"- `{name}{sig(obj)}` — {first(obj.__doc__)}")
        else:
            r = repr(obj)
            if isinstance(obj, struct.Struct):  # its repr differs between versions
                r = f"Struct({obj.format!r})"
            elif " at 0x" in r:
                r = f"{type(obj).__name__}(...)"
            if len(r) > 70:
                r = type(obj).__name__
            out.append(f"- `{name}` = `{r}`")
    out.append("")
print(HEAD + "\n".join(out).rstrip())
