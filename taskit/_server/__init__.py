"""The server engine behind :class:`taskit.backend.BackEnd` (private).

- ``handler``: the sans-I/O request handler -- one message in, a decision per
  item (drop, a reply item, or a :class:`~taskit._server.handler.Call` to run)
  out; the sessions of a keyed backend; reply items packed into frames.
- ``loop``: the I/O loop -- the ROUTER, the threads (I/O, standby, inline
  runs), the pool; it feeds the handler and sends what it decides.
- ``accounting``: the counters behind ``<stats>``, the per-peer byte ledger,
  the traceback rate limit.
- ``access``: the CURVE keys and the client allow-list.
- ``options``: option defaults and checks, the ROUTER's socket options.

Imports flow down that list (``loop`` -> ``handler`` -> the rest); nothing
here imports :mod:`taskit.backend`.
"""
