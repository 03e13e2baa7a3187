"""One FastAPI endpoint with reqscope's dependency against the same with a plain ``get_db``.

    python benchmarks/fastapi_endpoint.py [--postgres URL] [--rounds 31] [--requests 200]

Each variant is a whole FastAPI app driven in this process through ASGI (no HTTP client,
no socket: what is measured is the server side of a request): reqscope's middleware and
dependency, or FastAPI's yield dependency with an ``async_sessionmaker`` session. Both apps
run on engines with the same settings. Workloads: ``SELECT 1`` (``RequestScopedDbDep`` vs a
``get_db`` that only yields) and insert + select + commit (``CommitOnSuccessDbDep`` vs a
``get_db`` that commits after ``yield``). The user comes from a header (a resolver) for
reqscope; the plain app has no notion of one.

Figures, as shared/BENCHMARKING.md asks: CPU time of this process per request (primary),
mean and p99 latency; each as the median over rounds of the per-round ratio to the plain
variant, with its 95 % interval. "plain again" is the plain app measured a second time
under another name: the noise floor.
"""

# No `from __future__ import annotations`: FastAPI must see the local get_db annotations.

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import fastapi
import sqlalchemy
from fastapi import Depends, FastAPI
from sessions import median_ci, round_order  # benchmarks/sessions.py
from sqlalchemy import Integer, String, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reqscope import IsolatedSessionFactory, PoolConfig, build_engine
from reqscope.fastapi import CommitOnSuccessDbDep, RequestScopedDbDep, from_header, setup

POOL = PoolConfig(pool_size=20, max_overflow=0, pool_timeout=30)


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "reqscope_bench_fastapi_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)


async def select_one(db: AsyncSession) -> int:
    return int((await db.execute(text("SELECT 1"))).scalar_one())


async def insert_select(db: AsyncSession) -> int:
    await db.execute(insert(Row).values(user_id="alice"))
    return int(await db.scalar(select(Row.id).order_by(Row.id.desc()).limit(1)) or 0)


def plain_app(url: str, workload: str) -> tuple[FastAPI, Callable[[], Any]]:
    engine = build_engine(url, pool=POOL)
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()
    if workload == "select":

        async def get_db() -> AsyncIterator[AsyncSession]:
            async with sessionmaker() as session:
                yield session

        @app.get("/")
        async def endpoint(db: Annotated[AsyncSession, Depends(get_db)]) -> int:
            return await select_one(db)

    else:

        async def get_db() -> AsyncIterator[AsyncSession]:  # commits on success
            async with sessionmaker() as session:
                yield session
                await session.commit()

        @app.get("/")
        async def endpoint(db: Annotated[AsyncSession, Depends(get_db)]) -> int:
            return await insert_select(db)

    return app, engine.dispose


def reqscope_app(url: str, workload: str) -> tuple[FastAPI, Callable[[], Any]]:
    factory = IsolatedSessionFactory(url, pool=POOL)
    app = FastAPI()
    setup(app, factory, user_resolver=from_header("x-user"))
    if workload == "select":

        @app.get("/")
        async def endpoint(db: RequestScopedDbDep) -> int:
            return await select_one(db)

    else:

        @app.get("/")
        async def endpoint(db: CommitOnSuccessDbDep) -> int:
            return await insert_select(db)

    app.state.factory = factory
    return app, factory.aclose


async def call(app: FastAPI) -> float:
    """One GET / through ASGI; returns its latency in seconds."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"x-user", b"alice")],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    started = time.perf_counter()
    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"the benchmark endpoint answered {status}")
    return time.perf_counter() - started


async def measure(app: FastAPI, requests: int, concurrency: int) -> tuple[float, float, float]:
    """(CPU seconds per request, mean latency, p99 latency) over ``requests`` requests."""
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await call(app))

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return cpu / requests, statistics.fmean(latencies), p99


async def bench(url: str, workload: str, concurrency: int, rounds: int, requests: int) -> None:
    builders = {
        "plain Depends(get_db)": plain_app,
        "plain again (control)": plain_app,
        "reqscope": reqscope_app,
    }
    apps: dict[str, FastAPI] = {}
    closers = []
    contexts = []
    for name, build in builders.items():
        app, close = build(url, workload)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        contexts.append(lifespan)
        apps[name] = app
        closers.append(close)
        await measure(app, max(requests, concurrency), concurrency)  # warm up: pool, caches
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in apps}
    for index in range(rounds):
        for name in round_order(list(apps), index):
            figures[name].append(await measure(apps[name], max(requests, concurrency), concurrency))
    for lifespan in reversed(contexts):
        await lifespan.__aexit__(None, None, None)
    for close in closers:
        await close()
    base = figures["plain Depends(get_db)"]
    print(f"\n{workload}, concurrency {concurrency}: ratio to plain Depends(get_db)")
    print(f"{'variant':24} {'CPU/request':>24} {'mean latency':>24} {'p99 latency':>24}")
    for name, rows in figures.items():
        cells = []
        for column in range(3):
            ratios = [row[column] / plain[column] for row, plain in zip(rows, base, strict=True)]
            cells.append(f"{statistics.median(ratios):.3f} ({median_ci(ratios)})")
        absolute = statistics.median(row[0] for row in rows) * 1e6
        print(f"{name:24} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24}   {absolute:.0f} µs CPU")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_BENCH_POSTGRES_URL"))
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--workload", choices=["select", "insert"], nargs="+")
    args = parser.parse_args()
    url = args.postgres or "postgresql+asyncpg://postgres@127.0.0.1:5432/test?ssl=disable"
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(
        f"python {platform.python_version()}, fastapi {fastapi.__version__}, sqlalchemy "
        f"{sqlalchemy.__version__}, nproc {os.cpu_count()}, database {url.split('@')[-1]}"
    )
    engine = build_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()
    for workload in args.workload or ["select", "insert"]:
        for concurrency in args.concurrency:
            await bench(url, workload, concurrency, args.rounds, args.requests)


if __name__ == "__main__":
    asyncio.run(main())
