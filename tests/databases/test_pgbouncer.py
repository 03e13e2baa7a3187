"""PostgreSQL behind a real PgBouncer in transaction mode (``REQSCOPE_TEST_PGBOUNCER_URL``).

Consecutive transactions of one client connection run on different server connections, so
whatever a driver leaves on a server connection (a named prepared statement) meets other
clients. The whole PostgreSQL suite also runs a second time through PgBouncer in
``.ci/run``; these tests show what the ``pooler`` setting changes.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conftest import server_url
from reqscope import IsolatedSessionFactory, PoolConfig, UserExecutionContext, build_engine

pytestmark = pytest.mark.anyio

STATEMENTS = ("SELECT 1", "SELECT 2 + :x", "SELECT pg_backend_pid()")


def _bouncer(driver: str) -> str:
    url = make_url(server_url("pgbouncer"))
    if driver == "psycopg":
        url = url.set(drivername="postgresql+psycopg", query={})
    return url.render_as_string(hide_password=False)


async def _busy(engine: AsyncEngine, requests: int = 200) -> list[BaseException]:
    """Many short transactions at once, each a few statements; the errors they raised."""

    async def one(i: int) -> None:
        async with engine.begin() as conn:
            for statement in STATEMENTS:
                await conn.execute(text(statement), {"x": i})

    results = await asyncio.gather(*(one(i) for i in range(requests)), return_exceptions=True)
    return [result for result in results if isinstance(result, BaseException)]


async def _prepared_during_a_transaction(engine: AsyncEngine) -> int:
    """How many statements one transaction left prepared on its server connection.

    Counted inside the transaction, which stays on one server connection: what other
    clients would meet there next.
    """
    count = text("SELECT count(*) FROM pg_prepared_statements")
    async with engine.begin() as conn:
        before = await conn.scalar(count)
        for i in range(8):  # psycopg prepares a statement from its 5th execution
            await conn.execute(text("SELECT 2 + :x"), {"x": i})
        after = await conn.scalar(count)
    return int(after or 0) - int(before or 0)


async def test_asyncpg_breaks_behind_pgbouncer_unless_the_pooler_is_declared() -> None:
    url = _bouncer("asyncpg")
    declared = build_engine(url, pool=PoolConfig(pool_size=20, max_overflow=0, pooler="pgbouncer"))
    try:
        assert await _busy(declared) == []
        assert await _prepared_during_a_transaction(declared) == 0
    finally:
        await declared.dispose()

    plain = create_async_engine(url, pool_size=20, max_overflow=0)
    try:
        assert await _prepared_during_a_transaction(plain) > 0
        errors = await _busy(plain)
    finally:
        await plain.dispose()
    assert errors, "asyncpg's named prepared statements should collide behind PgBouncer"
    assert all(isinstance(error, sa_exc.DBAPIError) for error in errors)
    assert any("prepared statement" in str(error) for error in errors)


async def test_psycopg_prepares_nothing_behind_a_declared_pooler() -> None:
    url = _bouncer("psycopg")
    plain = create_async_engine(url)
    declared = build_engine(url, pool=PoolConfig(pooler="pgbouncer"))
    try:
        assert await _prepared_during_a_transaction(declared) == 0
        assert await _prepared_during_a_transaction(plain) > 0
    finally:
        await plain.dispose()
        await declared.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_isolated_sessions_work_through_pgbouncer(driver) -> None:
    factory = IsolatedSessionFactory(
        _bouncer(driver), pool=PoolConfig(pool_size=10, max_overflow=0, pooler="pgbouncer")
    )
    async with factory:

        async def request(i: int) -> None:
            async with factory.begin(UserExecutionContext.create(f"user-{i % 7}")) as session:
                for statement in STATEMENTS:
                    await session.execute(text(statement), {"x": i})

        await asyncio.gather(*(request(i) for i in range(300)))
        metrics = factory.metrics()
        assert (metrics.sessions_opened, metrics.sessions_failed) == (300, 0)
        assert (await factory.health()).status == "ok"
