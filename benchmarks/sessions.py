"""Per-request cost of reqscope sessions against plain async_sessionmaker sessions.

    python benchmarks/sessions.py [--rounds 5] [--requests 2000] [--postgres URL]

Primary figure: CPU time of this process per request (time.process_time), as
shared/BENCHMARKING.md asks; wall-clock latency and throughput are printed but not gated on.
The plain variants run on an engine of their own that reqscope never touched, with the same
settings (pool, driver, pre-ping) as the factory's: only reqscope's code differs.
"plain-again" is a second run of the plain variant under another name: its ratio is the
noise floor. Rounds interleave the variants in an order shuffled afresh each round
(seeded, so repeatable); the table shows the median of per-round paired ratios, a 95 %
confidence interval for that median (distribution-free: order statistics of the ratios),
and their interquartile range. On a 2-core virtual machine shared with the database server
one round's ratio moves by ±10 % or more, so resolve 5 % with many short rounds:
``--rounds 301 --requests 40`` (a round measures at least ``concurrency`` requests per
variant) gives an interval about ±2.5 % wide at concurrency 1 and 100; runs differ by more
than that, so repeat a run before trusting a cell.
``--runner asyncio`` (default) runs each request in a task of its own, as ASGI servers do;
``--runner anyio`` runs them in task-group workers, inside anyio cancel scopes. ``--pin``
puts this process on one CPU and a local PostgreSQL's backends on the others.

The last column is the time Python's cyclic garbage collector ran during each variant's
measurements, per request (mean: collections are rare and long, so a median would mostly
read 0); it is part of the CPU figure.

Also measured: one leak-detector pass over 10,000 open, unexpired sessions, and RSS growth
over 200,000 session scopes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import sqlalchemy
from sqlalchemy import Integer, String, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import reqscope
from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    TenantPolicy,
    TenantScoped,
    UserExecutionContext,
    build_engine,
    use_context,
)
from reqscope._context import _current
from reqscope._leaks import LeakDetector
from reqscope._registry import Entry, SessionRegistry

POOL = PoolConfig(pool_size=20, max_overflow=0, pool_timeout=120.0)
CONCURRENCY = [1, 100, 1000]
RUNNER = ["asyncio"]  # --runner
PIN = [False]  # --pin
DIAGNOSTICS = [False]  # --diagnostics
SPIN_SECONDS = 5e-6  # the calibration variant's busy loop


class Base(DeclarativeBase):
    pass


class TenantRow(TenantScoped, Base):
    __tablename__ = "reqscope_bench_tenant_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    body: Mapped[str] = mapped_column(String(64))


class Row(Base):
    __tablename__ = "reqscope_bench_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(String(64))


Workload = Callable[[AsyncSession, str], Awaitable[None]]


async def select_one(session: AsyncSession, _user: str) -> None:
    await session.execute(text("SELECT 1"))


async def insert_select(session: AsyncSession, user: str) -> None:
    async with session.begin():
        await session.execute(insert(Row).values(user_id=user, body="x"))
        await session.execute(select(Row.id).where(Row.user_id == user).limit(5))


WORKLOADS: dict[str, Workload] = {"SELECT 1": select_one, "insert+select": insert_select}


def variants(plain_engine: AsyncEngine, factory: IsolatedSessionFactory):
    maker = async_sessionmaker(plain_engine, expire_on_commit=False)

    async def plain(workload: Workload, user: str) -> None:
        async with maker() as session:
            await workload(session, user)

    async def scoped(workload: Workload, user: str) -> None:
        async with factory.session(UserExecutionContext.create(user)) as session:
            await workload(session, user)

    # The session alone: a context per user made beforehand (in an app the middleware
    # makes the request's context once, whatever the request then opens).
    contexts = {f"user-{i}": UserExecutionContext.create(f"user-{i}") for i in range(100)}

    async def scoped_session_only(workload: Workload, user: str) -> None:
        async with factory.session(contexts[user]) as session:
            await workload(session, user)

    # The shape of a FastAPI dependency's session: opened with a child context, used by the
    # endpoint under the request's own, so every statement takes the lineage check.
    children = {user: ctx.child("dependency") for user, ctx in contexts.items()}

    async def scoped_lineage(workload: Workload, user: str) -> None:
        async with factory.session(children[user]) as session:
            with use_context(contexts[user]):
                await workload(session, user)

    runs = {
        "plain": plain,
        "plain-again": plain,
        "reqscope": scoped,
        "reqscope, context given": scoped_session_only,
        "reqscope, used by its parent context": scoped_lineage,
    }
    if DIAGNOSTICS[0]:
        runs.update(diagnostic_variants(plain_engine, factory, contexts))
    return runs


def diagnostic_variants(
    plain_engine: AsyncEngine,
    factory: IsolatedSessionFactory,
    contexts: dict[str, UserExecutionContext],
):
    """Variants that split reqscope's cost into parts (``--diagnostics``).

    - "plain, close inline": ``try/finally: await session.close()`` instead of
      ``async with``, whose ``__aexit__`` closes in a task of its own, as reqscope does not;
    - "plain, factory's engine": the plain session on the engine reqscope listens on;
    - "factory session, bare": the factory's session class (ReqscopeSession, its event hooks)
      on that engine, closed inline, with none of the scope's bookkeeping;
    - "bare + context variable": that bare session in the smallest async context manager that
      makes the request's context current (set on entry, reset on exit): the floor of any
      scope that enforcement can check against;
    - "plain + 5 µs busy loop": the plain variant plus a known amount of client CPU, to
      calibrate how much a few µs of extra work per request move the ratio on this machine.
    """
    maker = async_sessionmaker(plain_engine, expire_on_commit=False)
    factory_maker = async_sessionmaker(factory.engine, expire_on_commit=False)

    def closing_inline(new_session: Callable[[], AsyncSession]):
        async def run(workload: Workload, user: str) -> None:
            session = new_session()
            try:
                await workload(session, user)
            finally:
                await session.close()

        return run

    async def on_factory_engine(workload: Workload, user: str) -> None:
        async with factory_maker() as session:
            await workload(session, user)

    async def spin(workload: Workload, user: str) -> None:
        async with maker() as session:
            await workload(session, user)
            started = time.perf_counter()
            while time.perf_counter() - started < SPIN_SECONDS:
                pass

    async def with_context(workload: Workload, user: str) -> None:
        async with _ContextOnly(factory, contexts[user]) as session:
            await workload(session, user)

    return {
        "plain, close inline": closing_inline(maker),
        "plain, factory's engine": on_factory_engine,
        # the factory's own session class, as factory.session() binds it
        "factory session, bare": closing_inline(factory._keeper.new_session),  # noqa: SLF001
        "bare + context variable": with_context,
        f"plain + {SPIN_SECONDS * 1e6:.0f} µs busy loop": spin,
    }


class _ContextOnly:
    """A bare factory session with the request's context current (diagnostic only)."""

    __slots__ = ("_ctx", "_factory", "_session", "_token")

    def __init__(self, factory: IsolatedSessionFactory, ctx: UserExecutionContext) -> None:
        self._factory, self._ctx = factory, ctx

    async def __aenter__(self) -> AsyncSession:
        self._session = self._factory._keeper.new_session()  # noqa: SLF001
        self._token = _current.set(self._ctx)
        return self._session

    async def __aexit__(self, *_exc: object) -> None:
        try:
            await self._session.close()
        finally:
            _current.reset(self._token)


