"""Transactions that retry: run a function in a fresh session, and again after a conflict.

:meth:`IsolatedSessionFactory.run_in_transaction` delegates here. A serialization failure
or a deadlock (SQLSTATE ``40001`` / ``40P01``; MySQL and MariaDB error 1213) means the
server rolled the transaction back because a concurrent one won: running the same work
again, in a new session and a new transaction, is the documented remedy. Any other error
is the caller's and is raised at once.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
from sqlalchemy import exc as sa_exc

from reqscope._logging import get_logger
from reqscope.exceptions import TransactionConflictError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession

    from reqscope._registry import SessionRegistry
    from reqscope._scope import SessionScope

__all__ = ["is_transaction_conflict", "retry_transaction"]

logger = get_logger(__name__)

T = TypeVar("T")

# serialization_failure and deadlock_detected (PostgreSQL; MySQL reports 1213 as 40001)
CONFLICT_SQLSTATES: Final = frozenset({"40001", "40P01"})
# ER_LOCK_DEADLOCK: a deadlock, or a SERIALIZABLE conflict InnoDB resolved as one
CONFLICT_MYSQL_CODES: Final = frozenset({1213})


def is_transaction_conflict(error: BaseException) -> bool:
    """True when the server rolled ``error``'s transaction back for a concurrent one.

    A serialization failure or a deadlock: the work is sound, its timing lost. Read from
    the driver's error under SQLAlchemy's ``DBAPIError`` (``sqlstate`` on asyncpg and
    psycopg, the error code on MySQL drivers).
    """
    if not isinstance(error, sa_exc.DBAPIError) or error.orig is None:
        return False
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in CONFLICT_SQLSTATES
    args: tuple[object, ...] = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in CONFLICT_MYSQL_CODES


def backoff_delay(retry: int, backoff: float, max_backoff: float) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): full jitter, capped.

    A uniform draw below ``backoff * 2 ** (retry - 1)`` (at most ``max_backoff``), so that
    the transactions that collided do not collide again in step.
    """
    return random.uniform(0.0, min(max_backoff, backoff * 2 ** (retry - 1)))  # noqa: S311 - jitter, not a secret


async def retry_transaction(
    begin: Callable[[], SessionScope],
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    retries: int,
    isolation_level: str | None,
    backoff: float,
    max_backoff: float,
    registry: SessionRegistry,
) -> T:
    """Run ``fn`` in ``begin()``'s session; on a conflict, in a new one, up to ``retries`` more.

    Raises:
        TransactionConflictError: every attempt conflicted (the last error is its cause).
    """
    retry = 0
    while True:
        try:
            async with begin() as session:
                if isolation_level is not None:
                    # before the transaction's first statement: applies to this one only
                    await session.connection(execution_options={"isolation_level": isolation_level})
                return await fn(session)
        except sa_exc.DBAPIError as error:  # noqa: PERF203 - retrying is the point
            if not is_transaction_conflict(error):
                raise
            if retry >= retries:
                registry.transaction_conflicts_exhausted += 1
                raise TransactionConflictError(
                    f"the transaction conflicted with concurrent ones {retry + 1} time(s) in a "
                    f"row ({type(error.orig).__name__}: {str(error.orig).strip()}); give "
                    "run_in_transaction() more retries, or make the transactions touch fewer "
                    "shared rows",
                    attempts=retry + 1,
                ) from error
            retry += 1
            registry.transaction_retries += 1
            delay = backoff_delay(retry, backoff, max_backoff)
            logger.info(
                "reqscope: transaction conflict (%s); retry %d of %d in %.3f s",
                type(error.orig).__name__,
                retry,
                retries,
                delay,
            )
            await anyio.sleep(delay)
