"""IsolatedSessionFactory: one new AsyncSession per request scope, enforced and reclaimed.

The factory owns the engine's event listeners, the registry of open sessions, the leak
detector, the circuit breaker and the observation API. One request's scope
(open, tag, register, clean up) lives in :mod:`reqscope._scope`; the enforcement hooks in
:mod:`reqscope._enforcement`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import anyio
import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.util import greenlet_spawn
from typing_extensions import Self

from reqscope._breaker import CircuitBreaker, is_configuration_error, is_connection_failure
from reqscope._context import log_fields
from reqscope._enforcement import (
    _PID_KEY,
    ReqscopeSession,
    _invalidate,
    _on_handle_error,
    _remember_backend_pid,
    reclaimed_error,
    tenant_session_class,
)
from reqscope._leaks import LeakDetector
from reqscope._pool import PoolConfig, PoolStats, build_engine, pool_stats, refuse_memory_sqlite
from reqscope._registry import (
    Entry,
    EntryState,
    FactoryMetrics,
    SessionRecord,
    SessionRegistry,
)
from reqscope._scope import CleanupWatchdog, CommitScope, SessionScope
from reqscope.exceptions import (
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    IsolationViolation,
    PoolExhaustedError,
    ReqscopeError,
    TenancyConfigurationError,
)
from reqscope.tenancy import (
    TenancyReport,
    TenantPolicy,
    inspect_tenancy,
    tenant_tables,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection

    from reqscope._context import UserExecutionContext
    from reqscope._health import HealthReport

__all__ = [
    "IsolatedSessionFactory",
    "configure",
    "get_default_factory",
    "isolated_session",
]

logger = logging.getLogger("reqscope")

DEFAULT_CLEANUP_TIMEOUT: Final = 5.0


def _refuse_unusable_bind(bind: object, session_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse at construction what would otherwise fail at the first statement."""
    for key in ("bind", "binds"):
        if session_kwargs and key in session_kwargs:
            raise ReqscopeError(
                f"session_kwargs[{key!r}] is not supported: the factory binds every session to "
                "its own engine; pass the engine (or its URL) as the factory's first argument"
            )
    if isinstance(bind, AsyncConnection):
        raise ReqscopeError(
            "IsolatedSessionFactory takes an AsyncEngine or a URL, not an AsyncConnection: each "
            "request's session checks out its own connection from the engine's pool; pass "
            "conn.engine, or the engine you made the connection from"
        )
    if not isinstance(bind, (AsyncEngine, str, sa.URL, type(None))):
        raise ReqscopeError(
            "IsolatedSessionFactory takes an AsyncEngine, a database URL string or None, not "
            f"{type(bind).__name__}"
            + (
                " (a synchronous Engine: make one with create_async_engine())"
                if isinstance(bind, sa.engine.Engine)
                else ""
            )
        )