def parse_ab_arguments(parser: argparse.ArgumentParser, rounds: int) -> argparse.Namespace:
    """The in-process A/B scripts' options (versus.py, telemetry.py), parsed and echoed."""
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    if not args.postgres:
        parser.error("give --postgres URL (or set REQSCOPE_TEST_POSTGRES_URL)")
    print(f"command: python {' '.join(sys.argv)}")
    return args


def round_order(names: list[str], index: int) -> list[str]:
    """The order of the variants in round ``index``: a fresh shuffle, the same in every run.

    Rotating one fixed order would keep each variant's predecessor the same, and on this
    machine the predecessor matters (a variant after one on the same engine runs warmer):
    rotation once put the plain-again control at 1.07 with an interval excluding 1.
    """
    order = list(names)
    random.Random(index).shuffle(order)
    return order


def median_ci(ratios: list[float]) -> str:
    """A 95 % confidence interval for the median of ``ratios``, from their order statistics.

    Distribution-free (the count of ratios below the true median is binomial(n, 1/2)), so
    it holds for the skewed, heavy-tailed ratios a shared machine produces.
    """
    n = len(ratios)
    if n < 6:  # below 6 samples no pair of order statistics covers 95 %
        return "n/a"
    ordered = sorted(ratios)
    half_width = 1.96 * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half_width) - 1)
    high = min(n - 1, math.ceil(n / 2 + half_width) - 1)
    return f"{ordered[low]:.3f} to {ordered[high]:.3f}"


def spread(ratios: list[float]) -> str:
    """The interquartile range of per-round ratios (min to max below 4 rounds)."""
    if len(ratios) < 4:
        return f"{min(ratios):.3f} to {max(ratios):.3f}"
    q1, _, q3 = statistics.quantiles(ratios)
    return f"{q1:.3f} to {q3:.3f}"


