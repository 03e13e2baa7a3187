"""The pool under load on real servers: overload is not an outage, and waits are fair."""

from __future__ import annotations

import asyncio
import collections

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from conftest import _SERVERS, POOLER, server_url
from reqscope import (
    CircuitBreaker,
    CircuitState,
    DatabaseConfigurationError,
    IsolatedSessionFactory,
    PoolConfig,
    PoolExhaustedError,
    UserExecutionContext,
)

pytestmark = pytest.mark.anyio


async def test_a_burst_of_pool_timeouts_leaves_the_circuit_closed(postgres) -> None:
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=0.5)
    breaker = CircuitBreaker(failure_threshold=3)
    async with IsolatedSessionFactory(postgres.url, pool=pool, circuit_breaker=breaker) as factory:
        outcomes: collections.Counter[str] = collections.Counter()

        async def request(i: int) -> None:
            try:
                async with factory.session(UserExecutionContext.create(f"u{i % 5}")) as session:
                    await session.execute(text("SELECT pg_sleep(0.3)"))
                outcomes["ok"] += 1
            except PoolExhaustedError:
                outcomes["exhausted"] += 1

        async with anyio.create_task_group() as group:
            for i in range(30):
                group.start_soon(request, i)
        assert outcomes["exhausted"] > breaker.failure_threshold
        assert outcomes["ok"] + outcomes["exhausted"] == 30
        metrics = factory.metrics()
        assert metrics.pool_timeouts == outcomes["exhausted"]
        assert metrics.circuit_state is CircuitState.CLOSED
        assert breaker.consecutive_failures == 0
        assert breaker.times_opened == 0
        # the next request on the idle pool is served
        async with factory.session(UserExecutionContext.create("after")) as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def test_worker_loops_sharing_a_small_pool_are_served_in_turn(postgres) -> None:
    # 40 loops, each returning its connection and at once asking for the next: with waiters
    # served in order each waits for about 40/2 short statements, far below pool_timeout.
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=2.0)
    async with IsolatedSessionFactory(postgres.url, pool=pool) as factory:
        served = collections.Counter[int]()
        exhausted = 0
        deadline = anyio.current_time() + 2.5

        async def loop(i: int) -> None:
            nonlocal exhausted
            ctx = UserExecutionContext.create(f"worker-{i}")
            while anyio.current_time() < deadline:
                try:
                    async with factory.session(ctx) as session:
                        await session.execute(text("SELECT 1"))
                    served[i] += 1
                except PoolExhaustedError:  # noqa: PERF203 - each iteration's outcome counts
                    exhausted += 1

        await asyncio.gather(*(loop(i) for i in range(40)))
        assert exhausted == 0
        assert len(served) == 40  # every loop got connections
        stats = factory.metrics().pool
        assert stats is not None
        assert stats.waits > 0
        assert stats.wait_seconds > 0
        assert stats.waiting == 0


async def test_waiting_checkouts_are_counted_while_they_wait(postgres) -> None:
    pool = PoolConfig(pool_size=1, max_overflow=0, pool_timeout=5.0)
    async with IsolatedSessionFactory(postgres.url, pool=pool) as factory:
        holding = anyio.Event()
        release = anyio.Event()

        async def holder() -> None:
            async with factory.session(UserExecutionContext.create("holder")) as session:
                await session.execute(text("SELECT 1"))
                holding.set()
                await release.wait()

        async def waiter() -> None:
            async with factory.session(UserExecutionContext.create("waiter")) as session:
                await session.execute(text("SELECT 1"))

        async with anyio.create_task_group() as group:
            group.start_soon(holder)
            await holding.wait()
            for _ in range(3):
                group.start_soon(waiter)
            with anyio.fail_after(5):
                while factory.metrics().pool.waiting < 3:  # type: ignore[union-attr]
                    await anyio.sleep(0.01)
            assert "waiting=3" in str(factory.pool_stats())
            release.set()
        stats = factory.metrics().pool
        assert stats is not None
        assert (stats.waiting, stats.waits) == (0, 3)


@pytest.fixture(name="server", params=sorted(_SERVERS))
def _server(request: pytest.FixtureRequest) -> str:
    return server_url(request.param)


@pytest.mark.parametrize("wrong", ["database", "user"])
async def test_a_refused_login_is_a_configuration_error_that_never_opens_the_circuit(
    server, wrong
) -> None:
    url = make_url(server)
    url = (
        url.set(database="reqscope_no_such_db")
        if wrong == "database"
        else url.set(username="reqscope_no_such_role")
    )
    if POOLER is not None and wrong == "database":
        pytest.skip(
            "PgBouncer answers a login to an unknown database once, then makes the next "
            "clients wait for its retry (server_login_retry) instead of refusing them"
        )
    breaker = CircuitBreaker(failure_threshold=2)
    async with IsolatedSessionFactory(url, circuit_breaker=breaker) as factory:
        for _ in range(5):
            with pytest.raises(DatabaseConfigurationError) as caught:
                async with factory.session(UserExecutionContext.create("alice")) as session:
                    await session.execute(text("SELECT 1"))
            message = str(caught.value)
            assert "server is up" in message
            assert "user, password and database name" in message
            assert "running and reachable" not in message
        assert breaker.state is CircuitState.CLOSED
        assert breaker.consecutive_failures == 0
        assert factory.metrics().pool_timeouts == 0
