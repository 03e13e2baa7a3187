"""Instructions per request, reqscope vs plain, counted by valgrind (deterministic).

    python benchmarks/instructions.py [--postgres URL] [--requests 1000] [--workload tenant]
                                      [--concurrency 1] [--skip-sqlite] [--no-gc] [--cache-sim]

CPU time on a small shared machine moves by ±10 % between rounds (see sessions.py), so a
few-percent difference is hard to resolve there. ``valgrind --tool=callgrind`` counts the
instructions the process executes instead, which repeats to within about 1 % whatever else
the machine is doing. Each variant runs ``SELECT 1`` requests (``--workload tenant``: an ORM
select of five rows of a tenant-scoped model, the plain session filtering by hand, reqscope
through a ``TenantPolicy(rls=False)``) at ``--concurrency`` (default 1; pool 20), each
variant in a process of its own; a run with zero requests is subtracted, so start-up does
not count. The plain variant uses an engine reqscope never touched. Instruction counts
ignore cache misses and system calls, so their ratio is not the CPU-time ratio; it is the
stable measure of how much work reqscope's own code adds. ``--cache-sim`` adds valgrind's
simulated cache misses and mispredicted branches per request. "context given" is reqscope
with the request's context made beforehand (the session scope alone).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sessions import Base, TenantRow  # benchmarks/sessions.py: the same tenant table
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker

from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    TenantPolicy,
    UserExecutionContext,
    build_engine,
)

POOL = PoolConfig(pool_size=20, max_overflow=0, pool_timeout=120.0)  # valgrind is slow


async def prepare(url: str) -> None:
    """The tenant table with 1,000 rows of 100 users (made once, before the variants run)."""
    engine = build_engine(url, pool=POOL)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        if not (await conn.scalar(select(func.count()).select_from(TenantRow))):
            rows = [{"user_id": f"user-{i % 100}", "body": "x"} for i in range(1000)]
            await conn.execute(insert(TenantRow), rows)
    await engine.dispose()


async def run_variant(
    variant: str, url: str, requests: int, workload: str, concurrency: int
) -> None:
    engine = build_engine(url, pool=POOL)
    plain_engine = build_engine(url, pool=POOL)
    maker = async_sessionmaker(plain_engine, expire_on_commit=False)
    tenant = TenantPolicy(rls=False) if workload == "tenant" else None
    slots = asyncio.Semaphore(concurrency)
    # "given": the request's context made beforehand (as middleware would have made it).
    contexts = {f"user-{i}": UserExecutionContext.create(f"user-{i}") for i in range(100)}

    async def request(n: int) -> None:
        async with slots:
            user = f"user-{n % 100}"
            if variant == "plain":
                async with maker() as session:
                    if tenant is None:
                        await session.execute(text("SELECT 1"))
                    else:
                        query = select(TenantRow).where(TenantRow.user_id == user).limit(5)
                        (await session.scalars(query)).all()
            else:
                ctx = contexts[user] if variant == "given" else UserExecutionContext.create(user)
                async with factory.session(ctx) as session:
                    if tenant is None:
                        await session.execute(text("SELECT 1"))
                    else:  # the policy adds the filter
                        (await session.scalars(select(TenantRow).limit(5))).all()

    async with IsolatedSessionFactory(engine, tenant=tenant) as factory:
        await asyncio.gather(*(request(n) for n in range(requests)))
    await engine.dispose()
    await plain_engine.dispose()


def count(
    variant: str,
    url: str,
    requests: int,
    workload: str,
    concurrency: int,
    *,
    no_gc: bool,
    cache_sim: bool,
) -> dict[str, int]:
    """Run one variant under callgrind; return its event totals (``Ir``, and more with
    ``cache_sim``: ``D1mr``, ``DLmr``, ``Bcm``, ...)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        *(["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []),
        sys.executable,
        __file__,
        "--child",
        variant,
        "--url",
        url,
        "--requests",
        str(requests),
        "--workload",
        workload,
        "--concurrency",
        str(concurrency),
        *(["--no-gc"] if no_gc else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
    events = re.search(r"Events\s*: ([\w ]+)", result.stderr)
    collected = re.search(r"Collected\s*: ([\d ]+)", result.stderr)
    if events is None or collected is None:
        raise RuntimeError(f"no event counts in valgrind's output:\n{result.stderr}")
    return dict(zip(events.group(1).split(), map(int, collected.group(1).split()), strict=True))


def measure_database(name: str, url: str, args: argparse.Namespace) -> list[str]:
    """Print one database's instruction row; return its simulated-cache rows, if asked."""
    simulated: list[str] = []
    if args.workload == "tenant":
        asyncio.run(prepare(url))
    jobs = [(v, n) for v in ("plain", "reqscope", "given") for n in (0, args.requests)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = list(
            pool.map(
                lambda job, url=url: count(
                    job[0],
                    url,
                    job[1],
                    args.workload,
                    args.concurrency,
                    no_gc=args.no_gc,
                    cache_sim=args.cache_sim,
                ),
                jobs,
            )
        )
    per = [
        {k: (totals[i + 1][k] - totals[i][k]) / args.requests for k in totals[i]} for i in (0, 2, 4)
    ]
    plain, scoped, given = (p["Ir"] for p in per)
    print(
        f"| {name} | {plain:,.0f} | {scoped:,.0f} | {scoped / plain:.3f} | "
        f"{given:,.0f} | {given / plain:.3f} |",
        flush=True,
    )
    if args.cache_sim:
        for label, counts in zip(("plain", "reqscope", "context given"), per, strict=True):
            simulated.append(
                f"| {name} | {label} | {counts['D1mr'] + counts['D1mw']:,.0f} | "
                f"{counts['DLmr'] + counts['DLmw'] + counts['ILmr']:,.0f} | "
                f"{counts['I1mr']:,.0f} | {counts['Bcm'] + counts['Bim']:,.0f} |"
            )
    return simulated


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--workload", choices=["select1", "tenant"], default="select1")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (pool 20)")
    parser.add_argument("--skip-sqlite", action="store_true", help="only PostgreSQL")
    parser.add_argument("--no-gc", action="store_true", help="gc.disable() in every variant")
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate caches and branch prediction (much slower)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.no_gc:
            gc.disable()
        asyncio.run(
            run_variant(args.child, args.url, args.requests, args.workload, args.concurrency)
        )
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    print(f"command: python {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        urls = {}
        if not args.skip_sqlite:
            urls["SQLite"] = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.sqlite3'}"
        if args.postgres:
            urls["PostgreSQL"] = args.postgres
        print(
            "| database | plain instr/req | reqscope instr/req | ratio | "
            "context given instr/req | ratio |"
        )
        print("|---|---|---|---|---|---|")
        simulated: list[str] = []
        for name, url in urls.items():
            simulated += measure_database(name, url, args)
        if simulated:
            print("\nsimulated per request (callgrind --cache-sim=yes --branch-sim=yes):")
            print(
                "| database | variant | L1 data misses | last-level misses | L1 instruction misses "
                "| mispredicted branches |"
            )
            print("|---|---|---|---|---|---|")
            print("\n".join(simulated))


if __name__ == "__main__":
    main()
