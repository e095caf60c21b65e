"""The pyzmq and CPython internals taskit._wire relies on: if a new release changes
them, these fail loudly (rather than the hot path failing obscurely)."""

from __future__ import annotations

import concurrent.futures

import pytest
import zmq

from taskit import _wire


def _pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    return ctx, a, b


def test_unwrapped_socket_methods_take_int_flags_and_copy():
    ctx, a, b = _pair()
    try:
        big = b"x" * _wire.ZERO_COPY
        _wire.send_frames(_wire.base_send.__get__(a), [b"h", b"d", big])
        assert _wire.base_recv(b, 0) == b"h"
        frame = _wire.base_recv(b, _wire.NOBLOCK, False)  # a Frame, with its RCVMORE flag
        assert isinstance(frame, zmq.Frame) and frame.more and frame.bytes == b"d"
        body = _wire.base_recv(b, _wire.NOBLOCK, False)
        assert not body.more and bytes(body.buffer) == big
        assert not _wire.base_get(b, _wire.EVENTS) & _wire.POLLIN
        _wire.send_frames(a.send, [b"1", b"2", b"3", b"sig"])  # signed: four frames
        assert b.recv_multipart() == [b"1", b"2", b"3", b"sig"]
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_flags_are_the_plain_ints_of_pyzmq():
    assert _wire.MORE == int(zmq.SNDMORE) | int(zmq.DONTWAIT)
    assert _wire.NOBLOCK == int(zmq.NOBLOCK) == _wire.DONTWAIT
    assert (_wire.EVENTS, _wire.POLLIN) == (int(zmq.EVENTS), int(zmq.POLLIN))


def test_zmq_poll_takes_socket_items():
    ctx, a, b = _pair()
    try:
        assert _wire.zmq_poll([(b, zmq.POLLIN)], 0) == []
        a.send(b"x")
        assert _wire.zmq_poll([(b, zmq.POLLIN)], 1000) == [(b, zmq.POLLIN)]
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_a_future_can_be_made_running_by_its_state_name():
    f: concurrent.futures.Future = concurrent.futures.Future()
    f._state = _wire.FUTURE_RUNNING  # what CallFuture does
    assert f.running() and not f.cancel()
    f.set_result(1)
    assert f.done() and f.result() == 1


def test_a_running_future_can_be_cancelled_by_way_of_its_pending_state_name():
    f: concurrent.futures.Future = concurrent.futures.Future()
    f._state = _wire.FUTURE_RUNNING
    f._state = _wire.FUTURE_PENDING  # what CallFuture does once its backend withdrew it
    assert f.cancel() and f.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        f.result(0)


def test_future_fields_are_what_future_init_sets():
    # CallFuture skips Future.__init__ (its Condition is made on first use) and sets
    # the other fields itself: a Python that adds a field must fail here
    assert set(vars(concurrent.futures.Future())) == set(_wire.FUTURE_FIELDS)
    f: concurrent.futures.Future = concurrent.futures.Future()
    assert f._state not in _wire.FUTURE_OVER
    f.set_result(1)
    assert f._state == _wire.FUTURE_FINISHED and f._state in _wire.FUTURE_OVER
    g: concurrent.futures.Future = concurrent.futures.Future()
    g.cancel()
    assert g._state in _wire.FUTURE_OVER
