"""The client's credit-based dispatcher, without sockets: credit limits, choices by
expected finish, joins and drains, and a per-call cost flat in the fleet size."""

from __future__ import annotations

import heapq

import pytest

from taskit._client import dispatch
from taskit._client.dispatch import Dispatcher


def test_a_backend_takes_at_most_capacity_times_prefetch_calls():
    d = Dispatcher(prefetch=2)
    d.up("a", 3)
    slots = []
    for _ in range(6):
        slot = d.pick()
        assert slot is not None and slot.key == "a"
        d.sent(slot)
        slots.append(slot)
    assert d.pick() is None  # no credit left: the next call waits
    d.answered(slots.pop(), 0.001)
    assert d.pick().key == "a"  # a slot was freed


def test_no_backend_up_means_wait_and_a_backend_that_comes_up_takes_calls():
    d = Dispatcher()
    d.add("a")
    assert d.pick() is None
    d.up("a", 4)
    assert d.pick().key == "a"
    d.down("a")
    assert d.pick() is None


def test_calls_go_to_the_backend_expected_to_finish_sooner():
    d = Dispatcher(prefetch=4)
    d.up("fast", 4)
    d.up("slow", 4)
    fast, slow = d.slots["fast"], d.slots["slow"]
    for slot, latency in ((fast, 0.001), (slow, 0.010)) * 6:  # a few calls teach it
        d.sent(slot)
        d.answered(slot, latency, 0)
    picks = []
    for _ in range(16):
        slot = d.pick()
        assert slot is not None
        d.sent(slot)
        picks.append(slot.key)
    assert picks.count("fast") == 16  # 16 fast calls end before one slow one would
    assert d.pick() is None  # the fast one is full; waiting for it beats the slow one


def test_other_clients_load_counts_against_a_backend():
    d = Dispatcher(prefetch=4)
    d.up("a", 2)
    d.up("b", 2)
    a = d.slots["a"]
    d.sent(a)
    d.answered(a, None, 0, reported=11)  # its reply: 11 there, ours one of them
    assert a.others == 10
    assert d.pick().key == "b"


def test_a_drained_backend_gets_no_calls_and_its_calls_in_flight_still_settle():
    d = Dispatcher(prefetch=1)
    d.up("a", 1)
    d.up("b", 1)
    a = d.slots["a"]
    d.sent(a)
    d.down("a")
    assert all(d.pick().key == "b" for _ in range(3))
    d.answered(a, 0.001)
    assert a.in_flight == 0 and d.pick().key == "b"
    d.remove("a")
    assert "a" not in d.slots


def test_prefetch_must_be_positive():
    with pytest.raises(ValueError, match="prefetch"):
        Dispatcher(prefetch=0)


def _simulate(speeds, workers=4, calls=2000, prefetch=dispatch.DEFAULT_PREFETCH):
    """Makespan of ``calls`` on backends of the given per-call seconds, as a ratio
    to the ideal (every worker busy until the end): an event simulation."""
    d = Dispatcher(prefetch, seed=1)
    for i in range(len(speeds)):
        d.up(i, workers)
    free = {i: [0.0] * workers for i in range(len(speeds))}
    events: list = []
    waiting = calls
    seq = 0
    counts = [0] * len(speeds)

    def send(now):
        nonlocal waiting, seq
        while waiting:
            slot = d.pick(waiting - 1)
            if slot is None:
                return
            waiting -= 1
            b = slot.key
            ahead = slot.in_flight + slot.others
            d.sent(slot)
            counts[b] += 1
            ws = free[b]
            k = ws.index(min(ws))
            ws[k] = max(ws[k], now) + speeds[b]
            seq += 1
            heapq.heappush(events, (ws[k], seq, b, now, ahead))

    send(0.0)
    end = 0.0
    while events:
        end, _, b, sent_at, ahead = heapq.heappop(events)
        d.answered(d.slots[b], end - sent_at, ahead)
        send(end)
    return end / (calls / sum(workers / s for s in speeds)), counts


def test_backends_of_different_speeds_finish_near_the_ideal_time():
    ratio, (fast, slow) = _simulate([0.001, 0.010])
    assert ratio <= 1.1
    assert slow < fast / 5  # the slow backend gets its share, not half


def test_the_cost_of_a_choice_is_flat_in_the_number_of_backends(monkeypatch):
    looked = []
    original = dispatch.Slot.expected

    def counted(self, *args):
        looked.append(self)
        return original(self, *args)

    monkeypatch.setattr(dispatch.Slot, "expected", counted)
    per_pick = {}
    for n in (10, 1_000, 10_000):
        d = Dispatcher(seed=1)
        for i in range(n):
            d.up(i, 4)
        looked.clear()
        for _ in range(1000):
            slot = d.pick()
            d.sent(slot)
            d.answered(slot, 0.001)
        per_pick[n] = len(looked) / 1000
    assert per_pick[10_000] <= 2 and per_pick[1_000] <= 2 * per_pick[10]


def test_an_idle_backend_measured_slow_once_is_tried_again():
    d = Dispatcher()
    d.up("a", 4)
    d.up("b", 4)
    a, b = d.slots["a"], d.slots["b"]
    for slot, latency in ((a, 0.001), (b, 0.001), (a, 0.001), (b, 0.050)):  # b stalled once
        d.sent(slot)
        d.answered(slot, latency, 0)
    picks = []
    for _ in range(100):  # sequential calls: every backend idle at each choice
        slot = d.pick()
        d.sent(slot)
        d.answered(slot, 0.001 if slot is a else 0.001, 0)
        picks.append(slot.key)
    assert picks.count("b") >= 40  # one stall does not shun it: it keeps its share


def test_a_much_slower_idle_backend_is_only_probed_now_and_then():
    # (idle backends within 8x of each other take turns: see _IDLE_SIMILAR)
    d = Dispatcher()
    d.up("fast", 4)
    d.up("slow", 4)
    speed = {"fast": 0.001, "slow": 0.030}
    for key in ("fast", "slow") * 8:
        slot = d.slots[key]
        d.sent(slot)
        d.answered(slot, speed[key], 0)
    picks = []
    for _ in range(200):
        slot = d.pick()
        d.sent(slot)
        d.answered(slot, speed[slot.key], 0)
        picks.append(slot.key)
    assert picks.count("slow") < 200 / 8
