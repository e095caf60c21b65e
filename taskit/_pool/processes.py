"""The parent side of a process pool: worker processes and the manager thread.

One manager thread (``<pool name>-manager``) owns every worker process: it
starts them (so the kernel's parent-death signal is tied to a thread that
lives as long as the pool), sends them jobs, reads their results, and notices
their deaths. Submitting threads only append to a deque and poke a wake-up
pipe, so ``submit`` never blocks on a child.

Scheduling: each worker has its own job pipe. The next jobs go to the worker
with the fewest jobs in flight (least loaded). A worker may hold more than one
job only when jobs are short: the per-worker cap is the number of jobs that
fit in :data:`BATCH_SECONDS` of measured run time (a moving average), so tiny
jobs travel in batches (one pipe write for many) while long jobs go one at a
time. When job sizes are mixed and a worker goes idle while another has jobs
waiting behind a job running longer than :data:`STEAL_AFTER`, the manager
takes those jobs back (the child skips them; see ``claim`` in
:mod:`taskit._pool.child`) and gives them to the idle worker: no job waits
for long while a worker is idle.

Start method: ``forkserver`` by default on POSIX, else ``spawn``. ``fork``
is refused: the parent is multithreaded (this manager, the backend's I/O
threads, user threads), and a forked child inherits locks held by other
threads and the parent's open pipes, which would also defeat the pipe-EOF
detection of a dead parent. ``forkserver`` forks each worker from a small
single-threaded server, so a worker starts in a few milliseconds instead of a
fresh interpreter's tens (``spawn``); ``bench/pool.py`` measures both.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - its exit hook must be registered before ours
import os
import pickle
import selectors
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from taskit._pool import child
from taskit._pool.work_item import WorkItem
from taskit.errors import (
    PoolError,
    PoolShutdownError,
    RemoteTaskError,
    RemoteTraceback,
    UnpicklableError,
    WorkerLostError,
    WorkerStartError,
)


class _Pool(Protocol):
    """What the engine uses of its :class:`~taskit.pool.WorkerPool` (which imports
    this module; a Protocol keeps the import one-way)."""

    name: str
    _initializer: Callable[..., Any] | None
    _initargs: tuple
    _toolbox_factory: Callable[[], Any] | None
    _slots: threading.Semaphore | None
    _target: int

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None: ...
    def _job_done(self, n: int = 1) -> None: ...
    def _terminated_by_job(self) -> None: ...


__all__ = ["ProcessEngine", "BATCH_SECONDS", "MAX_INFLIGHT", "default_start_method"]

log = logging.getLogger("taskit.pool")

BATCH_SECONDS = 0.002  # estimated work a worker may hold beyond its current job
# A worker silent this long with jobs waiting behind its current one is
# "stalled": while another worker is idle, its waiting jobs are taken back.
STEAL_AFTER = 0.01
MAX_INFLIGHT = 256  # jobs per worker, whatever their size
# Consecutive workers that die before running any job (or cannot be created):
# then the pool stops replacing them and fails its jobs with WorkerStartError.
_DEATHS_BEFORE_GIVING_UP = 5
_EXIT_WAIT = 10.0  # seconds interpreter exit waits for worker processes to stop
_dumps = pickle.dumps
_loads = pickle.loads
_PROTO = pickle.HIGHEST_PROTOCOL


_live_engines: weakref.WeakSet[ProcessEngine] = weakref.WeakSet()


def _stop_at_exit() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that
    # hook joins every child process, which would wait forever for workers
    # nobody told to stop. Running jobs finish; queued ones are cancelled.
    # Then wait (bounded) for the workers to exit: that hook also unlinks the
    # pools' semaphores, which a worker still starting (a replacement started
    # just before shutdown(wait=False), as terminate_server does) must open,
    # or it dies with a FileNotFoundError traceback on stderr.
    engines = list(_live_engines)
    for engine in engines:
        try:
            engine._pool.shutdown(wait=False, cancel_pending=True)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    deadline = time.monotonic() + _EXIT_WAIT
    for engine in engines:
        engine.wait_stopped(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_at_exit)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_if_importing_main() -> None:
    """End this process at once if multiprocessing is still importing the main
    module in it: a script without the ``if __name__ == "__main__":`` guard,
    re-run by a worker process (or by the fork server) that it started.

    Workers cannot start from here (multiprocessing refuses while the main
    module is imported), and the rest of the script would run here too:
    nested backends, calls that fail, a fork server that never serves. The
    parent sees the exit code and reports the cause, once.
    """
    # multiprocessing's own mark for this phase (see spawn._check_not_importing_main).
    if getattr(mp.current_process(), "_inheriting", False):
        os._exit(child.EXIT_UNGUARDED_MAIN)


def _main_module() -> str:
    """How to name the main module in a message: its file, or ``__main__``."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return f"the main module ({path})" if path else "the main module"


