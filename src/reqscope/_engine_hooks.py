"""The event hooks a factory puts on its engine: connect errors, reclaimed and cancelled statements.

These concern the engine, not one session: a connect that fails (an outage, or a refused
login), a statement cut off by the leak detector's reclaim, a statement interrupted by
cancellation (whose server-side backend keeps running), and SQLite's "database is locked".
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

import anyio
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from reqscope import _compat
from reqscope._breaker import is_configuration_error, is_connection_failure
from reqscope._enforcement import reclaimed_error
from reqscope._logging import get_logger
from reqscope._pool import connect_args
from reqscope.exceptions import (
    DatabaseBusyError,
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    ReqscopeError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from reqscope._keeper import SessionKeeper

__all__ = ["EngineHooks"]

logger = get_logger(__name__)

_PID_KEY: Final = "reqscope.backend_pid"
_CANCEL_KEY: Final = "reqscope.cancel_key"  # psycopg behind a pooler: its PGcancel


class EngineHooks:
    """A factory's listeners on its engine; :meth:`install` and :meth:`remove` them."""

    def __init__(self, keeper: SessionKeeper) -> None:
        self._keeper = keeper
        self._engine = keeper.engine
        self._timeout = keeper.cleanup.timeout
        self._control_engine: AsyncEngine | None = None  # for pg_cancel_backend

    def install(self) -> None:
        """Listen on the engine (again, after :meth:`remove`)."""
        self._listen(event.listen)

    def remove(self) -> None:
        """Stop listening on the engine."""
        self._listen(event.remove)

    def _listen(self, how: Callable[..., None]) -> None:
        engine = self._engine.sync_engine
        if self._engine.dialect.name == "sqlite":
            how(engine, "handle_error", _sqlite_busy)
            how(engine, "handle_error", _sqlite_refused_commit)
        how(engine, "handle_error", self._reclaimed_statement)
        how(engine, "do_connect", self._connect)
        if self._engine.dialect.name == "postgresql":
            # Behind a pooler in transaction mode a connection's server backend changes
            # between transactions (PgBouncer reports a pid of its own): never cancel by
            # pid there, send the pooler a CancelRequest.
            if self._keeper.pooler is None:
                how(engine, "connect", _remember_backend_pid)
            else:
                how(engine, "connect", _remember_cancel_key)
            how(engine, "handle_error", self._stop_cancelled_statement)

    async def aclose(self) -> None:
        """Dispose of the connection kept for cancelling server-side statements."""
        engine, self._control_engine = self._control_engine, None
        if engine is not None:
            with anyio.move_on_after(self._timeout):
                await engine.dispose()

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
            url = self._engine.url.render_as_string(hide_password=True)
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
                f"running and reachable (after {self._keeper.breaker.failure_threshold} "
                "consecutive failures the circuit opens and requests fail fast)"
            ) from error

    def _reclaimed_statement(self, context: Any) -> BaseException | None:
        """``handle_error`` hook: a statement cut off by the leak detector's reclaim.

        Reclaiming invalidates the connection under a statement that may still be running;
        the driver's error for that ("canceling statement due to user request", "connection
        closed") is raised as :class:`SessionReclaimedError`, which says why.
        """
        entry = self._keeper.reclaimed_on(context.connection) if context.connection else None
        return None if entry is None else reclaimed_error(entry, "execute")

    def _stop_cancelled_statement(self, context: Any) -> None:
        """Cancel the server-side statement of a statement interrupted by cancellation.

        A cancelled client stops waiting, but PostgreSQL keeps running the statement and
        holding its locks; SQLAlchemy then invalidates the connection and the pool hands the
        slot to the next request, so busy server backends would outnumber the pool. This
        ``handle_error`` hook runs inside SQLAlchemy's greenlet *before* that invalidation,
        so it can await ``pg_cancel_backend`` (shielded, bounded) on a connection of its own.
        """
        # A handle_error hook that raises replaces the original exception, which would
        # turn a cancellation into an ordinary error: this hook must never raise.
        original = context.original_exception
        if isinstance(original, Exception) or context.connection is None:
            return  # only exit exceptions: cancellation, KeyboardInterrupt
        try:
            info = context.connection.info
        except NotImplementedError:  # cancelled while connecting: nothing runs on the server
            return
        pid = info.get(_PID_KEY)
        if pid is None and self._keeper.pooler is None:
            return
        try:
            with anyio.CancelScope(shield=True):  # noqa: ASYNC100 - await_only awaits inside
                if pid is not None:
                    await_only(self._cancel_backend(pid))
                else:
                    await_only(
                        self._cancel_through_pooler(context.connection, info.get(_CANCEL_KEY))
                    )
        except Exception as error:  # a cancellation is not an error: say so, at WARNING
            logger.warning(
                "reqscope: could not cancel the server-side statement of a cancelled request "
                "(backend %s): %s: %s; the server stops it when the connection closes",
                pid if pid is not None else f"behind {self._keeper.pooler}",
                type(error).__name__,
                error,
            )

    async def _cancel_through_pooler(self, connection: Any, cancel_key: Any) -> None:
        """Cancel the statement with a CancelRequest, which the pooler forwards.

        asyncpg sends one by itself when a statement's task is cancelled: wait for it to be
        sent and answered (the force-close that follows would abort it). With psycopg, send
        one with the cancel key noted at connect (psycopg may have closed the connection
        by now), from a worker thread: libpq's cancel blocks.
        """
        with anyio.fail_after(self._timeout):
            if cancel_key is not None:  # psycopg
                await anyio.to_thread.run_sync(cancel_key.cancel)
                return
            await asyncio.sleep(0)  # asyncpg starts its CancelRequest from a callback
            sending = _compat.asyncpg_cancellations(connection.connection.driver_connection)
            if sending:
                await asyncio.wait(sending)

    async def _cancel_backend(self, pid: int) -> None:
        if self._control_engine is None:
            url = self._engine.url
            self._control_engine = create_async_engine(
                url,
                pool_size=1,
                max_overflow=4,
                pool_timeout=self._timeout,
                connect_args=connect_args(url, self._timeout),
            )
        with anyio.fail_after(self._timeout):
            async with self._control_engine.connect() as conn:
                await conn.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})


