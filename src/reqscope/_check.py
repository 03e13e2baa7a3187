"""The isolation self-check behind ``reqscope check``.

It runs a concurrent workload through an ``IsolatedSessionFactory`` against a table of its
own (``reqscope_check_<random>``, created and dropped by the check, never a user table) and
verifies: no request saw another user's rows, no request saw another request's *uncommitted*
row, no session leaked and no connection stayed checked out.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, update

from reqscope._context import UserExecutionContext
from reqscope._enforcement import session_tags
from reqscope._pool import PoolConfig
from reqscope._sessions import IsolatedSessionFactory

__all__ = ["CheckReport", "run_check"]


@dataclass
class CheckReport:
    """The outcome of one ``reqscope check`` run."""

    database: str
    users: int
    requests: int
    concurrency: int
    pool_size: int
    completed: int = 0
    failed: int = 0
    seconds: float = 0.0
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    foreign_rows_seen: int = 0
    uncommitted_rows_seen: int = 0
    wrong_session_owner: int = 0
    leaked_sessions: int = 0
    checked_out_after: int = 0
    isolation_violations: int = 0
    pool_high_water: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every isolation property held and every request completed."""
        return not (
            self.failed
            or self.foreign_rows_seen
            or self.uncommitted_rows_seen
            or self.wrong_session_owner
            or self.leaked_sessions
            or self.checked_out_after
            or self.isolation_violations
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe data (with ``ok``)."""
        return {**asdict(self), "ok": self.ok}


def _table(name: str) -> Table:
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("user_id", String(64), nullable=False, index=True),
        Column("request_id", String(64), nullable=False),
        Column("status", String(16), nullable=False),
    )


MAX_ERRORS_SHOWN = 5
SERVER_POOL_SIZE = 10
SQLITE_POOL_SIZE = 4


class _Workload:
    """One run: the table, the factory, the counters; one request at a time per worker."""

    def __init__(self, factory: IsolatedSessionFactory, report: CheckReport) -> None:
        self.factory = factory
        self.report = report
        self.table = _table(f"reqscope_check_{os.urandom(6).hex()}")
        self.setup = UserExecutionContext.create("reqscope-check")
        self.latencies: list[float] = []
        self.next_request = 0
        self.done = 0

    async def create_table(self) -> None:
        # Through a session scope, so an unreachable server is a DatabaseUnavailableError.
        async with self.factory.begin(self.setup) as session:
            await session.run_sync(lambda s: self.table.metadata.create_all(s.connection()))

    async def drop_table(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self.factory.begin(self.setup) as session:
                await session.run_sync(lambda s: self.table.metadata.drop_all(s.connection()))

    async def request(self, n: int) -> None:
        report, table, factory = self.report, self.table, self.factory
        user = f"check-user-{n % report.users}"
        ctx = UserExecutionContext.create(user)
        started = time.perf_counter()
        async with factory.begin(ctx) as session:
            if session_tags(session).user_id != user:
                report.wrong_session_owner += 1
            stats = factory.pool_stats()
            if stats is not None:
                report.pool_high_water = max(report.pool_high_water, stats.checked_out)
            row = {"user_id": user, "request_id": ctx.request_id, "status": "pending"}
            result = await session.execute(insert(table).values(**row))
            (row_id,) = result.inserted_primary_key or (None,)  # type: ignore[attr-defined]
            await anyio.lowlevel.checkpoint()  # let other requests see this pending row
            # By primary key: an unindexed UPDATE takes range locks (InnoDB deadlocks).
            await session.execute(update(table).where(table.c.id == row_id).values(status="done"))
        async with factory.session(ctx) as session:
            owners = await session.scalars(select(table.c.user_id).where(table.c.user_id == user))
            report.foreign_rows_seen += sum(1 for owner in owners if owner != user)
            pending = await session.scalar(
                select(func.count()).select_from(table).where(table.c.status == "pending")
            )
            report.uncommitted_rows_seen += int(pending or 0)
        self.latencies.append(time.perf_counter() - started)

    async def worker(self, progress: Callable[[int, int], None] | None) -> None:
        report = self.report
        while self.next_request < report.requests:
            n = self.next_request
            self.next_request += 1
            try:
                await self.request(n)
                report.completed += 1
            except Exception as exc:
                report.failed += 1
                if len(report.errors) < MAX_ERRORS_SHOWN:
                    report.errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            self.done += 1
            if progress is not None:
                progress(self.done, report.requests)

    def finish(self) -> None:
        report = self.report
        metrics = self.factory.metrics()
        report.leaked_sessions = metrics.active_sessions + metrics.leaks_detected
        report.checked_out_after = metrics.pool.checked_out if metrics.pool else 0
        report.isolation_violations = metrics.isolation_violations + metrics.scope_violations
        report.throughput = report.completed / report.seconds if report.seconds else 0.0
        if self.latencies:
            ordered = sorted(self.latencies)
            report.p50_ms = statistics.median(ordered) * 1000
            report.p99_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


async def run_check(
    database_url: str | None,
    *,
    users: int = 20,
    requests: int = 500,
    concurrency: int = 50,
    pool_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Run the workload and return the report (database errors propagate to the caller).

    ``pool_size`` defaults to 10 connections, or 4 on SQLite: SQLite lets one transaction
    write at a time and the others poll in its busy handler, unfairly, so more connections
    only make a starved writer more likely to reach the busy timeout on a slow machine.

    Raises:
        ValueError: a count is below 1.
        ReqscopeError: the URL is malformed or its driver is not installed.
        DatabaseUnavailableError: the database cannot be reached.
    """
    if pool_size is None:
        sqlite = database_url is None or database_url.startswith("sqlite")
        pool_size = SQLITE_POOL_SIZE if sqlite else SERVER_POOL_SIZE
    if min(users, requests, concurrency, pool_size) < 1:
        raise ValueError("--users, --requests, --concurrency and --pool-size must be >= 1")
    pool = PoolConfig(pool_size=pool_size, max_overflow=0, pool_timeout=60.0)
    factory = IsolatedSessionFactory(database_url, pool=pool, max_session_lifetime=120.0)
    shown = factory.engine.url.render_as_string(hide_password=True)
    workload = _Workload(factory, CheckReport(shown, users, requests, concurrency, pool_size))
    async with factory:
        await workload.create_table()
        try:
            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(min(concurrency, requests)):
                    group.start_soon(workload.worker, progress)
            workload.report.seconds = time.perf_counter() - started
        finally:
            await workload.drop_table()
        workload.report.warnings = list((await factory.health()).warnings)
        workload.finish()
    return workload.report
