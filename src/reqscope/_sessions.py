"""IsolatedSessionFactory: one new AsyncSession per request scope, enforced and reclaimed.

The factory owns the engine's lifecycle and event hooks (:mod:`reqscope._engine_hooks`),
the leak detector, the health probe and the observation API. What its session scopes share
(the registry of open sessions, the circuit breaker, connection cleanup, the settings) is a
:class:`~reqscope._keeper.SessionKeeper`, which the factory hands each scope
(:mod:`reqscope._scope`); the checks on each session live in :mod:`reqscope._enforcement`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from typing_extensions import Self

from reqscope import _compat
from reqscope._breaker import CircuitBreaker
from reqscope._context import current_context_or_none
from reqscope._enforcement import ReqscopeSession, tenant_session_class
from reqscope._engine_hooks import EngineHooks
from reqscope._health import HealthProbe
from reqscope._keeper import SessionKeeper
from reqscope._leaks import LeakDetector
from reqscope._logging import get_logger
from reqscope._observers import ObservedSession, SessionObserver
from reqscope._pool import (
    PoolConfig,
    PoolStats,
    build_engine,
    pool_name,
    pool_stats,
    refuse_memory_sqlite,
    resolve_pooler,
)
from reqscope._registry import Entry, FactoryMetrics, SessionRecord
from reqscope._replicas import Replica, ReplicaSet, ReplicaStatus
from reqscope._retry import retry_transaction
from reqscope._scope import SessionScope
from reqscope.exceptions import ReqscopeError, TenancyConfigurationError
from reqscope.tenancy import TenancyReport, TenantPolicy, inspect_tenancy, tenant_tables

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from reqscope._context import UserExecutionContext
    from reqscope._health import HealthReport

__all__ = [
    "IsolatedSessionFactory",
    "configure",
    "get_default_factory",
    "isolated_session",
]

logger = get_logger(__name__)

DEFAULT_CLEANUP_TIMEOUT: Final = 5.0
# seconds one check of a read replica (reachable? how far behind?) may take
REPLICA_CHECK_TIMEOUT: Final = 2.0

T = TypeVar("T")

# every factory of this process, so that a forked child can make each start afresh
_FACTORIES: weakref.WeakSet[IsolatedSessionFactory] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for factory in list(_FACTORIES):
        factory._after_fork()  # noqa: SLF001 - this module's own class


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX (Windows has no fork)
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        replicas: read replicas (engines you keep owning, or URLs built with ``pool``)
            for ``session(ctx, read_only=True)`` (the "Read replicas" page).
        replica_max_lag: seconds of replay lag past which a replica is skipped
            (PostgreSQL standbys).
        replica_check_interval: seconds between the background checks of each replica.

    Raises:
        ReqscopeError: an in-memory SQLite URL or engine, an unusable URL, or a
            ``statement_timeout`` on a database other than PostgreSQL, or a replica of
            another kind of database than the primary.
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
        replicas: Sequence[AsyncEngine | str] = (),
        replica_max_lag: float = 10.0,
        replica_check_interval: float = 1.0,
        name: str | None = None,
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
        if leak_check_interval is None:
            leak_check_interval = min(5.0, max(0.01, float(max_session_lifetime) / 4))
        self.leak_check_interval = float(leak_check_interval)
        kwargs = {"expire_on_commit": False, **(session_kwargs or {})}
        sync_class = kwargs.pop("sync_session_class", ReqscopeSession)
        if not issubclass(sync_class, ReqscopeSession):
            raise ReqscopeError(
                "session_kwargs['sync_session_class'] must subclass "
                "reqscope.ReqscopeSession so enforcement applies to it"
            )
        session_class: type[AsyncSession] = kwargs.pop("class_", AsyncSession)
        if tenant is not None:
            sync_class = tenant_session_class(sync_class)
        # what the primary's keeper and every replica's keeper share
        settings: dict[str, Any] = {
            "session_class": session_class,
            "session_kwargs": {**kwargs, "sync_session_class": sync_class},
            "cleanup_timeout": cleanup_timeout,
            "max_session_lifetime": float(max_session_lifetime),
            "enforce_owner": enforce_owner,
            "tenant": tenant,
            "statement_timeout": self._check_statement_timeout(statement_timeout),
            "capture_stacks": capture_stacks,
            "pooler": resolve_pooler(self.engine.url, pool.pooler if pool else None),
            "start": self._start_on_first_use,
            "observers": [],
        }
        self._keeper = SessionKeeper(
            self.engine, breaker=circuit_breaker or CircuitBreaker(), **settings
        )
        if not replica_max_lag > 0 or not replica_check_interval > 0:
            raise ValueError(
                "replica_max_lag and replica_check_interval must be positive seconds, got "
                f"{replica_max_lag!r} and {replica_check_interval!r}"
            )
        self._replicas = ReplicaSet(
            [self._replica(bind, pool, settings) for bind in replicas],
            max_lag=float(replica_max_lag),
            check_interval=float(replica_check_interval),
        )
        self.leak_detector = LeakDetector(
            self._keeper.registry, _reclaim, self._drain, reclaim_leaks=reclaim_leaks
        )
        self.name = name if name is not None else pool_name(self.engine.url)
        self._closed = False
        self._hooks = EngineHooks(self._keeper)
        self._health = HealthProbe(self.engine.url, self._keeper.pooler)
        self._detector: asyncio.Task[None] | None = None
        self._replica_checks: asyncio.Task[None] | None = None
        self._install_hooks()
        _FACTORIES.add(self)

    def _replica(
        self, bind: AsyncEngine | str, pool: PoolConfig | None, settings: dict[str, Any]
    ) -> Replica:
        """A read replica's engine, and a keeper that shares this factory's registry."""
        if isinstance(bind, AsyncEngine):
            refuse_memory_sqlite(bind.url)
            engine = bind
        else:
            engine = build_engine(bind, pool=pool)
        if engine.dialect.name != self.engine.dialect.name:
            raise ReqscopeError(
                f"a read replica must be the same kind of database as the primary: the "
                f"primary is {self.engine.dialect.name}, the replica {engine.dialect.name} "
                f"({engine.url.render_as_string(hide_password=True)})"
            )
        keeper = SessionKeeper(
            engine, breaker=CircuitBreaker(), registry=self._keeper.registry, **settings
        )
        return Replica(keeper, EngineHooks(keeper), owns_engine=not isinstance(bind, AsyncEngine))

    def _install_hooks(self) -> None:
        self._hooks.install()
        for replica in self._replicas.replicas:
            replica.hooks.install()

    def _keepers(self) -> list[SessionKeeper]:
        return [self._keeper, *(replica.keeper for replica in self._replicas.replicas)]

    async def _drain(self) -> None:
        """Finish every deferred connection close, on the primary and on each replica."""
        for keeper in self._keepers():
            await keeper.cleanup.drain()

    # -- settings (read-only) --------------------------------------------------------------

    @property
    def engines(self) -> tuple[AsyncEngine, ...]:
        """The primary's engine, then each read replica's: each has a pool of its own."""
        return tuple(keeper.engine for keeper in self._keepers())

    @property
    def max_session_lifetime(self) -> float:
        """Seconds after which an open session counts as leaked."""
        return self._keeper.max_session_lifetime

    @property
    def enforce_owner(self) -> bool:
        """Whether a session used while another user's context is current is refused."""
        return self._keeper.enforce_owner

    @property
    def tenant(self) -> TenantPolicy | None:
        """The tenant policy confining every session (None: none)."""
        return self._keeper.tenant

    @property
    def statement_timeout(self) -> float | None:
        """The bound on one statement, in seconds (PostgreSQL; None: no bound)."""
        return self._keeper.statement_timeout

    @property
    def capture_stacks(self) -> bool:
        """Whether the stack that opened each session is recorded."""
        return self._keeper.capture_stacks

    @property
    def cleanup_timeout(self) -> float:
        """Seconds a session's close may take before its connection is invalidated instead."""
        return self._keeper.cleanup.timeout

    @property
    def circuit_breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding the database."""
        return self._keeper.breaker

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background leak detector (``async with factory`` calls this).

        With a tenant policy on PostgreSQL, :meth:`check_tenancy` runs first and a role
        that would bypass row-level security is refused. A factory that was never started
        starts itself when its first session opens (and logs that it did); a closed one
        starts again only through this method (an app's lifespan entered once per test).
        """
        if self._keeper.started:
            return
        if self._closed:
            self._reopen()
        if self.tenant is not None and self.tenant.rls and self.engine.dialect.name == "postgresql":
            await self.check_tenancy()
        # Plain tasks, not a task group: aclose() may run in another task than start() (a
        # lifespan, a fixture), and a factory started on first use has no block.
        loop = asyncio.get_running_loop()
        if self.leak_check_interval > 0:
            self._detector = loop.create_task(
                self.leak_detector.run(self.leak_check_interval),
                name="reqscope leak detector",
            )
        if self._replicas:
            await self._replicas.check_all(REPLICA_CHECK_TIMEOUT)  # routed from the first read
            self._replica_checks = loop.create_task(
                self._replicas.run(REPLICA_CHECK_TIMEOUT), name="reqscope replica checks"
            )
        for keeper in self._keepers():
            keeper.started = True

    async def _start_on_first_use(self) -> None:
        """Start a factory nobody started: its sessions are policed like any others."""
        self._check_open()
        logger.info(
            "reqscope: IsolatedSessionFactory started on first use; close it with "
            "`await factory.aclose()` (or use `async with factory:` / your app's lifespan)",
        )
        await self.start()

    def _after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``, ``multiprocessing``): start afresh.

        The parent's pooled connections, open sessions and background tasks are not the
        child's: the pools are replaced without closing what the parent still uses, the
        parent's sessions are forgotten, and the factory starts again on its first session
        (or its app's lifespan) in the child.
        """
        self._detector = self._replica_checks = None  # tasks of the parent's event loop
        for keeper in self._keepers():
            keeper.after_fork()
        self._keeper.registry.forget_all()
        logger.debug("reqscope: forked child %s: the factory starts afresh", os.getpid())

    def _reopen(self) -> None:
        self._closed = False
        self._install_hooks()
        if self._tempdir is not None:  # the embedded database starts empty again
            self._tempdir.mkdir(parents=True, exist_ok=True)

    async def aclose(self) -> None:
        """Stop the detector, invalidate sessions still open, dispose an engine it built.

        Idempotent. A closed factory refuses new sessions until :meth:`start` (or
        ``async with factory``) starts it again.
        """
        if self._closed:
            return
        self._closed = True
        for keeper in self._keepers():
            keeper.started = False
        tasks = [task for task in (self._detector, self._replica_checks) if task is not None]
        self._detector = self._replica_checks = None
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(tasks)
        for entry in list(self._keeper.registry.entries()):
            logger.warning(
                "reqscope: factory closing with session %s still open; invalidating it",
                entry.session_id,
                extra=entry.log_fields(),
            )
            _reclaim(entry, defer=True)
        await self._drain()
        with anyio.CancelScope(shield=True):
            await self._health.aclose(self.cleanup_timeout)
            await self._hooks.aclose()
            self._hooks.remove()
            for replica in self._replicas.replicas:
                await replica.aclose(self.cleanup_timeout)
                replica.hooks.remove()
            if self.owns_engine:
                await self._dispose(self.engine)
            await _compat.aiosqlite_stopped(self.cleanup_timeout)
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
        """True after :meth:`aclose` (until :meth:`start`)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
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
        read_only: bool = False,
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
            read_only: the session only reads: on a factory with ``replicas``, it goes to an
                available replica, unless this request opened a session on the primary
                before (then the primary, so the request reads its own writes).

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
            self._keeper_for(ctx, read_only=read_only),
            ctx,
            lifetime=max_lifetime,
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
        return SessionScope(
            self._keeper_for(ctx, read_only=False),
            ctx,
            lifetime=max_lifetime,
            commit=True,
            bypass_tenant=bypass_tenant,
            statement_timeout=self._check_statement_timeout(statement_timeout),
        )

    def _keeper_for(self, ctx: UserExecutionContext | None, *, read_only: bool) -> SessionKeeper:
        """The keeper of the engine a new session of ``ctx`` goes to: primary or a replica."""
        replicas = self._replicas
        if not replicas:
            return self._keeper
        ctx = ctx if ctx is not None else current_context_or_none()
        registry = self._keeper.registry
        if not read_only:
            replicas.wrote(ctx)
            return self._keeper
        if self._keeper.joined is not None:  # outer_transaction(): the test's one connection
            return self._keeper
        if replicas.has_written(ctx):  # read your own writes
            registry.sticky_reads += 1
            return self._keeper
        replica = replicas.choose()
        if replica is None:
            registry.replica_fallbacks += 1
            return self._keeper
        registry.replica_sessions += 1
        return replica.keeper

    async def run_in_transaction(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        ctx: UserExecutionContext | None = None,
        *,
        retries: int = 3,
        isolation_level: str | None = None,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        bypass_tenant: bool = False,
        statement_timeout: float | None = None,
    ) -> T:
        """Run ``await fn(session)`` in a transaction, again after a serialization failure.

        Each attempt is a :meth:`begin` scope of its own: a new session and a new
        transaction, committed when ``fn`` returns. When the server rolls an attempt back
        for a concurrent transaction (serialization failure or deadlock: SQLSTATE ``40001``
        / ``40P01``, MySQL/MariaDB error 1213), the attempt's session is closed and ``fn``
        runs again in a new one after a jittered backoff, up to ``retries`` more times. Any
        other error is raised at once. ``fn`` must be safe to run more than once: keep side
        effects outside the database (an email, an HTTP call) out of it.

        Example:
            >>> async def transfer(session):
            ...     await session.execute(debit)
            ...     await session.execute(credit)
            >>> await factory.run_in_transaction(transfer, ctx, isolation_level="SERIALIZABLE")

        Args:
            fn: the transaction's work; its return value is returned.
            ctx: the request's context; the current one when omitted.
            retries: how many times to run ``fn`` again after a conflict (0: never).
            isolation_level: the transaction's isolation level (``"SERIALIZABLE"``,
                ``"REPEATABLE READ"``, ...); the engine's when omitted.
            backoff: seconds the first retry waits at most; each later one doubles it.
            max_backoff: the cap on any one wait, in seconds.
            bypass_tenant: as for :meth:`session`.
            statement_timeout: as for :meth:`session`.

        Raises:
            TransactionConflictError: every attempt conflicted; the last error is its cause.
            ValueError: a negative ``retries`` or backoff.
        """
        if retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        if not 0 <= backoff <= max_backoff:
            raise ValueError(
                f"need 0 <= backoff <= max_backoff, got backoff={backoff!r}, "
                f"max_backoff={max_backoff!r}"
            )
        statement_timeout = self._check_statement_timeout(statement_timeout)

        def begin() -> SessionScope:
            return self.begin(ctx, bypass_tenant=bypass_tenant, statement_timeout=statement_timeout)

        return await retry_transaction(
            begin,
            fn,
            retries=retries,
            isolation_level=isolation_level,
            backoff=backoff,
            max_backoff=max_backoff,
            registry=self._keeper.registry,
        )

    @contextlib.asynccontextmanager
    async def outer_transaction(self) -> AsyncIterator[AsyncConnection]:
        """For tests: every session opened inside joins one transaction, rolled back at the end.

        The block holds one connection in a transaction; each session the factory opens
        meanwhile runs in a SAVEPOINT of its own on it, so sessions stay separate, owner
        checked and rolled back on error, a session's commit is seen by later sessions
        of the block, and nothing the block wrote survives it (on every database,
        SQLite included). The sessions share the connection: open them one at a time
        (test clients send one request at a time). A connection invalidated inside (a
        reclaimed leak) ends the block without error: the server rolled it back.

        Example:
            >>> async with factory.outer_transaction():
            ...     response = await client.post("/notes", json={"body": "hi"})
            ... # the note is gone

        Yields:
            The connection, to arrange or inspect data inside the same transaction.

        Raises:
            ReqscopeError: the factory is closed, or already inside ``outer_transaction()``.
        """
        self._check_open()
        keeper = self._keeper
        if keeper.joined is not None:
            raise ReqscopeError(
                "this factory is already inside outer_transaction(); one test transaction "
                "at a time (open it once, in one fixture)"
            )
        async with self.engine.connect() as conn:
            transaction = await conn.begin()
            if self.engine.dialect.name == "sqlite":
                # Python's sqlite3 begins lazily, at the first write: a SAVEPOINT before it
                # would open a transaction that the session's commit (RELEASE) commits.
                await conn.exec_driver_sql("BEGIN")
            keeper.joined = conn
            try:
                yield conn
            finally:
                keeper.joined = None
                if transaction.is_active and not conn.invalidated:
                    await transaction.rollback()

    def add_observer(self, observer: SessionObserver) -> Callable[[], None]:
        """Tell ``observer`` of every session scope from now on, on the primary and replicas.

        The observer's methods run synchronously where it happens (the scope's task, the
        leak detector); their exceptions are logged, never raised into the request.
        :mod:`reqscope.otel`'s tracing is one.

        Returns:
            A function that removes the observer.
        """
        observers = self._keeper.observers

        def remove() -> None:
            with contextlib.suppress(ValueError):  # removed already
                observers.remove(observer)

        observers.append(observer)
        return remove

    def on_session_close(self, callback: Callable[[SessionRecord], None]) -> Callable[[], None]:
        """Call ``callback`` with the record of each session whose scope ends from now on.

        The record names the user the session ended as (the one its request identified,
        for a session opened before authentication). For tests and instrumentation
        (``reqscope.testing.record_sessions``). The callback runs in the scope's task as it
        closes; its exceptions are logged, never raised into the request.

        Returns:
            A function that stops the calls.
        """
        return self.add_observer(_OnClose(callback))

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

    # -- observation -----------------------------------------------------------------------

    def pool_stats(self) -> PoolStats | None:
        """A snapshot of the engine's pool (``None`` for pools that do not count)."""
        return pool_stats(self.engine.pool)

    def metrics(self) -> FactoryMetrics:
        """A snapshot of the factory's counters, gauges and pool."""
        registry = self._keeper.registry
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
            cleanup_failures=self._keeper.cleanup.failures,
            circuit_state=self.circuit_breaker.state,
            pool=self.pool_stats(),
            pool_timeouts=registry.pool_timeouts,
            transaction_retries=registry.transaction_retries,
            transaction_conflicts_exhausted=registry.transaction_conflicts_exhausted,
            replica_sessions=registry.replica_sessions,
            replica_fallbacks=registry.replica_fallbacks,
            sticky_reads=registry.sticky_reads,
        )

    def replica_status(self) -> tuple[ReplicaStatus, ...]:
        """What the latest background check found of each read replica (empty: none)."""
        return tuple(replica.status() for replica in self._replicas.replicas)

    def active_sessions(self) -> tuple[SessionRecord, ...]:
        """Every open session, oldest first."""
        # Sorted on the monotonic clock: opened_at is derived per record from the wall clock,
        # so two sessions opened within a microsecond could swap places.
        entries = sorted(self._keeper.registry.entries(), key=lambda entry: entry.opened_mono)
        return tuple(entry.record() for entry in entries)

    async def health(self, timeout: float = 2.0) -> HealthReport:
        """Probe the database on a connection of its own (never the app's pool).

        Returns "down" when the probe fails or times out, "degraded" when the circuit is not
        closed or the pool is saturated, "ok" otherwise. Never raises for a database problem.
        """
        return await self._health.check(self.metrics(), timeout)


class _OnClose(SessionObserver):
    def __init__(self, callback: Callable[[SessionRecord], None]) -> None:
        self.callback = callback

    def session_closed(
        self,
        session: ObservedSession,
        *,
        committed: bool,  # noqa: ARG002 - the callback gets the record only
        error: BaseException | None,  # noqa: ARG002
    ) -> None:
        assert isinstance(session, Entry)  # noqa: S101 - the factory's observers get entries
        self.callback(session.record())


def _reclaim(entry: Entry, defer: bool) -> None:
    """Reclaim a leaked session through the keeper of the engine it is on."""
    entry.keeper.reclaim(entry, defer)


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
