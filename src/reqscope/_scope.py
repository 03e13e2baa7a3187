"""One request's session scope: open, tag, register, and clean up whatever happens.

``factory.session(ctx)`` returns a :class:`SessionScope`. Opening it checks a connection out
of the pool (so pool exhaustion and outages surface there, as reqscope errors the circuit
breaker sees), binds a new ``AsyncSession`` to it, tags and registers the session and makes
``ctx`` current. Closing it rolls back and returns the connection inside a shielded cancel
scope, bounded by the factory's ``cleanup_timeout``.

This is the per-request hot path: it is written to stay within a few percent of a plain
``async_sessionmaker`` session (``benchmarks/sessions.py``), which is why the cleanup deadline
is one shared timer (:class:`CleanupWatchdog`) instead of one timer per scope.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import traceback
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.util import greenlet_spawn

from reqscope._context import UserExecutionContext, _current, current_context, new_id
from reqscope._enforcement import _invalidate, _task_name
from reqscope._leaks import LeakDetector
from reqscope._registry import Entry, EntryState

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncSession

    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["CleanupWatchdog", "SessionScope"]

logger = logging.getLogger("reqscope")

_ACTIVE = EntryState.ACTIVE
_utc = dt.timezone.utc


class CleanupWatchdog:
    """Cancels shielded cleanups that outlive their deadline, with one timer for all.

    A cancel scope with its own deadline arms and cancels an event-loop timer per request,
    which costs more than everything else reqscope adds to a request. Cleanups instead
    register here; a single timer, armed only while some cleanup is in progress, fires at
    the earliest deadline and cancels the scopes that are overdue.
    """

    __slots__ = ("_handle", "_loop", "_pending")

    def __init__(self) -> None:
        self._pending: dict[anyio.CancelScope, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, scope: anyio.CancelScope, timeout: float) -> None:
        """Cancel ``scope`` if it is still watched ``timeout`` seconds from now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if loop is not self._loop:  # first use, or the factory moved to another loop
            if self._handle is not None:
                self._handle.cancel()
            self._pending.clear()
            self._loop, self._handle = loop, None
        self._pending[scope] = deadline
        if self._handle is None:
            self._handle = loop.call_at(deadline, self._expire)

    def unwatch(self, scope: anyio.CancelScope) -> None:
        """Stop watching ``scope`` (its cleanup finished)."""
        self._pending.pop(scope, None)

    def __len__(self) -> int:
        return len(self._pending)

    def _expire(self) -> None:
        loop = self._loop
        assert loop is not None  # noqa: S101 - armed by watch()
        self._handle = None
        now = loop.time()
        overdue = [scope for scope, deadline in self._pending.items() if deadline <= now]
        for scope in overdue:
            del self._pending[scope]
            scope.cancel()
        if self._pending:
            self._handle = loop.call_at(min(self._pending.values()), self._expire)


