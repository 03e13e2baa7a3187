"""PoolConfig, pool_stats and the pool-capacity fallback."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from reqscope import PoolConfig, _compat, build_engine
from reqscope._pool import pool_stats

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pool_size": 0}, "pool_size must be >= 1"),
        ({"max_overflow": -1}, "max_overflow must be >= 0"),
        ({"pool_timeout": 0}, "must be positive"),
        ({"connect_timeout": -1.0}, "must be positive"),
    ],
)
def test_bad_pool_settings_are_refused(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        PoolConfig(**settings)


def test_presets_and_capacity() -> None:
    assert PoolConfig.standard().capacity == 25
    assert PoolConfig.high_performance().capacity == 40
    assert PoolConfig(pool_size=3, max_overflow=2).capacity == 5


async def test_a_pool_that_does_not_count_has_no_stats(tmp_path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", poolclass=NullPool)
    try:
        assert pool_stats(engine.pool) is None
    finally:
        await engine.dispose()


async def test_capacity_of_a_pool_reqscope_did_not_make(tmp_path, monkeypatch) -> None:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", pool_size=2, max_overflow=3
    )
    try:
        stats = pool_stats(engine.pool)
        assert stats is not None
        assert stats.capacity == 5  # read from SQLAlchemy's pool
        # Without SQLAlchemy's internals and no record of how it was made: the overflow in
        # use now, a lower bound.
        monkeypatch.setattr(_compat, "FALLBACKS_FORCED", True)
        stats = pool_stats(engine.pool)
        assert stats is not None
        assert stats.capacity == 2
    finally:
        await engine.dispose()


async def test_capacity_of_a_pool_build_engine_made_survives_the_fallback(
    tmp_path, monkeypatch
) -> None:
    engine = build_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", pool=PoolConfig(pool_size=2, max_overflow=3)
    )
    try:
        monkeypatch.setattr(_compat, "FALLBACKS_FORCED", True)
        assert _compat.pool_max_overflow(engine.pool) == 3  # recorded by build_engine
        stats = pool_stats(engine.pool)
        assert stats is not None
        assert stats.capacity == 5
    finally:
        await engine.dispose()


def test_without_anyio_task_records_every_task_counts_as_cancellable(monkeypatch) -> None:
    monkeypatch.setattr(_compat, "_TASK_STATES", None)
    assert _compat.anyio_may_cancel(object()) is True  # type: ignore[arg-type]
