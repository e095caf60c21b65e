"""Every exception taskit raises, in one hierarchy under :class:`TaskItError`.

This module imports nothing from taskit, so every other module may import it.
Each message should tell the user what happened and what to do next.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

__all__ = [
    "TaskItError",
    "WaitTimeoutError",
    # local half
    "ResyncError",
    "ResyncWaitTimeout",
    "ResultAlreadySetError",
    "PoolError",
    "PoolShutdownError",
    "WorkerLostError",
    "RemoteTaskError",
    "RemoteTraceback",
    "WorkerInitError",
    "WorkerStartError",
    "UnpicklableError",
    "UnknownTargetError",
    "JobWorkerError",
    "JobWorkerNotFound",
    # distributed half
    "CodecError",
    "EncodeError",
    "MessageTooLargeError",
    "DecodeError",
    "UnknownCodecError",
    "ProtocolError",
    "SignatureError",
    "FrontEndError",
    "BackendNotAvailableError",
    "BackendLostError",
    "AuthenticationError",
    "CallTimeoutError",
    "FrontEndClosedError",
    "BackendProcessingError",
    "UnknownTaskError",
    "CodecNotAllowedError",
    "BusyError",
    "StoppingError",
    "ExpiredError",
    "ProtocolVersionError",
    "BackendBindError",
    "InsecureCodecError",
    # operations
    "PortSpecError",
    "TaskLoadError",
    "KeyFileError",
]


class TaskItError(Exception):
    """Root of every error taskit raises itself."""


# Before Python 3.11 concurrent.futures.TimeoutError is not the builtin
# TimeoutError: taskit's timeouts are both, so `except TimeoutError` (and
# `except concurrent.futures.TimeoutError`) catch them on every version.
if concurrent.futures.TimeoutError is TimeoutError:
    _TIMEOUT: tuple[type[Exception], ...] = (TimeoutError,)
else:  # Python 3.10
    _TIMEOUT = (TimeoutError, concurrent.futures.TimeoutError)


class WaitTimeoutError(TaskItError, *_TIMEOUT):  # type: ignore[misc]
    """A wait ran out of time before the result was there: ``result(timeout)`` or
    ``exception(timeout)`` of a FrontEnd's future, ``WorkerPool.map(timeout=...)``.

    Only the wait ended: the call or job goes on (``map`` cancels the jobs not
    yet started). A builtin ``TimeoutError`` and a
    ``concurrent.futures.TimeoutError`` on every supported Python.
    """


# --- local half -------------------------------------------------------------


class ResyncError(TaskItError):
    """Misuse of a :class:`taskit.resync.Mediator`."""


class ResyncWaitTimeout(ResyncError, *_TIMEOUT, RuntimeError):  # type: ignore[misc]
    """``Mediator.get(timeout)`` ran out of time before a result or error was set.

    Also a ``RuntimeError``, as the original (a ``_thread.error``) was.
    """

    def __init__(self, msg: str = "Could not acquire lock within the time allotted") -> None:
        super().__init__(msg)


class ResultAlreadySetError(ResyncError):
    """A Mediator already holds a result or an error; it is set exactly once."""


class PoolError(TaskItError):
    """Base of the worker-pool errors."""


class PoolShutdownError(PoolError, RuntimeError):
    """Work was submitted to a pool that is shut down (or shutting down)."""


class WorkerLostError(PoolError):
    """The worker process running this job died before answering (crash, kill, os._exit).

    Only that job fails; the pool replaces the worker.
    """


class RemoteTaskError(PoolError):
    """A job raised in a process worker and its exception could not be sent back as is.

    ``.type`` is the exception's class name, ``.remote_traceback`` the text.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type = type_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class RemoteTraceback(TaskItError):
    """Not raised: set as ``__cause__`` of an exception re-raised from a process
    worker, so the printed chain shows where it happened. ``str()`` is the text.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class WorkerInitError(PoolError):
    """A worker's ``initializer`` or ``toolbox_factory`` raised (see ``__cause__``).

    Every job that worker takes fails with this error; fix the factory and
    create the pool again.
    """


class WorkerStartError(PoolError):
    """A process pool's workers cannot start: they die while starting (before any
    job) or cannot be created, a few in a row, so the pool stopped replacing them.

    Every job queued then or submitted later fails with this error; the message
    names the cause (often a script that creates the pool without the
    ``if __name__ == "__main__":`` guard). Fix it and create the pool again.
    """


class UnpicklableError(PoolError, TypeError):
    """A job's function, arguments or result cannot be pickled to or from a
    process worker. Use module-level functions and picklable values, or a
    ``kind="thread"`` pool.
    """


class UnknownTargetError(PoolError, LookupError):
    """A ``start_workers`` job named a target its attributes object does not have."""


class JobWorkerError(TaskItError):
    """A pipeline stage cannot do what was asked (e.g. resize a dispatcher stage)."""


class JobWorkerNotFound(JobWorkerError):
    """``set_thread_num`` named a function that is not a stage of this pipeline."""


# --- distributed half -------------------------------------------------------


class CodecError(TaskItError):
    """Base of the codec errors."""


class EncodeError(CodecError, ValueError):
    """A value cannot be carried by the chosen codec (the message names its type)."""


class MessageTooLargeError(EncodeError):
    """A call's encoded arguments exceed the client's ``max_message_size``: it is
    refused before sending, since a backend would drop the whole connection (and
    every call in flight on it) on an oversized message."""


class DecodeError(CodecError, ValueError):
    """Bytes could not be decoded by the chosen codec."""


class UnknownCodecError(CodecError, LookupError):
    """No codec is registered under that name or wire id."""


class ProtocolError(TaskItError):
    """A message does not follow the taskit wire protocol (magic, header, frames)."""


class SignatureError(ProtocolError):
    """A message's HMAC signature is missing or wrong (this peer has a shared key), or
    present where this peer has no key to check it."""


class FrontEndError(TaskItError):
    """Base of the errors a FrontEnd raises about reaching backends."""


class BackendNotAvailableError(FrontEndError):
    """No backend could be reached (all down, or none configured)."""


class BackendLostError(FrontEndError):
    """The backend running this call went away before answering.

    The call may or may not have run there (at-most-once); pass ``retries=`` to
    the FrontEnd to re-send such calls to another backend.
    """


class AuthenticationError(FrontEndError):
    """The backend refused the call's signature: the FrontEnd's ``key=`` and the
    backend's differ, or one side has none. The call did not run. The message
    says which side lacks the key when that is known; give both sides the same key.
    """


class FrontEndClosedError(FrontEndError, RuntimeError):
    """The FrontEnd was closed: new calls are refused and pending ones fail with this."""


class CallTimeoutError(FrontEndError, *_TIMEOUT):  # type: ignore[misc]
    """No answer arrived within the call's timeout. Also a builtin ``TimeoutError``
    (and a ``concurrent.futures.TimeoutError``, on every supported Python)."""


class BackendProcessingError(TaskItError):
    """The task raised on the backend (or the backend refused the call).

    ``.type`` is the remote exception's class name, ``.args`` its arguments,
    ``.remote_traceback`` the remote traceback text (may be empty), ``.task``
    the task name and ``.backend`` the backend address.
    """

    def __init__(
        self,
        type: str,
        args: Any = (),
        remote_traceback: str = "",
        task: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(type, args)
        self.type = type
        self.args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
        self.remote_traceback = remote_traceback or ""
        self.task = task
        self.backend = backend

    def __reduce__(self):  # keep all fields through pickling
        return (
            type(self),
            (self.type, self.args, self.remote_traceback, self.task, self.backend),
        )

    def __str__(self) -> str:
        where = ""
        if self.task is not None:
            where = f" in task {self.task!r}"
        if self.backend is not None:
            where += f" on {self.backend}"
        text = f"{self.type}{where}: {', '.join(map(repr, self.args))}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class UnknownTaskError(BackendProcessingError):
    """The backend has no task of that name (``.type == 'UnknownTask'``)."""


class CodecNotAllowedError(BackendProcessingError):
    """The backend refuses the request's codec (e.g. pickle without a key)."""


