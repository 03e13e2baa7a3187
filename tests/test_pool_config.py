"""PoolConfig, pool_stats and the pool-capacity fallback."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from reqscope import PoolConfig, ReqscopeError, _compat, build_engine
from reqscope._pool import pool_stats

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pool_size": 0}, "pool_size must be >= 1"),
        ({"max_overflow": -1}, "max_overflow must be >= 0"),
        ({"pool_timeout": 0}, "must be positive"),
        ({"connect_timeout": -1.0}, "must be positive"),
        ({"pooler": "odyssey"}, "pooler must be one of"),
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


PG = "postgresql+asyncpg://app@db.example/app"


class _CapturedError(Exception):
    pass


async def _connect_args(engine) -> dict:
    """What the engine passes to the driver's connect (captured, nothing connects)."""
    from sqlalchemy import event

    captured: dict = {}

    def capture(_dialect, _record, _cargs, cparams) -> None:
        captured.update(cparams)
        raise _CapturedError

    event.listen(engine.sync_engine, "do_connect", capture)
    with pytest.raises(_CapturedError):
        await engine.connect()
    return captured


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (PG, {"statement_cache_size": 0, "prepared_statement_cache_size": 0}),
        ("postgresql+psycopg://app@db.example/app", {"prepare_threshold": None}),
    ],
)
def test_a_declared_pooler_turns_prepared_statements_off(url, expected) -> None:
    from sqlalchemy.engine import make_url

    from reqscope._pool import connect_args

    args = connect_args(make_url(url), 5.0, "pgbouncer")
    for key, value in expected.items():
        assert args[key] == value
    if "asyncpg" in url:
        assert args["prepared_statement_name_func"]() == ""  # the unnamed statement
    plain = connect_args(make_url(url), 5.0)
    assert not set(expected) & set(plain)


def test_the_environment_declares_the_pooler_for_postgresql_only(monkeypatch, tmp_path) -> None:
    from sqlalchemy.engine import make_url

    from reqscope._pool import resolve_pooler

    monkeypatch.setenv("REQSCOPE_POOLER", "pgbouncer")
    assert resolve_pooler(make_url(PG), None) == "pgbouncer"
    assert resolve_pooler(make_url(f"sqlite+aiosqlite:///{tmp_path}/a.db"), None) is None
    assert resolve_pooler(make_url(PG), "pgbouncer") == "pgbouncer"
    monkeypatch.setenv("REQSCOPE_POOLER", "")
    assert resolve_pooler(make_url(PG), None) is None
    monkeypatch.setenv("REQSCOPE_POOLER", "pgpool")
    with pytest.raises(ReqscopeError, match="REQSCOPE_POOLER='pgpool' names no pooler"):
        resolve_pooler(make_url(PG), None)


def test_pooler_settings_that_cannot_work_are_refused(monkeypatch, tmp_path) -> None:
    with pytest.raises(ReqscopeError, match="is not PostgreSQL"):
        build_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db", pool=PoolConfig(pooler="pgbouncer"))
    with pytest.raises(ReqscopeError, match="reset_session"):
        build_engine(PG, pool=PoolConfig(reset_session=True, pooler="pgbouncer"))
    monkeypatch.setenv("REQSCOPE_POOLER", "pgbouncer")
    with pytest.raises(ReqscopeError, match="REQSCOPE_POOLER"):
        build_engine(PG, pool=PoolConfig(reset_session=True))


async def test_connect_args_of_yours_are_added_to_reqscopes() -> None:
    engine = build_engine(
        PG,
        pool=PoolConfig(pooler="pgbouncer"),
        connect_args={"server_settings": {"application_name": "mine"}, "timeout": 9},
    )
    try:
        args = await _connect_args(engine)
        assert args["server_settings"] == {"application_name": "mine"}
        assert args["timeout"] == 9  # yours wins
        assert args["statement_cache_size"] == 0  # reqscope's stays
    finally:
        await engine.dispose()


def test_a_pools_name_is_host_port_and_database() -> None:
    from sqlalchemy.engine import make_url

    from reqscope._pool import pool_name

    assert pool_name(make_url("postgresql+asyncpg://u:secret@db.internal/orders")) == (
        "db.internal:5432/orders"
    )
    assert pool_name(make_url("mysql+asyncmy://root@127.0.0.1:3307/test")) == "127.0.0.1:3307/test"
    assert pool_name(make_url("sqlite+aiosqlite:////srv/app.db")) == "/srv/app.db"
    assert pool_name(make_url("oracle+oracledb://u@h/db")) == "h/db"  # no port known
