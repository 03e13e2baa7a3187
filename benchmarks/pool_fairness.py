"""Waiting for a connection under load: reqscope against plain SQLAlchemy, same run.

    python benchmarks/pool_fairness.py --postgres URL [--seconds 10] [--rounds 3]

Two scenarios, each with a plain ``async_sessionmaker`` variant on an engine of its own
(same pool settings, SQLAlchemy's own pool class) and a reqscope variant, alternating
first and second over ``--rounds`` rounds:

- ``worker loops``: 100 long-lived loops under ``asyncio.gather`` share a pool of 5
  (``pool_timeout`` 5 s); each iteration opens a session and runs ``SELECT 1``. A pool that
  lets the task which just returned a connection take it straight back starves the others
  until they time out.
- ``check``: ``reqscope check``'s workload (insert + update + commit, then a select, in two
  sessions) from 50 workers over a pool of 10, 2,000 requests.

Reported per variant: requests finished (served or timed out), ``PoolExhaustedError``/
``TimeoutError`` and ``CircuitOpenError`` counts, and the latency of a request (open to
close; a timed-out one at the time it failed) at p50, p99 and max. The figure that
matters is reqscope's p99 over plain's in the same round; latencies on this 2-core machine
are noisy, so read the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import sqlalchemy
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.pool import AsyncAdaptedQueuePool

import reqscope
from reqscope import (
    CircuitOpenError,
    IsolatedSessionFactory,
    PoolConfig,
    UserExecutionContext,
    build_engine,
)

Opener = Callable[[str], object]  # user -> async context manager yielding a session


class Outcomes:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()

    def row(self, name: str) -> str:
        lat = sorted(self.latencies) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"{name:<22} {len(self.latencies):>8} {self.errors['timeout']:>9} "
            f"{self.errors['circuit']:>8} {statistics.median(lat) * 1000:>9.1f} "
            f"{p99 * 1000:>9.1f} {lat[-1] * 1000:>9.1f}"
        )

    def p99(self) -> float:
        lat = sorted(self.latencies) or [0.0]
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))]


async def timed(out: Outcomes, work: Callable[[], Awaitable[None]]) -> None:
    started = time.perf_counter()
    try:
        await work()
    except (TimeoutError, sa_exc.TimeoutError):  # PoolExhaustedError is a TimeoutError
        out.errors["timeout"] += 1
        out.latencies.append(time.perf_counter() - started)  # a failure counts at its time
    except CircuitOpenError:
        out.errors["circuit"] += 1
        await asyncio.sleep(0.001)  # do not spin on a refusing circuit
    else:
        out.latencies.append(time.perf_counter() - started)


async def worker_loops(open_session: Opener, seconds: float, loops: int = 100) -> Outcomes:
    out = Outcomes()
    deadline = time.monotonic() + seconds

    async def loop(i: int) -> None:
        user = f"user-{i % 20}"

        async def once() -> None:
            async with open_session(user) as session:  # type: ignore[attr-defined]
                await session.execute(text("SELECT 1"))

        while time.monotonic() < deadline:
            await timed(out, once)

    await asyncio.gather(*(loop(i) for i in range(loops)))
    return out


def check_table() -> Table:
    return Table(
        f"reqscope_bench_fair_{os.getpid()}",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("user_id", String(64), nullable=False, index=True),
        Column("status", String(16), nullable=False),
    )


async def check_workload(
    open_session: Opener, table: Table, requests: int = 2000, workers: int = 50
) -> Outcomes:
    out = Outcomes()
    remaining = iter(range(requests))

    async def request(n: int) -> None:
        user = f"check-user-{n % 20}"
        async with open_session(user) as session, session.begin():  # type: ignore[attr-defined]
            result = await session.execute(insert(table).values(user_id=user, status="p"))
            row_id = result.inserted_primary_key[0]
            await session.execute(update(table).where(table.c.id == row_id).values(status="d"))
        async with open_session(user) as session:  # type: ignore[attr-defined]
            await session.scalars(select(table.c.user_id).where(table.c.user_id == user))
            await session.scalar(select(func.count()).select_from(table))

    async def worker() -> None:
        for n in remaining:
            await timed(out, lambda n=n: request(n))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return out


def plain_opener(maker: async_sessionmaker[AsyncSession]) -> Opener:
    return lambda _user: maker()


def scoped_opener(factory: IsolatedSessionFactory) -> Opener:
    return lambda user: factory.session(UserExecutionContext.create(user))


async def run(url: str, seconds: float, rounds: int, requests: int) -> None:
    scenarios = {
        "worker loops": PoolConfig(pool_size=5, max_overflow=0, pool_timeout=5.0),
        "check": PoolConfig(pool_size=10, max_overflow=0, pool_timeout=60.0),
    }
    table = check_table()
    print(
        f"{'variant':<22} {'requests':>8} {'timeouts':>9} {'circuit':>8} "
        f"{'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"
    )
    for scenario, pool in scenarios.items():
        ratios: list[float] = []
        for n in range(rounds):
            # SQLAlchemy's own pool; otherwise the same settings as the factory's engine
            plain_engine = build_engine(url, pool=pool, poolclass=AsyncAdaptedQueuePool)
            maker = async_sessionmaker(plain_engine, expire_on_commit=False)
            factory = IsolatedSessionFactory(url, pool=pool, max_session_lifetime=120.0)
            async with factory:
                async with plain_engine.begin() as conn:
                    await conn.run_sync(table.metadata.create_all)

                results = {}
                order = [("plain", plain_opener(maker)), ("reqscope", scoped_opener(factory))]
                if n % 2:
                    order.reverse()
                for name, opener in order:
                    if scenario == "worker loops":
                        results[name] = await worker_loops(opener, seconds)
                    else:
                        results[name] = await check_workload(opener, table, requests)
                async with plain_engine.begin() as conn:
                    await conn.run_sync(table.metadata.drop_all)
            await plain_engine.dispose()
            print(f"-- {scenario}, round {n + 1}")
            for name in ("plain", "reqscope"):
                print(results[name].row(name))
            if results["plain"].p99() > 0:
                ratios.append(results["reqscope"].p99() / results["plain"].p99())
        print(
            f"== {scenario}: p99 reqscope / plain, median of {len(ratios)} rounds: "
            f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--seconds", type=float, default=10.0, help="worker-loop run length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="check requests")
    args = parser.parse_args()
    if not args.postgres:
        parser.error("--postgres URL (or REQSCOPE_TEST_POSTGRES_URL) is required")
    print(f"$ {' '.join(sys.argv)}")
    print(
        f"python {platform.python_version()}, sqlalchemy {sqlalchemy.__version__}, "
        f"reqscope {reqscope.__version__}, nproc {os.cpu_count()}"
    )
    asyncio.run(run(args.postgres, args.seconds, args.rounds, args.requests))


if __name__ == "__main__":
    main()
