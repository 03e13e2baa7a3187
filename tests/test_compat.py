"""Each private internal reqscope relies on has a fallback; these tests run the fallbacks."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.pool import AsyncAdaptedQueuePool

from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    UserExecutionContext,
    _compat,
    _pool,
    build_engine,
)

pytestmark = pytest.mark.anyio


def test_build_engine_uses_the_fair_pool(tmp_path) -> None:
    engine = build_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}")
    assert type(engine.pool) is _compat.fair_pool_class()
    assert type(engine.pool) is not AsyncAdaptedQueuePool
    assert _compat.handoff_queue_of(engine.pool) is not None


async def test_without_sqlalchemy_queue_internals_the_pool_is_sqlalchemys_own(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(_compat, "_FAIR_POOL_CLASS", None)
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    pool = PoolConfig(pool_size=1, max_overflow=0, pool_timeout=5)
    async with IsolatedSessionFactory(url, pool=pool) as factory:
        assert type(factory.engine.pool) is AsyncAdaptedQueuePool
        assert _compat.handoff_queue_of(factory.engine.pool) is None
        for user in ("alice", "bob"):
            async with factory.session(UserExecutionContext.create(user)) as session:
                assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        stats = factory.metrics().pool
        assert stats is not None
        assert (stats.waiting, stats.waits, stats.wait_seconds) == (0, 0, 0.0)


def test_pool_pre_ping_in_engine_kwargs_keeps_sqlalchemys_own_ping(tmp_path) -> None:
    from sqlalchemy import event

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    bounded = build_engine(url)
    assert event.contains(bounded.sync_engine, "connect", _pool._mark_fresh)
    assert not bounded.pool._pre_ping  # reqscope's bounded ping replaces it
    own = build_engine(url, pool_pre_ping=True)
    assert not event.contains(own.sync_engine, "connect", _pool._mark_fresh)
    assert own.pool._pre_ping
