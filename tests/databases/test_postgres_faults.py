"""Faults on a real PostgreSQL server: killed backends, exhaustion, cancellation, outages."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from conftest import POOLER, server_behind
from reqscope import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    DatabaseUnavailableError,
    IsolatedSessionFactory,
    PoolConfig,
    PoolExhaustedError,
    UserExecutionContext,
    build_engine,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(name="admin")
async def _admin(postgres) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(server_behind(postgres.url), poolclass=NullPool)
    yield engine
    await engine.dispose()


async def backends(admin: AsyncEngine, tag: str) -> list[tuple[int, str]]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT pid, coalesce(state, '') FROM pg_stat_activity "
                "WHERE application_name = :tag AND pid <> pg_backend_pid()"
            ),
            {"tag": tag},
        )
        return [(row[0], row[1]) for row in rows]


def tagged(url: str, tag: str) -> dict:
    """connect_args that set application_name, so the test can find its backends."""
    if "+asyncpg" in url:
        return {"server_settings": {"application_name": tag}, "timeout": 5}
    return {"application_name": tag, "connect_timeout": 5}


async def test_a_killed_backend_fails_only_its_request(postgres, admin) -> None:

    tag = "reqscope-kill"
    engine = build_engine(
        postgres.url,
        pool=PoolConfig(pool_size=4, max_overflow=0),
        connect_args=tagged(postgres.url, tag),
    )
    async with IsolatedSessionFactory(engine) as factory:
        victim_ready = anyio.Event()
        results: dict[str, object] = {}

        async def victim() -> None:
            ctx = UserExecutionContext.create("victim")
            try:
                async with factory.session(ctx) as session:
                    pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                    results["pid"] = pid
                    await session.execute(text("CREATE TEMP TABLE t (x int)"))
                    victim_ready.set()
                    await anyio.sleep(0.5)
                    await session.execute(text("INSERT INTO t VALUES (1)"))
                results["victim"] = "ok"
            except sa_exc.DBAPIError as error:
                results["victim"] = error

        async def bystander(i: int) -> None:
            ctx = UserExecutionContext.create(f"bystander-{i}")
            for _ in range(5):
                async with factory.begin(ctx) as session:
                    await session.execute(text("SELECT 1"))
                await anyio.sleep(0.05)
            results[f"bystander-{i}"] = "ok"

        async with anyio.create_task_group() as group:
            group.start_soon(victim)
            for i in range(3):
                group.start_soon(bystander, i)
            await victim_ready.wait()
            async with admin.connect() as conn:
                await conn.execute(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": results["pid"]}
                )
        error = results["victim"]
        assert isinstance(error, sa_exc.DBAPIError)
        assert error.connection_invalidated
        assert all(results[f"bystander-{i}"] == "ok" for i in range(3))
        # the pool recovered: a fresh request works, nothing is held
        async with factory.session(UserExecutionContext.create("after")) as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        assert factory.metrics().pool.checked_out == 0
        assert factory.circuit_breaker.state is CircuitState.CLOSED  # one failure, threshold 5
    await engine.dispose()


async def test_pool_exhaustion_is_a_clear_error(postgres) -> None:
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=0.5)
    breaker = CircuitBreaker(failure_threshold=1000)
    async with IsolatedSessionFactory(postgres.url, pool=pool, circuit_breaker=breaker) as factory:
        outcomes: list[object] = []

        async def request(i: int) -> None:
            try:
                async with factory.session(UserExecutionContext.create(f"u{i % 5}")) as session:
                    await session.execute(text("SELECT pg_sleep(0.3)"))
                outcomes.append("ok")
            except PoolExhaustedError as error:
                outcomes.append(error)

        async with anyio.create_task_group() as group:
            for i in range(50):
                group.start_soon(request, i)
        errors = [o for o in outcomes if isinstance(o, PoolExhaustedError)]
        assert 2 <= outcomes.count("ok") < 50
        assert errors
        assert isinstance(errors[0], TimeoutError)
        assert "size=2" in str(errors[0])
        assert "pool_size" in str(errors[0])  # says what to do
        assert errors[0].stats is not None
        assert errors[0].stats.capacity == 2
        metrics = factory.metrics()
        assert metrics.pool.checked_out == 0
        assert metrics.active_sessions == 0


@pytest.mark.parametrize("style", ["anyio", "asyncio"])
async def test_a_cancelled_statement_stops_on_the_server(postgres, admin, style) -> None:
    """Directly (pg_cancel_backend) and behind a pooler (a CancelRequest it forwards)."""
    if POOLER is not None and style == "anyio" and postgres.name == "postgres-psycopg":
        pytest.skip(
            "an anyio scope cancels psycopg's own cancel request again, and psycopg then "
            "closes the connection: behind a pooler nothing can reach its statement any more "
            "(docs/many-instances.md: set statement_timeout)"
        )
    tag = f"reqscope-stop-{style}"
    engine = build_engine(
        postgres.url,
        pool=PoolConfig(pool_size=2, max_overflow=0),
        connect_args=tagged(postgres.url, tag),
    )
    async with IsolatedSessionFactory(engine) as factory:
        for round_ in range(3):
            ctx = UserExecutionContext.create("alice")

            async def sleep(ctx: UserExecutionContext = ctx) -> None:
                async with factory.session(ctx) as session:
                    await session.execute(text("SELECT pg_sleep(30)"))

            if style == "anyio":
                with anyio.move_on_after(0.3):
                    await sleep()
            else:
                task = asyncio.create_task(sleep())
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            with anyio.move_on_after(5):  # the server stops the statement: it does not run 30 s
                while any(state == "active" for _, state in await backends(admin, tag)):
                    await anyio.sleep(0.05)
            assert not any(state == "active" for _, state in await backends(admin, tag)), (
                round_,
                await backends(admin, tag),
            )
            assert factory.metrics().active_sessions == 0, round_
    await engine.dispose()


@pytest.mark.skipif(
    POOLER is not None,
    reason="PgBouncer 1.18 exits ('bad client state') when a storm of CancelRequests races its "
    "own parameter setting on a server connection; one cancellation at a time is tested above",
)
@pytest.mark.parametrize("style", ["anyio", "asyncio"])
async def test_random_cancellation_mid_query_leaves_nothing_behind(postgres, admin, style) -> None:

    tag = f"reqscope-cancel-{style}"
    engine = build_engine(
        postgres.url,
        pool=PoolConfig(pool_size=5, max_overflow=5, pool_timeout=30),
        connect_args=tagged(postgres.url, tag),
    )
    rng = random.Random(1234)
    async with IsolatedSessionFactory(engine) as factory:
        peak_backends = 0
        stop = anyio.Event()

        async def watch() -> None:
            nonlocal peak_backends
            while not stop.is_set():
                peak_backends = max(peak_backends, len(await backends(admin, tag)))
                await anyio.sleep(0.05)

        async def query(i: int) -> None:
            ctx = UserExecutionContext.create(f"user-{i % 20}")
            async with factory.session(ctx) as session:
                await session.execute(text("SELECT pg_sleep(:s)"), {"s": rng.uniform(0.0, 0.2)})
                await session.execute(text("SELECT pg_sleep(5)"))

        async def cancelled_anyio(i: int) -> None:
            with anyio.move_on_after(rng.uniform(0.0, 0.4)):
                await query(i)

        async def cancelled_asyncio(i: int) -> None:
            task = asyncio.create_task(query(i))
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run = cancelled_anyio if style == "anyio" else cancelled_asyncio
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            async with anyio.create_task_group() as requests:
                for i in range(200):
                    requests.start_soon(run, i)
            stop.set()
        metrics = factory.metrics()
        assert metrics.active_sessions == 0
        assert metrics.pool.checked_out == 0
        assert peak_backends <= 10  # never more server backends than pool capacity
        await anyio.sleep(0.2)
        left = await backends(admin, tag)
        assert all(state != "idle in transaction" for _, state in left), left
        assert all(state != "active" for _, state in left), left
    await engine.dispose()


PG_CTL = shutil.which("pg_ctlcluster")


def _pg(action: str) -> None:
    version = max(path.name for path in Path("/etc/postgresql").iterdir())
    subprocess.run(  # noqa: S603 - fixed arguments
        [PG_CTL, "--skip-systemctl-redirect", version, "main", action],  # type: ignore[list-item]
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.skipif(
    os.environ.get("REQSCOPE_TEST_PG_RESTART") != "1" or PG_CTL is None,
    reason="stops the local PostgreSQL server: set REQSCOPE_TEST_PG_RESTART=1 (CI does)",
)
async def test_outage_and_recovery_without_restarting_the_app(postgres) -> None:
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=0.5)
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=2, connect_timeout=2)
    ctx = UserExecutionContext.create("alice")
    async with IsolatedSessionFactory(postgres.url, pool=pool, circuit_breaker=breaker) as factory:
        async with factory.session(ctx) as session:
            await session.execute(text("SELECT 1"))
        try:
            await anyio.to_thread.run_sync(_pg, "stop")
            failures = 0
            with anyio.fail_after(30):
                while breaker.state is not CircuitState.OPEN:
                    with pytest.raises((DatabaseUnavailableError, sa_exc.DBAPIError)):
                        async with factory.session(ctx) as session:
                            await session.execute(text("SELECT 1"))
                    failures += 1
            assert failures <= 3
            with pytest.raises(CircuitOpenError):
                async with factory.session(ctx):
                    pass
            assert (await factory.health(timeout=1)).status == "down"
        finally:
            await anyio.to_thread.run_sync(_pg, "start")
        with anyio.fail_after(60):
            while True:
                try:
                    async with factory.session(ctx) as session:
                        await session.execute(text("SELECT 1"))
                    break
                except (CircuitOpenError, DatabaseUnavailableError, sa_exc.DBAPIError):
                    await anyio.sleep(0.2)
        assert breaker.state is CircuitState.CLOSED
        assert (await factory.health()).status == "ok"


class _FreezingProxy:
    """A TCP proxy in front of PostgreSQL that can stop forwarding without closing.

    Frozen, it looks like a server that stopped answering (a partition, a stopped VM):
    sockets stay open and nothing comes back.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = False
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, upstream_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if not self.frozen:
                    sink.write(data)

        await asyncio.gather(
            pump(reader, upstream_writer), pump(upstream_reader, writer), return_exceptions=True
        )

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


