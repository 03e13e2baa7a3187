"""What the broker tests share: 50 users' jobs, a ledger on PostgreSQL, and its checks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

TOTAL = 5000


def user_of(n: int) -> str:
    return f"user-{n % 50}"


def poisoned(n: int) -> bool:
    """5 % of the jobs: their handler raises."""
    return n % 20 == 0


def without_context(n: int) -> bool:
    """1 % of the jobs: published with no context at all."""
    return n % 100 == 1


def insert_sql(table: str) -> str:
    return (
        f"INSERT INTO {table} (message, user_id, session_owner) VALUES (:n, :user, :owner) "
        "ON CONFLICT (message) DO NOTHING"  # idempotent: a redelivered job counts once
    )


async def reset(pg_url: str, table: str, *, create: bool = True) -> None:
    engine = create_async_engine(pg_url, poolclass=NullPool)
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        if create:
            await conn.execute(
                text(
                    f"CREATE TABLE {table} (message integer PRIMARY KEY, user_id text NOT NULL, "
                    "session_owner text NOT NULL)"
                )
            )
    await engine.dispose()


async def rows(pg_url: str, table: str) -> list[tuple[int, str, str]]:
    engine = create_async_engine(pg_url, poolclass=NullPool)
    async with engine.connect() as conn:
        result = [tuple(row) for row in await conn.execute(text(f"SELECT * FROM {table}"))]
    await engine.dispose()
    return result  # type: ignore[return-value]


async def check_five_thousand(stats: Any, pg_url: str, table: str) -> int:
    """Counts and ledger of a run over ``TOTAL`` jobs; returns how many must be dead letters."""
    failed = sum(1 for n in range(TOTAL) if poisoned(n))
    rejected = sum(1 for n in range(TOTAL) if without_context(n))
    assert (stats.processed, stats.failed, stats.rejected) == (
        TOTAL - failed - rejected,
        failed,
        rejected,
    )
    ledger = await rows(pg_url, table)
    assert len(ledger) == stats.processed
    assert all(user == user_of(n) == owner for n, user, owner in ledger)  # own user, session
    return failed + rejected
