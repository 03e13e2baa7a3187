"""The partner a session scope is handed: everything it needs from its factory, and no more.

An :class:`~reqscope.IsolatedSessionFactory` makes one :class:`SessionKeeper` and hands it to
every scope it opens. The scope (:mod:`reqscope._scope`), the enforcement hooks
(:mod:`reqscope._enforcement`) and the leak detector use only the keeper's public attributes
and methods; nothing below the factory reaches back up into it, so closing a session never
climbs back to the factory. The factory keeps what concerns the whole engine: its lifecycle,
its event hooks, observation and health.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from reqscope import _compat
from reqscope._cleanup import ConnectionCleanup
from reqscope._context import log_fields
from reqscope._logging import get_logger
from reqscope._pool import pool_stats
from reqscope._registry import Entry, EntryState, SessionRegistry
from reqscope.exceptions import IsolationViolation, PoolExhaustedError, ReqscopeError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

    from reqscope._breaker import CircuitBreaker
    from reqscope._context import UserExecutionContext
    from reqscope._leaks import LeakReport
    from reqscope._observers import SessionObserver
    from reqscope.tenancy import TenantPolicy

__all__ = ["SessionKeeper"]

logger = get_logger(__name__)


class SessionKeeper:
    """The registry, breaker, cleanup and settings that a factory's session scopes share.

    Attributes:
        engine: the engine its sessions use (the factory's, or one of its read replicas).
        registry: the open sessions and the session counters.
        breaker: the circuit breaker guarding the database.
        cleanup: closes sessions within ``cleanup_timeout``; invalidates failed connections.
        max_session_lifetime: seconds after which an open session counts as leaked.
        enforce_owner: refuse a session used while another user's context is current.
        tenant: the tenant policy sessions are confined by (None: none).
        statement_timeout: the factory's bound on one statement, in seconds (PostgreSQL).
        capture_stacks: record the stack that opened each session.
        pooler: the pooler in transaction mode in front of PostgreSQL (None: none).
        started: the factory is started (its leak detector runs).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        session_class: type[AsyncSession],
        session_kwargs: Mapping[str, Any],
        breaker: CircuitBreaker,
        cleanup_timeout: float,
        max_session_lifetime: float,
        enforce_owner: bool,
        tenant: TenantPolicy | None,
        statement_timeout: float | None,
        capture_stacks: bool,
        pooler: str | None,
        start: Callable[[], Awaitable[None]],
        registry: SessionRegistry | None = None,
        observers: list[SessionObserver] | None = None,
    ) -> None:
        self.engine = engine
        # a read replica's keeper shares its factory's registry: one view of every session
        self.registry = SessionRegistry() if registry is None else registry
        self.breaker = breaker
        self.cleanup = ConnectionCleanup(cleanup_timeout, graceful=pooler is None)
        self.max_session_lifetime = max_session_lifetime
        self.enforce_owner = enforce_owner
        self.tenant = tenant
        self.statement_timeout = statement_timeout
        self.capture_stacks = capture_stacks
        self.pooler = pooler
        self.started = False
        # outer_transaction(): the connection every new session joins (None: the engine)
        self.joined: AsyncConnection | None = None
        # factory.add_observer(): told of each session's life (shared with the replicas)
        self.observers: list[SessionObserver] = [] if observers is None else observers
        self._start = start
        self._session_class = session_class
        self._session_kwargs = dict(session_kwargs)
        # connection -> the reclaimed session's record (see reclaim)
        self._reclaimed: weakref.WeakKeyDictionary[Connection, Entry] = weakref.WeakKeyDictionary()

    async def start_on_first_use(self) -> None:
        """Start the factory (a session opened before anyone started it, or after a close)."""
        await self._start()

    def after_fork(self) -> None:
        """In a forked child: let go of the parent's connections without closing them.

        The child gets a new, empty pool (SQLAlchemy's recipe, ``dispose(close=False)``):
        a pooled connection's socket is shared with the parent, and using or closing it
        here would corrupt or end the parent's conversation with the server. The factory
        starts again on its first session in the child.
        """
        pool = self.engine.sync_engine.pool
        max_overflow = _compat.pool_max_overflow(pool)
        self.engine.sync_engine.dispose(close=False)
        if max_overflow is not None:
            _compat.remember_max_overflow(self.engine.sync_engine.pool, max_overflow)
        self.cleanup.forget()
        self.joined = None
        self.started = False

    def new_session(self) -> AsyncSession:
        """A new session of the factory's session class and arguments.

        On the engine; inside ``outer_transaction()``, on its connection, in a SAVEPOINT of
        its own (the session's commit releases it, its rollback rolls back to it).
        """
        if self.joined is None:
            return self._session_class(bind=self.engine, **self._session_kwargs)
        return self._session_class(
            bind=self.joined,
            **{**self._session_kwargs, "join_transaction_mode": "create_savepoint"},
        )

    def tenant_for(
        self, ctx: UserExecutionContext, *, bypass: bool
    ) -> tuple[TenantPolicy, str] | None:
        """The (policy, user id) a session of ``ctx`` is confined to; None in an admin bypass.

        Raises:
            ReqscopeError: ``bypass`` without a tenant policy.
            IsolationViolation: ``bypass`` for a context not marked admin (counted, logged).
        """
        policy = self.tenant
        if not bypass:
            return None if policy is None else (policy, ctx.user_id)
        if policy is None:
            raise ReqscopeError(
                "bypass_tenant=True needs a factory with a tenant policy "
                "(IsolatedSessionFactory(..., tenant=TenantPolicy()))"
            )
        if ctx.metadata.get(policy.admin_marker) is not True:
            self.registry.isolation_violations += 1
            logger.error(
                "reqscope: refused a tenant bypass for user %r (request %s): the context is "
                "not marked admin",
                ctx.user_id,
                ctx.request_id,
                extra=log_fields(ctx),
            )
            raise IsolationViolation(
                f"bypass_tenant=True for user {ctx.user_id!r}, whose context is not marked "
                f"admin; your authorization code must set metadata {policy.admin_marker}=True "
                "on admin contexts (never from client input)"
            )
        logger.warning(
            "reqscope: tenant filter bypassed by admin user %r (request %s)",
            ctx.user_id,
            ctx.request_id,
            extra={**log_fields(ctx), "bypass_tenant": True},
        )
        return None

    def translate(self, error: BaseException) -> BaseException:
        """Reqscope's error for ``error`` raised inside a scope (``error`` itself if none).

        SQLAlchemy's pool timeout becomes :class:`PoolExhaustedError`, which says what to do.
        """
        if isinstance(error, sa_exc.TimeoutError) and not isinstance(error, PoolExhaustedError):
            pool = self.engine.pool
            stats = pool_stats(pool)
            timeout = pool.timeout() if hasattr(pool, "timeout") else None
            return PoolExhaustedError(
                f"no database connection came free within {timeout} s ({stats}); raise "
                "pool_size/max_overflow, hold sessions for less time, or look for leaks "
                "with factory.active_sessions()",
                stats,
            )
        return error

    # -- telling the observers (their errors are logged, never raised into the request) ----

    def _tell(self, call: Callable[[SessionObserver], None]) -> None:
        for observer in tuple(self.observers):  # an observer may remove itself
            try:
                call(observer)
            except Exception:  # noqa: PERF203 - an observer's bug must not fail the request
                logger.exception("reqscope: a session observer failed")

    def scope_opened(self, entry: Entry) -> None:
        """``entry``'s session was opened."""
        self._tell(lambda observer: observer.session_opened(entry))

    def scope_began(self, entry: Entry) -> None:
        """``entry``'s session got its first connection."""
        self._tell(lambda observer: observer.session_began(entry))

    def scope_ended(self, entry: Entry, *, committed: bool, error: BaseException | None) -> None:
        """``entry``'s scope ended."""
        self._tell(
            lambda observer: observer.session_closed(entry, committed=committed, error=error)
        )

    def leaked(self, entry: Entry, report: LeakReport) -> None:
        """The leak detector reported ``entry``."""
        self._tell(lambda observer: observer.session_leaked(entry, report))

    def refused(self, entry: Entry, error: ReqscopeError) -> None:
        """A use of ``entry``'s session was refused with ``error``."""
        self._tell(lambda observer: observer.session_refused(entry, error))

    def reclaim(self, entry: Entry, defer: bool) -> None:
        """Poison a leaked session and invalidate its connection (the leak detector's).

        Synchronous: the detector's ``scan()`` must not await. Invalidation frees the pool
        slot and never returns the (possibly busy) connection to the pool. With ``defer``
        (async callers), :meth:`ConnectionCleanup.drain` finishes it through SQLAlchemy's
        graceful async path instead of the driver's synchronous force-close.
        """
        entry.state = EntryState.RECLAIMED
        conn = entry.connection
        if conn is not None:
            self._reclaimed[conn] = entry  # a statement it was running fails: reclaimed_on
            if self.engine.dialect.has_terminate and not defer:
                self.cleanup.invalidate(conn)
            else:  # the driver can only close from async code
                self.cleanup.defer(conn)
        self.registry.discard(entry)

    def reclaimed_on(self, conn: Connection) -> Entry | None:
        """The record of the reclaimed session that held ``conn``, if one did."""
        return self._reclaimed.get(conn)
