"""Read replicas, routed on any database: which engine a session goes to, and when not.

SQLite files stand in for the primary and its replica (a marker table says which file a
session reads); the real streaming replica is tested in
``tests/databases/test_replicas_postgres.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import marked_sqlite
from reqscope import (
    IsolatedSessionFactory,
    IsolationViolation,
    ReqscopeError,
    SessionReclaimedError,
    UserExecutionContext,
    use_context,
)

pytestmark = pytest.mark.anyio


async def _where(session: sa.ext.asyncio.AsyncSession) -> str:
    return str((await session.execute(sa.text("SELECT name FROM whereami"))).scalar_one())


@pytest.fixture(name="urls")
async def _urls(tmp_path: Path) -> tuple[str, str]:
    return await marked_sqlite(tmp_path / "primary.db", "primary"), await marked_sqlite(
        tmp_path / "replica.db", "replica"
    )


@pytest.fixture(name="routed")
async def _routed(urls: tuple[str, str]) -> AsyncIterator[IsolatedSessionFactory]:
    primary, replica = urls
    async with IsolatedSessionFactory(primary, replicas=[replica]) as factory:
        yield factory
    assert factory.metrics().active_sessions == 0


def _request(user: str = "alice") -> UserExecutionContext:
    return UserExecutionContext.create(user)


async def test_read_only_sessions_go_to_the_replica_and_the_rest_to_the_primary(routed) -> None:
    async with routed.session(_request(), read_only=True) as session:
        assert await _where(session) == "replica"
    async with routed.session(_request()) as session:
        assert await _where(session) == "primary"
    metrics = routed.metrics()
    assert (metrics.replica_sessions, metrics.replica_fallbacks, metrics.sticky_reads) == (1, 0, 0)
    assert metrics.to_dict()["replica_sessions"] == 1
    (status,) = routed.replica_status()
    assert status.available
    assert status.reason is None
    assert status.checked_at is not None
    assert status.to_dict()["circuit_state"] == "closed"


async def test_a_request_that_used_the_primary_reads_its_own_writes(routed) -> None:
    request = _request()
    async with routed.begin(request) as session:
        await session.execute(sa.text("UPDATE whereami SET name = 'written'"))
    for ctx in (request, request.child("tool_call"), request.with_metadata(step=2)):
        async with routed.session(ctx, read_only=True) as session:
            assert await _where(session) == "written"  # the primary, with the request's write
    assert routed.metrics().sticky_reads == 3
    # another request of the same user is not held to the primary
    async with routed.session(_request(), read_only=True) as session:
        assert await _where(session) == "replica"


async def test_the_current_context_routes_when_none_is_given(routed) -> None:
    request = _request()
    with use_context(request):
        async with routed.session(read_only=True) as session:
            assert await _where(session) == "replica"
        async with routed.session():
            pass
        async with routed.session(read_only=True) as session:
            assert await _where(session) == "primary"


async def test_isolation_holds_on_the_replica(routed, alice, bob) -> None:
    async with routed.session(alice, read_only=True) as session:
        assert session.info["user_id"] == "alice"
        with use_context(bob), pytest.raises(IsolationViolation, match="alice"):
            await session.execute(sa.text("SELECT 1"))
    with pytest.raises(ReqscopeError, match="block ended"):
        await session.execute(sa.text("SELECT 1"))
    assert routed.metrics().isolation_violations == 1


async def test_a_leak_on_the_replica_is_reclaimed(urls, alice) -> None:
    primary, replica = urls
    async with IsolatedSessionFactory(
        primary, replicas=[replica], max_session_lifetime=0.05, leak_check_interval=0.01
    ) as factory:
        async with factory.session(alice, read_only=True) as session:
            assert await _where(session) == "replica"
            with anyio.fail_after(5):
                while factory.metrics().leaks_reclaimed == 0:
                    await anyio.sleep(0.01)
            with pytest.raises(SessionReclaimedError):
                await session.execute(sa.text("SELECT 1"))
        assert factory.metrics().active_sessions == 0


async def test_an_unreachable_replica_is_skipped_and_counted(tmp_path, urls, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="reqscope")
    primary, _ = urls
    gone = f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
    async with IsolatedSessionFactory(primary, replicas=[gone]) as factory:
        (status,) = factory.replica_status()
        assert not status.available
        assert "unable to open database file" in (status.reason or "")
        async with factory.session(_request(), read_only=True) as session:
            assert await _where(session) == "primary"
    assert factory.metrics().replica_fallbacks == 1
    assert any("is skipped" in record.getMessage() for record in caplog.records)


async def test_a_replica_whose_circuit_is_open_is_skipped(urls) -> None:
    primary, replica = urls
    async with IsolatedSessionFactory(primary, replicas=[replica]) as factory:
        breaker = factory._replicas.replicas[0].keeper.breaker
        for _ in range(breaker.failure_threshold):
            breaker.record_failure()
        (status,) = factory.replica_status()
        assert not status.available
        assert "circuit is open" in (status.reason or "")
        async with factory.session(_request(), read_only=True) as session:
            assert await _where(session) == "primary"
        assert factory.circuit_breaker.state.value == "closed"  # the primary's is its own


async def test_replicas_take_turns(tmp_path, urls) -> None:
    primary, first = urls
    second = await marked_sqlite(tmp_path / "second.db", "second")
    async with IsolatedSessionFactory(primary, replicas=[first, second]) as factory:
        seen = []
        for _ in range(4):
            async with factory.session(_request(), read_only=True) as session:
                seen.append(await _where(session))
    assert seen == ["replica", "second", "replica", "second"]


async def test_without_replicas_read_only_is_the_primary(urls) -> None:
    primary, _ = urls
    async with IsolatedSessionFactory(primary) as factory:
        async with factory.session(_request(), read_only=True) as session:
            assert await _where(session) == "primary"
        assert factory.replica_status() == ()
        assert factory.metrics().replica_fallbacks == 0


async def test_outer_transaction_keeps_reads_on_its_connection(routed) -> None:
    async with (
        routed.outer_transaction(),
        routed.session(_request(), read_only=True) as session,
    ):
        assert await _where(session) == "primary"


async def test_a_replica_engine_you_own_is_left_open(urls) -> None:
    primary, replica = urls
    engine = create_async_engine(replica)
    async with (
        IsolatedSessionFactory(primary, replicas=[engine]) as factory,
        factory.session(_request(), read_only=True) as session,
    ):
        assert await _where(session) == "replica"
    async with engine.connect() as conn:  # still usable: the factory did not dispose it
        assert (await conn.execute(sa.text("SELECT name FROM whereami"))).scalar_one() == "replica"
    await engine.dispose()


async def test_bad_replica_settings_are_refused(urls) -> None:
    primary, replica = urls
    with pytest.raises(ReqscopeError, match="same kind of database"):
        IsolatedSessionFactory(primary, replicas=["postgresql+asyncpg://u@127.0.0.1:1/db"])
    with pytest.raises(ValueError, match="replica_max_lag"):
        IsolatedSessionFactory(primary, replicas=[replica], replica_max_lag=0)
    with pytest.raises(ValueError, match="replica_check_interval"):
        IsolatedSessionFactory(primary, replicas=[replica], replica_check_interval=-1)
