"""Credit-based dispatch: which backend takes a client's next call, or none yet.

Pure logic, no sockets, no clock of its own (times are passed in). The client
core asks :meth:`Dispatcher.pick` for each call; ``None`` means every backend
is out of *credit* (or is expected to finish later than waiting for one that
is), and the call waits in the client until :meth:`Dispatcher.answered` frees
a slot.

The model, per backend ``b``:

- ``capacity``: its workers, from its WELCOME (1 until known);
- ``limit = capacity * max(prefetch, WINDOW_SECONDS / service)`` (at most
  ``MAX_PER_WORKER`` per worker): this client's calls it may hold at once (its
  *credit* is ``limit - in_flight``). Quick calls get a window covering about
  2 ms of work per worker, so pipelining does not stall on the round trip,
  while the backend's queue never holds more than that (or ``prefetch``
  calls per worker) of this client's work ahead of other clients' calls;
- ``others``: calls of other clients queued or running there, from the load
  it reports in every reply (its reported total minus this client's calls in
  flight when the reply was built);
- ``service``: seconds one call keeps one worker busy, an exponentially
  weighted estimate from this client's replies (latency divided by how many
  calls' worth of work were ahead of it per worker).

Its expected finish for one more call is ``((others + in_flight) //
capacity + 1) * service``: the rounds of work ahead of it per worker, then
its own. A call goes to the backend expected to finish it soonest, among
those with credit; a backend without credit still counts as a candidate
(the call then waits for it), so a slow backend does not take a call that a
fast one would finish sooner even after waiting for its credit. Backends whose
expected finishes are within a quarter of each other count as equal (the less
loaded wins, then they take turns); idle ones, within a factor of eight (their
measures are noisy), and one passed over drifts toward the chosen one's
service time, so a single slow measure never shuns a backend for good.

Cost per call stays flat in the number of backends: up to :data:`SCAN`
backends are compared exactly; beyond, the candidates are two drawn at
random from those with credit (power-of-two choices), O(1).
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["Dispatcher", "Slot", "DEFAULT_PREFETCH", "SCAN", "WINDOW_SECONDS", "MAX_PER_WORKER"]

DEFAULT_PREFETCH = 8  # calls per worker one client may keep on a backend (measured)
# ... or more, when that is less than this much work per worker: a window of quick
# calls must cover the round trip, or pipelining stalls (measured: 2 ms of 10 us calls
# is 200 per worker; a backend's queue then holds ~2 ms of this client's work).
WINDOW_SECONDS = 0.002
MAX_PER_WORKER = 256
SCAN = 8  # up to this many backends, every one is compared
_FIRST_SERVICE = 0.001  # seconds: the guess before any reply (equal for all)
_WEIGHT = 0.2  # weight of a new sample in the service-time average
# Expected finishes this close count as equal; between idle backends, within a factor
# of eight: an idle backend's first call after a pause is slower (its I/O thread
# sleeps deeper), so a backend used less would look ever slower, and a loaded
# machine's latencies are that noisy; a 10x slower backend still loses.
_SIMILAR = (0.8, 1.25)
_IDLE_SIMILAR = (0.125, 8.0)
_AGE = 0.05  # how far an idle backend passed over drifts toward the chosen one's time
_OUTLIER = 3.0  # a sample counts as at most this many times the estimate it updates


class Slot:
    """What the dispatcher knows of one backend (public, read-only to others)."""

    __slots__ = (
        "key",
        "capacity",
        "limit",
        "per_worker",
        "in_flight",
        "others",
        "service",
        "samples",
        "usable",
        "_pos",
    )

    def __init__(self, key: Any, capacity: int, prefetch: int) -> None:
        self.key = key
        self.capacity = max(1, capacity)
        self.per_worker = prefetch
        self.limit = self.capacity * prefetch
        self.in_flight = 0
        self.others = 0
        self.service = _FIRST_SERVICE
        self.samples = 0
        self.usable = False  # up and taking calls
        self._pos = -1  # index in Dispatcher._open, or -1

    @property
    def credit(self) -> int:
        return self.limit - self.in_flight

    def expected(self, unmeasured: float = _FIRST_SERVICE) -> float:
        """Seconds until one more call sent here would be done (the model above);
        ``unmeasured``: the service time to assume while it has no measure of its own."""
        service = self.service if self.samples > 1 else unmeasured
        return ((self.others + self.in_flight) // self.capacity + 1) * service

    def __repr__(self) -> str:
        return (
            f"<Slot {self.key} cap={self.capacity} {self.in_flight}/{self.limit} "
            f"others={self.others} service={self.service * 1e3:.3f}ms>"
        )


class Dispatcher:
    """Backends with credit and the choice among them (see the module docstring).

    ``prefetch``: calls per worker this client may keep on one backend.
    Not thread-safe (the client core serialises).
    """

    def __init__(self, prefetch: int = DEFAULT_PREFETCH, seed: int | None = None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch!r}")
        self.prefetch = int(prefetch)
        self.slots: dict[Any, Slot] = {}
        self._usable: list[Slot] = []  # up, in order of arrival
        self._open: list[Slot] = []  # usable with credit (swap-remove; O(1))
        self._rand = random.Random(seed).random
        self._next = 0  # where the next scan starts (ties rotate)
        self._typical = _FIRST_SERVICE  # service time of the backends measured, averaged
        self._measured = False  # _typical is a measure, not the first guess

    # -- membership ------------------------------------------------------------

    def add(self, key: Any, capacity: int = 1) -> Slot:
        """Start tracking ``key`` (not usable until :meth:`up`)."""
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, capacity, self.prefetch)
        return slot

    def up(self, key: Any, capacity: int) -> None:
        """``key`` takes calls now, with ``capacity`` workers (from its handshake)."""
        slot = self.add(key)
        slot.capacity = max(1, int(capacity))
        slot.limit = slot.capacity * slot.per_worker
        if not slot.usable:
            slot.usable = True
            self._usable.append(slot)
        self._update(slot)

    def down(self, key: Any) -> None:
        """``key`` takes no new calls (down, stopping, draining); its calls in flight
        are still counted until they are :meth:`answered` or :meth:`forget`-ed."""
        slot = self.slots.get(key)
        if slot is None or not slot.usable:
            return
        slot.usable = False
        self._usable.remove(slot)
        self._close(slot)

    def remove(self, key: Any) -> None:
        """Forget ``key`` entirely."""
        self.down(key)
        self.slots.pop(key, None)

    # -- calls -------------------------------------------------------------------

    def pick(self, waiting: int = 0) -> Slot | None:
        """The backend for the next call (not yet charged: call :meth:`sent`), or
        None: the call should wait (no credit anywhere, or the best backend is one
        without credit: the call is expected to finish sooner after waiting).
        ``waiting``: calls already waiting in the client, ahead of this one (they
        are counted against the backends without credit, which they wait for)."""
        usable = self._usable
        n = len(usable)
        if n == 1:
            slot = usable[0]
            return slot if slot.in_flight < slot.limit else None
        if n == 0:
            return None
        if n <= SCAN:
            best: Slot | None = None
            best_t = best_load = 0.0
            start = self._next % n  # ties rotate, so idle backends share the calls
            best_i = start
            ref = self._typical
            for i in range(start, start + n):
                slot = usable[i % n]
                t = slot.expected(ref)
                if waiting and slot.in_flight >= slot.limit:
                    t += waiting // slot.capacity * slot.service
                # Backends about as quick (service times are noisy estimates): the
                # less loaded wins, and among equals the scan's rotating start, so
                # idle backends share the calls.
                load = (slot.others + slot.in_flight) / slot.capacity
                low, high = _IDLE_SIMILAR if load == best_load == 0 else _SIMILAR
                if best is None or t < best_t * low or (t <= best_t * high and load < best_load):
                    best, best_t, best_load, best_i = slot, t, load, i
            self._next = best_i + 1
            if best is not None and best_load == 0:
                self._age(best)
            if best is not None and best.in_flight < best.limit:
                return best
            # The best has no credit: wait for it, unless one with credit is as good.
            return None
        open_ = self._open
        m = len(open_)
        if m == 0:
            return None
        rand = self._rand
        a = open_[int(rand() * m)]
        b = open_[int(rand() * m)]
        ref = self._typical
        return a if a.expected(ref) <= b.expected(ref) else b

    def _age(self, chosen: Slot) -> None:
        """An idle backend passed over for an idle ``chosen`` one drifts toward its
        service time: one measured slow once (a stall, a warm-up) is tried again
        after a few calls, not shunned for good; a truly slow one is measured
        slow again and drifts back up. (Only when ``chosen`` is idle: under load the
        choice is by queues, and every backend gets measured.)"""
        quick = chosen.service if chosen.samples > 1 else self._typical
        for slot in self._usable:
            if (
                slot is not chosen
                and slot.samples > 1
                and slot.service > quick
                and not slot.in_flight
                and not slot.others
            ):
                slot.service -= _AGE * (slot.service - quick)

    def sent(self, slot: Slot) -> None:
        """A call was sent to ``slot``."""
        slot.in_flight += 1
        if slot.in_flight >= slot.limit:
            self._close(slot)

    def answered(
        self,
        slot: Slot,
        latency: float | None = None,
        ahead: int = 0,
        reported: int | None = None,
    ) -> None:
        """A call sent to ``slot`` is over (answered, refused, lost or withdrawn).

        ``latency``: seconds from send to reply, when it ran there; ``ahead``: the
        calls in flight there (this client's, plus others' known) when it was sent,
        not counting itself; ``reported``: the backend's queued + running in the
        reply, which counted this call."""
        slot.in_flight -= 1
        if reported is not None:
            # This reply was built while our calls in flight included this one.
            slot.others = max(0, reported - slot.in_flight - 1)
        if latency is not None and latency > 0:
            slot.samples += 1
        if latency is not None and latency > 0 and slot.samples > 1:
            # (a backend's first call pays for its warm-up: not a sample)
            per_worker = 1.0 + ahead / slot.capacity
            sample = latency / per_worker
            # One stall (a descheduled process, a page fault storm) counts as at most
            # _OUTLIER times what was expected, so it cannot shun a backend at once; a
            # backend that really slowed down is followed within a few calls.
            if slot.samples > 2:
                sample = min(sample, _OUTLIER * slot.service)
                slot.service += _WEIGHT * (sample - slot.service)
            else:
                if self._measured:
                    sample = min(sample, _OUTLIER * self._typical)
                slot.service = sample
            # What an unmeasured backend is assumed to take: like the others (so it is
            # tried at once, neither shunned nor flooded by a made-up guess).
            if self._measured:
                self._typical += _WEIGHT * (sample - self._typical)
            else:
                self._typical, self._measured = sample, True
            per = WINDOW_SECONDS / slot.service
            per = self.prefetch if per <= self.prefetch else min(MAX_PER_WORKER, int(per))
            slot.per_worker = per
            slot.limit = slot.capacity * per
            if slot.in_flight >= slot.limit:
                self._close(slot)
        if slot.usable and slot._pos < 0 and slot.in_flight < slot.limit:
            self._open_slot(slot)

    @property
    def up_count(self) -> int:
        """How many backends take calls now."""
        return len(self._usable)

    # -- internals ---------------------------------------------------------------

    def _update(self, slot: Slot) -> None:
        if slot.usable and slot.in_flight < slot.limit:
            self._open_slot(slot)
        else:
            self._close(slot)

    def _open_slot(self, slot: Slot) -> None:
        if slot._pos < 0:
            slot._pos = len(self._open)
            self._open.append(slot)

    def _close(self, slot: Slot) -> None:
        pos = slot._pos
        if pos < 0:
            return
        open_ = self._open
        last = open_.pop()
        if last is not slot:
            open_[pos] = last
            last._pos = pos
        slot._pos = -1
