"""The pipeline machinery behind :mod:`taskit.jobq` (private: import from there).

Imports point down this list:

* :mod:`.manager` -- ``JobManager``, a running pipeline (spec checks, wiring,
  feeding, join and abort), and ``run()``/``stat()`` over it;
* :mod:`.stage` -- one stage: its threads, ordering, dispatching, statistics;
* :mod:`.channel` -- the bounded, closable queue between stages;
* :mod:`.speed_limit` -- ``limit_job_speed``, a stage that caps throughput.
"""
