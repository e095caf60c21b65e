"""Unit tests of the server's bookkeeping (taskit._server.accounting): no sockets."""

from __future__ import annotations

from taskit._server.accounting import (
    CALL_COST,
    FAST,
    PENALTY,
    QUALIFY,
    REPLY_COST,
    SLOW,
    Accounting,
    PeerLedger,
    TracebackLimiter,
)

# --- PeerLedger: the bytes one client makes the backend hold ------------------------------


def test_peer_ledger_charges_calls_and_refuses_past_the_budget():
    ledger = PeerLedger(budget=10 * CALL_COST)
    assert not ledger.over(b"a", 10**9)  # a peer holding nothing gets its first call
    ledger.charge(b"a", 4 * CALL_COST)
    assert ledger.held_by(b"a") == 5 * CALL_COST
    assert not ledger.over(b"a", 4 * CALL_COST)  # 5 + 5 = 10: still within
    assert ledger.over(b"a", 4 * CALL_COST + 1)
    assert not ledger.over(b"b", 4 * CALL_COST + 1)  # per peer
    ledger.settle(b"a", 4 * CALL_COST)
    assert ledger.held == {}  # nothing held: the peer is forgotten


def test_peer_ledger_backlog_is_bounded_and_forgotten():
    one = 2 * 24 + 100 + REPLY_COST  # two items: their headers and bodies
    ledger = PeerLedger(budget=3 * one)
    items = [(2, 1, 1, b"x" * 60), (2, 1, 2, b"y" * 40)]
    assert all(ledger.defer(b"a", items) for _ in range(3))
    assert not ledger.defer(b"a", items)  # the fourth would pass the budget
    assert ledger.held_by(b"a") == 3 * one and len(ledger.backlog[b"a"]) == 3
    ledger.sent(b"a")
    assert ledger.held_by(b"a") == 2 * one
    assert ledger.forget(b"a") == 2
    assert ledger.held == {} and ledger.backlog == {}
    assert ledger.forget(b"a") == 0


# --- Accounting: the counters and the inline choice ---------------------------------------


def test_a_task_earns_inline_runs_and_loses_them_when_slow():
    acct = Accounting()
    for _ in range(QUALIFY):
        assert not acct.quick("t")
        acct.in_flight += 1
        acct.finished("t", True, FAST / 2, FAST / 2)
    assert acct.quick("t") and acct.in_flight == 0
    acct.finished("t", True, SLOW, SLOW)  # one slow run bars it for a long while
    assert acct.speed["t"] == -PENALTY and not acct.quick("t")
    acct.finished("t", False, 0.5, None)  # a pool run of unknown duration leaves it barred
    snap = acct.snapshot()
    assert snap["tasks"]["t"]["calls"] == QUALIFY + 2 and snap["failed"] == 1


# --- TracebackLimiter ---------------------------------------------------------------------


def test_tracebacks_are_admitted_once_per_interval_and_key():
    limit = TracebackLimiter(interval=3600)
    assert limit.admit(("t", "ValueError")) == 0
    assert limit.admit(("t", "ValueError")) is None  # skipped, counted
    assert limit.admit(("t", "KeyError")) == 0  # another key
    now = TracebackLimiter(interval=0)
    assert now.admit("k") == 0 and now.admit("k") == 0
