"""Fixtures of the integration tests that drive a BackEnd with raw DEALER clients
(tests/integration/_backend_helpers.RawClient): every backend and client a test
makes is stopped or closed at its teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskit.backend import BackEnd
from taskit.frontend import FrontEnd
from tests.integration._backend_helpers import RawClient


@pytest.fixture
def serve() -> Iterator[Callable[..., BackEnd]]:
    """serve(tasks, **kw) -> a started BackEnd on a free port; every one is terminated
    and closed at teardown."""
    started: list[BackEnd] = []

    def _serve(tasks: dict, **kw: Any) -> BackEnd:
        kw.setdefault("port", 0)
        b = BackEnd(tasks, **kw).start()
        started.append(b)
        return b

    yield _serve
    for b in started:
        b.terminate_server()
        b.close(timeout=10)


@pytest.fixture
def client() -> Iterator[Callable[..., RawClient]]:
    """client(backend_or_endpoint, **kw) -> a RawClient, closed at teardown."""
    made: list[RawClient] = []

    def _client(backend_or_endpoint: Any, **kw: Any) -> RawClient:
        ep = getattr(backend_or_endpoint, "endpoint", backend_or_endpoint)
        c = RawClient(ep, **kw)
        made.append(c)
        return c

    yield _client
    for c in made:
        c.close()


@pytest.fixture
def frontends() -> Iterator[Callable[..., FrontEnd]]:
    """frontends(*args, **kw) -> a FrontEnd; every one is closed at teardown."""
    made: list[FrontEnd] = []

    def make(*a: Any, **kw: Any) -> FrontEnd:
        fe = FrontEnd(*a, **kw)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        fe.close()
