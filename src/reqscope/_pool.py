"""Pool configuration, engine construction and pool statistics."""

from __future__ import annotations

import asyncio
import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import anyio
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool
from sqlalchemy.util import await_only

from reqscope._compat import (
    aiosqlite_connect,
    fair_pool_class,
    handoff_queue_of,
    pool_max_overflow,
    remember_max_overflow,
)
from reqscope.exceptions import ReqscopeError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["PoolConfig", "PoolStats", "Pooler", "build_engine", "pool_stats"]

DEFAULT_CONNECT_TIMEOUT: Final = 5.0
SQLITE_BUSY_TIMEOUT_MS: Final = 5_000

#: A connection pooler between the application and PostgreSQL, in transaction mode.
Pooler = Literal["pgbouncer"]
POOLERS: Final = ("pgbouncer",)
#: Declares the pooler where the code does not (``PoolConfig(pooler=...)`` wins).
POOLER_VARIABLE: Final = "REQSCOPE_POOLER"


def resolve_pooler(url: URL, declared: Pooler | None) -> Pooler | None:
    """The pooler in front of ``url``'s server: declared in code, else by the environment.

    ``REQSCOPE_POOLER`` concerns PostgreSQL URLs only; unset or empty, there is none.

    Raises:
        ReqscopeError: ``REQSCOPE_POOLER`` names no pooler reqscope knows.
    """
    if declared is not None or url.get_backend_name() != "postgresql":
        return declared
    value = os.environ.get(POOLER_VARIABLE) or None
    if value is not None and value not in POOLERS:
        raise ReqscopeError(
            f"{POOLER_VARIABLE}={value!r} names no pooler reqscope knows; set it to one of "
            f"{', '.join(POOLERS)}, or unset it when nothing stands between the application "
            "and PostgreSQL"
        )
    return cast("Pooler | None", value)


def unnamed_statement() -> str:
    """The name asyncpg gives its statements behind a pooler: none (the unnamed statement).

    A named statement outlives its transaction on a server connection that other clients
    share: with repeating names a second client's statement collides with it ("already
    exists"), with unique names they pile up on the server. The unnamed statement is
    replaced by the next one; asyncpg re-parses it before each use without a cache.
    """
    return ""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Connection pool settings for :func:`build_engine`.

    Args:
        pool_size: connections kept open.
        max_overflow: extra connections opened under load and closed when returned.
        pool_timeout: seconds a request waits for a free connection before
            :class:`~reqscope.exceptions.PoolExhaustedError`.
        pool_recycle: seconds after which a connection is replaced (server idle timeouts).
        pool_pre_ping: test each pooled connection on checkout (survives server restarts),
            within ``connect_timeout``: a server that stopped answering fails the ping, the
            pool's connections are invalidated and a new one is tried.
        connect_timeout: seconds to establish a new connection, and to ping a pooled one;
            bounded so that an unreachable or silent server fails every request quickly and
            the circuit breaker can trip.
        reset_session: on PostgreSQL, when a connection returns to the pool, also undo what
            a request may have changed on it beyond its transaction: settings made with a
            plain ``SET``, temporary tables, ``LISTEN``, advisory locks, sequence state, open
            cursors (``DISCARD ALL`` less dropping prepared statements, which the drivers
            cache). Off by default: turn it on when application code runs ``SET`` (not
            ``SET LOCAL``), temporary tables or session advisory locks; it costs one more
            round trip per request (docs/performance.md).
        pooler: ``"pgbouncer"`` when PgBouncer (or another pooler in transaction mode)
            stands between the application and PostgreSQL: consecutive transactions of one
            connection then run on different server connections, so prepared statements
            are neither cached nor named (asyncpg) nor prepared at all (psycopg), and a
            cancelled statement is not cancelled by server pid. When None, the
            ``REQSCOPE_POOLER`` environment variable declares it for PostgreSQL URLs.
    """

    pool_size: int = 10
    max_overflow: int = 15
    pool_timeout: float = 5.0
    pool_recycle: int = 1800
    pool_pre_ping: bool = True
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    reset_session: bool = False
    pooler: Pooler | None = None

    def __post_init__(self) -> None:
        if self.pooler is not None and self.pooler not in POOLERS:
            raise ValueError(f"pooler must be one of {POOLERS} or None, got {self.pooler!r}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {self.pool_size}")
        if self.max_overflow < 0:
            raise ValueError(f"max_overflow must be >= 0, got {self.max_overflow}")
        if self.pool_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("pool_timeout and connect_timeout must be positive (seconds)")

    @classmethod
    def standard(cls) -> PoolConfig:
        """10 connections, 15 overflow, 5 s pool timeout: a typical web service."""
        return cls(pool_size=10, max_overflow=15, pool_timeout=5.0)

    @classmethod
    def high_performance(cls) -> PoolConfig:
        """15 connections, 25 overflow, 3 s pool timeout: busy services that fail fast."""
        return cls(pool_size=15, max_overflow=25, pool_timeout=3.0)

    @property
    def capacity(self) -> int:
        """The most connections this pool opens at once."""
        return self.pool_size + self.max_overflow


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a connection pool (``checked_out`` is what requests hold right now).

    ``waiting`` is how many checkouts wait for a connection now; ``waits`` counts the
    checkouts that had to wait since the pool was made, and ``wait_seconds`` adds up how
    long they waited (``wait_seconds / waits`` is the mean wait). The three stay 0 for a
    pool that is not reqscope's (an engine not made by :func:`build_engine`).
    """

    size: int
    checked_in: int
    checked_out: int
    overflow: int
    capacity: int
    waiting: int = 0
    waits: int = 0
    wait_seconds: float = 0.0

    def to_dict(self) -> dict[str, int | float]:
        """Return the snapshot as JSON-safe data."""
        return {
            "size": self.size,
            "checked_in": self.checked_in,
            "checked_out": self.checked_out,
            "overflow": self.overflow,
            "capacity": self.capacity,
            "waiting": self.waiting,
            "waits": self.waits,
            "wait_seconds": self.wait_seconds,
        }

    def __str__(self) -> str:
        return (
            f"size={self.size}, checked_out={self.checked_out}, checked_in={self.checked_in}, "
            f"overflow={self.overflow}, capacity={self.capacity}, waiting={self.waiting}"
        )


