"""An optional progress bar shared by ``jobq.run(progress=True)`` and
``FrontEnd.map(progress=True)``.

Interface (stable; other modules import it)::

    from taskit.progress import progress_bar

    with progress_bar(total=None, enabled=None, desc=None, file=None) as bar:
        bar.update()       # one more item done (n=1)
        bar.update(10)     # ten more
    # or: bar = progress_bar(...); ...; bar.close()

- ``progress_bar(...)`` returns a :class:`tqdm.tqdm` bar (wrapped) when it is
  *enabled*, ``tqdm`` is importable (the optional ``progress`` extra) and the
  output stream (``file``, default ``sys.stderr``) is a terminal; otherwise a
  no-op object with the same methods. It never raises because tqdm is missing.
- ``enabled``: ``False`` never shows a bar; ``True`` or ``None`` (the default)
  show one when the conditions above hold, so logs and CI output stay clean.
- ``total``: the number of items if known (``len()`` of the input), else
  ``None`` (tqdm then shows a count and a rate without a percentage).
- The returned object has ``update(n=1)``, ``close()`` (idempotent), and works
  as a context manager; ``.active`` tells whether a real bar is shown and
  ``.count`` how many items were reported.
- Thread-safety: ``update`` and ``close`` may be called from any thread
  (a lock serialises them).
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

__all__ = ["progress_bar", "ProgressBar", "tqdm_available"]


def tqdm_available() -> bool:
    """True when the optional ``tqdm`` package can be imported."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """A progress bar, or a no-op stand-in when ``bar`` is ``None``.

    Build it with :func:`progress_bar`; ``update``/``close`` are thread-safe.
    """

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar
        self._lock = threading.Lock()
        self._closed = False
        self.count = 0

    @property
    def active(self) -> bool:
        """True when a real (tqdm) bar is being drawn."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """Report ``n`` more items done. Never blocks for long, never raises after close."""
        with self._lock:
            if self._closed:
                return
            self.count += n
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int | None = None,
    enabled: bool | None = None,
    desc: str | None = None,
    file: IO[str] | None = None,
) -> ProgressBar:
    """A :class:`ProgressBar` drawing with tqdm when enabled, tqdm is
    installed and ``file`` (default ``sys.stderr``) is a terminal; else a no-op.
    """
    stream = file if file is not None else sys.stderr
    if enabled is False or not _is_terminal(stream):
        return ProgressBar(None)
    try:
        from tqdm import tqdm
    except ImportError:
        return ProgressBar(None)
    return ProgressBar(tqdm(total=total, desc=desc, file=stream, unit="it", leave=True))
