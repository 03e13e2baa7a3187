"""One request's session scope: open, tag, register, and clean up whatever happens.

``factory.session(ctx)`` returns a :class:`SessionScope`, handed the factory's
:class:`~reqscope._keeper.SessionKeeper`, which is all it uses of the factory. Opening it
makes a new ``AsyncSession`` (which checks a connection out of the pool at its first
statement, as a plain session does), records it (an :class:`~reqscope._registry.Entry` the
session points at for its checks), registers it and makes ``ctx`` current. Closing it rolls
back and returns the connection, shielded from cancellation and bounded by the factory's
``cleanup_timeout`` (:class:`~reqscope._cleanup.ConnectionCleanup`); a connection whose
close did not complete is invalidated, never returned.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc

from reqscope._context import UserExecutionContext, _current, current_context
from reqscope._enforcement import attach_record
from reqscope._leaks import LeakDetector
from reqscope._registry import Entry, EntryState

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncSession

    from reqscope._keeper import SessionKeeper

__all__ = ["SessionScope"]


class SessionScope:
    """``async with factory.session(ctx)`` / ``factory.begin(ctx)``: one request's session."""

    __slots__ = (
        "_bypass_tenant",
        "_commit",
        "_ctx",
        "_entered",
        "_keeper",
        "_lifetime",
        "_previous",
        "_probe",
        "_record",
        "_session",
        "_statement_timeout",
    )

    def __init__(
        self,
        keeper: SessionKeeper,
        ctx: UserExecutionContext | None,
        *,
        lifetime: float | None = None,
        commit: bool = False,
        bypass_tenant: bool = False,
        statement_timeout: float | None = None,
    ) -> None:
        if ctx is not None and not isinstance(ctx, UserExecutionContext):
            raise TypeError(
                f"factory.session() takes a UserExecutionContext, got {type(ctx).__name__}"
            )
        if lifetime is None:
            lifetime = keeper.max_session_lifetime
        elif not lifetime > 0:
            raise ValueError(f"max_lifetime must be positive seconds, got {lifetime!r}")
        self._keeper = keeper
        self._ctx = ctx  # None: the current context, on entry
        self._lifetime = float(lifetime)
        self._commit = commit  # commit when the block succeeds: factory.begin()
        self._bypass_tenant = bypass_tenant
        self._statement_timeout = (
            keeper.statement_timeout if statement_timeout is None else statement_timeout
        )
        self._entered = False
        self._session: AsyncSession | None = None
        self._record: Entry | None = None
        self._probe = False  # the circuit breaker's half-open probe
        # The context current before the scope, restored on exit: a restore that works from
        # any contextvars.Context, unlike a Token.
        self._previous: UserExecutionContext | None = None

    async def __aenter__(self) -> AsyncSession:
        if self._entered:
            raise RuntimeError(
                "this session scope is already open or was used before; call "
                "factory.session() again for a new one"
            )
        self._entered = True
        keeper = self._keeper
        if not keeper.started:
            await keeper.start_on_first_use()  # or the error for a closed factory
        ctx = self._ctx if self._ctx is not None else current_context()
        # refused before the breaker could admit it as its probe
        tenant = keeper.tenant_for(ctx, bypass=self._bypass_tenant)
        self._probe = keeper.breaker.before_call()
        # The session checks a connection out of the pool on first use, inside the same
        # greenlet as its first statement (as a plain session does). Connect failures
        # surface there as DatabaseUnavailableError (the factory's do_connect hook), pool
        # timeouts as PoolExhaustedError (translated on exit).
        session = keeper.new_session()
        record = Entry(
            keeper,
            ctx,
            lifetime=self._lifetime,
            task=asyncio.current_task(),
            tenant=tenant,
            statement_timeout=self._statement_timeout,
            stack="".join(traceback.format_stack(limit=25)[:-1]) if keeper.capture_stacks else None,
        )
        attach_record(session, record)
        keeper.registry.add(record)
        self._session, self._record = session, record
        self._previous = _current.get()
        _current.set(ctx)
        if keeper.observers:
            keeper.scope_opened(record)
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._commit and exc is None:
            await self._commit_and_release()
        else:
            await self._release(exc)

    async def _commit_and_release(self) -> None:
        """``factory.begin(ctx)`` ending without an error: commit, then release."""
        assert self._session is not None  # noqa: S101 - entered
        assert self._record is not None  # noqa: S101
        try:
            await self._session.commit()
        except Exception as error:
            # SQLAlchemy rolled the transaction back: the connection is reusable. The
            # commit's own error propagates as it is.
            await self._release(error, translate=False)
            raise
        except BaseException as error:
            # Interrupted mid-commit: the outcome is unknown, so never report success,
            # and never trust the connection again.
            await self._keeper.cleanup.invalidate_gracefully(self._record.connection)
            await self._release(error, translate=False)
            raise
        await self._release(None)

    async def _release(self, error: BaseException | None, *, translate: bool = True) -> None:
        """Close the session, unregister it, restore the previous context.

        ``error`` (the block's exception) is raised as its reqscope translation, if it has
        one, when ``translate``.
        """
        keeper, record, session = self._keeper, self._record, self._session
        assert record is not None  # noqa: S101 - entered
        assert session is not None  # noqa: S101
        conn = record.connection  # the latest transaction's connection, if it had one
        try:
            try:
                if record.state is EntryState.RECLAIMED:  # its connection is invalid already
                    clean = False
                else:
                    clean = await keeper.cleanup.close(session, record)
                    record.state = EntryState.CLOSED
                if not clean:
                    await keeper.cleanup.invalidate_gracefully(conn)
            except BaseException:
                await self._abandon(conn)
                raise
            finally:
                if keeper.observers:
                    committed = self._commit and error is None
                    keeper.scope_ended(record, committed=committed, error=error)
                # The session points at its record: drop the ways back, so that session,
                # record and task are freed by reference counting, not the GC (an exception
                # kept by the task can hold the frame that holds the session).
                record.connection = record.task = None
                self._session = None
                keeper.registry.discard(record)
            self._settle(error, conn)
        finally:
            _current.set(self._previous)
        if error is not None and translate:
            translated = keeper.translate(error)
            if translated is not error:
                raise translated from error

    async def _abandon(self, conn: Connection | None) -> None:
        """The cleanup was interrupted half-way: invalidate the connection.

        The shield stops anyio cancellation, not asyncio's ``Task.cancel()``. The connection
        is never returned half-cleaned: it is invalidated, through the driver's graceful
        close unless that is interrupted too.
        """
        keeper = self._keeper
        assert self._record is not None  # noqa: S101 - entered
        self._record.state = EntryState.CLOSED
        keeper.cleanup.failures += 1
        try:
            await keeper.cleanup.invalidate_gracefully(conn)
        finally:
            if conn is not None:
                keeper.cleanup.invalidate(conn)  # a no-op once the graceful path finished
            if self._probe:
                keeper.breaker.release_probe()

    def _settle(self, error: BaseException | None, conn: Connection | None) -> None:
        """After a release: count a failure, tell the breaker, follow up a reported leak."""
        keeper, record = self._keeper, self._record
        assert record is not None  # noqa: S101 - entered
        if error is not None:
            keeper.registry.sessions_failed += 1
            if isinstance(error, sa_exc.TimeoutError):  # the pool's: overload, not an outage
                keeper.registry.pool_timeouts += 1
            if not keeper.breaker.observe(error) and self._probe:
                keeper.breaker.release_probe()
        elif self._probe and conn is None:
            keeper.breaker.release_probe()  # the probe never reached the database
        if record.leak_reported:
            LeakDetector.log_late_close(record)
