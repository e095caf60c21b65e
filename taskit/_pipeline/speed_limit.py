"""``limit_job_speed``: a pipeline stage that caps throughput (jobq's).

Import it from :mod:`taskit.jobq`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["limit_job_speed"]

logger = logging.getLogger("taskit.jobq")


class limit_job_speed:  # noqa: N801 -- jobq's public name
    """A pass-through stage that caps throughput at ``max_job_speed`` jobs/s.

    Use it as a stage: ``run(src, [fetch, limit_job_speed(100), store])``.
    ``max_job_speed`` is a number, or a callable read on each job (to change
    the rate while running). Each call counts ``job_step`` jobs and is paced so
    that job k is released ``job_step / speed`` seconds after job k-1 (idle
    time is not saved up for a later burst); the first job waits one step, so
    300 jobs at 100/s take about 3 s. The measured speed is logged at DEBUG
    every 5 s. Thread-safe: with several threads the cap is shared. A speed
    that is not a positive number (or a callable that raises) is logged and
    that job passes unlimited. Raises ``TypeError``/``ValueError`` for a bad
    constant speed or step.
    """

    __module__ = "taskit.jobq"  # its public home, as before the move (reprs, api.md)

    tick_time = 5.0

    def __init__(self, max_job_speed: float | Callable[[], float], job_step: float = 1) -> None:
        if not callable(max_job_speed):
            self._check_speed(max_job_speed)
        if isinstance(job_step, bool) or not isinstance(job_step, (int, float)) or job_step <= 0:
            raise ValueError(f"job_step must be a positive number, got {job_step!r}")
        self.max_job_speed = max_job_speed
        self.job_step = job_step
        self.__name__ = "limit_job_speed"
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time at which the last admitted job was released
        self._tick_start = time.monotonic()
        self._tick_count = 0.0

    @staticmethod
    def _check_speed(speed: Any) -> float:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise TypeError(f"max_job_speed must be a number or a callable, got {speed!r}")
        if not speed > 0:
            raise ValueError(f"max_job_speed must be > 0 jobs per second, got {speed!r}")
        return float(speed)

    def __call__(self, args: Any) -> Any:
        try:
            speed = self.max_job_speed
            speed = self._check_speed(speed() if callable(speed) else speed)
        except Exception:
            logger.warning("limit_job_speed: bad max_job_speed, job not limited", exc_info=True)
            return args
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + self.job_step / speed
            wake = self._next
            self._tick_count += self.job_step
            if now - self._tick_start >= self.tick_time:
                logger.debug(
                    "limit_job_speed: %.1f jobs/s (max %.1f)",
                    self._tick_count / (now - self._tick_start),
                    speed,
                )
                self._tick_start, self._tick_count = now, 0.0
        delay = wake - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing is this stage's purpose, not synchronisation
        return args