def pool_stats(pool: Pool) -> PoolStats | None:
    """Return a snapshot of ``pool``, or ``None`` for pools that do not count (NullPool)."""
    size = getattr(pool, "size", None)
    if size is None:
        return None
    max_overflow = pool_max_overflow(pool)
    if max_overflow is None:  # unknown (a pool reqscope did not make): what is in use now
        max_overflow = pool.overflow()  # type: ignore[attr-defined]
    queue = handoff_queue_of(pool)
    return PoolStats(
        size=pool.size(),  # type: ignore[attr-defined]  # QueuePool and its async variant
        checked_in=pool.checkedin(),  # type: ignore[attr-defined]
        checked_out=pool.checkedout(),  # type: ignore[attr-defined]
        overflow=max(0, pool.overflow()),  # type: ignore[attr-defined]
        capacity=pool.size() + max(0, max_overflow),  # type: ignore[attr-defined]
        waiting=0 if queue is None else queue.waiting,
        waits=0 if queue is None else queue.waits,
        wait_seconds=0.0 if queue is None else round(queue.wait_seconds, 6),
    )


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


def pool_name(url: URL) -> str:
    """A pool's name as OpenTelemetry's conventions default it: ``host:port/database``.

    SQLite has neither host nor port: its name is the database file's path.
    """
    database = url.database or ""
    if url.host is None:
        return database
    port = url.port or _DEFAULT_PORTS.get(url.get_backend_name())
    address = url.host if port is None else f"{url.host}:{port}"
    return f"{address}/{database}"


def is_memory_sqlite(url: URL) -> bool:
    """True for SQLite URLs whose database lives in one process's memory."""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return (
        database in {"", ":memory:"}
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    )


def refuse_memory_sqlite(url: URL) -> None:
    """Raise when ``url`` is an in-memory SQLite database.

    SQLAlchemy serves ``:memory:`` through one shared connection, so request B would see
    request A's *uncommitted* rows: the opposite of isolation.
    """
    if is_memory_sqlite(url):
        raise ReqscopeError(
            f"refusing in-memory SQLite ({url.render_as_string()}): every session would share "
            "one connection and see each other's uncommitted rows; use a file URL such as "
            "'sqlite+aiosqlite:///app.db', or bind=None for reqscope's embedded default"
        )


def _driver(url: URL) -> str:
    # From the URL text: get_driver_name() would import the dialect (and fail for typos).
    return url.drivername.partition("+")[2]


