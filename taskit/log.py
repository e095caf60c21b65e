"""TaskIt loggers, and a bridge both ways with the stdlib :mod:`logging` module.

A TaskIt *logger* is any callable ``logger(importance, msg)`` that also has a
``close()`` method. Importances are the strings :data:`DEBUG`, :data:`INFO`,
:data:`ERROR` and :data:`IMPORTANT` (any other string is allowed and passed
through). The classes here compose into a tree: a :class:`LoggerNode` filters
events and forwards them to child loggers; a :class:`FileLogger` also writes
them to a file-like object.

Bridging:

* :class:`LoggingLogger` is a TaskIt logger that forwards every event to a
  ``logging.Logger`` -- hand it to a BackEnd/FrontEnd to route taskit's
  events into your own logging setup.
* :class:`TaskItHandler` is a ``logging.Handler`` that feeds records into a
  TaskIt logger -- attach it to the ``taskit`` logger to see what the library
  logs through stdlib logging in your TaskIt log tree.

:data:`IMPORTANT` maps to the stdlib level :data:`IMPORTANT_LEVEL` (25,
between INFO and WARNING, registered under the name ``"IMPORTANT"``): such
events pass an INFO threshold without being reported as warnings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Protocol

__all__ = [
    "DEBUG",
    "INFO",
    "ERROR",
    "IMPORTANT",
    "IMPORTANT_LEVEL",
    "TaskItLogger",
    "null_logger",
    "OutToLog",
    "OutToError",
    "Splitter",
    "LoggerNode",
    "FileLogger",
    "LoggingLogger",
    "TaskItHandler",
    "JSONFormatter",
    "to_logging_level",
    "from_logging_level",
]

DEBUG, INFO, ERROR, IMPORTANT = "DEBUG", "INFO", "ERROR", "IMPORTANT"

#: The stdlib logging level that :data:`IMPORTANT` maps to.
IMPORTANT_LEVEL = 25
if logging.getLevelName(IMPORTANT_LEVEL) == f"Level {IMPORTANT_LEVEL}":
    # only name the level if nobody else has claimed it
    logging.addLevelName(IMPORTANT_LEVEL, IMPORTANT)


class TaskItLogger(Protocol):
    """What a TaskIt logger is: ``logger(importance, msg)`` plus ``close()``."""

    def __call__(self, importance: str, msg: Any) -> Any: ...

    def close(self) -> None: ...


class _NullLogger:
    """Accepts every event and does nothing; ``close()`` does nothing too."""

    __slots__ = ()

    def __call__(self, importance: str, msg: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "null_logger"


#: A logger that drops everything (the default logger everywhere in taskit).
null_logger = _NullLogger()


class OutToLog:
    """A write-only file-like object that logs each complete line it is given.

    Meant for e.g. ``sys.stdout = OutToLog(logger)``. A partial line is kept
    until its newline arrives (so ``print`` writing text and ``"\\n"``
    separately gives one event); :meth:`close` logs what is left. ``flush``
    does not break a line in two. Thread-safe: lines from several threads are
    never mixed within one event (though their order follows the writes).
    """

    def __init__(self, log: Callable[[str, Any], Any], level: str = INFO) -> None:
        self.log = log
        self.level = level
        self.cache = ""
        self.closed = False
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        """Buffer ``s``, log every line it completes; returns ``len(s)``.

        Raises ``ValueError`` after :meth:`close` (as files do).
        """
        if self.closed:
            raise ValueError("I/O operation on closed OutToLog")
        with self._lock:
            lines = (self.cache + s).split("\n")
            self.cache = lines.pop()
        for line in lines:
            self.log(self.level, line)
        return len(s)

    def writelines(self, lines: Iterable[str]) -> None:
        """Write each string of ``lines`` (no newlines are added, as with files)."""
        for s in lines:
            self.write(s)

    def flush(self) -> None:
        """Nothing to push: complete lines are logged as soon as they are written."""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """Log a pending partial line, if any, and refuse further writes.

        Does not close the logger. Idempotent.
        """
        with self._lock:
            rest, self.cache = self.cache, ""
            already, self.closed = self.closed, True
        if rest and not already:
            self.log(self.level, rest)


class OutToError(OutToLog):
    """:class:`OutToLog` at :data:`ERROR`, for ``sys.stderr = OutToError(logger)``."""

    def __init__(self, log: Callable[[str, Any], Any]) -> None:
        super().__init__(log, ERROR)


class Splitter:
    """A file-like object that repeats ``write``/``writelines``/``flush``/``close``
    on each of several files::

        (in)--(Splitter)--(out-0)
                       +--(out-1)
                       +--(out-n)

    Not locked: it is as thread-safe as the files it writes to.
    """

    def __init__(self, files: Iterable[IO[str]] = ()) -> None:
        self.files = list(files)

    def write(self, s: str) -> int:
        """Write ``s`` to every file; returns ``len(s)``."""
        for f in self.files:
            f.write(s)
        return len(s)

    def writelines(self, itr: Iterable[str]) -> None:
        """Write the same lines to every file, even when ``itr`` is a one-shot iterator."""
        lines = list(itr)
        for f in self.files:
            f.writelines(lines)

    def flush(self) -> None:
        for f in self.files:
            f.flush()

    def close(self) -> None:
        for f in self.files:
            f.close()


class LoggerNode:
    """A filtering node of a logger tree: it logs nothing itself, but forwards
    each *allowed* event to its children.

    ``allowed`` is a collection of importances, or ``None`` to allow all.
    Calling the node returns ``True`` when the event was allowed (and forwarded),
    ``False`` otherwise. ``close()`` does nothing (see :meth:`close_children`).
    """

    def __init__(
        self,
        children: Iterable[Callable[[str, Any], Any]] = (),
        allowed: Iterable[str] | None = None,
    ) -> None:
        self.children: list[Callable[[str, Any], Any]] = []
        self.add_children(*children)
        self.allowed = None if allowed is None else frozenset(allowed)

    def __call__(self, importance: str, msg: Any) -> bool:
        allowed = self.allowed
        if allowed is not None and importance not in allowed:
            return False
        for child in self.children:
            child(importance, msg)
        return True

    def add_children(self, *loggers: Callable[[str, Any], Any]) -> None:
        """Append ``loggers`` to the children that receive allowed events."""
        self.children.extend(loggers)

    def close_children(self) -> None:
        """Call ``close()`` on every child."""
        for child in self.children:
            child.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        """A node holds no resource; children are closed by :meth:`close_children`."""


class FileLogger(LoggerNode):
    """A :class:`LoggerNode` that also writes each allowed event to ``fobj``
    as ``'LEVEL (time)\\tmsg\\n'``.

    ``flush`` > 0 calls ``fobj.flush()`` after every ``flush`` lines (``count``
    is the number written since the last flush); ``flush`` <= 0 never
    flushes. Subclasses override :meth:`_time` and/or :meth:`_format` to change
    the line. Thread-safe: each event is written (and counted) whole.
    """

    def __init__(
        self,
        fobj: IO[str],
        allowed: Iterable[str] | None = None,
        flush: int = 5,
        children: Iterable[Callable[[str, Any], Any]] = (),
    ) -> None:
        super().__init__(children, allowed)
        self.fobj = fobj
        self.flush = flush  # the TaskIt 4.0 name: an int, not a method
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, importance: str, msg: Any) -> bool:
        if not super().__call__(importance, msg):
            return False
        line = self._format(importance, msg)
        with self._lock:
            self.fobj.write(line)
            if self.flush > 0:
                self.count += 1
                if self.count >= self.flush:
                    self.fobj.flush()
                    self.count = 0
        return True

    def _time(self) -> str:
        """The time stamp of a line; override to change it."""
        return time.strftime("%a %d %B %Y, %H:%M:%S")

    def _format(self, level: str, msg: Any) -> str:
        """The whole line written for one event (with its newline); override to change it."""
        return f"{level} ({self._time()})\t{msg}\n"

    def close(self) -> None:
        """Close the file (not the children: see :meth:`close_children`)."""
        self.fobj.close()


# --- bridge with stdlib logging ----------------------------------------------

_TO_LOGGING: dict[str, int] = {
    DEBUG: logging.DEBUG,
    INFO: logging.INFO,
    IMPORTANT: IMPORTANT_LEVEL,
    ERROR: logging.ERROR,
}


def to_logging_level(importance: str) -> int:
    """The stdlib level for a TaskIt importance.

    The four TaskIt names map to DEBUG, INFO, :data:`IMPORTANT_LEVEL` and
    ERROR; any other stdlib level name (``"WARNING"``, ``"CRITICAL"``) maps
    to its level; anything else to INFO.
    """
    level = _TO_LOGGING.get(importance)
    if level is not None:
        return level
    named = logging.getLevelName(importance) if isinstance(importance, str) else None
    return named if isinstance(named, int) else logging.INFO


def from_logging_level(levelno: int) -> str:
    """The TaskIt importance for a stdlib level: ERROR and above -> :data:`ERROR`,
    WARNING and :data:`IMPORTANT_LEVEL` -> :data:`IMPORTANT`, INFO -> :data:`INFO`,
    below INFO -> :data:`DEBUG`."""
    if levelno >= logging.ERROR:
        return ERROR
    if levelno >= IMPORTANT_LEVEL:
        return IMPORTANT
    if levelno >= logging.INFO:
        return INFO
    return DEBUG


class LoggingLogger:
    """A TaskIt logger that forwards each event to a stdlib ``logging.Logger``.

    ``logger`` is a ``logging.Logger`` or a logger name (default ``"taskit"``).
    ``levels`` overrides the importance -> level mapping (see
    :func:`to_logging_level`). ``msg`` is logged as ``"%s" % msg``, so a
    ``%`` in it is harmless. ``close()`` does nothing: the stdlib logger is
    not ours. Thread-safe (as stdlib logging is).
    """

    def __init__(
        self,
        logger: logging.Logger | str = "taskit",
        levels: Mapping[str, int] | None = None,
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.levels = dict(levels or {})

    def __call__(self, importance: str, msg: Any) -> bool:
        level = self.levels.get(importance)
        if level is None:
            level = to_logging_level(importance)
        if not self.logger.isEnabledFor(level):
            return False
        self.logger.log(level, "%s", msg)
        return True

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"LoggingLogger({self.logger.name!r})"


class TaskItHandler(logging.Handler):
    """A ``logging.Handler`` that passes each record to a TaskIt logger as
    ``taskit_logger(importance, formatted_message)``.

    The importance comes from :func:`from_logging_level` (or ``levels``, a
    mapping of exact level numbers). Without a formatter the message is the
    record's message plus any traceback. A record that arrives while this
    handler is already emitting on the same thread (a loop through a
    :class:`LoggingLogger` back into logging) is dropped, so a misconfigured
    bridge cannot recurse forever. ``close()`` also closes the TaskIt logger
    when ``close_logger`` is true.
    """

    def __init__(
        self,
        taskit_logger: Callable[[str, Any], Any],
        level: int = logging.NOTSET,
        levels: Mapping[int, str] | None = None,
        close_logger: bool = False,
    ) -> None:
        super().__init__(level)
        self.taskit_logger = taskit_logger
        self.levels = dict(levels or {})
        self.close_logger = close_logger
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            importance = self.levels.get(record.levelno) or from_logging_level(record.levelno)
            self.taskit_logger(importance, self.format(record))
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)
        finally:
            self._local.busy = False

    def close(self) -> None:
        try:
            if self.close_logger:
                self.taskit_logger.close()  # type: ignore[attr-defined]
        finally:
            super().close()


# LogRecord attributes a JSONFormatter copies into the object when a record has them
# (set through ``extra=``): what a log shipper indexes a call by.
_CALL_FIELDS = ("task", "call_id", "peer", "duration")


class JSONFormatter(logging.Formatter):
    """A ``logging.Formatter`` writing each record as one line of JSON, for log shippers.

    The object has ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
    ``message`` (formatted; a traceback appended as ``exception``), and
    ``process``; plus ``task``, ``call_id``, ``peer`` and ``duration`` (seconds)
    when the record carries them (``extra=``). Values JSON cannot hold are written
    as their ``repr``. ``taskit backend --log-format json`` uses it.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for field in _CALL_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=repr, ensure_ascii=False)
