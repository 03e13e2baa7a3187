from __future__ import annotations

import logging
import time

import anyio
import pytest
from sqlalchemy import text

from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    SessionReclaimedError,
    SessionScopeError,
    UserExecutionContext,
)
from reqscope._registry import Entry, SessionRegistry

pytestmark = pytest.mark.anyio


async def test_a_leak_is_logged_reclaimed_and_poisoned(database, alice, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="reqscope")
    async with IsolatedSessionFactory(
        database.url,
        pool=PoolConfig(pool_size=1, max_overflow=0, pool_timeout=1.0),
        max_session_lifetime=0.05,
        leak_check_interval=0,
        capture_stacks=True,
    ) as factory:
        async with factory.session(alice) as session:
            await session.execute(text("SELECT 1"))
            await anyio.sleep(0.1)
            reports = await factory.leak_detector.ascan()
            assert len(reports) == 1
            report = reports[0]
            assert report.reclaimed
            assert report.user_id == "alice"
            assert report.request_id == alice.request_id
            assert report.age >= 0.05
            assert report.stack is not None
            assert "test_a_leak_is_logged_reclaimed_and_poisoned" in report.stack
            # the pool slot is free again: another request gets the only connection
            assert factory.metrics().pool.checked_out == 0
            async with factory.session(UserExecutionContext.create("bob")) as other:
                assert (await other.execute(text("SELECT 1"))).scalar_one() == 1
            with pytest.raises(SessionReclaimedError, match="reclaimed"):
                await session.execute(text("SELECT 1"))
            with pytest.raises(SessionScopeError):  # a SessionReclaimedError is one
                await session.execute(text("SELECT 1"))
            # reclaimed is closed (its connection is gone), though its block has not ended
            assert (factory.metrics().sessions_opened, factory.metrics().sessions_closed) == (2, 2)
        metrics = factory.metrics()
        assert (metrics.sessions_opened, metrics.sessions_closed) == (2, 2)  # not counted twice
        assert metrics.leaks_detected == 1
        assert metrics.leaks_reclaimed == 1
        assert metrics.active_sessions == 0
        assert metrics.pool.checked_out == 0
        assert factory.leak_detector.scan() == []
    record = next(r for r in caplog.records if "past its" in r.getMessage())
    assert record.levelno == logging.ERROR
    assert record.user_id == "alice"
    assert record.session_id == report.session_id
    assert "Opened at" in record.getMessage()


async def test_unreclaimed_leak_logs_a_follow_up_when_it_closes(database, alice, caplog) -> None:
    caplog.set_level(logging.INFO, logger="reqscope")
    async with IsolatedSessionFactory(
        database.url, max_session_lifetime=0.05, leak_check_interval=0, reclaim_leaks=False
    ) as factory:
        async with factory.session(alice) as session:
            await anyio.sleep(0.1)
            (report,) = factory.leak_detector.scan()
            assert not report.reclaimed
            assert report.stack is None
            assert factory.leak_detector.scan() == []  # reported once
            assert factory.metrics().active_sessions == 1
            assert factory.metrics().sessions_closed == 0  # a leak left open is open
            assert len(factory.active_sessions()) == 1
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        assert factory.metrics().active_sessions == 0
        assert factory.metrics().sessions_closed == 1
    follow_up = [r for r in caplog.records if "finally closed" in r.getMessage()]
    assert len(follow_up) == 1
    assert follow_up[0].held >= 0.1


async def test_max_lifetime_per_scope_is_not_a_leak(database, alice) -> None:
    async with IsolatedSessionFactory(
        database.url, max_session_lifetime=0.05, leak_check_interval=0
    ) as factory:
        async with factory.session(alice, max_lifetime=60) as streaming:
            async with factory.session(alice) as short:
                await anyio.sleep(0.1)
                reports = factory.leak_detector.scan()
                assert [r.session_id for r in reports] == [short.info["session_id"]]
            await streaming.execute(text("SELECT 1"))
        records = factory.active_sessions()
        assert records == ()


async def test_background_detector_runs_every_interval(database, alice) -> None:
    async with IsolatedSessionFactory(
        database.url, max_session_lifetime=0.05, leak_check_interval=0.02
    ) as factory:
        async with factory.session(alice) as session:
            with anyio.fail_after(5):
                while factory.metrics().leaks_reclaimed == 0:
                    await anyio.sleep(0.01)
            with pytest.raises(SessionReclaimedError):
                await session.execute(text("SELECT 1"))
        assert factory.leak_detector.passes > 0


async def test_active_sessions_records(factory, alice, bob) -> None:
    async with factory.session(alice), factory.session(bob):
        records = factory.active_sessions()
        assert [r.user_id for r in records] == ["alice", "bob"]
        assert records[0].age >= 0
        assert records[0].task_name
        assert records[0].max_lifetime == factory.max_session_lifetime
        assert factory.metrics().active_sessions == 2
    assert factory.active_sessions() == ()


def _entry(i: int, lifetime: float = 30.0) -> Entry:
    ctx = UserExecutionContext.create(f"user-{i}")
    return Entry(None, ctx, lifetime=lifetime)  # type: ignore[arg-type]  # no keeper: never checked


def test_scan_cost_does_not_grow_with_open_sessions() -> None:
    # O(expired), not O(open): with 10,000 live sessions a pass looks at one per bucket.
    registry = SessionRegistry()
    for i in range(10_000):
        registry.add(_entry(i))
    visited = 0
    for _ in registry.pop_expired(time.monotonic()):
        visited += 1
    assert visited == 0
    assert len(registry) == 10_000
    expired = _entry(-1, lifetime=0.0)
    registry.add(expired)
    assert list(registry.pop_expired(time.monotonic() + 0.001)) == [expired]
    assert len(registry) == 10_000


def test_registry_discard_and_buckets() -> None:
    registry = SessionRegistry()
    short, long_ = _entry(1, 1.0), _entry(2, 100.0)
    registry.add(short)
    registry.add(long_)
    assert registry.peak_active == 2
    registry.discard(short)
    registry.discard(short)  # idempotent
    registry.keep_reported(short)
    registry.discard(short)
    assert list(registry.entries()) == [long_]
    assert (registry.sessions_opened, registry.sessions_closed, len(registry)) == (2, 1, 1)


def test_an_empty_bucket_waits_for_the_next_scan() -> None:
    # A request does not pay for removing its lifetime's bucket: the leak scan drops it.
    registry = SessionRegistry()
    short, long_ = _entry(1, 1.0), _entry(2, 100.0)
    registry.add(short)
    registry.add(long_)
    registry.discard(short)
    assert sorted(registry._buckets) == [1.0, 100.0]
    assert list(registry.pop_expired(time.monotonic())) == []
    assert sorted(registry._buckets) == [100.0]
    again = _entry(3, 1.0)
    registry.add(again)  # the lifetime comes back: a new bucket, scanned as before
    assert list(registry.pop_expired(time.monotonic() + 2)) == [again]
    assert (registry.sessions_opened, registry.sessions_closed, registry.peak_active) == (3, 2, 2)
    assert sorted(registry._buckets) == [100.0]
