"""HandoffQueue: idle connections handed to waiting checkouts first come, first served."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["HandoffQueue"]

_T = TypeVar("_T")


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class HandoffQueue(Generic[_T]):
    """A queue of idle connections that serves waiting checkouts first come, first served.

    asyncio's own queue (behind SQLAlchemy's async pool) only *wakes* its oldest waiter
    when a connection comes back; until that waiter runs, any task may take the
    connection, and the waiter, finding the queue empty again, queues anew at the back. A
    task that returns a connection and at once asks for another (a worker loop, a request
    opening its next session) keeps winning, and the others wait until ``pool_timeout``.
    Here a returned item goes straight to the oldest live waiter; it is queued only when
    nobody waits, so an item in the queue means nobody is waiting for it.

    Args:
        maxsize: the most idle items kept (0: no bound); :meth:`put_nowait` refuses more.
        lifo: hand out the most recently returned idle item first (``pool_use_lifo``).
    """

    __slots__ = (
        "_items",
        "_lifo",
        "_waiters",
        "maxsize",
        "wait_observers",
        "wait_seconds",
        "waits",
    )

    def __init__(self, maxsize: int = 0, *, lifo: bool = False) -> None:
        self.maxsize = maxsize
        self._lifo = lifo
        self._items: deque[_T] = deque()
        self._waiters: deque[asyncio.Future[_T]] = deque()
        self.waits = 0  # gets that had to wait, and were served
        self.wait_seconds = 0.0  # how long they waited, in all
        # called with each served wait's seconds (the wait_time histogram's exporters)
        self.wait_observers: list[Callable[[float], None]] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Gets waiting for an item now."""
        # a copy: metrics readers count from a thread of their own while the loop queues
        return sum(1 for waiter in list(self._waiters) if not waiter.done())

    def full(self) -> bool:
        """True when no further idle item would be kept."""
        return 0 < self.maxsize <= len(self._items)

    def put_nowait(self, item: _T) -> bool:
        """Hand ``item`` to the oldest waiter, else keep it; False when full (not taken)."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(item)
                return True
        if self.full():
            return False
        self._items.append(item)
        return True

    def get_nowait(self) -> _T:
        """Take an idle item. Raises ``IndexError`` when there is none."""
        return self._items.pop() if self._lifo else self._items.popleft()

    async def get(self, timeout: float | None = None) -> _T:
        """Take an idle item, or wait for one behind every earlier waiter.

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
        """
        if self._items:
            return self.get_nowait()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_T] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        started = time.monotonic()
        try:
            item = await waiter
        except BaseException:  # timed out, or the task was cancelled
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.put_nowait(waiter.result())  # handed over as we gave up: pass it on
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        waited = time.monotonic() - started
        self.waits += 1
        self.wait_seconds += waited
        for observer in self.wait_observers:
            observer(waited)
        return item
