"""The child side of a process pool: the loop each worker process runs.

Wire format between the pool's manager thread and a worker (private, both
ends are this package, so pickle is fine: the parent trusts its own children):

* parent -> child, on the job pipe: ``pickle([(jid, is_job, payload), ...])``,
  a batch of jobs, each ``payload`` being ``pickle((fn, args, kwargs))``
  made in the submitting thread; or ``b""``: finish the jobs received, exit.
* child -> parent, on the result pipe: one frame per job, in the order the
  jobs were received: an 8-byte big-endian length, then
  ``pickle((jid, status, data, seconds))`` (status: :data:`OK`,
  :data:`ERROR`, :data:`TERMINATED`). The frame is written before the next
  job starts, so a crash never loses a result already produced; the parent
  reads whatever frames are in the pipe with one ``read``.
* ``claim``: four shared integers ``[started, skip_lo, skip_hi, ready]``;
  the first three are guarded by ``gate`` (a process-shared lock). Before
  running a job the child sets
  ``started`` to its id, unless the id lies in ``(skip_lo, skip_hi]``: those
  jobs the parent took back to give to an idle worker (work stealing), and
  the child drops them silently. When a child dies, ``started`` tells the
  parent which job it was running (that one fails) and which it never
  started (those are re-queued for the other workers). ``ready`` is set to 1
  when :func:`child_main` begins: a worker that dies with it still 0 died
  while starting (multiprocessing's bootstrap, e.g. re-importing the main
  module), before any taskit code ran in it.

Parent death: a reader thread drains the job pipe, so a write end closed
without the ``b""`` stop message (EOF: the parent died, however) makes the
child exit at once, even in the middle of a long job; it also checks
``getppid()`` each second, and on Linux the kernel sends SIGKILL when the
parent dies (``PR_SET_PDEATHSIG``), which works even while a job holds the GIL.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
import traceback
from typing import Any

__all__ = [
    "child_main",
    "OK",
    "ERROR",
    "TERMINATED",
    "STOP",
    "HEADER",
    "READY",
    "EXIT_UNGUARDED_MAIN",
    "encode_exception",
]

OK, ERROR, TERMINATED = 0, 1, 2
STOP = b""
HEADER = struct.Struct("!Q")  # result frames: 8-byte length, then the pickle
EXIT_ORPHANED = 70  # the parent is gone: nobody is left to read our results
# A process pool was asked for workers while this process was still importing
# the main module for multiprocessing (an unguarded script): see processes.py.
EXIT_UNGUARDED_MAIN = 78  # EX_CONFIG
READY = 3  # claim[READY]: child_main has begun
_PR_SET_PDEATHSIG = 1
_dumps = pickle.dumps
_loads = pickle.loads
_PROTO = pickle.HIGHEST_PROTOCOL


def encode_exception(e: BaseException) -> bytes:
    """``pickle((type_name, message, remote_traceback, pickled_exception_or_None))``.

    The exception itself is included only if it survives a pickle round trip
    here, so the parent can always decode the outer tuple.
    """
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    name = type(e).__qualname__
    module = type(e).__module__
    if module not in ("builtins", "__main__", "__mp_main__"):
        name = f"{module}.{name}"
    blob: bytes | None
    try:
        blob = _dumps(e, _PROTO)
        _loads(blob)
    except Exception:  # noqa: BLE001 - fall back to RemoteTaskError in the parent
        blob = None
    try:
        message = str(e)
    except Exception:  # noqa: BLE001
        message = "<unprintable exception>"
    return _dumps((name, message, tb, blob), _PROTO)


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL us when our parent dies; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        # CDLL(None): the symbols already loaded (libc among them); cheaper
        # than importing ctypes.util to look libc up.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - the pipe EOF and getppid checks remain
        pass


def _read_jobs(conn: Any, inbox: queue.SimpleQueue, ppid: int) -> None:
    """Drain the job pipe into ``inbox``; exit the process when the parent is gone."""
    try:
        while True:
            while not conn.poll(1.0):
                if os.getppid() != ppid:
                    os._exit(EXIT_ORPHANED)
            data = conn.recv_bytes()
            inbox.put(data)
            if data == STOP:
                return
    except (EOFError, OSError):
        os._exit(EXIT_ORPHANED)


def child_main(
    job_conn: Any,
    result_conn: Any,
    claim: Any,
    gate: Any,
    expected_ppid: int,
    init: bytes,
) -> None:
    """Entry point of a worker process (runs in the child)."""
    from taskit._pool.classic import TerminationNotice
    from taskit._pool.toolbox import call_initializers
    from taskit.errors import UnpicklableError, WorkerInitError

    claim[READY] = 1  # the bootstrap is over: a death from now on is not a start failure
    _set_parent_death_signal()
    # Our parent may have died before prctl took effect: then we were re-parented.
    ppid = os.getppid()
    if expected_ppid and ppid != expected_ppid:
        os._exit(EXIT_ORPHANED)
    # Ctrl-C in a terminal signals the whole process group: the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(
        target=_read_jobs, args=(job_conn, inbox, ppid), name="taskit-worker-reader", daemon=True
    ).start()

    init_error: BaseException | None = None
    toolbox = None
    initializer, initargs, toolbox_factory = _loads(init)
    try:
        toolbox = call_initializers(initializer, initargs, toolbox_factory)
    except BaseException as e:  # noqa: BLE001 - every job will report it
        init_error = e
    equipped = toolbox_factory is not None

    out_fd = result_conn.fileno()
    perf = time.perf_counter

    def send(jid: int, status: int, data: bytes, seconds: float) -> None:
        # One frame per job, written before the next job starts: if this
        # process dies, every result it produced has already left it.
        body = _dumps((jid, status, data, seconds), _PROTO)
        frame = memoryview(HEADER.pack(len(body)) + body)
        while frame:
            frame = frame[os.write(out_fd, frame) :]

    try:
        while True:
            data = inbox.get()
            if data == STOP:
                break
            for jid, is_job, payload in _loads(data):
                with gate:
                    if claim[1] < jid <= claim[2]:
                        continue  # taken back by the parent
                    claim[0] = jid
                t0 = perf()
                try:
                    if init_error is not None:
                        raise WorkerInitError(
                            f"worker process {os.getpid()} could not start: initializer or "
                            f"toolbox_factory raised {init_error!r}; fix it and recreate the pool"
                        ) from init_error
                    fn, args, kwargs = _loads(payload)
                    if is_job and equipped:
                        value = fn(toolbox=toolbox)
                    else:
                        value = fn(*args, **kwargs)
                    try:
                        status, out = OK, _dumps(value, _PROTO)
                    except Exception as e:  # noqa: BLE001
                        err = UnpicklableError(
                            f"the job's result ({type(value).__name__}) cannot be pickled back "
                            f"to the parent: {e}; return picklable values"
                        )
                        status, out = ERROR, encode_exception(err)
                except TerminationNotice:
                    send(jid, TERMINATED, b"", perf() - t0)
                    return
                except BaseException as e:  # noqa: BLE001 - a job never kills its worker
                    if isinstance(e, (SystemExit, KeyboardInterrupt)):
                        # Re-raised in the parent these would stop the caller's thread.
                        e = RuntimeError(f"the job raised {type(e).__name__}{e.args!r}")
                    status, out = ERROR, encode_exception(e)
                value = None
                send(jid, status, out, perf() - t0)
    except OSError:  # EPIPE: the parent is gone
        os._exit(EXIT_ORPHANED)
