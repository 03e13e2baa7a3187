"""Read replicas on a real PostgreSQL streaming replica (``.ci/run`` makes one on :5433).

Routing, read-your-writes, replay lag (paused with ``pg_wal_replay_pause()``) and a replica
that stops and comes back. ``REQSCOPE_TEST_REPLICA_URL`` names the replica;
``REQSCOPE_TEST_REPLICA_PG_CTL`` (pg_ctl with its data directory) lets the suite stop it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from conftest import REQUIRE_SERVICES, server_url
from reqscope import (
    DatabaseUnavailableError,
    IsolatedSessionFactory,
    IsolationViolation,
    PoolConfig,
    UserExecutionContext,
    use_context,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(name="urls")
def _urls() -> tuple[str, str]:
    return server_url("postgres-asyncpg"), server_url("postgres-replica")


@pytest.fixture(name="standby")
async def _standby(urls: tuple[str, str]) -> AsyncIterator[AsyncEngine]:
    """A plain engine on the replica, for what the test does to the replica itself."""
    engine = create_async_engine(urls[1], isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        async with engine.connect() as conn:  # never leave replay paused for later tests
            await conn.execute(sa.text("SELECT pg_wal_replay_resume()"))
        await engine.dispose()


@pytest.fixture(name="table")
async def _table(urls: tuple[str, str], standby: AsyncEngine) -> AsyncIterator[sa.Table]:
    """A table of its own on the primary, once the replica has replayed its creation."""
    table = sa.Table(
        f"replica_items_{uuid.uuid4().hex[:12]}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(32), nullable=False),
    )
    primary = create_async_engine(urls[0])
    async with primary.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    await _until(lambda: _replica_sees(standby, table.name))
    try:
        yield table
    finally:
        async with primary.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)
        await primary.dispose()


async def _replica_sees(standby: AsyncEngine, name: str) -> bool:
    async with standby.connect() as conn:
        found = await conn.execute(sa.text("SELECT to_regclass(:name)"), {"name": name})
        return found.scalar_one() is not None


async def _until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            result = condition()
            if hasattr(result, "__await__"):
                result = await result  # type: ignore[misc]
            if result:
                return
            await anyio.sleep(0.05)


async def _on_standby(session: AsyncSession) -> bool:
    return bool((await session.execute(sa.text("SELECT pg_is_in_recovery()"))).scalar_one())


def _request(user: str = "alice") -> UserExecutionContext:
    return UserExecutionContext.create(user)


@pytest.fixture(name="factory")
async def _factory(urls: tuple[str, str]) -> AsyncIterator[IsolatedSessionFactory]:
    primary, replica = urls
    async with IsolatedSessionFactory(
        primary,
        replicas=[replica],
        pool=PoolConfig(pool_size=3, max_overflow=0, pool_timeout=10),
        replica_max_lag=0.5,
        replica_check_interval=0.05,
    ) as factory:
        yield factory
    metrics = factory.metrics()
    assert metrics.active_sessions == 0


async def test_reads_go_to_the_standby_and_writes_to_the_primary(factory, table) -> None:
    async with factory.begin(_request()) as session:
        assert not await _on_standby(session)
        await session.execute(sa.insert(table).values(id=1, owner="alice"))
    (status,) = factory.replica_status()
    assert status.available
    assert status.lag_seconds is not None
    assert status.lag_seconds <= 0.5
    reader = _request("bob")
    async with factory.session(reader, read_only=True) as session:
        assert await _on_standby(session)
        # a standby refuses writes: the routing cannot send one there unnoticed
        with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
            await session.execute(sa.insert(table).values(id=2, owner="bob"))
    assert factory.metrics().replica_sessions == 1


async def test_isolation_holds_on_the_standby(factory, alice, bob) -> None:
    async with factory.session(alice, read_only=True) as session:
        assert await _on_standby(session)
        assert session.info["user_id"] == "alice"
        with use_context(bob), pytest.raises(IsolationViolation, match="alice"):
            await session.execute(sa.text("SELECT 1"))
    assert factory.metrics().isolation_violations == 1
    stats = factory.pool_stats()
    assert stats is not None
    assert stats.checked_out == 0


async def test_a_request_reads_its_own_writes_on_the_primary(factory, table, standby) -> None:
    request = _request()
    async with standby.connect() as conn:  # the replica must not catch up in time by luck
        await conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
    async with factory.begin(request) as session:
        await session.execute(sa.insert(table).values(id=1, owner="alice"))
    async with factory.session(request.child("summary"), read_only=True) as session:
        assert not await _on_standby(session)
        owners = (await session.execute(sa.select(table.c.owner))).scalars().all()
        assert owners == ["alice"]
    assert factory.metrics().sticky_reads == 1


async def test_a_lagging_standby_is_skipped_until_it_catches_up(factory, table, standby) -> None:
    async with standby.connect() as conn:
        await conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
    async with factory.begin(_request()) as session:  # WAL the standby receives, not replays
        await session.execute(sa.insert(table).values(id=1, owner="alice"))
    await _until(lambda: not factory.replica_status()[0].available)
    (status,) = factory.replica_status()
    assert "behind" in (status.reason or "")
    async with factory.session(_request("bob"), read_only=True) as session:
        assert not await _on_standby(session)
    assert factory.metrics().replica_fallbacks >= 1
    async with standby.connect() as conn:
        await conn.execute(sa.text("SELECT pg_wal_replay_resume()"))
    await _until(lambda: factory.replica_status()[0].available)
    async with factory.session(_request("bob"), read_only=True) as session:
        assert await _on_standby(session)
        assert (await session.execute(sa.select(table.c.owner))).scalars().all() == ["alice"]


def _pg_ctl(*args: str) -> None:
    command = os.environ.get("REQSCOPE_TEST_REPLICA_PG_CTL")
    if not command:
        if REQUIRE_SERVICES:
            pytest.fail("REQSCOPE_TEST_REPLICA_PG_CTL is not set but REQSCOPE_REQUIRE_SERVICES=1")
        pytest.skip("stops the replica: set REQSCOPE_TEST_REPLICA_PG_CTL (CI does)")
    subprocess.run([*shlex.split(command), *args], check=True, capture_output=True, timeout=60)  # noqa: S603


async def test_a_stopped_standby_is_skipped_and_used_again_when_back(factory, alice) -> None:
    async with factory.session(_request(), read_only=True) as session:
        assert await _on_standby(session)
    _pg_ctl("stop", "-m", "fast", "-w")
    try:
        # a read that reached the standby as it went down fails with a library error
        # (or goes to the primary once a check noticed): nothing hangs, nothing leaks
        try:
            async with factory.session(alice, read_only=True) as session:
                await _on_standby(session)
        except DatabaseUnavailableError:
            pass
        await _until(lambda: not factory.replica_status()[0].available)
        async with factory.session(_request("bob"), read_only=True) as session:
            assert not await _on_standby(session)
        assert factory.metrics().replica_fallbacks >= 1
        assert factory.circuit_breaker.state.value == "closed"  # the primary's breaker
    finally:
        _pg_ctl("start", "-w")
    await _until(lambda: factory.replica_status()[0].available, timeout=60)
    async with factory.session(_request("carol"), read_only=True) as session:
        assert await _on_standby(session)
