"""Trace context across a real socket: a call made inside an OpenTelemetry span runs
its task, on the backend, inside a child span (same trace, parent = the client's span).
Spans are collected with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from taskit import _tracing  # noqa: E402
from taskit.aio import AsyncFrontEnd  # noqa: E402
from taskit.frontend import FrontEnd  # noqa: E402

BOUND = 30.0


@pytest.fixture(scope="module")
def exporter():
    """The process's tracer provider, set once (OpenTelemetry allows one per process),
    exporting every ended span to memory as it ends."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # not set yet by another module
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture
def spans(exporter):
    exporter.clear()
    return exporter


def add(a, b):
    return a + b


def boom():
    raise ValueError("boom")


def nested():
    with trace.get_tracer("test").start_as_current_span("inside the task"):
        return "ok"


def server_spans(exporter, name):
    return [s for s in exporter.get_finished_spans() if s.name == name]


def assert_child(span, parent):
    assert span.kind == SpanKind.SERVER
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.parent.is_remote


@pytest.mark.parametrize("inline", [False, {"add", "boom", "nested"}], ids=["pool", "inline"])
def test_the_backend_span_is_a_child_of_the_client_span(serve, spans, inline):
    be = serve({"add": add, "boom": boom, "nested": nested}, workers=2, inline=inline)
    tracer = trace.get_tracer("test")
    with FrontEnd([("127.0.0.1", be.port)], codec="msgpack") as fe:
        with tracer.start_as_current_span("client work") as parent:
            assert [fe.work("add", i, 1) for i in range(12)] == list(range(1, 13))
            with pytest.raises(Exception, match="boom"):
                fe.work("boom")
            assert fe.work("nested") == "ok"
        assert fe.work("add", 1, 1) == 2  # outside any span: no context sent, no span
    added = server_spans(spans, "add")
    assert len(added) == 12
    for span in added:
        assert_child(span, parent)
        assert span.status.status_code != StatusCode.ERROR
    (failed,) = server_spans(spans, "boom")
    assert_child(failed, parent)
    assert failed.status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in failed.events)
    (task_span,) = server_spans(spans, "nested")
    (inner,) = server_spans(spans, "inside the task")
    assert inner.parent.span_id == task_span.context.span_id  # the task's own spans nest


def test_an_async_frontend_carries_the_context_too(serve, spans):
    be = serve({"add": add})
    tracer = trace.get_tracer("test")

    async def main():
        async with AsyncFrontEnd([("127.0.0.1", be.port)]) as fe:
            with tracer.start_as_current_span("async work") as parent:
                assert await fe.work("add", 2, 3) == 5
            return parent

    parent = asyncio.run(asyncio.wait_for(main(), BOUND))
    (span,) = server_spans(spans, "add")
    assert_child(span, parent)


@pytest.mark.slow
def test_a_process_pool_call_gets_a_span_for_its_time_in_the_pool(serve, spans):
    be = serve({"add": add}, pool="process", workers=1)
    tracer = trace.get_tracer("test")
    with FrontEnd([("127.0.0.1", be.port)], connect_timeout=BOUND, timeout=BOUND) as fe:
        with tracer.start_as_current_span("client work") as parent:
            assert fe.work("add", 1, 2) == 3
    (span,) = server_spans(spans, "add")
    assert_child(span, parent)


def test_the_context_sent_is_the_w3c_traceparent_of_the_current_span(spans):
    assert _tracing.outgoing() is None  # no span active
    with trace.get_tracer("test").start_as_current_span("s") as span:
        meta = _tracing.outgoing()
    ctx = span.get_span_context()
    traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert meta == {"traceparent": traceparent}