class SessionScope:
    """``async with factory.session(ctx)`` / ``factory.begin(ctx)``."""

    __slots__ = (
        "_begin",
        "_bypass",
        "_ctx",
        "_entry",
        "_factory",
        "_lifetime",
        "_previous",
        "_probe",
        "_session",
        "_token",
    )

    def __init__(
        self,
        factory: IsolatedSessionFactory,
        ctx: UserExecutionContext | None,
        lifetime: float | None,
        *,
        begin: bool,
        bypass_tenant: bool = False,
    ) -> None:
        if ctx is not None and not isinstance(ctx, UserExecutionContext):
            raise TypeError(
                f"factory.session() takes a UserExecutionContext, got {type(ctx).__name__}"
            )
        if lifetime is not None and lifetime <= 0:
            raise ValueError(f"max_lifetime must be positive seconds, got {lifetime!r}")
        self._factory = factory
        self._ctx = ctx
        self._lifetime = lifetime
        self._begin = begin
        self._bypass = bypass_tenant
        self._session: AsyncSession | None = None

    async def __aenter__(self) -> AsyncSession:
        if self._session is not None:
            raise RuntimeError("this session scope is already open; call factory.session() again")
        factory = self._factory
        factory._check_open()  # noqa: SLF001
        ctx = self._ctx if self._ctx is not None else current_context()
        if self._bypass:
            factory._authorize_bypass(ctx)  # noqa: SLF001
        self._probe = factory.circuit_breaker.before_call()
        # The session checks a connection out of the pool on first use, inside the same
        # greenlet as its first statement (as a plain session does): connecting eagerly
        # would cost a greenlet switch per request. Connect failures surface there as
        # DatabaseUnavailableError (the factory's do_connect hook), pool timeouts as
        # PoolExhaustedError (on exit).
        session = factory._new_session()  # noqa: SLF001
        entry = _register(factory, session, ctx, self._lifetime, self._bypass)
        self._entry = entry
        self._session = session
        self._previous = _current.get()
        self._token = _current.set(ctx)
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        factory = self._factory
        session = self._session
        assert session is not None  # noqa: S101 - __aenter__ ran
        error = exc
        try:
            if self._begin and error is None:
                try:
                    await session.commit()
                except Exception as commit_error:
                    # SQLAlchemy rolled the transaction back: the connection is reusable.
                    error = commit_error
                    raise
                except BaseException as commit_error:
                    # Interrupted mid-commit: the outcome is unknown, so never report
                    # success, and never trust the connection again.
                    error = commit_error
                    await factory._invalidate_gracefully(self._entry.connection)  # noqa: SLF001
                    raise
        finally:
            await self._release(error)
            try:
                _current.reset(self._token)
            except ValueError:  # exited in another contextvars.Context than it was entered
                _current.set(self._previous)
        if error is not None:
            translated = factory._translate(error)  # noqa: SLF001
            if translated is not error:
                raise translated from error
        return False

    async def _release(self, error: BaseException | None) -> None:
        factory = self._factory
        entry = self._entry
        conn = entry.connection  # the latest transaction's connection, if it ever had one
        registry = factory._registry  # noqa: SLF001
        try:
            if entry.state is not EntryState.RECLAIMED:
                clean = await self._close_shielded()
                entry.state = EntryState.CLOSED
                if not clean:
                    await factory._invalidate_gracefully(conn)  # noqa: SLF001
            else:
                await factory._invalidate_gracefully(conn)  # noqa: SLF001
        except BaseException:
            # The shield stops anyio cancellation, not asyncio's Task.cancel(): interrupted
            # half-way, the connection is invalidated (never returned half-cleaned), through
            # the driver's graceful close unless that is interrupted too.
            entry.state = EntryState.CLOSED
            registry.cleanup_failures += 1
            try:
                await factory._invalidate_gracefully(conn)  # noqa: SLF001
            finally:
                if conn is not None:
                    _invalidate(conn)  # a no-op once the graceful path finished
                if self._probe:
                    factory.circuit_breaker.release_probe()
            raise
        finally:
            entry.connection = None
            registry.discard(entry)
            registry.sessions_closed += 1
        if error is not None:
            registry.sessions_failed += 1
            breaker = factory.circuit_breaker
            if not breaker.observe(error) and self._probe:
                breaker.release_probe()
        elif self._probe and conn is None:
            factory.circuit_breaker.release_probe()  # the probe never reached the database
        if entry.leak_reported:
            LeakDetector.log_late_close(entry)

    async def _close_shielded(self) -> bool:
        """Roll back and return the connection, shielded, within ``cleanup_timeout``.

        Returns:
            Whether it completed; if not, the caller invalidates the connection.
        """
        factory = self._factory
        entry = self._entry
        watchdog = factory._cleanup_watchdog  # noqa: SLF001
        clean = False
        with anyio.CancelScope(shield=True) as shield:
            watchdog.watch(shield, factory.cleanup_timeout)
            try:
                await greenlet_spawn(self._session.sync_session.close)  # type: ignore[union-attr]
                clean = True
            except Exception:
                factory._registry.cleanup_failures += 1  # noqa: SLF001
                logger.exception(
                    "reqscope: closing session %s failed; invalidating its connection",
                    entry.session_id,
                    extra=entry.log_fields(),
                )
            finally:
                if not shield.cancel_called:
                    watchdog.unwatch(shield)
        if shield.cancelled_caught:
            factory._registry.cleanup_failures += 1  # noqa: SLF001
            logger.error(
                "reqscope: closing session %s took longer than cleanup_timeout=%s s; "
                "invalidating its connection",
                entry.session_id,
                factory.cleanup_timeout,
                extra=entry.log_fields(),
            )
        return clean


def _register(
    factory: IsolatedSessionFactory,
    session: AsyncSession,
    ctx: UserExecutionContext,
    lifetime: float | None,
    bypass_tenant: bool,
) -> Entry:
    session_id = new_id()
    opened_at = dt.datetime.now(_utc)
    session.sync_session.info.update(
        user_id=ctx.user_id,
        request_id=ctx.request_id,
        thread_id=ctx.thread_id,
        run_id=ctx.run_id,
        session_id=session_id,
        created_at=opened_at,
        is_request_scoped=True,
        factory_managed=True,
    )
    entry = Entry(
        session_id,
        ctx,
        opened_at,
        factory.max_session_lifetime if lifetime is None else float(lifetime),
        _task_name(),
        "".join(traceback.format_stack(limit=26)[:-2]) if factory.capture_stacks else None,
    )
    entry.owner = factory
    entry.bypass_tenant = bypass_tenant
    policy = factory.tenant
    if policy is not None and not bypass_tenant:
        entry.tenant = (policy, ctx.user_id)
    session.sync_session._reqscope_entry = entry  # type: ignore[attr-defined]  # noqa: SLF001 - our Session subclass
    factory._registry.add(entry)  # noqa: SLF001
    return entry
