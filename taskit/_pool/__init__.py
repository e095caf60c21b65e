"""The worker-pool machinery behind :mod:`taskit.pool` (private: import from there).

One module per concern; imports point down this list:

* :mod:`.start_workers` -- ``start_workers()`` and the queue it returns
  (the multiprocess worker library's model), over a :class:`~.pool.WorkerPool`;
* :mod:`.pool` -- ``WorkerPool``: one FIFO queue, sizing, ``join``, stats,
  shutdown; its workers are threads (:mod:`.threads`) or processes
  (:mod:`.processes`);
* :mod:`.threads` -- the thread workers (``Worker``, ``EquippedWorker``);
* :mod:`.processes` -- the parent side of process workers: the manager
  thread, pipes, scheduling, replacing dead workers;
* :mod:`.child` -- what a worker process runs (imported by name in the child);
* :mod:`.work_item` -- ``WorkItem``, one queued call, shared by both kinds;
* :mod:`.classic` -- workerpool's ``Job``, ``SimpleJob``, ``SuicideJob``,
  ``TerminationNotice``;
* :mod:`.toolbox` -- per-worker set-up (initializer, toolbox) and
  ``current_toolbox()``.

This file imports nothing, so a worker process that imports :mod:`.child`
loads only what it runs.
"""