async def test_closing_the_factory_is_bounded_when_the_server_stops_answering(caplog) -> None:
    # asyncpg's graceful close waits for the server to hang up after Terminate, without a
    # timeout of its own: a server that stopped answering held factory.aclose() forever.
    from sqlalchemy.engine import make_url

    from conftest import server_url

    url = make_url(server_url("postgres-asyncpg"))
    proxy = _FreezingProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        factory = IsolatedSessionFactory(url.set(port=port), cleanup_timeout=0.5)
        async with factory:
            async with factory.session(UserExecutionContext.create("alice")) as session:
                await session.execute(text("SELECT 1"))
            assert factory.pool_stats().checked_in == 1  # type: ignore[union-attr]
            proxy.frozen = True
            started = anyio.current_time()
        assert anyio.current_time() - started < 5  # not asyncpg's unbounded wait
        assert factory.closed
        assert any("abandoning them" in r.getMessage() for r in caplog.records)
    finally:
        await proxy.close()


@pytest.mark.parametrize("driver", ["postgres-asyncpg", "postgres-psycopg"])
async def test_requests_on_pooled_connections_to_a_silent_server_fail_instead_of_hanging(
    driver,
) -> None:
    # SQLAlchemy's pre-ping waited without a bound on a pooled connection to a server that
    # stopped answering: every request hung while new connects failed in connect_timeout.
    from sqlalchemy.engine import make_url

    from conftest import server_url

    url = make_url(server_url(driver))
    proxy = _FreezingProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=5, connect_timeout=1)
    breaker = CircuitBreaker(failure_threshold=2)
    try:
        factory = IsolatedSessionFactory(
            url.set(port=port), pool=pool, circuit_breaker=breaker, cleanup_timeout=0.5
        )
        async with factory:
            async with anyio.create_task_group() as group:  # two pooled, idle connections
                for user in ("alice", "bob"):
                    group.start_soon(_select_one, factory, user)
            assert factory.pool_stats().checked_in == 2  # type: ignore[union-attr]
            proxy.frozen = True
            with anyio.fail_after(30):  # a hang guard: unbounded before
                for _ in range(2):
                    with pytest.raises(DatabaseUnavailableError):
                        await _select_one(factory, "alice")
                assert breaker.state is CircuitState.OPEN  # the outage is counted
                with pytest.raises(CircuitOpenError):
                    await _select_one(factory, "alice")
                assert (await factory.health(timeout=1)).status == "down"
            assert factory.metrics().pool.checked_out == 0  # type: ignore[union-attr]
    finally:
        await proxy.close()


async def _select_one(factory: IsolatedSessionFactory, user: str) -> None:
    async with factory.session(UserExecutionContext.create(user)) as session:
        await session.execute(text("SELECT 1"))
