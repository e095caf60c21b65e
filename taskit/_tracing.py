"""OpenTelemetry trace context across the wire: the glue, and nothing when unused.

A call made inside an OpenTelemetry span carries that span's W3C trace context
(``traceparent``, and ``tracestate`` when set) in its CALL body's metadata map
(doc/protocol.md); the backend runs the task inside a child span
(``SpanKind.SERVER``, named after the task), so a trace shows the call's run
on the backend under the client's span.

taskit never imports OpenTelemetry itself: tracing is on in a process once
``opentelemetry.trace`` has been imported there (any OpenTelemetry set-up
does, and no span can be active before). Until then :func:`outgoing` and
:func:`traced` cost a dictionary look-up and import nothing, whether the
package is installed or not. After that, a call made outside any span costs
one context look-up and sends no metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["outgoing", "traced", "span_until_done", "META_KEYS"]

# The metadata keys a CALL may carry (the W3C trace context headers).
META_KEYS = ("traceparent", "tracestate")

# (trace module, propagator, tracer) once OpenTelemetry is in use; () if it is unusable
_api: Any = None
_TRACE_MODULE = "opentelemetry.trace"
_modules = sys.modules


def _load() -> Any:
    """The OpenTelemetry pieces, once ``opentelemetry.trace`` is imported; else None."""
    global _api
    if _api is not None:
        return _api or None
    trace = _modules.get(_TRACE_MODULE)
    if trace is None:
        return None  # not in use in this process: nothing to import, nothing to send
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:  # a partial install: no tracing, and no retry per call
        _api = ()
        return None
    _api = (trace, TraceContextTextMapPropagator(), trace.get_tracer("taskit"))
    return _api


def outgoing() -> dict[str, str] | None:
    """The trace context to send with a call made now: ``{"traceparent": ...}`` (plus
    ``"tracestate"`` when the span has one), or None when no span is active (or
    OpenTelemetry is not in use). Reads the caller's context: call it in the thread or
    task making the call. Never raises."""
    api = _api
    if api is None:
        if _TRACE_MODULE not in _modules:  # the usual case, kept to one look-up
            return None
        api = _load()
    if not api:
        return None
    trace, propagator, _tracer = api
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    try:
        propagator.inject(carrier)
    except Exception:  # a broken context must not fail the call
        return None
    return carrier or None


def _server_span(name: str, meta: dict[str, str], api: Any) -> Any:
    trace, propagator, tracer = api
    context = propagator.extract(meta)
    return tracer, context, trace.SpanKind.SERVER


def traced(fn: Callable[..., Any], name: str, meta: dict[str, str]) -> Callable[..., Any]:
    """``fn``, run inside a server span named ``name`` that continues the trace of
    ``meta`` (a call's metadata); ``fn`` itself when OpenTelemetry is not in use.

    The span records an exception the task raises (status ERROR) and is the current
    span while ``fn`` runs (the task's own spans are its children)."""
    api = _api or _load()
    if api is None:
        return fn
    tracer, context, kind = _server_span(name, meta, api)

    def run_traced(*args: Any, **kwargs: Any) -> Any:
        with tracer.start_as_current_span(name, context=context, kind=kind):
            return fn(*args, **kwargs)

    return run_traced


def span_until_done(name: str, meta: dict[str, str]) -> Callable[[Any], None] | None:
    """For a task run in another process: start the server span now, in this one,
    and return the ``add_done_callback`` function that ends it with the future's
    outcome; None when OpenTelemetry is not in use. The span covers the call's time in
    the pool (the task's own spans, made in the worker, are not linked to it)."""
    api = _api or _load()
    if api is None:
        return None
    tracer, context, kind = _server_span(name, meta, api)
    span = tracer.start_span(name, context=context, kind=kind)
    trace = api[0]

    def end(fut: Any) -> None:
        try:
            exc = fut.exception()
        except BaseException as e:  # cancelled
            exc = e
        if exc is not None:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}"))
        span.end()

    return end
