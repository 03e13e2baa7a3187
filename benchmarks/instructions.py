"""Instructions per request, reqscope vs plain, counted by valgrind (deterministic).

    python benchmarks/instructions.py [--postgres URL] [--requests 1000] [--workload tenant]
                                      [--concurrency 1] [--skip-sqlite] [--no-gc]

CPU time on a small shared machine moves by ±10 % between rounds (see sessions.py), so a
few-percent difference is hard to resolve there. ``valgrind --tool=callgrind`` counts the
instructions the process executes instead, which repeats to within about 1 % whatever else
the machine is doing. Each variant runs ``SELECT 1`` requests (``--workload tenant``: an ORM
select of five rows of a tenant-scoped model, the plain session filtering by hand, reqscope
through a ``TenantPolicy(rls=False)``) at ``--concurrency`` (default 1; pool 20), each
variant in a process of its own; a run with zero requests is subtracted, so start-up does
not count. The plain variant uses an engine reqscope never touched. Instruction counts
ignore cache misses and system calls, so their ratio is not the CPU-time ratio; it is the
stable measure of how much work reqscope's own code adds.
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
                async with factory.session(UserExecutionContext.create(user)) as session:
                    if tenant is None:
                        await session.execute(text("SELECT 1"))
                    else:  # the policy adds the filter
                        (await session.scalars(select(TenantRow).limit(5))).all()

    async with IsolatedSessionFactory(engine, tenant=tenant) as factory:
        await asyncio.gather(*(request(n) for n in range(requests)))
    await engine.dispose()
    await plain_engine.dispose()


def count(
    variant: str, url: str, requests: int, workload: str, concurrency: int, *, no_gc: bool
) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
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
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--workload", choices=["select1", "tenant"], default="select1")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (pool 20)")
    parser.add_argument("--skip-sqlite", action="store_true", help="only PostgreSQL")
    parser.add_argument("--no-gc", action="store_true", help="gc.disable() in every variant")
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
        print("| database | plain instr/req | reqscope instr/req | ratio |")
        print("|---|---|---|---|")
        for name, url in urls.items():
            if args.workload == "tenant":
                asyncio.run(prepare(url))
            jobs = [("plain", 0), ("plain", args.requests), ("reqscope", 0)]
            jobs.append(("reqscope", args.requests))
            with ThreadPoolExecutor(max_workers=2) as pool:
                totals = list(
                    pool.map(
                        lambda job, url=url: count(
                            job[0], url, job[1], args.workload, args.concurrency, no_gc=args.no_gc
                        ),
                        jobs,
                    )
                )
            plain = (totals[1] - totals[0]) / args.requests
            scoped = (totals[3] - totals[2]) / args.requests
            print(f"| {name} | {plain:,.0f} | {scoped:,.0f} | {scoped / plain:.3f} |", flush=True)


if __name__ == "__main__":
    main()