# Seconds spent in Python's cyclic garbage collector, counted by the gc callback main() adds.
GC_SECONDS = [0.0, 0.0]  # [total, when the current collection started]


def count_gc_time(phase: str, _info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: add each collection's duration to ``GC_SECONDS[0]``."""
    if phase == "start":
        GC_SECONDS[1] = time.perf_counter()
    else:
        GC_SECONDS[0] += time.perf_counter() - GC_SECONDS[1]


async def measure(
    run, workload: Workload, requests: int, concurrency: int
) -> tuple[float, float, float]:
    """Return (CPU µs, wall ms, cyclic-GC µs) per request for ``requests`` requests.

    ``RUNNER[0] == "asyncio"``: every request runs in an asyncio task of its own, at most
    ``concurrency`` at a time, as uvicorn runs ASGI requests. ``"anyio"``: ``concurrency``
    workers in an anyio task group each run their share of requests one after another, so
    every request runs inside an anyio cancel scope (as under ``BaseHTTPMiddleware``).
    The GC figure is the time the cyclic garbage collector ran during the measurement
    (part of the CPU figure): it grows with the objects requests keep alive meanwhile.
    """
    per_worker = max(1, requests // concurrency)
    total = per_worker * concurrency
    loop = asyncio.get_running_loop()
    own_task = RUNNER[0] == "asyncio"

    async def worker(index: int) -> None:
        user = f"user-{index % 100}"
        for _ in range(per_worker):
            request = run(workload, user)
            await (loop.create_task(request) if own_task else request)

    gc_before = GC_SECONDS[0]
    cpu, wall = time.process_time(), time.perf_counter()
    if own_task:
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
    else:
        async with anyio.create_task_group() as group:
            for index in range(concurrency):
                group.start_soon(worker, index)
    return (
        (time.process_time() - cpu) / total * 1e6,
        (time.perf_counter() - wall) / total * 1e3,
        (GC_SECONDS[0] - gc_before) / total * 1e6,
    )


def pin_self() -> None:
    """Run this process on the last CPU only (``--pin``)."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


async def pin_server_backends(engine: AsyncEngine) -> None:
    """Move this database's PostgreSQL backends off this process's CPU (``--pin``).

    Only for a server on this machine: each pid is checked to be a ``postgres`` process.
    """
    if engine.dialect.name != "postgresql":
        return
    async with engine.connect() as conn:
        pids = (
            await conn.scalars(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND backend_type = 'client backend'"
                )
            )
        ).all()
    pin_elsewhere(list(pids))


def pin_elsewhere(pids: list[int]) -> None:
    """Run the ``postgres`` processes among ``pids`` on the CPUs this process does not use."""
    others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
    for pid in pids:
        comm = Path(f"/proc/{pid}/comm")
        if others and comm.exists() and comm.read_text().strip() == "postgres":
            os.sched_setaffinity(pid, others)


async def bench_database(name: str, url: str, rounds: int, requests: int) -> list[str]:
    engine = build_engine(url, pool=POOL)
    # The plain variants get an engine of their own, with the same settings: one that
    # reqscope never touched, as in an application without reqscope.
    plain_engine = build_engine(url, pool=POOL)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    lines = []
    async with IsolatedSessionFactory(engine) as factory:
        runs = variants(plain_engine, factory)
        names = list(runs)
        for label, workload in WORKLOADS.items():
            for concurrency in CONCURRENCY:
                n = max(requests, concurrency)
                for variant in names:  # warm up: fill the pool, cache statements
                    await measure(runs[variant], workload, min(n, 400), min(concurrency, 100))
                if PIN[0]:
                    await pin_server_backends(engine)
                cpu: dict[str, list[float]] = {v: [] for v in names}
                wall: dict[str, list[float]] = {v: [] for v in names}
                gc_time: dict[str, list[float]] = {v: [] for v in names}
                for index in range(rounds):
                    order = round_order(names, index)
                    for variant in order:
                        c, w, g = await measure(runs[variant], workload, n, concurrency)
                        cpu[variant].append(c)
                        wall[variant].append(w)
                        gc_time[variant].append(g)
                for variant in names:
                    ratios = [a / b for a, b in zip(cpu[variant], cpu["plain"], strict=True)]
                    wall_ratios = [a / b for a, b in zip(wall[variant], wall["plain"], strict=True)]
                    lines.append(
                        f"| {name} | {label} | {concurrency} | {variant} | "
                        f"{statistics.median(cpu[variant]):.0f} | "
                        f"{statistics.median(ratios):.3f} | "
                        f"{median_ci(ratios)} | "
                        f"{spread(ratios)} | "
                        f"{statistics.median(wall[variant]):.3f} | "
                        f"{statistics.median(wall_ratios):.3f} | "
                        f"{statistics.fmean(gc_time[variant]):.1f} |"
                    )
                print("\n".join(lines[-len(names) :]), flush=True)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    await engine.dispose()
    await plain_engine.dispose()
    return lines


async def bench_tenant(name: str, url: str, rounds: int, requests: int) -> None:
    """The tenant-scoped session against a plain session running the same filtered query."""
    engine = build_engine(url, pool=POOL)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(
            insert(TenantRow), [{"user_id": f"user-{i % 100}", "body": "x"} for i in range(1000)]
        )
    plain_engine = build_engine(url, pool=POOL)  # untouched by reqscope, same settings
    maker = async_sessionmaker(plain_engine, expire_on_commit=False)
    # ORM filters only: this measures reqscope's client-side cost (RLS adds one
    # set_config statement per transaction, a server round trip, on top).
    tenant = IsolatedSessionFactory(engine, tenant=TenantPolicy(rls=False))

    async def plain(_workload: Workload, user: str) -> None:
        async with maker() as session:
            await session.scalars(select(TenantRow).where(TenantRow.user_id == user).limit(5))

    async def scoped(_workload: Workload, user: str) -> None:
        async with tenant.session(UserExecutionContext.create(user)) as session:
            await session.scalars(select(TenantRow).limit(5))  # the policy adds the filter

    runs = {"plain": plain, "plain-again": plain, "reqscope+tenant": scoped}
    names = list(runs)
    async with tenant:
        for concurrency in (1, 100):
            for variant in names:
                await measure(runs[variant], select_one, 400, min(concurrency, 100))
            if PIN[0]:
                await pin_server_backends(engine)
            cpu: dict[str, list[float]] = {v: [] for v in names}
            gc_time: dict[str, list[float]] = {v: [] for v in names}
            for index in range(rounds):
                for variant in round_order(names, index):
                    c, _, g = await measure(runs[variant], select_one, requests, concurrency)
                    cpu[variant].append(c)
                    gc_time[variant].append(g)
            for variant in names:
                ratios = [a / b for a, b in zip(cpu[variant], cpu["plain"], strict=True)]
                print(
                    f"| {name} | ORM select, tenant model | {concurrency} | {variant} | "
                    f"{statistics.median(cpu[variant]):.0f} | {statistics.median(ratios):.3f} | "
                    f"{median_ci(ratios)} | {spread(ratios)} | | | "
                    f"{statistics.fmean(gc_time[variant]):.1f} |",
                    flush=True,
                )
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await engine.dispose()
    await plain_engine.dispose()


def leak_pass_cost() -> float:
    """Median µs of one LeakDetector.scan() over 10,000 open, unexpired sessions."""
    registry = SessionRegistry()
    for i in range(10_000):
        ctx = UserExecutionContext.create(f"user-{i % 100}")
        registry.add(Entry(None, ctx, lifetime=3600.0))  # type: ignore[arg-type]
    detector = LeakDetector(registry, lambda _e, _d: None, _noop, reclaim_leaks=True)
    samples = []
    for _ in range(9):
        started = time.perf_counter_ns()
        for _ in range(1000):
            detector.scan()
        samples.append((time.perf_counter_ns() - started) / 1000 / 1000)
    if len(registry) != 10_000:
        raise RuntimeError("a pass over unexpired sessions must not remove any")
    return statistics.median(samples)


async def _noop() -> None:
    return None


async def empty_scope_cost(batches: int = 21, scopes: int = 5000) -> tuple[float, float]:
    """Median CPU µs of an empty session scope and of a bare factory session, no I/O.

    What reqscope's own Python adds per request, measured hot: each scope (or bare session,
    closed inline) runs in an asyncio task of its own, ten at a time, in alternating
    batches. The difference is the scope's cost before any cache or scheduling effect.
    """
    async with IsolatedSessionFactory(leak_check_interval=0) as factory:
        ctx = UserExecutionContext.create("u")
        loop = asyncio.get_running_loop()

        async def scoped() -> None:
            async with factory.session(ctx):
                pass

        async def bare() -> None:
            session = factory._keeper.new_session()  # noqa: SLF001
            await session.close()

        samples: dict[str, list[float]] = {"scope": [], "bare": []}
        for _ in range(batches):
            for name, run in (("scope", scoped), ("bare", bare)):
                started = time.process_time()
                for _ in range(scopes // 10):
                    await asyncio.gather(*(loop.create_task(run()) for _ in range(10)))
                samples[name].append((time.process_time() - started) / scopes * 1e6)
        return statistics.median(samples["scope"]), statistics.median(samples["bare"])


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:  # noqa: PTH123
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def rss_growth(scopes: int) -> tuple[float, float]:
    # As many connections as workers: this phase measures memory, not pool contention.
    async with IsolatedSessionFactory(pool=PoolConfig(pool_size=10, max_overflow=0)) as factory:

        async def run(count: int) -> None:
            async def worker() -> None:
                for _ in range(count // 10):
                    async with factory.session(UserExecutionContext.create("u")) as session:
                        await session.execute(text("SELECT 1"))

            async with anyio.create_task_group() as group:
                for _ in range(10):
                    group.start_soon(worker)

        await run(20_000)  # warm up: caches, pool, allocator arenas
        before = rss_mb()
        await run(scopes)
        return before, rss_mb()


def apply_options(args: argparse.Namespace) -> None:
    """Set the module-level options (runner, pinning) from the command line."""
    RUNNER[0] = args.runner
    PIN[0] = args.pin
    DIAGNOSTICS[0] = args.diagnostics
    if args.pin:
        pin_self()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--scopes", type=int, default=200_000)
    parser.add_argument("--only-memory", action="store_true", help="skip the latency table")
    parser.add_argument("--only-tenant", action="store_true", help="only the tenant table")
    parser.add_argument("--skip-sqlite", action="store_true", help="only PostgreSQL tables")
    parser.add_argument("--skip-tenant", action="store_true", help="no tenant table")
    parser.add_argument("--workload", choices=list(WORKLOADS), help="only this workload")
    parser.add_argument(
        "--runner",
        choices=["asyncio", "anyio"],
        default="asyncio",
        help="each request in its own asyncio task (as uvicorn runs them; default), or "
        "workers in an anyio task group (every request inside an anyio cancel scope)",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help=f"instead of {' '.join(map(str, CONCURRENCY))}"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin this process to one CPU and a local PostgreSQL's backends to the others "
        "(less noise on a small machine)",
    )
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="also measure variants that split reqscope's cost into parts "
        "(plain closing inline, plain on the factory's engine, the factory's bare session, "
        "that session with the context variable, the scope without its cleanup deadline) "
        "and a calibration: plain plus a 5 µs busy loop",
    )
    args = parser.parse_args()
    apply_options(args)
    if args.concurrency:
        CONCURRENCY[:] = args.concurrency
    if args.workload:
        for name in list(WORKLOADS):
            if name != args.workload:
                del WORKLOADS[name]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"python {platform.python_version()}, sqlalchemy {sqlalchemy.__version__}, "
        f"reqscope {reqscope.__version__}, nproc {os.cpu_count()}, {platform.machine()}"
    )
    print(
        f"pool: {POOL}; rounds={args.rounds}; requests per measurement={args.requests}; "
        f"runner={args.runner}; pinned={args.pin}"
    )
    print(
        "| database | workload | concurrency | variant | CPU µs/req | CPU ratio (median) | "
        "95 % CI | ratio IQR | wall ms/req | wall ratio | GC µs/req (mean) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gc.callbacks.append(count_gc_time)
    full = not (args.only_memory or args.only_tenant)
    tenant = args.only_tenant or (full and not args.skip_tenant)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.sqlite3'}"
        if full and not args.skip_sqlite:
            await bench_database("SQLite", sqlite, args.rounds, args.requests)
        if tenant and not args.skip_sqlite:
            await bench_tenant("SQLite", sqlite, args.rounds, args.requests)
    if args.postgres and full:
        await bench_database("PostgreSQL", args.postgres, args.rounds, args.requests)
    if args.postgres and tenant:
        await bench_tenant("PostgreSQL", args.postgres, args.rounds, args.requests)
    if args.only_tenant:
        return
    print(f"\nleak-detector pass over 10,000 open sessions: {leak_pass_cost():.2f} µs (median)")
    scope_cpu, bare_cpu = await empty_scope_cost()
    print(
        f"empty session scope, no I/O: {scope_cpu:.2f} µs CPU vs {bare_cpu:.2f} µs for a bare "
        f"factory session (+{scope_cpu - bare_cpu:.2f} µs; median of 21 batches)"
    )
    before, after = await rss_growth(args.scopes)
    print(
        f"RSS over {args.scopes:,} session scopes: {before:.1f} MB -> {after:.1f} MB "
        f"(+{after - before:.1f} MB)"
    )


if __name__ == "__main__":
    asyncio.run(main())
