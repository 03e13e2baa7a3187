"""Cleaning up after a request: closing its session within a deadline, invalidating connections.

A request's session is closed (rolled back, its connection returned to the pool) however
the request ends: normally, on an error, on a timeout or on cancellation. The close is
shielded from cancellation and bounded by the factory's ``cleanup_timeout``; a close that
does not complete, or that a cancellation interrupts half-way, never returns its connection
to the pool: the connection is invalidated instead
(:meth:`ConnectionCleanup.invalidate_gracefully`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import anyio
from sqlalchemy.util import greenlet_spawn

from reqscope import _compat
from reqscope._logging import get_logger

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncSession

    from reqscope._registry import Entry

__all__ = ["CleanupWatchdog", "ConnectionCleanup"]

logger = get_logger(__name__)

# Task.cancelling() and Task.uncancel(), Python 3.11+
_UNCANCEL: Final = sys.version_info >= (3, 11)


class CleanupWatchdog:
    """Cancels cleanups that outlive their deadline, with one timer for all.

    A cancel scope with its own deadline arms and cancels an event-loop timer per request,
    which costs more than everything else reqscope adds to a request. Cleanups instead
    register here; a single timer, armed only while some cleanup is in progress, fires at
    the earliest deadline and cancels what is overdue. Two kinds of cleanup register:

    - an anyio shield scope (the cleanup runs inside an anyio cancel scope): cancelled once,
      which anyio keeps delivering until the scope exits;
    - an asyncio task outside every anyio cancel scope (no anyio scope can reach it): only
      ``Task.cancel()`` can interrupt it, so the watchdog cancels the task at the deadline
      and again every ``timeout`` seconds until it is unwatched (a driver may swallow one
      cancellation); :meth:`unwatch` says how many cancellations it sent.
    """

    __slots__ = ("_cuts", "_handle", "_loop", "_pending")

    def __init__(self) -> None:
        # scope or task -> (deadline on the monotonic clock, timeout)
        self._pending: dict[anyio.CancelScope | asyncio.Task[Any], tuple[float, float]] = {}
        self._cuts: dict[asyncio.Task[Any], int] = {}  # tasks cancelled while watched
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(
        self,
        scope: anyio.CancelScope | asyncio.Task[Any],
        timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Cancel ``scope`` if it is still watched ``timeout`` seconds from now.

        ``loop`` is the running loop, when the caller knows it (``task.get_loop()`` costs no
        system call; ``asyncio.get_running_loop()`` does, on Python 3.10 and 3.11).
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or the factory moved to another loop
            if self._handle is not None:
                self._handle.cancel()
            self._pending.clear()
            self._cuts.clear()
            self._loop, self._handle = loop, None
        if self._handle is None:
            self._handle = loop.call_later(timeout, self._expire)
        self._pending[scope] = (time.monotonic() + timeout, timeout)

    def unwatch(self, scope: anyio.CancelScope | asyncio.Task[Any]) -> int:
        """Stop watching ``scope`` (its cleanup finished).

        Returns:
            How many times the watchdog cancelled the task ``scope`` while it was watched
            (0 for a scope: its ``cancel_called`` says).
        """
        self._pending.pop(scope, None)
        return self._cuts.pop(scope, 0)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._pending)

    def _expire(self) -> None:
        loop = self._loop
        assert loop is not None  # noqa: S101 - armed by watch()
        self._handle = None
        now = time.monotonic()
        pending = self._pending
        overdue = [(scope, timeout) for scope, (at, timeout) in pending.items() if at <= now]
        for scope, timeout in overdue:
            if isinstance(scope, asyncio.Task):
                self._cuts[scope] = self._cuts.get(scope, 0) + 1
                pending[scope] = (now + timeout, timeout)  # again, until unwatched
                scope.cancel()
            else:
                del pending[scope]
                scope.cancel()  # anyio keeps delivering it until the scope exits
        if pending:
            earliest = min(at for at, _ in pending.values())
            self._handle = loop.call_later(max(0.0, earliest - now), self._expire)


class ConnectionCleanup:
    """Closes sessions within ``timeout`` seconds and invalidates the connections that fail.

    Attributes:
        timeout: seconds a close (rollback, return to the pool) or an invalidation may take.
        failures: closes that failed, overran ``timeout`` or were interrupted.
        graceful: invalidate through the driver's graceful close. Off behind a pooler:
            asyncpg's graceful close of a busy connection sends a CancelRequest that its
            force-close then aborts half-way, and PgBouncer 1.18 exits on such a request.
    """

    __slots__ = ("_pending", "failures", "graceful", "timeout", "watchdog")

    def __init__(self, timeout: float, *, graceful: bool = True) -> None:
        self.timeout = timeout
        self.graceful = graceful
        self.failures = 0
        self.watchdog = CleanupWatchdog()
        self._pending: list[Connection] = []  # invalidations left for async code to finish

    async def close(self, session: AsyncSession, entry: Entry) -> bool:
        """Roll back and close ``session`` (``entry`` is its record, for the logs).

        Shielded from cancellation and bounded by :attr:`timeout`. Returns False when the
        close did not complete: the caller then invalidates the connection. A cancellation
        that interrupts the close (``Task.cancel()`` reaches through an anyio shield)
        propagates; the caller invalidates the connection then too.
        """
        task = entry.task  # the task that opened the scope is the one closing it
        if task is None or _compat.anyio_may_cancel(task):
            return await self._close_in_shield(session, entry)
        return await self._close_watching_task(session, entry, task)

    async def _close_in_shield(self, session: AsyncSession, entry: Entry) -> bool:
        """Close inside an anyio shield scope, which the watchdog cancels when overdue."""
        clean = False
        with anyio.CancelScope(shield=True) as shield:
            self.watchdog.watch(shield, self.timeout)
            try:
                await session.close()
                clean = True
            except Exception as error:
                self._log_failed_close(error, entry)
            finally:
                if not shield.cancel_called:
                    self.watchdog.unwatch(shield)
        if shield.cancelled_caught:
            self._log_overdue(entry)
        return clean

    async def _close_watching_task(
        self, session: AsyncSession, entry: Entry, task: asyncio.Task[Any]
    ) -> bool:
        """Close in a task no anyio scope can cancel: only the watchdog's ``Task.cancel()``.

        A plain asyncio task, as servers such as uvicorn run requests in: an anyio shield
        there would only cost. The watchdog's cancellations are taken back afterwards
        (``Task.uncancel()``), so the task is left as it was; a cancellation from elsewhere
        propagates, exactly as it does through an anyio shield.
        """
        before = task.cancelling() if _UNCANCEL else 0  # type: ignore[attr-defined]  # 3.11+
        cancelled: asyncio.CancelledError | None = None
        clean = False
        self.watchdog.watch(task, self.timeout, task.get_loop())
        try:
            await session.close()
            clean = True
        except asyncio.CancelledError as interrupted:
            cancelled = interrupted
        except Exception as error:
            self._log_failed_close(error, entry)
        finally:
            cuts = self.watchdog.unwatch(task)
        if not cuts:
            if cancelled is not None:
                raise cancelled  # not the watchdog's
            return clean
        if _UNCANCEL:
            for _ in range(cuts):
                task.uncancel()  # type: ignore[attr-defined]  # 3.11+
        self._log_overdue(entry)
        if cancelled is not None and _UNCANCEL and task.cancelling() > before:  # type: ignore[attr-defined]
            raise asyncio.CancelledError  # a Task.cancel() from elsewhere landed too
        return False

    def _log_failed_close(self, error: Exception, entry: Entry) -> None:
        self.failures += 1
        logger.error(
            "reqscope: closing session %s failed; invalidating its connection",
            entry.session_id,
            exc_info=error,
            extra=entry.log_fields(),
        )

    def _log_overdue(self, entry: Entry) -> None:
        self.failures += 1
        logger.error(
            "reqscope: closing session %s took longer than cleanup_timeout=%s s; "
            "invalidating its connection",
            entry.session_id,
            self.timeout,
            extra=entry.log_fields(),
        )

    @staticmethod
    def invalidate(conn: Connection) -> None:
        """Drop ``conn`` from the pool for good, without I/O (frees the slot)."""
        if not conn.closed and not conn.invalidated:
            conn.invalidate()

    async def invalidate_gracefully(self, conn: Connection | None) -> None:
        """Invalidate ``conn`` through the driver's graceful close, shielded and bounded.

        Falls back to :meth:`invalidate` when the graceful close fails or overruns, and
        goes straight to it where :attr:`graceful` is off and the driver can force-close.
        """
        if conn is None:  # the session never got a connection
            return
        graceful = self.graceful or not conn.dialect.has_terminate
        if graceful and not conn.closed and not conn.invalidated:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.timeout),
                contextlib.suppress(Exception),
            ):
                await greenlet_spawn(conn.invalidate)
        self.invalidate(conn)  # a no-op unless the graceful path timed out or failed

    def defer(self, conn: Connection) -> None:
        """Invalidate ``conn`` at the next :meth:`drain` (its driver closes from async code)."""
        self._pending.append(conn)

    def forget(self) -> None:
        """Drop the deferred invalidations unclosed: a forked child's, whose parent owns them."""
        self._pending = []

    async def drain(self) -> None:
        """Finish the invalidations :meth:`defer` left."""
        pending, self._pending = self._pending, []
        for conn in pending:
            await self.invalidate_gracefully(conn)
