"""Pool configuration, engine construction and pool statistics."""

from __future__ import annotations

import asyncio
import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import Pool

from reqscope.exceptions import ReqscopeError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["PoolConfig", "PoolStats", "build_engine", "pool_stats"]

DEFAULT_CONNECT_TIMEOUT: Final = 5.0
SQLITE_BUSY_TIMEOUT_MS: Final = 5_000


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Connection pool settings for :func:`build_engine`.

    Args:
        pool_size: connections kept open.
        max_overflow: extra connections opened under load and closed when returned.
        pool_timeout: seconds a request waits for a free connection before
            :class:`~reqscope.exceptions.PoolExhaustedError`.
        pool_recycle: seconds after which a connection is replaced (server idle timeouts).
        pool_pre_ping: test each connection on checkout (survives server restarts).
        connect_timeout: seconds to establish a new connection; bounded so that an
            unreachable server fails every request quickly and the circuit breaker can trip.
    """

    pool_size: int = 10
    max_overflow: int = 15
    pool_timeout: float = 5.0
    pool_recycle: int = 1800
    pool_pre_ping: bool = True
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __post_init__(self) -> None:
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
    """A snapshot of a connection pool (``checked_out`` is what requests hold right now)."""

    size: int
    checked_in: int
    checked_out: int
    overflow: int
    capacity: int

    def to_dict(self) -> dict[str, int]:
        """Return the snapshot as JSON-safe data."""
        return {
            "size": self.size,
            "checked_in": self.checked_in,
            "checked_out": self.checked_out,
            "overflow": self.overflow,
            "capacity": self.capacity,
        }

    def __str__(self) -> str:
        return (
            f"size={self.size}, checked_out={self.checked_out}, checked_in={self.checked_in}, "
            f"overflow={self.overflow}, capacity={self.capacity}"
        )


def pool_stats(pool: Pool) -> PoolStats | None:
    """Return a snapshot of ``pool``, or ``None`` for pools that do not count (NullPool)."""
    size = getattr(pool, "size", None)
    if size is None:
        return None
    max_overflow = getattr(pool, "_max_overflow", 0)
    return PoolStats(
        size=pool.size(),  # type: ignore[attr-defined]  # QueuePool and its async variant
        checked_in=pool.checkedin(),  # type: ignore[attr-defined]
        checked_out=pool.checkedout(),  # type: ignore[attr-defined]
        overflow=max(0, pool.overflow()),  # type: ignore[attr-defined]
        capacity=pool.size() + max(0, max_overflow),  # type: ignore[attr-defined]
    )


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


def _connect_args(url: URL, timeout: float) -> dict[str, Any]:
    driver = _driver(url)
    if driver == "asyncpg":
        return {"timeout": timeout}
    if driver in {"psycopg", "psycopg_async"}:
        return {"connect_timeout": max(1, round(timeout))}
    if driver in {"asyncmy", "aiomysql"}:
        # Their connect_timeout covers the TCP connect, not the handshake with a server
        # that accepts and never answers: bound the whole connect.
        return {"connect_timeout": timeout, "async_creator_fn": _bounded_connect(driver, timeout)}
    if driver == "aiosqlite":
        args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        stop_once = _aiosqlite_stop_once()
        if stop_once is not None:
            args["async_creator_fn"] = stop_once
        return args
    return {}


@functools.cache
def _aiosqlite_stop_once() -> Callable[..., Any] | None:
    """``aiosqlite.connect`` whose connections tell their worker thread to stop only once.

    When a statement is cancelled while SQLite busy-waits, SQLAlchemy starts a graceful
    ``close()`` in a task of its own and, cancelled again, force-stops the worker thread.
    aiosqlite's ``close()`` then queues a second stop on the exited thread and awaits it
    forever: a task that never ends, and an event loop that cannot shut down. Here a
    second ``stop()`` returns nothing to wait for.
    """
    try:
        import sqlite3  # noqa: PLC0415 - some Python builds lack it

        import aiosqlite  # noqa: PLC0415 - an optional extra
    except ImportError:
        return None
    if not hasattr(aiosqlite.Connection, "stop"):  # before 0.22: no force-stop, no race
        return None

    class StopOnceConnection(aiosqlite.Connection):
        def stop(self) -> asyncio.Future[Any] | None:
            if not self._running:  # a stop is already queued; the thread ends after it
                return None
            return super().stop()

    def connect(database: Any, *, iter_chunk_size: int = 64, **kwargs: Any) -> Any:
        location = database.decode() if isinstance(database, bytes) else str(database)
        connection = StopOnceConnection(
            functools.partial(sqlite3.connect, location, **kwargs), iter_chunk_size
        )
        thread = getattr(connection, "_thread", None)
        if thread is not None:  # as SQLAlchemy does: never keep the process alive
            thread.daemon = True
        return connection

    return connect


def _bounded_connect(driver: str, timeout: float) -> Callable[..., Awaitable[Any]]:
    """The driver's ``connect`` (through SQLAlchemy's ``async_creator_fn``), time-bounded."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        module = importlib.import_module(driver)
        return await asyncio.wait_for(module.connect(*args, **kwargs), timeout)

    return connect


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
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
            (and win over the pool settings).

    Returns:
        A new engine; the caller owns it and must ``await engine.dispose()``.

    Raises:
        ReqscopeError: the URL is malformed, names in-memory SQLite, or its driver is not
            installed (the message names the extra to install).
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
    kwargs: dict[str, Any] = {
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "pool_timeout": config.pool_timeout,
        "pool_recycle": config.pool_recycle,
        "pool_pre_ping": config.pool_pre_ping,
        "connect_args": _connect_args(parsed, config.connect_timeout),
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
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
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
