"""FrontEnd and AsyncFrontEnd are two faces of one client engine: they take the same
options with the same defaults and offer the same public methods (checked by
introspection, so a new option or method added to one face only fails here)."""

from __future__ import annotations

import inspect

import pytest

from taskit.aio import AsyncFrontEnd
from taskit.codecs import MsgpackCodec
from taskit.frontend import FrontEnd

# what only the asyncio face has: closing by awaiting, async context management
ASYNC_ONLY = {"aclose", "__aenter__", "__aexit__"}
SYNC_ONLY = {"__enter__", "__exit__"}


def _options(cls: type) -> list[tuple[str, object, object, object]]:
    return [
        (p.name, p.kind, p.default, p.annotation)
        for p in inspect.signature(cls).parameters.values()
    ]


def test_both_faces_take_the_same_options_with_the_same_defaults():
    assert _options(FrontEnd) == _options(AsyncFrontEnd)
    names = [name for name, *_ in _options(FrontEnd)]
    assert names[:4] == ["backends", "default_port", "logger", "codec"]
    assert "busy_retries" in names and "logger" in names
    defaults = {p.name: p.default for p in inspect.signature(AsyncFrontEnd).parameters.values()}
    assert defaults["busy_retries"] == 50  # was 20 in AsyncFrontEnd alone


def _public(cls: type) -> dict[str, object]:
    return {
        name: inspect.getattr_static(cls, name)
        for name in dir(cls)
        if not name.startswith("_") or name in ASYNC_ONLY | SYNC_ONLY
    }


def test_both_faces_offer_the_same_public_methods():
    sync, aio = _public(FrontEnd), _public(AsyncFrontEnd)
    assert set(sync) - SYNC_ONLY == set(aio) - ASYNC_ONLY
    for name in set(sync) - SYNC_ONLY:
        s, a = sync[name], aio[name]
        assert type(s) is type(a), name  # a property on both, or a function on both
        if isinstance(s, property):
            continue
        assert not inspect.iscoroutinefunction(s), name
        # the same parameters; the asyncio face may make a method async
        assert inspect.signature(s).parameters.keys() == inspect.signature(a).parameters.keys(), (
            name
        )


def test_a_codec_passed_where_the_logger_goes_says_what_to_do():
    with pytest.raises(TypeError, match="codec="):
        AsyncFrontEnd([], 54543, MsgpackCodec)
    with pytest.raises(TypeError, match="codec="):
        FrontEnd([], 54543, "msgpack")
    with FrontEnd([], 54543, None) as fe:  # None: no TaskIt logger, as before
        assert fe.logger is AsyncFrontEnd([], 54543, None).logger
