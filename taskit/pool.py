"""The worker-pool core: run callables and Job objects on threads or processes.

One :class:`WorkerPool` serves local users and the backend:

* ``submit(fn, *args, **kwargs)`` returns a :class:`concurrent.futures.Future`;
  ``map`` returns the results as a list (input order by default);
  ``put(job)`` runs a workerpool-style :class:`Job`.
* Workers pull from one FIFO queue, so no job waits while a worker is idle and
  jobs *start* in submission order.
* ``grow``/``shrink``/``resize`` work while jobs run; a retired worker finishes
  the job it is running and takes no other. A pool of size 0 runs nothing until
  it grows.
* A job that raises never kills its worker and never stalls ``join``: the
  exception goes to the job's future (and is logged for jobs nobody waits on).
* ``kind="process"`` runs jobs in child processes (see :mod:`taskit._pool.processes`):
  a worker that dies fails only its own job with
  :class:`~taskit.errors.WorkerLostError` and is replaced, and the children
  exit on their own when this process dies, even by SIGKILL.

Lifecycle: use ``with WorkerPool(...)`` or call :meth:`WorkerPool.shutdown`.
A forgotten pool never hangs interpreter exit: thread workers are daemon
threads, and process workers are told to stop at exit (running jobs finish,
queued ones are cancelled). Future callbacks run in the worker thread (thread
pools) or in the pool's manager thread (process pools): keep them short. As
with any multiprocessing code, a script that starts a process pool must guard
its entry point with ``if __name__ == "__main__":`` (each worker imports the
main module again); without it, the pool's jobs fail at once with
:class:`~taskit.errors.WorkerStartError` saying so. Workers that keep dying
before their first job are likewise given up on after a few tries.

The classic interfaces are here too: workerpool's :class:`Job`,
:class:`SimpleJob`, :class:`SuicideJob`, :class:`TerminationNotice`,
:class:`Worker` and :class:`EquippedWorker` (one toolbox per worker, created
in that worker), and the multiprocess worker library's :func:`start_workers`.

This module is the public face; the machinery is in :mod:`taskit._pool`.
"""

from taskit._pool.classic import Job, SimpleJob, SuicideJob, TerminationNotice
from taskit._pool.pool import WorkerPool, default_size
from taskit._pool.start_workers import JobQueue, start_workers
from taskit._pool.threads import EquippedWorker, Worker
from taskit._pool.toolbox import current_toolbox

__all__ = [
    "WorkerPool",
    "Job",
    "SimpleJob",
    "SuicideJob",
    "TerminationNotice",
    "Worker",
    "EquippedWorker",
    "JobQueue",
    "start_workers",
    "current_toolbox",
    "default_size",
]