def _sqlite_busy(context: Any) -> BaseException | None:
    """``handle_error`` hook: SQLite's "database is locked" as :class:`DatabaseBusyError`."""
    original = context.original_exception
    if "database is locked" in str(original) and context.dialect.name == "sqlite":
        return DatabaseBusyError(
            "SQLite reported 'database is locked': another transaction held the write lock "
            "past the busy timeout; keep write transactions short, retry, or use a server "
            "database for concurrent writers"
        )
    return None


def _sqlite_refused_commit(context: Any) -> None:
    """``handle_error`` hook: end the transaction of a COMMIT that SQLite refused.

    SQLite keeps a transaction open after refusing its COMMIT (a deferred foreign key, say),
    while SQLAlchemy takes the failed COMMIT as the end of the transaction and skips its
    rollback when the connection goes back to the pool: the next request on that connection
    would run inside the refused transaction and see (or commit) its rows. A failure of a
    transaction-level operation (no statement) that leaves SQLite inside a transaction is
    rolled back here, at once. The original error propagates unchanged.
    """
    if context.statement is not None or context.connection is None:
        return
    try:
        dbapi_connection = context.connection.connection.dbapi_connection
        if getattr(dbapi_connection.driver_connection, "in_transaction", False):
            dbapi_connection.rollback()
    except Exception:  # a handle_error hook must not replace the original error
        logger.warning(
            "reqscope: could not roll back the transaction SQLite kept open after a failed "
            "COMMIT; its connection is invalidated instead",
            exc_info=True,
        )
        context.connection.invalidate()


def _remember_cancel_key(_dbapi_connection: object, record: Any) -> None:
    """``connect`` listener behind a pooler: note psycopg's cancel key (libpq's PGcancel).

    The pooler hands the client a key of its own and forwards a CancelRequest bearing it
    to the server connection that runs the client's statement at that moment.
    """
    pgconn = getattr(record.driver_connection, "pgconn", None)
    if pgconn is not None:
        record.info[_CANCEL_KEY] = pgconn.get_cancel()


def _remember_backend_pid(_dbapi_connection: object, record: Any) -> None:
    """``connect`` listener: note the PostgreSQL backend pid of each new connection.

    Read once per physical connection (no I/O), so that a cancelled statement can still be
    cancelled server-side after the driver has closed its end.
    """
    driver = record.driver_connection
    get_pid = getattr(driver, "get_server_pid", None)  # asyncpg
    pid = (
        get_pid()
        if get_pid is not None
        else getattr(getattr(driver, "info", None), "backend_pid", None)
    )
    if pid:
        record.info[_PID_KEY] = int(pid)