def connect_args(url: URL, timeout: float, pooler: str | None = None) -> dict[str, Any]:
    """The driver's connect arguments: a bounded connect, and what ``pooler`` needs."""
    driver = _driver(url)
    if driver == "asyncpg":
        if pooler is None:
            return {"timeout": timeout}
        return {
            "timeout": timeout,
            "statement_cache_size": 0,  # asyncpg's own cache
            "prepared_statement_cache_size": 0,  # SQLAlchemy's, on top of asyncpg's
            "prepared_statement_name_func": unnamed_statement,
        }
    if driver in {"psycopg", "psycopg_async"}:
        if pooler is None:
            return {"connect_timeout": max(1, round(timeout))}
        return {"connect_timeout": max(1, round(timeout)), "prepare_threshold": None}
    if driver in {"asyncmy", "aiomysql"}:
        # Their connect_timeout covers the TCP connect, not the handshake with a server
        # that accepts and never answers: bound the whole connect.
        return {"connect_timeout": timeout, "async_creator_fn": _bounded_connect(driver, timeout)}
    if driver == "aiosqlite":
        args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        stop_once = aiosqlite_connect()
        if stop_once is not None:
            args["async_creator_fn"] = stop_once
        return args
    return {}


def _bounded_connect(driver: str, timeout: float) -> Callable[..., Awaitable[Any]]:
    """The driver's ``connect`` (through SQLAlchemy's ``async_creator_fn``), time-bounded."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        module = importlib.import_module(driver)
        return await asyncio.wait_for(module.connect(*args, **kwargs), timeout)

    return connect


_FRESH: Final = "reqscope.fresh"  # connection record info: made, not yet checked out


def _mark_fresh(_dbapi_connection: object, record: ConnectionPoolEntry) -> None:
    record.info[_FRESH] = True


def _bounded_pre_ping(engine: AsyncEngine, timeout: float) -> None:
    """Ping each pooled connection on checkout, as ``pool_pre_ping`` does, within ``timeout``.

    SQLAlchemy's own pre-ping waits for the answer without a bound: against a server that
    stopped answering (a partition, a stopped VM) every request on a pooled connection hung
    while new connects failed in ``connect_timeout``. This ``checkout`` listener runs the
    dialect's ping under an anyio deadline, in the checking-out task itself (a ping in a task
    of its own, abandoned on timeout, would still be waiting on the socket that invalidation
    closes, and psycopg then fails the next connection given the same file descriptor). A
    ping that fails or does not answer in time raises ``InvalidatePoolError``, on which the
    pool (as for its own failed pre-ping) invalidates its connections and connects anew,
    which ``connect_timeout`` bounds. anyio keeps cancelling until the ping returns, so
    psycopg closes the connection at once instead of asking a silent server to cancel the
    query (which it waits 10 s for). A connection just made is not pinged.
    """
    dialect = engine.dialect

    def checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: object) -> None:
        if record.info.pop(_FRESH, False):
            return
        try:
            # In the checking-out task's greenlet, as SQLAlchemy's own ping: the deadline
            # cancels the task's wait for the driver, which raises here.
            with anyio.fail_after(timeout):  # noqa: ASYNC100 - do_ping awaits inside
                alive = dialect.do_ping(dbapi_connection)
        except Exception as error:  # the ping failed or timed out: the connection is unusable
            raise sa_exc.InvalidatePoolError(
                f"pre-ping failed: {type(error).__name__}: {error}"
            ) from error
        if not alive:
            raise sa_exc.InvalidatePoolError("pre-ping found the connection closed")

    event.listen(engine.sync_engine, "connect", _mark_fresh)
    event.listen(engine.sync_engine, "checkout", checkout)


# What DISCARD ALL does, but DEALLOCATE ALL: the drivers' prepared-statement caches stay valid.
_RESET_SESSION: Final = (
    "CLOSE ALL; RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); "
    "DISCARD TEMP; DISCARD SEQUENCES"
)


def _reset_session(dbapi_connection: Any, _record: object, reset_state: Any) -> None:
    """``reset`` listener (before the pool's rollback): reset the PostgreSQL session state."""
    if reset_state.terminate_only or not reset_state.asyncio_safe:
        return  # the connection is being discarded, or this runs where nothing may be awaited
    dbapi_connection.rollback()  # out of any (failed) transaction first
    driver = dbapi_connection.driver_connection
    await_only(driver.execute(_RESET_SESSION))  # one round trip: several statements
    if getattr(driver, "autocommit", True) is False:  # psycopg began a transaction for it
        await_only(driver.commit())


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers proceed beside one writer; the busy timeout turns short write
    # contention into a wait instead of an immediate "database is locked".
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def build_engine(
    url: str | URL, *, pool: PoolConfig | None = None, **engine_kwargs: Any
) -> AsyncEngine:
    """Create an ``AsyncEngine`` with reqscope's pool settings and a bounded connect timeout.

    Args:
        url: an async database URL (``postgresql+asyncpg://...``, ``sqlite+aiosqlite:///f.db``).
        pool: pool settings; :meth:`PoolConfig.standard` when omitted.
        **engine_kwargs: passed to :func:`sqlalchemy.ext.asyncio.create_async_engine`
            (and win over the pool settings); ``connect_args`` are added to reqscope's
            (the connect timeout, what the pooler needs), each of yours winning.

    Returns:
        A new engine; the caller owns it and must ``await engine.dispose()``.

    Raises:
        ReqscopeError: the URL is malformed, names in-memory SQLite, or its driver is not
            installed (the message names the extra to install); ``reset_session`` or
            ``pooler`` on a database other than PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ReqscopeError(
            f"cannot parse database URL {url!r}: {exc}; expected e.g. "
            "'postgresql+asyncpg://user@host/db'"
        ) from None
    refuse_memory_sqlite(parsed)
    config = pool or PoolConfig.standard()
    if config.reset_session and parsed.get_backend_name() != "postgresql":
        raise ReqscopeError(
            f"PoolConfig(reset_session=True) resets PostgreSQL sessions; {parsed.drivername!r} "
            "is not PostgreSQL: leave reset_session off there"
        )
    if config.pooler is not None and parsed.get_backend_name() != "postgresql":
        raise ReqscopeError(
            f"PoolConfig(pooler={config.pooler!r}) is for PostgreSQL behind {config.pooler}; "
            f"{parsed.drivername!r} is not PostgreSQL: leave pooler unset there"
        )
    pooler = resolve_pooler(parsed, config.pooler)
    if pooler is not None and config.reset_session:
        raise ReqscopeError(
            "PoolConfig(reset_session=True) resets a server connection that a pooler in "
            f"transaction mode hands to other clients between transactions; behind {pooler} "
            "(declared by PoolConfig(pooler=...) or REQSCOPE_POOLER) leave it off: the pooler "
            "resets server connections itself (PgBouncer's server_reset_query)"
        )
    kwargs: dict[str, Any] = {
        "poolclass": fair_pool_class(),
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "pool_timeout": config.pool_timeout,
        "pool_recycle": config.pool_recycle,
        "connect_args": connect_args(parsed, config.connect_timeout, pooler),
    }
    # pool_pre_ping in engine_kwargs asks for SQLAlchemy's own, unbounded ping
    bounded_ping = config.pool_pre_ping and "pool_pre_ping" not in engine_kwargs
    # connect_args of the caller's are added to reqscope's, each of theirs winning
    engine_kwargs = {
        **engine_kwargs,
        "connect_args": {**kwargs["connect_args"], **engine_kwargs.get("connect_args", {})},
    }
    kwargs.update(engine_kwargs)
    try:
        engine = create_async_engine(parsed, **kwargs)
    except ModuleNotFoundError as exc:
        raise ReqscopeError(
            f"the driver for {parsed.drivername!r} is not installed ({exc.name}); "
            f"install it with: {_install_hint(parsed, exc.name)}"
        ) from None
    except Exception as exc:  # an unknown dialect is an ArgumentError/NoSuchModuleError
        raise ReqscopeError(f"cannot create an engine for {parsed.drivername!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    if bounded_ping:
        _bounded_pre_ping(engine, config.connect_timeout)
    if config.reset_session:
        event.listen(engine.sync_engine, "reset", _reset_session)
    remember_max_overflow(engine.pool, kwargs["max_overflow"])
    return engine


_EXTRAS: Final = {
    "asyncpg": "postgres",
    "psycopg": "psycopg",
    "psycopg_async": "psycopg",
    "asyncmy": "mysql",
    "aiosqlite": "sqlite",
}


def _install_hint(url: URL, module: str | None) -> str:
    extra = _EXTRAS.get(_driver(url))
    if extra is not None:
        return f"pip install 'reqscope[{extra}]'"
    return f"pip install {module or _driver(url)}"
