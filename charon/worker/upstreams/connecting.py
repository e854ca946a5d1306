"""A connect in progress: uvloop's `create_connection` (or `connect_accepted_socket`) stepped
without an asyncio Task.

A Task per connect costs an entry in asyncio's set of all tasks (a Python WeakSet, added to on
creation and removed from on release) and a loop turn before connect() is even called. The
coroutine only ever waits on futures, so it is stepped here directly: the first step runs at
once, each later one from the done callback of the future it waits on, as a Task would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

# (the Connecting, the protocol or None, None or what was raised)
ConnectDone = Callable[["Connecting", Any, BaseException | None], None]


class Connecting:
    __slots__ = ("_coro", "_waiting", "_on_done", "_loop", "_cancelled")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, tuple[asyncio.BaseTransport, asyncio.BaseProtocol]],
        on_done: ConnectDone,
    ) -> None:
        self._loop = loop
        self._coro = coro
        self._on_done = on_done  # not called once cancelled
        self._waiting: asyncio.Future[Any] | None = None
        self._cancelled = False

    def start(self) -> None:
        """The first step (a failure may be reported from within it)."""
        self._step()

    def cancel(self) -> None:
        """Give up: CancelledError is raised where the coroutine waits, and uvloop closes the
        socket, even one already connected. Nothing is reported."""
        self._cancelled = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # steps at once, as a Task does, if it was not done yet

    def _step(self, _done: object = None) -> None:
        self._waiting = None
        try:
            if self._cancelled:
                awaited = self._coro.throw(asyncio.CancelledError())
            else:
                awaited = self._coro.send(None)
        except StopIteration as stop:
            self._on_done(self, stop.value[1], None)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - the exchange answers 502
            self._on_done(self, None, exc)
            return
        if awaited is None:  # a bare yield: go on at the next loop turn
            self._loop.call_soon(self._step)
            return
        awaited._asyncio_future_blocking = False  # taken by us, as a Task takes it
        self._waiting = awaited
        awaited.add_done_callback(self._step)
