"""Statement bounds, session resets and reqscope's own errors on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from conftest import POOLER
from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    ReqscopeError,
    SessionReclaimedError,
    UserExecutionContext,
)

pytestmark = pytest.mark.anyio

ONE_CONNECTION = PoolConfig(pool_size=1, max_overflow=0)


async def test_a_factory_statement_timeout_makes_the_server_cancel_long_statements(
    postgres,
) -> None:
    async with IsolatedSessionFactory(
        postgres.url, pool=ONE_CONNECTION, statement_timeout=0.2
    ) as factory:
        with pytest.raises(sa_exc.DBAPIError, match="statement timeout"):
            async with factory.session(UserExecutionContext.create("alice")) as session:
                await session.execute(text("SELECT pg_sleep(3)"))
        async with factory.session(UserExecutionContext.create("bob")) as session:
            assert (await session.execute(text("SHOW statement_timeout"))).scalar_one() == "200ms"
            # every transaction of the scope is bounded, not only the first
            await session.commit()
            assert (await session.execute(text("SHOW statement_timeout"))).scalar_one() == "200ms"


async def test_a_scope_sets_its_own_statement_timeout_for_itself_only(postgres) -> None:
    async with IsolatedSessionFactory(postgres.url, pool=ONE_CONNECTION) as factory:
        ctx = UserExecutionContext.create("alice")
        with pytest.raises(sa_exc.DBAPIError, match="statement timeout"):
            async with factory.begin(ctx, statement_timeout=0.2) as session:
                await session.execute(text("SELECT pg_sleep(3)"))
        # the same pooled connection, next request: no bound left behind (SET LOCAL)
        async with factory.session(ctx) as session:
            assert (await session.execute(text("SHOW statement_timeout"))).scalar_one() == "0"
            await session.execute(text("SELECT pg_sleep(0.3)"))


async def test_statement_timeout_is_refused_where_the_server_cannot_enforce_it(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    with pytest.raises(ReqscopeError, match="PostgreSQL"):
        IsolatedSessionFactory(url, statement_timeout=1.0)
    async with IsolatedSessionFactory(url) as factory:
        with pytest.raises(ReqscopeError, match="run_isolated"):
            factory.session(UserExecutionContext.create("alice"), statement_timeout=1.0)
        with pytest.raises(ValueError, match="positive"):
            factory.session(UserExecutionContext.create("alice"), statement_timeout=0)


async def test_a_statement_cut_off_by_a_reclaim_raises_session_reclaimed_error(postgres) -> None:
    async with IsolatedSessionFactory(
        postgres.url, max_session_lifetime=0.3, leak_check_interval=0.05
    ) as factory:
        inside: BaseException | None = None
        with pytest.raises(SessionReclaimedError, match="max_lifetime=") as outside:
            async with factory.session(UserExecutionContext.create("alice")) as session:
                try:
                    await session.execute(text("SELECT pg_sleep(3)"))
                except BaseException as error:
                    inside = error
                    raise
        assert isinstance(inside, SessionReclaimedError)  # already inside the block
        assert outside.value is inside
        assert inside.__cause__ is not None  # the driver's error, kept as the cause
        assert factory.metrics().leaks_reclaimed == 1


async def test_a_request_cancelled_while_connecting_logs_no_error(postgres, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="reqscope")
    for step in range(30):  # cancel at different moments of the first connect
        async with IsolatedSessionFactory(postgres.url) as factory:

            async def request(factory: IsolatedSessionFactory = factory) -> None:
                async with factory.session(UserExecutionContext.create("bob")) as session:
                    await session.execute(text("SELECT 1"))

            task = asyncio.create_task(request())
            await asyncio.sleep(step / 2000)
            task.cancel()  # late steps may find the request done: that is fine too
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert factory.metrics().active_sessions == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_health_warns_once_about_asyncpg_default_tls_against_a_server_without_tls(
    caplog,
) -> None:
    from conftest import server_url

    url = make_url(server_url("postgres-asyncpg"))
    default_tls = url.difference_update_query(["ssl", "sslmode"])
    async with IsolatedSessionFactory(default_tls) as factory:
        first = await factory.health()
        if not first.warnings:
            pytest.skip("this PostgreSQL server offers TLS")  # nothing to warn about
        assert "?ssl=disable" in first.warnings[0]
        assert first.to_dict()["warnings"] == list(first.warnings)
        assert (await factory.health()).warnings == first.warnings
    logged = [r for r in caplog.records if "ssl=disable" in r.getMessage()]
    assert len(logged) == 1
    async with IsolatedSessionFactory(url.update_query_dict({"ssl": "disable"})) as factory:
        assert (await factory.health()).warnings == ()


@pytest.mark.skipif(
    POOLER is not None, reason="behind a pooler, reset_session is refused: the pooler resets"
)
@pytest.mark.parametrize("reset", [False, True])
async def test_reset_session_undoes_what_a_request_changed_on_its_connection(
    postgres, reset
) -> None:
    pool = PoolConfig(pool_size=1, max_overflow=0, reset_session=reset)
    async with IsolatedSessionFactory(postgres.url, pool=pool) as factory:
        async with factory.session(UserExecutionContext.create("alice")) as session:
            await session.execute(text("SET work_mem = '7MB'"))  # plain SET: the session's
            await session.execute(text("CREATE TEMP TABLE alice_scratch (x int)"))
            await session.execute(text("SELECT pg_advisory_lock(4242)"))
            await session.commit()
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with factory.session(UserExecutionContext.create("bob")) as session:
            assert (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one() == pid
            work_mem = (await session.execute(text("SHOW work_mem"))).scalar_one()
            scratch = (
                await session.execute(text("SELECT to_regclass('pg_temp.alice_scratch')"))
            ).scalar_one()
            locks = (
                await session.execute(
                    text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = :p"),
                    {"p": pid},
                )
            ).scalar_one()
            # prepared statements survive (the driver's cache stays valid)
            for _ in range(3):
                await session.execute(text("SELECT CAST(:x AS integer)"), {"x": 1})
    if reset:
        assert (work_mem, scratch, locks) == ("4MB", None, 0)
    else:  # the documented default: only the transaction is rolled back
        assert (work_mem, scratch is not None, locks) == ("7MB", True, 1)


def test_reset_session_is_refused_where_it_is_not_implemented(tmp_path) -> None:
    with pytest.raises(ReqscopeError, match="PostgreSQL"):
        IsolatedSessionFactory(
            f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}",
            pool=PoolConfig(reset_session=True),
        )
