"""Pipelines: push a stream of elements through a chain of functions, each
stage with its own threads (jobq's model and API, with its defects fixed).

::

    from taskit import jobq

    jobq.run(range(3), [add1, (multi2, 2), print], keep_order=True)  # 2 4 6

A *stage* (worker spec) is ``func``, ``(func, n)`` or ``(func, n, dispatcher)``:
``func(element)`` runs in ``n`` threads of the stage; what it returns goes to
the next stage, except:

- ``EmptyRst``: nothing is passed on (``None`` *is* passed on);
- an iterator (e.g. a generator): each item it yields is passed on (items that
  are ``EmptyRst`` are skipped); other iterables such as lists are one value.

Ordering: with one thread a stage is FIFO. ``keep_order=True`` keeps every
stage's output in input order whatever the thread count (a generator's items
stay together). ``dispatcher(element) -> int`` sends an element to thread
``index % n`` of its stage, so elements with the same index run in order on
one thread while others run concurrently; the stage output keeps input order.

Errors: a stage function (or generator, or dispatcher) that raises is logged
on the ``taskit.jobq`` logger with its traceback; that element is dropped
(items a generator yielded before failing are kept), the pipeline goes on, and
``stat()`` counts it under ``errors``.

Memory: every queue is bounded (the head by ``queue_size``, the others by
1024), so a slow stage blocks the ones before it and, through ``put``, the
producer: memory does not grow with the input length.

Threads are daemon threads named ``taskit-jobq-...``: an abandoned pipeline
never blocks interpreter exit.

This module is the public face; the machinery is in :mod:`taskit._pipeline`:
the pipeline that wires the stages together in :mod:`~taskit._pipeline.manager`,
how a stage runs its threads and keeps its output in order in
:mod:`~taskit._pipeline.stage`, the queues between threads in
:mod:`~taskit._pipeline.channel`.
"""

from taskit._pipeline.manager import DEFAULT_QUEUE_SIZE, JobManager, run, stat
from taskit._pipeline.speed_limit import limit_job_speed
from taskit._pipeline.stage import EmptyRst
from taskit.errors import JobWorkerError, JobWorkerNotFound

__all__ = [
    "run",
    "stat",
    "EmptyRst",
    "JobManager",
    "limit_job_speed",
    "JobWorkerError",
    "JobWorkerNotFound",
    "DEFAULT_QUEUE_SIZE",
]