def default_start_method() -> str:
    """``forkserver`` where available (POSIX), else ``spawn``."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def decode_exception(data: bytes) -> BaseException:
    """Rebuild a worker's exception, with the remote traceback as its ``__cause__``.

    The original type comes back when it pickles; otherwise a
    :class:`~taskit.errors.RemoteTaskError` carrying its name, message and
    traceback text. Either way ``.remote_traceback`` holds the text.
    """
    name, message, tb, blob = _loads(data)
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = _loads(blob)
        except Exception:  # noqa: BLE001 - e.g. class unknown in the parent
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteTaskError(name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - exceptions with __slots__
        pass
    return exc


class _Proc:
    """One worker process, as the manager thread sees it."""

    __slots__ = (
        "wid",
        "process",
        "job_w",
        "result_r",
        "claim",
        "gate",
        "progress",
        "inflight",
        "retiring",
        "done",
        "buf",
    )

    def __init__(
        self, wid: int, process: Any, job_w: Any, result_r: Any, claim: Any, gate: Any
    ) -> None:
        self.wid = wid
        self.process = process
        self.job_w = job_w
        self.result_r = result_r
        self.claim = claim  # [started, skip_lo, skip_hi], see taskit._pool.child
        self.gate = gate
        self.progress = 0.0  # when it last reported a result, or got work while empty
        self.inflight: deque[WorkItem] = deque()  # sent, in the order the child runs them
        self.retiring = False
        self.done = 0  # results received
        self.buf = bytearray()  # result bytes not yet parsed into frames
        os.set_blocking(result_r.fileno(), False)


class ProcessEngine:
    """The process half of a :class:`~taskit.pool.WorkerPool` (internal).

    ``encode`` runs in the submitting thread, ``enqueue``/``set_target`` under
    the pool's lock; everything else happens in the manager thread.
    """

    def __init__(self, pool: _Pool, start_method: str | None) -> None:
        method = start_method or default_start_method()
        if method == "fork":
            raise ValueError(
                "start_method='fork' is not supported: the pool's parent is multithreaded, "
                "and a forked child can inherit held locks and the parent's pipes; "
                "use 'forkserver' (default) or 'spawn'"
            )
        self._ctx = mp.get_context(method)
        self.start_method = method
        self._pool = pool
        try:
            self._init = _dumps((pool._initializer, pool._initargs, pool._toolbox_factory), _PROTO)
        except Exception as e:
            raise UnpicklableError(
                f"initializer, initargs and toolbox_factory must pickle to reach the worker "
                f"processes ({e}); use module-level functions"
            ) from e
        self._queue: deque[WorkItem] = deque()
        self._target = 0
        self._workers: dict[int, _Proc] = {}
        self._wid = 0
        self._jid = 0
        self._avg: float | None = None  # moving average of seconds per job
        self._completed = 0
        self._failed = 0
        self._early_deaths = 0
        self._broken: str | None = None
        self._stopping = False
        self._cancel_pending = False
        self._count_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_pending = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"{pool.name}-manager", daemon=True)
        self._started = threading.Event()  # the first workers have been started
        _live_engines.add(self)
        self._thread.start()

    # -- called from user threads ------------------------------------------------

    def encode(self, item: WorkItem) -> bool:
        """Pickle the call in the caller's thread; on failure fail its future."""
        try:
            item.payload = _dumps((item.fn, item.args, item.kwargs), _PROTO)
        except Exception as e:  # noqa: BLE001 - pickle raises many types
            what = (
                "job" if item.is_job else f"function {getattr(item.fn, '__qualname__', item.fn)!r}"
            )
            item.future.set_exception(
                UnpicklableError(
                    f"cannot send the {what} or its arguments to a worker process: {e}. "
                    "Use a module-level function and picklable arguments, or kind='thread'"
                )
            )
            with self._count_lock:
                self._failed += 1
            return False
        item.args = item.kwargs = None  # type: ignore[assignment]  # the payload is what travels
        item.sent = False
        return True

    def enqueue(self, item: WorkItem) -> None:
        """Queue an encoded job (pool lock held)."""
        self._queue.append(item)  # if the pool is broken, the manager fails it
        self._wake()

    def set_target(self, n: int) -> None:
        """Ask for ``n`` live workers (pool lock held)."""
        if n:
            _exit_if_importing_main()
        self._target = n
        self._wake()

    def shutdown(self, cancel_pending: bool) -> None:
        self._cancel_pending = cancel_pending
        self._stopping = True
        self._wake()

    def is_manager_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def wait_stopped(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Counts read without locking the manager: a consistent-enough snapshot.

        ``running`` counts workers whose current job has started; jobs sent to
        a worker but not started yet count as ``queued``.
        """
        everyone = list(self._workers.values())
        live = [w for w in everyone if not w.retiring]
        running = sent = 0
        for w in everyone:
            inflight = list(w.inflight)
            sent += len(inflight)
            if inflight and inflight[0].jid <= w.claim[0]:
                running += 1
        return {
            "workers": len(live),
            "idle": sum(1 for w in live if not w.inflight),
            "queued": len(self._queue) + sent - running,
            "running": running,
            "completed": self._completed,
            "failed": self._failed,
            "size": self._pool._target,
        }

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        return [
            w.process.pid for w in list(self._workers.values()) if w.process.pid and not w.retiring
        ]

    def _wake(self) -> None:
        # One byte per burst of submits: the manager clears the flag after
        # draining the pipe and before it looks at the queue again.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # closed: the manager has exited
                pass

    # -- the manager thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - never leave futures hanging
            log.critical("%s: process pool manager crashed", self._pool.name, exc_info=True)
            self._fail_everything(PoolError(f"{self._pool.name}: the pool manager crashed: {e!r}"))
        finally:
            self._started.set()
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until the manager has started the initial workers."""
        return self._started.wait(timeout)

    def _loop(self) -> None:
        while True:
            self._adjust_workers()
            if self._target or self._broken or self._stopping:
                self._started.set()
            self._dispatch()
            if self._stopping and not self._workers:
                self._cancel_queue(PoolShutdownError(f"{self._pool.name} shut down"))
                return
            timeout = self._balance()
            if self._queue and timeout == 0.0:
                continue  # jobs were taken back: dispatch them now
            for key, _ in self._sel.select(timeout):
                w = key.data
                if w is None:
                    # Drain first, then clear: a submit that finds the flag clear
                    # writes a byte that this drain cannot swallow.
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self._wake_pending = False
                elif key.fileobj is w.result_r:
                    self._read_results(w)
                elif w.wid in self._workers:  # the sentinel: the process ended
                    self._worker_exited(w)

    def _start_worker(self) -> None:
        ctx = self._ctx
        self._wid += 1
        job_r, job_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        claim = ctx.RawArray("Q", 4)
        gate = ctx.Lock()
        # With forkserver the child's parent is the fork server, not us.
        expected_ppid = os.getpid() if self.start_method == "spawn" else 0
        process = ctx.Process(  # type: ignore[attr-defined]  # typeshed's BaseContext lacks it
            target=child.child_main,
            args=(job_r, result_w, claim, gate, expected_ppid, self._init),
            name=f"{self._pool.name}-{self._wid}",
            daemon=False,  # a job may start processes of its own
        )
        try:
            process.start()
        finally:
            job_r.close()  # only the child holds these ends: EOF tells it we died
            result_w.close()
        w = _Proc(self._wid, process, job_w, result_r, claim, gate)
        self._workers[w.wid] = w
        self._sel.register(result_r, selectors.EVENT_READ, w)
        self._sel.register(process.sentinel, selectors.EVENT_READ, w)
        log.debug("%s: started worker process %d", self._pool.name, process.pid)

    def _adjust_workers(self) -> None:
        live = [w for w in self._workers.values() if not w.retiring]
        target = 0 if self._stopping else self._target
        if self._stopping and not self._cancel_pending and self._queue:
            target = self._target  # drain the queue first, with the workers asked for
        missing = target - len(live)
        while missing > 0 and self._broken is None:
            try:
                self._start_worker()
            except Exception as e:  # noqa: BLE001 - e.g. EMFILE, ENOMEM: retried a few times
                self._early_deaths += 1
                log.debug("%s: cannot start a worker process: %r", self._pool.name, e)
                if self._early_deaths >= _DEATHS_BEFORE_GIVING_UP:
                    hint = ""
                    if isinstance(e, EOFError) and self.start_method == "forkserver":
                        # The fork server died at once: it may import the main module too.
                        hint = (
                            "; the fork server exited: if importing the main module starts a "
                            "process pool, guard the main module with if __name__ == '__main__':"
                        )
                    self._give_up(
                        f"{self._early_deaths} tries in a row failed, the last: {e!r}{hint}"
                    )
                continue
            missing -= 1
        excess = len(live) - target
        if excess > 0:
            # Retire idle workers first, then the least loaded.
            for w in sorted(live, key=lambda w: len(w.inflight))[:excess]:
                w.retiring = True
                self._send(w, child.STOP)

    def _cap(self) -> int:
        avg = self._avg
        if avg is None:
            return 1  # learn the job size from the first results
        return max(1, min(MAX_INFLIGHT, int(BATCH_SECONDS / max(avg, 1e-7))))

    def _dispatch(self) -> None:
        q = self._queue
        if not q:
            return
        if self._broken is not None:
            self._cancel_queue(WorkerStartError(self._broken), cancel=False)
            return
        live = [w for w in self._workers.values() if not w.retiring]
        if not live:
            if self._stopping:
                self._cancel_queue(PoolShutdownError(f"{self._pool.name} shut down"))
            return
        if self._stopping and self._cancel_pending:
            self._cancel_queue(None)
            return
        now = time.monotonic()
        moving = [w for w in live if not w.inflight or now - w.progress < STEAL_AFTER]
        if moving:
            live = moving  # no new work behind a job that is taking long
        cap = self._cap()
        slots = self._pool._slots
        done = 0
        while q:
            w = min(live, key=lambda w: len(w.inflight))
            room = cap - len(w.inflight)
            if room <= 0:
                break
            k = min(room, -(-len(q) // len(live)))
            batch: list[WorkItem] = []
            while len(batch) < k and q:
                item = q.popleft()
                if not item.sent:
                    if slots is not None:
                        slots.release()  # it leaves the waiting queue for good
                    if not item.future.set_running_or_notify_cancel():
                        done += 1
                        continue
                    item.sent = True
                self._jid += 1
                item.jid = self._jid
                batch.append(item)
            if batch:
                if not w.inflight:
                    w.progress = now
                w.inflight.extend(batch)
                self._send(w, _dumps([(i.jid, i.is_job, i.payload) for i in batch], _PROTO))
        if done:
            self._pool._job_done(done)

    def _balance(self) -> float | None:
        """Work stealing: give an idle worker the jobs waiting behind a long job.

        Returns 0.0 when jobs were taken back (they are queued again), the
        seconds until a busy worker would count as stalled, or ``None``.
        """
        if self._queue or self._stopping and self._cancel_pending:
            return None
        live = [w for w in self._workers.values() if not w.retiring]
        if all(w.inflight for w in live):
            return None
        now = time.monotonic()
        due = None
        for w in live:
            if len(w.inflight) > 1:
                left = w.progress + STEAL_AFTER - now
                if left <= 0:
                    self._steal(w)
                else:
                    due = left if due is None else min(due, left)
        if self._queue:
            return 0.0
        return None if due is None else min(due, 1.0)

    def _steal(self, w: _Proc) -> None:
        """Take back the jobs ``w`` has not started; the child will skip them."""
        with w.gate:
            started = w.claim[0]
            unstarted = [i for i in w.inflight if i.jid > started]
            if unstarted:
                # One range covers every job taken from w so far: any earlier
                # range started at or after ``started`` too.
                w.claim[1] = started
                w.claim[2] = unstarted[-1].jid
        if unstarted:
            w.inflight = deque(i for i in w.inflight if i.jid <= started)
            self._queue.extendleft(reversed(unstarted))
            log.debug("%s: moved %d jobs off a busy worker", self._pool.name, len(unstarted))

    def _send(self, w: _Proc, data: bytes) -> None:
        try:
            w.job_w.send_bytes(data)
        except OSError:
            pass  # the child died: its sentinel will fire and re-queue what it had not started

    def _read_results(self, w: _Proc, until_eof: bool = False) -> None:
        """Read every frame waiting in ``w``'s result pipe (one read for many)."""
        fd = w.result_r.fileno()
        buf = w.buf
        try:
            while True:
                chunk = os.read(fd, 1 << 18)
                if not chunk:  # EOF: the child exited; its sentinel follows
                    self._unregister(w.result_r)
                    break
                buf += chunk
                if len(chunk) < 1 << 18 and not until_eof:
                    break
        except BlockingIOError:
            pass
        except OSError:
            self._unregister(w.result_r)
        frames = []
        pos, end, size = 0, len(buf), child.HEADER.size
        unpack = child.HEADER.unpack_from
        while end - pos >= size:
            (n,) = unpack(buf, pos)
            if end - pos - size < n:
                break
            frames.append(_loads(buf[pos + size : pos + size + n]))
            pos += size + n
        del buf[:pos]
        if frames:
            self._settle(w, frames)

    def _settle(self, w: _Proc, frames: list) -> None:
        n = len(frames)
        busy = sum(f[3] for f in frames)
        per_job = busy / n
        self._avg = per_job if self._avg is None else 0.8 * self._avg + 0.2 * per_job
        w.done += n
        w.progress = time.monotonic()
        if self._early_deaths:
            self._early_deaths = 0  # workers do start: only failures in a row count
        completed = failed = 0
        inflight = w.inflight
        for _jid, status, payload, _ in frames:
            item = inflight.popleft()
            fut: Future = item.future
            if status == child.OK:
                try:
                    value = _loads(payload)
                except Exception as e:  # noqa: BLE001
                    failed += 1
                    fut.set_exception(
                        UnpicklableError(f"the job's result cannot be unpickled here: {e!r}")
                    )
                    continue
                completed += 1
                fut.set_result(value)
            elif status == child.ERROR:
                failed += 1
                exc = decode_exception(payload)
                fut.set_exception(exc)
                if item.is_job:
                    log.error("job %r raised in worker process", item.fn, exc_info=exc)
            else:  # TERMINATED: a TerminationNotice; the child exits after this
                completed += 1
                w.retiring = True
                self._pool._terminated_by_job()
                self._target = max(0, self._target - 1)
                fut.set_result(None)
        with self._count_lock:
            self._completed += completed
            self._failed += failed
        self._pool._job_done(n)

    def _worker_exited(self, w: _Proc) -> None:
        try:
            self._read_results(w, until_eof=True)  # whatever it sent before dying is valid
        except Exception:  # noqa: BLE001
            log.exception("%s: reading a dead worker's last results", self._pool.name)
        self._unregister(w.process.sentinel)
        self._unregister(w.result_r)
        w.process.join(5)
        del self._workers[w.wid]
        w.job_w.close()
        w.result_r.close()
        code = w.process.exitcode
        how = _describe_exit(code)
        if w.retiring and code == 0:
            # Retired (shrink, shutdown or a TerminationNotice): jobs it was sent
            # after the stop, if any, were never started and go back to the queue.
            log.debug("%s: worker process %s exited", self._pool.name, w.process.pid)
        elif w.done == 0 and w.claim[0] == 0:
            # Died before running any job: the jobs it was sent go back to the
            # queue, and a start that keeps failing is reported once (_give_up).
            self._start_failed(w, code, how)
        else:
            log.warning(
                "%s: worker process %s %s%s",
                self._pool.name,
                w.process.pid,
                how,
                "" if w.retiring or self._stopping else "; starting a replacement",
            )
            self._early_deaths = 0
        if not w.inflight:
            return
        started = w.claim[0]
        lost = [i for i in w.inflight if i.jid <= started]
        unstarted = [i for i in w.inflight if i.jid > started]
        for item in lost:
            ran = (
                "while running this job"
                if item.jid == started
                else "after running this job, before sending its result"
            )
            item.future.set_exception(
                WorkerLostError(
                    f"worker process {w.process.pid} of {self._pool.name} {how} {ran}; only this "
                    "job failed and the pool replaced the worker. Retry it if it is idempotent"
                )
            )
        if lost:
            with self._count_lock:
                self._failed += len(lost)
            self._pool._job_done(len(lost))
        # Jobs it never started go back to the front, in order, for other workers.
        self._queue.extendleft(reversed(unstarted))

    def _unregister(self, fileobj: Any) -> None:
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _start_failed(self, w: _Proc, code: int | None, how: str) -> None:
        """A worker died before running any job: give up now, or after a few in a row."""
        self._early_deaths += 1
        log.debug("%s: worker process %s %s before any job", self._pool.name, w.process.pid, how)
        if self._broken is not None:
            return
        if not w.claim[child.READY] and code == child.EXIT_UNGUARDED_MAIN:
            # Certain, and the same for every worker: no point in trying again.
            self._give_up(
                f"each one imports {_main_module()} again, and that starts a process pool "
                "(the script has no main guard); guard the main module with "
                "if __name__ == '__main__':"
            )
        elif self._early_deaths < _DEATHS_BEFORE_GIVING_UP:
            return
        elif not w.claim[child.READY]:
            # multiprocessing's bootstrap failed: usually importing the main module again.
            self._give_up(
                f"{self._early_deaths} in a row {how} while starting, before taskit's worker "
                f"code ran (their stderr says why); if importing {_main_module()} again fails "
                "or runs the program, guard the main module with if __name__ == '__main__':"
            )
        else:
            self._give_up(
                f"{self._early_deaths} in a row {how} before running any job; "
                "check the initializer and toolbox_factory"
            )

    def _give_up(self, reason: str) -> None:
        """Stop replacing workers: every queued and later job fails with WorkerStartError."""
        self._broken = f"{self._pool.name}: worker processes cannot start: {reason}"
        log.error("%s", self._broken)

    def _cancel_queue(self, exc: BaseException | None, cancel: bool = True) -> None:
        """Empty the queue: cancel each job not yet sent (``cancel``), else fail it
        with ``exc`` (or :class:`PoolShutdownError`)."""
        slots = self._pool._slots
        n = 0
        while self._queue:
            item = self._queue.popleft()
            if slots is not None and not item.sent:
                slots.release()
            n += 1
            if not item.sent:
                if cancel and item.future.cancel():
                    continue
                if not item.future.set_running_or_notify_cancel():
                    continue  # the caller cancelled it
            if not item.future.done():
                item.future.set_exception(
                    exc if exc is not None else PoolShutdownError(f"{self._pool.name} shut down")
                )
        if n:
            self._pool._job_done(n)

    def _fail_everything(self, exc: BaseException) -> None:
        for w in list(self._workers.values()):
            for item in w.inflight:
                if not item.future.done():
                    item.future.set_exception(exc)
                self._pool._job_done()
            w.inflight.clear()
            try:
                w.process.kill()
            except Exception:  # noqa: BLE001
                pass
        self._cancel_queue(exc)