class BusyError(BackendProcessingError):
    """The backend's queue is full (``max_pending``); try again or elsewhere."""


class StoppingError(BackendProcessingError):
    """The backend is stopping and accepts no new calls."""


class ExpiredError(BackendProcessingError, CallTimeoutError):
    """The call's deadline (its ``timeout``) passed before the backend could start it
    (``.type == 'Expired'``): it did not run, so it is safe to send again. Also a
    :class:`CallTimeoutError` (and a builtin ``TimeoutError``)."""


class ProtocolVersionError(FrontEndError, ProtocolError):
    """The peer speaks another version of the taskit wire protocol (an older taskit,
    or a newer one): upgrade the older side. The message names both versions."""


class BackendBindError(TaskItError, OSError):
    """A BackEnd could not bind its endpoint (address in use, bad host, no permission).

    The message names the endpoint; choose another port, or ``port=0`` for a free one.
    """


class InsecureCodecError(CodecError, ValueError):
    """A BackEnd was told to accept pickle without a shared key.

    Unpickling runs code chosen by the sender: pass ``key=`` (on both sides) so
    only key holders are heard, or ``insecure_pickle=True`` on a trusted network.
    """


# --- operations ---------------------------------------------------------------


class PortSpecError(TaskItError, ValueError):
    """A port list such as ``54543,54545`` or ``54543-54546`` is malformed or out of range."""


class TaskLoadError(TaskItError, ImportError):
    """``taskit backend MODULE[:ATTR]`` could not load tasks from what it was given
    (no such module or file, no such attribute, or nothing callable to serve)."""


class KeyFileError(TaskItError, ValueError):
    """A ``--key-file`` cannot be read or is empty (an empty key is never "no key")."""