class IsolatedSessionFactory:
    """Hands every request scope its own new ``AsyncSession``, and polices its use.

    Example:
        >>> async def handler(factory, ctx):
        ...     async with factory.session(ctx) as session:
        ...         return (await session.execute(text("SELECT 1"))).scalar_one()

    Args:
        bind: an ``AsyncEngine`` (you keep owning it), a URL (the factory builds and later
            disposes an engine with ``pool``), or ``None`` for an embedded file-backed SQLite
            database in a temporary directory (removed on :meth:`aclose`).
        pool: pool settings when the factory builds the engine.
        session_kwargs: extra ``AsyncSession`` arguments (``expire_on_commit`` defaults to
            ``False``, as the SQLAlchemy asyncio docs advise).
        max_session_lifetime: seconds after which an open session counts as leaked.
        leak_check_interval: seconds between leak-detector passes; ``None`` picks a quarter
            of ``max_session_lifetime`` (between 10 ms and 5 s); ``0`` disables the
            background task (``factory.leak_detector.scan()`` still works).
        reclaim_leaks: invalidate a leaked session's connection and poison the session.
        capture_stacks: record the stack that opened each session (costly; for debugging).
        enforce_owner: refuse a session used while another user's context is current.
        circuit_breaker: the breaker guarding the database (a new one per factory when
            omitted).
        cleanup_timeout: seconds the shielded rollback+close may take before the
            connection is invalidated instead.
        tenant: confine every session to its context's user inside the database (ORM
            filters everywhere, row-level security on PostgreSQL); see
            :mod:`reqscope.tenancy`.
        statement_timeout: seconds any one statement of a session may run before the
            server cancels it (PostgreSQL's ``statement_timeout``, set transaction-locally
            as each transaction's first statement: one more round trip per transaction);
            ``None``: no bound. A scope may set its own.

    Raises:
        ReqscopeError: an in-memory SQLite URL or engine, an unusable URL, or a
            ``statement_timeout`` on a database other than PostgreSQL.
    """

    def __init__(
        self,
        bind: AsyncEngine | str | None = None,
        *,
        pool: PoolConfig | None = None,
        session_kwargs: Mapping[str, Any] | None = None,
        max_session_lifetime: float = 30.0,
        leak_check_interval: float | None = None,
        reclaim_leaks: bool = True,
        capture_stacks: bool = False,
        enforce_owner: bool = True,
        circuit_breaker: CircuitBreaker | None = None,
        cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
        tenant: TenantPolicy | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        if max_session_lifetime <= 0:
            raise ValueError(f"max_session_lifetime must be positive, got {max_session_lifetime}")
        _refuse_unusable_bind(bind, session_kwargs)
        self._tempdir: Path | None = None
        self.owns_engine = not isinstance(bind, AsyncEngine)
        if isinstance(bind, AsyncEngine):
            refuse_memory_sqlite(bind.url)
            self.engine = bind
        elif bind is None:
            self._tempdir = Path(tempfile.mkdtemp(prefix="reqscope-"))
            # removed by aclose(), or when a factory nobody closed is collected or at exit
            weakref.finalize(self, shutil.rmtree, self._tempdir, ignore_errors=True)
            url = f"sqlite+aiosqlite:///{self._tempdir / 'reqscope.sqlite3'}"
            self.engine = build_engine(url, pool=pool)
        else:
            self.engine = build_engine(bind, pool=pool)
        self.max_session_lifetime = float(max_session_lifetime)
        if leak_check_interval is None:
            leak_check_interval = min(5.0, max(0.01, self.max_session_lifetime / 4))
        self.leak_check_interval = float(leak_check_interval)
        self.capture_stacks = capture_stacks
        self.enforce_owner = enforce_owner
        self.cleanup_timeout = cleanup_timeout
        self.tenant = tenant
        self.statement_timeout = self._check_statement_timeout(statement_timeout)
        self.circuit_breaker = circuit_breaker or CircuitBreaker()
        kwargs = {"expire_on_commit": False, **(session_kwargs or {})}
        sync_class = kwargs.pop("sync_session_class", ReqscopeSession)
        if not issubclass(sync_class, ReqscopeSession):
            raise ReqscopeError(
                "session_kwargs['sync_session_class'] must subclass "
                "reqscope.ReqscopeSession so enforcement applies to it"
            )
        self._session_class: type[AsyncSession] = kwargs.pop("class_", AsyncSession)
        if tenant is not None:
            sync_class = tenant_session_class(sync_class)
        self._session_kwargs = {**kwargs, "sync_session_class": sync_class}
        self._registry = SessionRegistry()
        self._pending_invalidation: list[Connection] = []
        self._cleanup_watchdog = CleanupWatchdog()
        self.leak_detector = LeakDetector(
            self._registry,
            self._reclaim,
            self._drain_invalidations,
            reclaim_leaks=reclaim_leaks,
        )
        self._state = "new"
        self._health_engine: AsyncEngine | None = None
        # warnings about how the URL reaches the server; None until health() first asks
        self._transport_warnings: tuple[str, ...] | None = None
        self._control_engine: AsyncEngine | None = None
        # connection -> the reclaimed scope that held it (the leak detector's, see _reclaim)
        self._reclaimed: weakref.WeakKeyDictionary[Connection, Entry] = weakref.WeakKeyDictionary()
        self._detector: asyncio.Task[None] | None = None
        self._listen(event.listen)

    def _listen(self, how: Callable[..., None]) -> None:
        """Add (``event.listen``) or remove (``event.remove``) the factory's engine hooks."""
        engine = self.engine.sync_engine
        how(engine, "handle_error", _on_handle_error)
        how(engine, "handle_error", self._reclaimed_statement)
        how(engine, "do_connect", self._connect)
        if self.engine.dialect.name == "postgresql":
            how(engine, "connect", _remember_backend_pid)
            how(engine, "handle_error", self._stop_cancelled_statement)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background leak detector (``async with factory`` calls this).

        With a tenant policy on PostgreSQL, :meth:`check_tenancy` runs first and a role
        that would bypass row-level security is refused. A factory that was never started
        starts itself when its first session opens (and logs that it did); a closed one
        starts again only through this method (an app's lifespan entered once per test).
        """
        if self._state == "started":
            return
        if self._state == "closed":
            self._reopen()
        if self.tenant is not None and self.tenant.rls and self.engine.dialect.name == "postgresql":
            await self.check_tenancy()
        if self.leak_check_interval > 0:
            # A plain task, not a task group: aclose() may run in another task than start()
            # (a lifespan, a fixture), and a factory started on first use has no block.
            self._detector = asyncio.get_running_loop().create_task(
                self.leak_detector.run(self.leak_check_interval),
                name="reqscope leak detector",
            )
        self._state = "started"

    async def _start_on_first_use(self) -> None:
        """Start a factory nobody started: its sessions are policed like any others."""
        self._check_open()
        logger.info(
            "reqscope: IsolatedSessionFactory started on first use; close it with "
            "`await factory.aclose()` (or use `async with factory:` / your app's lifespan)",
        )
        await self.start()

    def _reopen(self) -> None:
        self._listen(event.listen)
        if self._tempdir is not None:  # the embedded database starts empty again
            self._tempdir.mkdir(parents=True, exist_ok=True)

    async def aclose(self) -> None:
        """Stop the detector, invalidate sessions still open, dispose an engine it built.

        Idempotent. A closed factory refuses new sessions until :meth:`start` (or
        ``async with factory``) starts it again.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        detector, self._detector = self._detector, None
        if detector is not None:
            detector.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([detector])
        for entry in list(self._registry.entries()):
            logger.warning(
                "reqscope: factory closing with session %s still open; invalidating it",
                entry.session_id,
                extra=entry.log_fields(),
            )
            self._reclaim(entry, defer=True)
        await self._drain_invalidations()
        with anyio.CancelScope(shield=True):
            for extra in (self._health_engine, self._control_engine):
                if extra is not None:
                    await self._dispose(extra)
            self._health_engine = self._control_engine = None
            self._listen(event.remove)
            if self.owns_engine:
                await self._dispose(self.engine)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    async def _dispose(self, engine: AsyncEngine) -> None:
        # A server that stopped answering would hold a graceful close forever: bound it.
        # What is left unclosed is the driver's to drop when the process moves on.
        with anyio.move_on_after(self.cleanup_timeout) as scope:
            await engine.dispose()
        if scope.cancelled_caught:
            logger.warning(
                "reqscope: closing the connections of %s took longer than cleanup_timeout=%s s;"
                " abandoning them",
                engine.url.render_as_string(hide_password=True),
                self.cleanup_timeout,
            )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._state == "closed"

    def _check_open(self) -> None:
        if self._state == "closed":
            raise ReqscopeError(
                "this IsolatedSessionFactory is closed; start it again with `async with "
                "factory:` (or `await factory.start()`), or keep the one your app's lifespan "
                "owns open until shutdown"
            )

    # -- scopes ----------------------------------------------------------------------------

    def session(
        self,
        ctx: UserExecutionContext | None = None,
        *,
        max_lifetime: float | None = None,
        bypass_tenant: bool = False,
        statement_timeout: float | None = None,
    ) -> SessionScope:
        """Open a new session for one request; uncommitted work rolls back on exit.

        Args:
            ctx: the request's context; the current one when omitted.
            max_lifetime: this scope's leak threshold in seconds (a long stream is not a
                leak); the factory's ``max_session_lifetime`` when omitted.
            bypass_tenant: lift the ORM tenant filter for admin work; only for a context
                whose metadata carries the policy's ``admin_marker`` set to ``True``, and
                always logged. Row-level security still applies on PostgreSQL.
            statement_timeout: this scope's bound on one statement, in seconds (PostgreSQL);
                the factory's ``statement_timeout`` when omitted.

        Returns:
            An async context manager yielding a real ``AsyncSession``. Inside the block,
            ``ctx`` is the current context.

        Raises:
            NoActiveContextError: no ``ctx`` given and none is current.
            CircuitOpenError: the database circuit is open.
            PoolExhaustedError: no connection came free within ``pool_timeout``.
            IsolationViolation: ``bypass_tenant`` for a context not marked admin.
            ReqscopeError: ``statement_timeout`` on a database other than PostgreSQL.
        """
        return SessionScope(
            self,
            ctx,
            max_lifetime,
            bypass_tenant=bypass_tenant,
            statement_timeout=self._check_statement_timeout(statement_timeout),
        )

    def begin(
        self,
        ctx: UserExecutionContext | None = None,
        *,
        max_lifetime: float | None = None,
        bypass_tenant: bool = False,
        statement_timeout: float | None = None,
    ) -> SessionScope:
        """Like :meth:`session`, but commit on success (and roll back on error)."""
        return CommitScope(
            self,
            ctx,
            max_lifetime,
            bypass_tenant=bypass_tenant,
            statement_timeout=self._check_statement_timeout(statement_timeout),
        )

    def _check_statement_timeout(self, seconds: float | None) -> float | None:
        """Validate a ``statement_timeout``; None stays None (the factory's applies)."""
        if seconds is None:
            return None
        if not seconds > 0:
            raise ValueError(f"statement_timeout must be positive seconds, got {seconds!r}")
        if self.engine.dialect.name != "postgresql":
            raise ReqscopeError(
                f"statement_timeout is enforced by PostgreSQL's server; "
                f"{self.engine.dialect.name} has no transaction-local statement timeout. "
                "Bound the request instead, e.g. with run_isolated(..., timeout=...)"
            )
        return float(seconds)

    def _authorize_bypass(self, ctx: UserExecutionContext) -> None:
        policy = self.tenant
        if policy is None:
            raise ReqscopeError(
                "bypass_tenant=True needs a factory with a tenant policy "
                "(IsolatedSessionFactory(..., tenant=TenantPolicy()))"
            )
        if ctx.metadata.get(policy.admin_marker) is not True:
            self._registry.isolation_violations += 1
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

    async def check_tenancy(self, tables: tuple[str, ...] | None = None) -> TenancyReport:
        """Verify that row-level security binds this factory's database role.

        Args:
            tables: tenant tables to inspect; the tables of every mapped
                :class:`~reqscope.tenancy.TenantScoped` model when omitted.

        Returns:
            The report (tables lacking ``FORCE`` that this role does not own are warnings,
            also logged).

        Raises:
            TenancyConfigurationError: the role is a superuser or has ``BYPASSRLS``; owns a
                tenant table without ``FORCE ROW LEVEL SECURITY``, or inherits the
                privileges of its owner; a table lacks RLS; or the role can read a view
                over a tenant table that returns every tenant's rows (not
                ``security_invoker``, owned by a role the policies do not bind) or a
                materialized view over one.
        """
        report = await inspect_tenancy(
            self.engine, tables if tables is not None else tenant_tables()
        )
        for warning in report.warnings:
            logger.warning("reqscope: %s", warning)
        if report.problems:
            raise TenancyConfigurationError(
                "row-level security would not confine this factory's sessions: "
                + "; ".join(report.problems)
            )
        return report

    def _new_session(self) -> AsyncSession:
        return self._session_class(bind=self.engine, **self._session_kwargs)

    def _connect(self, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        """``do_connect`` hook: a failed connect becomes a reqscope error that says why.

        Drivers report an outage as a raw ``OSError``/``TimeoutError``, which inside a request
        could also be the application's own; raised here, it can only be the database's, so
        it becomes :class:`DatabaseUnavailableError`, which the circuit breaker counts. A
        server that answers by refusing the login or the database is up:
        :class:`DatabaseConfigurationError`, which the breaker does not count.
        """
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as error:
            if isinstance(error, ReqscopeError):
                raise
            url = self.engine.url.render_as_string(hide_password=True)
            reason = f"{type(error).__name__}: {error}".rstrip(": ")
            if is_configuration_error(error):
                raise DatabaseConfigurationError(
                    f"the database server at {url} refused the connection: {reason}; the "
                    "server is up, so check the user, password and database name in the "
                    "URL (and the server's pg_hba.conf or grants)"
                ) from error
            if not (
                isinstance(error, dialect.loaded_dbapi.Error)
                or is_connection_failure(error, connecting=True)
            ):
                raise
            raise DatabaseUnavailableError(
                f"cannot connect to the database at {url}: {reason}; check that it is "
                f"running and reachable (after {self.circuit_breaker.failure_threshold} "
                "consecutive failures the circuit opens and requests fail fast)"
            ) from error

    def _reclaim(self, entry: Entry, defer: bool) -> None:
        # Synchronous: the leak detector's scan() must not await. Invalidation frees the
        # pool slot and never returns the (possibly busy) connection to the pool. With
        # ``defer`` (async callers), _drain_invalidations does it through SQLAlchemy's
        # graceful async path instead of the drivers' synchronous force-close.
        entry.state = EntryState.RECLAIMED
        conn = entry.connection
        if conn is not None:
            self._reclaimed[conn] = entry  # a statement it was running fails: _reclaimed_statement
            if self.engine.dialect.has_terminate and not defer:
                _invalidate(conn)
            else:  # the driver can only close from async code: finish in _drain
                self._pending_invalidation.append(conn)
        self._registry.discard(entry)

    async def _invalidate_gracefully(self, conn: Connection | None) -> None:
        if conn is None:  # the session never got a connection
            return
        if not conn.closed and not conn.invalidated:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.cleanup_timeout),
                contextlib.suppress(Exception),
            ):
                await greenlet_spawn(conn.invalidate)
        _invalidate(conn)  # a no-op unless the graceful path timed out or failed

    async def _drain_invalidations(self) -> None:
        pending, self._pending_invalidation = self._pending_invalidation, []
        for conn in pending:
            await self._invalidate_gracefully(conn)

    def _translate(self, error: BaseException) -> BaseException:
        if isinstance(error, sa_exc.TimeoutError) and not isinstance(error, PoolExhaustedError):
            stats = self.pool_stats()
            timeout = getattr(self.engine.pool, "_timeout", None)
            return PoolExhaustedError(
                f"no database connection came free within {timeout} s ({stats}); raise "
                "pool_size/max_overflow, hold sessions for less time, or look for leaks "
                "with factory.active_sessions()",
                stats,
            )
        return error

    def _reclaimed_statement(self, context: Any) -> BaseException | None:
        """``handle_error`` hook: a statement cut off by the leak detector's reclaim.

        Reclaiming invalidates the connection under a statement that may still be running;
        the driver's error for that ("canceling statement due to user request", "connection
        closed") is raised as :class:`SessionReclaimedError`, which says why.
        """
        entry = self._reclaimed.get(context.connection) if context.connection else None
        return None if entry is None else reclaimed_error(entry, "execute")

    def _stop_cancelled_statement(self, context: Any) -> None:
        """Terminate the server backend of a statement interrupted by cancellation.

        A cancelled client stops waiting, but PostgreSQL keeps running the statement and
        holding its locks; SQLAlchemy then invalidates the connection and the pool hands the
        slot to the next request, so server backends would outnumber the pool. This
        ``handle_error`` hook runs inside SQLAlchemy's greenlet *before* that invalidation,
        so it can await ``pg_terminate_backend`` (shielded, bounded) first.
        """
        # A handle_error hook that raises replaces the original exception, which would
        # turn a cancellation into an ordinary error: this hook must never raise.
        original = context.original_exception
        if isinstance(original, Exception) or context.connection is None:
            return  # only exit exceptions: cancellation, KeyboardInterrupt
        try:
            pid = context.connection.info.get(_PID_KEY)
        except NotImplementedError:  # cancelled while connecting: nothing runs on the server
            return
        if pid is None:
            return
        try:
            from sqlalchemy.util import await_only  # noqa: PLC0415 - only on this rare path

            with anyio.CancelScope(shield=True):  # noqa: ASYNC100 - await_only awaits inside
                await_only(self._cancel_backend(pid))
        except Exception as error:  # a cancellation is not an error: say so, at WARNING
            logger.warning(
                "reqscope: could not cancel the server-side statement of a cancelled request "
                "(backend %s): %s: %s; the server stops it when the connection closes",
                pid,
                type(error).__name__,
                error,
            )

    async def _cancel_backend(self, pid: int) -> None:
        if self._control_engine is None:
            from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

            from reqscope._pool import _connect_args  # noqa: PLC0415

            url = self.engine.url
            self._control_engine = create_async_engine(
                url,
                pool_size=1,
                max_overflow=4,
                pool_timeout=self.cleanup_timeout,
                connect_args=_connect_args(url, self.cleanup_timeout),
            )
        with anyio.fail_after(self.cleanup_timeout):
            async with self._control_engine.connect() as conn:
                await conn.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})

    # -- observation -----------------------------------------------------------------------

    def pool_stats(self) -> PoolStats | None:
        """A snapshot of the engine's pool (``None`` for pools that do not count)."""
        return pool_stats(self.engine.pool)

    def metrics(self) -> FactoryMetrics:
        """A snapshot of the factory's counters, gauges and pool."""
        registry = self._registry
        return FactoryMetrics(
            active_sessions=len(registry),
            peak_active_sessions=registry.peak_active,
            sessions_opened=registry.sessions_opened,
            sessions_closed=registry.sessions_closed,
            sessions_failed=registry.sessions_failed,
            leaks_detected=registry.leaks_detected,
            leaks_reclaimed=registry.leaks_reclaimed,
            isolation_violations=registry.isolation_violations,
            scope_violations=registry.scope_violations,
            cleanup_failures=registry.cleanup_failures,
            circuit_state=self.circuit_breaker.state,
            pool=self.pool_stats(),
            pool_timeouts=registry.pool_timeouts,
        )

    def active_sessions(self) -> tuple[SessionRecord, ...]:
        """Every open session, oldest first."""
        records = [entry.record() for entry in self._registry.entries()]
        return tuple(sorted(records, key=lambda record: record.opened_at))

    async def health(self, timeout: float = 2.0) -> HealthReport:
        """Probe the database on a connection of its own (never the app's pool).

        Returns "down" when the probe fails or times out, "degraded" when the circuit is not
        closed or the pool is saturated, "ok" otherwise. Never raises for a database problem.
        """
        from reqscope._health import check_health  # noqa: PLC0415 - keeps imports acyclic

        return await check_health(self, timeout)


_default: IsolatedSessionFactory | None = None


def configure(
    bind: AsyncEngine | str | None = None, **factory_kwargs: Any
) -> IsolatedSessionFactory:
    """Create the process-wide default factory and return it.

    A previously configured default is replaced, not closed: close it yourself.
    """
    global _default  # noqa: PLW0603 - the one process-wide default is the point
    _default = IsolatedSessionFactory(bind, **factory_kwargs)
    return _default


def get_default_factory() -> IsolatedSessionFactory:
    """Return the default factory set by :func:`configure`.

    Raises:
        ReqscopeError: none configured.
    """
    if _default is None:
        raise ReqscopeError(
            "no default session factory: call reqscope.configure(bind=...) at startup, "
            "or use an IsolatedSessionFactory directly"
        )
    return _default


def isolated_session(
    ctx: UserExecutionContext | None = None, *, max_lifetime: float | None = None
) -> SessionScope:
    """``get_default_factory().session(ctx)``."""
    return get_default_factory().session(ctx, max_lifetime=max_lifetime)
