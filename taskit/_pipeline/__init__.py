"""The pipeline machinery behind :mod:`taskit.jobq` (private: import from there).

* :mod:`.stage` -- one stage: its threads, ordering, dispatching, statistics;
* :mod:`.channel` -- the bounded, closable queue between stages.
"""
