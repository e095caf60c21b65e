"""The server engine behind :class:`taskit.backend.BackEnd` (private).

- ``handler``: the sans-I/O request handler -- one message in, a decision
  (drop, reply frames, or a :class:`~taskit._server.handler.Call` to run) out.
- ``loop``: the I/O loop -- the ROUTER, the threads (I/O, standby, inline
  runs), the pool; it feeds the handler and sends what it decides.
- ``accounting``: the counters behind ``<stats>``, the per-peer byte ledger,
  the traceback rate limit.
- ``access``: the CURVE keys, the client allow-list, the answer to a message
  whose signature cannot be checked.
- ``options``: option defaults and checks, the ROUTER's socket options.

Imports flow down that list (``loop`` -> ``handler`` -> the rest); nothing
here imports :mod:`taskit.backend`.
"""
