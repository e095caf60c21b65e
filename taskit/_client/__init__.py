"""The client engine behind :mod:`taskit.frontend` and :mod:`taskit.aio`.

- :mod:`.core`: ``ClientCore``, every client decision without I/O (sans-I/O);
- :mod:`.connection`: all socket handling (``Connections``) and the client defaults;
- :mod:`.face`: ``ClientFace``, what both faces share that never waits (options);
- :mod:`.threaded`: the threaded driver (leader/follower, ``CallFuture``);
- :mod:`.aio_driver`: the asyncio driver (reader and monitor tasks, one timer).

Private: users import :mod:`taskit.frontend` and :mod:`taskit.aio`.
"""
