"""The asyncio driver of :class:`taskit.aio.AsyncFrontEnd`: the client's sockets
(:class:`~taskit._client.connection.Connections`) waited on by asyncio.

Everything runs on the event loop's thread, so the core has one driver and needs
no lock: a reader task per DEALER hands replies to the core, a task per backend
reads its socket monitor, and one ``loop.call_later`` timer fires at the core's
next deadline (call timeouts, connect waits, Busy back-off, liveness). Calls are
written to the socket when the loop next runs its callbacks (before the caller's
task awaits the reply), without a hop through another task: the calls of a burst
go out together, in batches. Private to :mod:`taskit.aio`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio

from taskit._client.connection import (
    DISCONNECTED,
    Connections,
    DealerSettings,
    Link,
    monitor_event,
)
from taskit._client.core import ClientCore, PendingCall
from taskit._wire import EVENTS, POLLIN, ZERO_COPY
from taskit.errors import FrontEndClosedError

__all__ = ["AsyncIO"]


class AsyncIO(Connections):
    """Sockets, tasks and timer of one AsyncFrontEnd. Its sockets are opened when a
    running loop first uses it (:meth:`start`); from then on it belongs to that loop."""

    _stdlog = logging.getLogger("taskit.aio")

    def __init__(self, core: ClientCore, settings: DealerSettings, note: Callable[..., None]):
        super().__init__(core, settings, note)
        self._ctx: zmq.asyncio.Context | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._send_soon = False  # a send_now() is scheduled on the loop
        self.closed = False
        # (seconds, refresh) to re-resolve the backends' names: refresh() runs in the
        # loop's default executor (DNS blocks), its (joined, left) applied on the loop.
        self.refresh: tuple[float, Callable[[], tuple[list[str], list[str]]]] | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None

    @staticmethod
    def closed_error() -> FrontEndClosedError:
        return FrontEndClosedError("this AsyncFrontEnd is closed; create a new one")

    def start(self) -> None:
        """Bind to the running loop and connect every backend (once); RuntimeError
        from another loop, FrontEndClosedError once closed."""
        if self.closed:
            raise self.closed_error()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._ctx = zmq.asyncio.Context()
            try:
                for endpoint in self._core.backends:
                    self.open(endpoint)
            except BaseException:
                self.release()  # close what opened, so no term() can block
                self._loop = None
                raise
            if self.refresh is not None:
                self._refresh_timer = loop.call_later(self.refresh[0], self._re_resolve)
        elif self._loop is not loop:
            raise RuntimeError(
                "this AsyncFrontEnd belongs to another event loop; create one per loop"
            )

    def connect(self, endpoint: str) -> None:
        """Use one more backend; its socket opens now if the loop already runs."""
        if self._core.add_backend(endpoint) and self._loop is not None:
            self.open(endpoint)

    def submit(
        self,
        task: str,
        args: Any,
        kwargs: Any,
        timeout: float | None,
        target: str | None,
        send: bool = True,
    ) -> asyncio.Future[Any]:
        """Send a call -- at the loop's next callbacks, with the others submitted
        meanwhile (``send`` false: only route it; :meth:`send_now` sends what is
        routed, in batches); the future of its result (cancelling it forgets the
        call, and withdraws it from its backend if it has not started)."""
        self.start()
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        call = self._core.new_call(task, args, kwargs, waiter=fut, timeout=timeout, target=target)
        fut.add_done_callback(functools.partial(self._forget, call=call))
        self._core.submit(call)
        if send and not self._send_soon:
            # Sent when the loop next runs callbacks -- before this task awaits the
            # reply -- so the calls of a burst (gather, a loop of submits) that the
            # caller makes before yielding go out together, packed in one message.
            self._send_soon = True
            self._loop.call_soon(self.send_now)
        return fut

    def send_now(self) -> None:
        """Send every routed call (those of ``submit(..., send=False)``)."""
        self._send_soon = False
        if not self.closed and self._loop is not None:
            self._send()
            self._schedule()

    def _forget(self, fut: asyncio.Future[Any], *, call: PendingCall) -> None:
        if fut.cancelled() and not self.closed:
            self._core.cancel(call)  # on the wire: a CANCEL goes out, not awaited
            self._send()
            self._schedule()

    def resolve(self, done: list[tuple[PendingCall, bool, Any]]) -> None:
        for call, ok, value in done:
            fut = call.waiter
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _send(self) -> None:
        """Write the routed calls, then read what the sockets hold: ZeroMQ's descriptor
        is edge-triggered and a send may consume the edge, so every use of a socket
        outside its reader task ends by emptying it (the reader can never miss a reply)."""
        core = self._core
        if core.resets or core.retired:
            self.between_turns()  # (before the drains below: they read every link)
        if not (core.outbox or core.control):
            return  # nothing routed, nothing sent
        self.flush()
        for link in list(self.links.values()):
            self.drain(link)

    def drain(self, link: Link) -> None:
        """Read every reply already queued on ``link``'s socket, asking EVENTS before
        each read rather than reading until zmq.Again: an exception per drain would
        cost as much as the rest of a call's reading (drains follow every send)."""
        events, receive = link.raw.getsockopt, self.receive
        while cast(int, events(EVENTS)) & POLLIN:
            receive(link, None, 1)

    # -- Connections' hooks ---------------------------------------------------------

    def _link(self, endpoint: str, sock: Any, monitor: Any) -> Link:
        # the zmq.asyncio socket for the tasks to await on, a plain view for the rest
        return Link(endpoint, sock, monitor, zmq.Socket.shadow(sock.underlying))

    def _watch(self, link: Link) -> None:
        for coro in (self._read(link), self._monitor(link)):
            task = asyncio.ensure_future(coro)
            task.set_name(f"taskit-aio:{link.endpoint}")
            link.tasks.append(task)

    def _unwatch(self, link: Link) -> None:
        """Stop ``link``'s tasks (except the one running this) and its delayed connect."""
        try:
            me = asyncio.current_task()
        except RuntimeError:  # close() outside the loop
            me = None
        for task in link.tasks:
            if task is not me:
                task.cancel()
        if link.redial is not None:
            link.redial.cancel()
            link.redial = None

    def _redial_later(self, link: Link, delay: float) -> None:
        assert self._loop is not None
        link.redial = self._loop.call_later(delay, self.dial, link)

    def dial(self, link: Link) -> None:
        if not self.closed:
            super().dial(link)

    # -- the tasks and the timer ------------------------------------------------------

    async def _read(self, link: Link) -> None:
        core, sock, endpoint = self._core, link.sock, link.endpoint
        while True:
            try:
                f = await sock.recv(copy=False)
                if f.more:  # never in protocol v2: maybe a v1 peer; read it whole
                    rest = await sock.recv_multipart()
                    done = core.on_frames(endpoint, [f.bytes, *rest])
                else:  # a large message is decoded from libzmq's buffer, uncopied
                    done = core.on_message(endpoint, f.bytes if len(f) < ZERO_COPY else f.buffer)
            except zmq.ZMQError:
                return  # closed
            self.resolve(done)
            self.drain(link)  # what else is queued, before yielding
            # Busy/Stopping replies re-route calls; a replaced or drained link closes
            # there, and this task's next recv ends it.
            self._send()
            self._schedule()

    async def _monitor(self, link: Link) -> None:
        while True:
            try:
                event = monitor_event(await link.monitor.recv_multipart())
            except zmq.ZMQError:
                return
            if link.up and event & DISCONNECTED:
                # Replies the backend sent before it went (e.g. the answer to <stop>)
                # arrived before this event. One may sit in the reader task's
                # resolved-but-not-yet-resumed recv: yielding once lets the reader
                # run first; the rest are still queued on the socket.
                await asyncio.sleep(0)
                if self.closed:
                    return
            replaced = self.on_event(link, event)
            self._send()
            self._schedule()
            if replaced:
                return  # the new socket has its own tasks

    def _re_resolve(self) -> None:
        """Resolve the names again in the executor; apply the changes on the loop."""
        if self.closed or self._loop is None or self.refresh is None:
            return
        every, refresh = self.refresh
        loop = self._loop

        def applied(fut: asyncio.Future[tuple[list[str], list[str]]]) -> None:
            if self.closed:
                return
            if not fut.cancelled() and fut.exception() is None:
                joined, left = fut.result()
                if joined or left:
                    self.apply_members(joined, left)
            self._refresh_timer = loop.call_later(every, self._re_resolve)

        loop.run_in_executor(None, refresh).add_done_callback(applied)

    def _schedule(self) -> None:
        """Keep one timer armed for the core's next deadline."""
        if self.closed or self._loop is None:
            return
        when = self._core.next_wakeup()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            delay = max(0.0, when - self._core.clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self.closed:
            return
        self.tick()
        self._send()
        self._schedule()

    # -- closing -------------------------------------------------------------------------

    def shutdown(self) -> list[asyncio.Task[None]]:
        """Fail the pending calls and cancel the tasks (the caller may await them)."""
        if self.closed:
            return []
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        tasks = [t for link in self.links.values() for t in link.tasks]
        if self._loop is not None:  # withdraw the calls still on the wire (CANCEL)
            self.withdraw_all()  # and close the sockets
        self.resolve(
            self._core.fail_all(
                FrontEndClosedError("the AsyncFrontEnd was closed before this call was answered")
            )
        )
        for t in tasks:
            t.cancel()
        return tasks

    def release(self) -> None:
        """Close every socket and the context."""
        self.close_all()
        if self._ctx is not None:
            # destroy, not term: a socket left open by any path would block term() for ever
            self._ctx.destroy(linger=0)
            self._ctx = None
