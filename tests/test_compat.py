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


@pytest.mark.skipif(_compat.FALLBACKS_FORCED, reason="the fair pool is the private path")
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


def test_the_private_accesses_are_in_use_unless_fallbacks_are_forced() -> None:
    from sqlalchemy.orm import Session

    from reqscope import ReqscopeSession

    forced = _compat.FALLBACKS_FORCED
    own_statement_hook = ReqscopeSession._execute_internal is not Session._execute_internal
    assert own_statement_hook is not forced
    assert (_compat._TASK_STATES is None) is forced
    assert (_compat.fair_pool_class() is AsyncAdaptedQueuePool) is forced
    # aiosqlite before 0.22 has no force-stop (and no race to guard): its own connect is used
    import aiosqlite

    guarded = hasattr(aiosqlite.Connection, "stop") and not forced
    assert (_compat.aiosqlite_connect() is not None) is guarded


@pytest.mark.skipif(
    _compat.aiosqlite_connect() is None, reason="aiosqlite as it is: nothing waits for a stop"
)
async def test_a_closing_factory_waits_for_the_sqlite_threads_it_force_stopped(tmp_path) -> None:
    """A reclaimed connection's worker thread is done before ``aclose()`` returns.

    Otherwise it finishes after the event loop closed and fails there ("Event loop is
    closed"), as a reclaim just before an application shuts down would.
    """
    import asyncio
    import threading
    import time

    workers: list[threading.Thread] = []

    def nap() -> int:  # keeps the connection's worker thread busy past the factory's close
        workers.append(threading.current_thread())
        time.sleep(3.0)
        return 1

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    factory = IsolatedSessionFactory(url, max_session_lifetime=0.01, leak_check_interval=3600)
    async with factory, factory.session(UserExecutionContext.create("alice")) as session:
        raw = await (await session.connection()).get_raw_connection()
        await raw.driver_connection.create_function("nap", 0, nap)
        busy = asyncio.ensure_future(raw.driver_connection.execute("SELECT nap()"))
        while not workers:
            await asyncio.sleep(0.01)
        (report,) = factory.leak_detector.scan()  # reclaims: SQLAlchemy force-stops it
        assert report.reclaimed
    (worker,) = workers
    worker.join(1.0)  # it ends at once after its stop; without the wait, 2 s later
    assert not worker.is_alive()
    await asyncio.wait([busy])


async def test_asyncpg_cancellations_are_read_unless_fallbacks_are_forced() -> None:
    import asyncio

    from asyncpg.connection import Connection

    assert "_cancellations" in Connection.__slots__  # what the private path reads
    pending = asyncio.get_running_loop().create_task(asyncio.sleep(10))

    class Sending:
        _cancellations = frozenset()  # not a set: not asyncpg's

    sending = Sending()
    assert _compat.asyncpg_cancellations(sending) == []
    sending._cancellations = {pending}  # type: ignore[assignment]
    expected = [] if _compat.FALLBACKS_FORCED else [pending]
    assert _compat.asyncpg_cancellations(sending) == expected
    assert _compat.asyncpg_cancellations(object()) == []
    pending.cancel()


def test_connection_start_stamps_are_read_unless_fallbacks_are_forced() -> None:
    from sqlalchemy.pool.base import _ConnectionRecord

    assert "starttime" in _ConnectionRecord.__slots__  # what the private path reads

    class Record:
        starttime = 1234.5

    expected = None if _compat.FALLBACKS_FORCED else 1234.5
    assert _compat.connection_started_at(Record()) == expected
    Record.starttime = 0  # a record that never connected: SQLAlchemy's int 0
    assert _compat.connection_started_at(Record()) is None
    assert _compat.connection_started_at(object()) is None


def test_the_isolation_suites_pass_with_every_fallback_forced(tmp_path) -> None:
    """Run the session, enforcement and pool suites with REQSCOPE_COMPAT_FALLBACKS=1.

    The servers the outer run uses (REQSCOPE_TEST_*_URL) are used here too.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    if _compat.FALLBACKS_FORCED:
        pytest.skip("already running with the fallbacks forced")
    tests = Path(__file__).parent
    suites = [
        "test_compat.py",
        "test_sessions.py",
        "test_scope.py",
        "test_leaks.py",
        "test_tenancy.py",
        "integrations/fastapi/test_identity.py",
    ]
    result = subprocess.run(  # noqa: S603 - this interpreter, the project's own tests
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            *(str(tests / suite) for suite in suites),
        ],
        env={**os.environ, "REQSCOPE_COMPAT_FALLBACKS": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
