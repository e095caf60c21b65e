"""The client engine behind :mod:`taskit.frontend` and :mod:`taskit.aio`.

- :mod:`.core`: ``ClientCore``, every client decision without I/O (sans-I/O);
- :mod:`.connection`: the client's options, its DEALER sockets and their events;
- :mod:`.threaded`: the threaded driver (leader/follower, ``CallFuture``);

Private: users import :mod:`taskit.frontend` and :mod:`taskit.aio`.
"""
