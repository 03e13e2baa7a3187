"""What ``PoolConfig(reset_session=True)`` costs a request on PostgreSQL.

    python benchmarks/reset_session.py --postgres URL [--rounds 41] [--requests 200]

Each round runs the same request (a session, ``SELECT 1``) ``--requests`` times one after
another through three factories that differ only in ``reset_session``: "off", "off again"
(the control row: its ratio to "off" is the noise floor) and "on", in an order rotated each
round. Printed per variant: the median over rounds of the wall time and of this process's
CPU time per request, and the median of per-round ratios to "off" with its interquartile
range. The reset is one more round trip per request, so the wall-time ratio is the figure
to read; the CPU ratio shows what the client pays for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time

import sqlalchemy
from sqlalchemy import text

import reqscope
from reqscope import IsolatedSessionFactory, PoolConfig, UserExecutionContext


async def measure(factory: IsolatedSessionFactory, requests: int) -> tuple[float, float]:
    ctx = UserExecutionContext.create("bench")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        async with factory.session(ctx) as session:
            await session.execute(text("SELECT 1"))
    return (
        (time.perf_counter() - wall) / requests * 1e6,
        (time.process_time() - cpu) / requests * 1e6,
    )


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f} to {q[2]:.3f}"


async def run(url: str, rounds: int, requests: int) -> None:
    pools = {
        "off": PoolConfig(pool_size=1, max_overflow=0),
        "off again": PoolConfig(pool_size=1, max_overflow=0),
        "on": PoolConfig(pool_size=1, max_overflow=0, reset_session=True),
    }
    factories = {name: IsolatedSessionFactory(url, pool=pool) for name, pool in pools.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in factories}
    names = list(factories)
    async with contextlib.AsyncExitStack() as stack:  # closed in reverse, as started
        for factory in factories.values():
            await stack.enter_async_context(factory)
            await measure(factory, 50)  # warm up: connect, cache statements
        for index in range(rounds):
            order = names[index % 3 :] + names[: index % 3]
            for name in order:
                results[name].append(await measure(factories[name], requests))
    print("| variant | wall µs/request | CPU µs/request | wall / off (IQR) | CPU / off (IQR) |")
    print("|---|---|---|---|---|")
    base = results["off"]
    for name, values in results.items():
        wall = [w for w, _ in values]
        cpu = [c for _, c in values]
        wall_ratio = [w / b[0] for (w, _), b in zip(values, base, strict=True)]
        cpu_ratio = [c / b[1] for (_, c), b in zip(values, base, strict=True)]
        print(
            f"| {name} | {statistics.median(wall):.0f} | {statistics.median(cpu):.0f} | "
            f"{statistics.median(wall_ratio):.3f} ({quartiles(wall_ratio)}) | "
            f"{statistics.median(cpu_ratio):.3f} ({quartiles(cpu_ratio)}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if not args.postgres:
        parser.error("--postgres URL (or REQSCOPE_TEST_POSTGRES_URL) is required")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"python {platform.python_version()}, sqlalchemy {sqlalchemy.__version__}, "
        f"reqscope {reqscope.__version__}, nproc {os.cpu_count()}"
    )
    asyncio.run(run(args.postgres, args.rounds, args.requests))


if __name__ == "__main__":
    main()
