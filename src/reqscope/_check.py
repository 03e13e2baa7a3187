"""The isolation self-check behind ``reqscope check``.

It runs a concurrent workload of many users through an ``IsolatedSessionFactory`` with a
tenant policy, against a table of its own (``reqscope_check_<random>``, created and dropped
by the check, never a user table), and verifies what it reports by attempting it:

- every request reads the table **without** a user filter of its own: the tenant filter
  must confine it to the user's rows, and no request may see another's uncommitted row;
- after the workload, probes try what isolation must refuse: a session used by another
  user, by a later request of the same user, after its block ended, and a row written for
  another user. Each attempt that succeeds is a breach;
- no session leaked and no connection stayed checked out.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy import Integer, String, func, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reqscope._context import UserExecutionContext, use_context
from reqscope._enforcement import session_tags
from reqscope._pool import PoolConfig
from reqscope._sessions import IsolatedSessionFactory
from reqscope.exceptions import IsolationViolation, SessionScopeError
from reqscope.tenancy import TenantPolicy, TenantScoped

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
    probes: int = 0
    probes_refused: int = 0
    breaches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every property held, every probe was refused, every request completed."""
        return not (
            self.failed
            or self.foreign_rows_seen
            or self.uncommitted_rows_seen
            or self.wrong_session_owner
            or self.leaked_sessions
            or self.checked_out_after
            or self.isolation_violations
            or self.breaches
            or self.probes_refused < self.probes
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe data (with ``ok``)."""
        return {**asdict(self), "ok": self.ok}


def _model(table: str) -> type[Any]:
    """A tenant-scoped model on ``table``, mapped in a registry of its own."""

    class Base(DeclarativeBase):
        pass

    class CheckRow(TenantScoped, Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
        request_id: Mapped[str] = mapped_column(String(64))
        status: Mapped[str] = mapped_column(String(16))

    return CheckRow


MAX_ERRORS_SHOWN = 5
SERVER_POOL_SIZE = 10
SQLITE_POOL_SIZE = 4
PROBE_ROUNDS = 3
INTRUDER = "reqscope-check-intruder"


def _drop(_record: logging.LogRecord) -> bool:
    return False


@contextmanager
def _quiet_refusals() -> Iterator[None]:
    """Swallow the refusals the probes provoke (the check reports each one instead)."""
    enforcement = logging.getLogger("reqscope._enforcement")
    enforcement.addFilter(_drop)
    try:
        yield
    finally:
        enforcement.removeFilter(_drop)


class _Workload:
    """One run: the table, the factory, the counters; one request at a time per worker."""

    def __init__(self, factory: IsolatedSessionFactory, report: CheckReport) -> None:
        self.factory = factory
        self.report = report
        self.row = _model(f"reqscope_check_{os.urandom(6).hex()}")
        self.setup = UserExecutionContext.create("reqscope-check")
        self.latencies: list[float] = []
        self.next_request = 0
        self.done = 0

    async def create_table(self) -> None:
        # Through a session scope, so an unreachable server is a DatabaseUnavailableError.
        metadata = self.row.metadata
        async with self.factory.begin(self.setup) as session:
            await session.run_sync(lambda s: metadata.create_all(s.connection()))

    async def drop_table(self) -> None:
        metadata = self.row.metadata
        with anyio.CancelScope(shield=True):
            async with self.factory.begin(self.setup) as session:
                await session.run_sync(lambda s: metadata.drop_all(s.connection()))
        self.row.registry.dispose()  # no longer a mapped tenant table of this process

    async def request(self, n: int) -> None:
        report, row, factory = self.report, self.row, self.factory
        user = f"check-user-{n % report.users}"
        ctx = UserExecutionContext.create(user)
        started = time.perf_counter()
        async with factory.begin(ctx) as session:
            if session_tags(session).user_id != user:
                report.wrong_session_owner += 1
            stats = factory.pool_stats()
            if stats is not None:
                report.pool_high_water = max(report.pool_high_water, stats.checked_out)
            mine = row(user_id=user, request_id=ctx.request_id, status="pending")
            session.add(mine)
            await session.flush()
            await anyio.lowlevel.checkpoint()  # let other requests see this pending row
            # By primary key: an unindexed UPDATE takes range locks (InnoDB deadlocks).
            await session.execute(update(row).where(row.id == mine.id).values(status="done"))
        async with factory.session(ctx) as session:
            # No user filter here: the tenant policy must add it.
            owners = await session.scalars(select(row.user_id))
            report.foreign_rows_seen += sum(1 for owner in owners if owner != user)
            pending = await session.scalar(
                select(func.count()).select_from(row).where(row.status == "pending")
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

    async def probe(self, what: str, attempt: Callable[[], Any], refusal: type[Exception]) -> None:
        """Run ``attempt``, which isolation must refuse with ``refusal``."""
        self.report.probes += 1
        try:
            await attempt()
        except refusal:
            self.report.probes_refused += 1
            return
        self.report.breaches.append(f"{what} was allowed")

    async def probes(self) -> None:
        """Attempt what isolation must refuse, a few times over, and record what got through."""
        for n in range(PROBE_ROUNDS):
            await self.probe_round(f"check-user-{n % self.report.users}")

    async def probe_round(self, user: str) -> None:
        row, factory = self.row, self.factory
        intruder = UserExecutionContext.create(INTRUDER)
        ctx = UserExecutionContext.create(user)
        later = UserExecutionContext.create(user)  # the same user's next request
        select_one = text("SELECT 1")
        async with factory.session(ctx) as session:

            async def as_intruder() -> None:
                with use_context(intruder):
                    await session.execute(select_one)

            async def in_later_request() -> None:
                with use_context(later):
                    await session.execute(select_one)

            async def foreign_write() -> None:
                session.add(row(user_id=INTRUDER, request_id=ctx.request_id, status="x"))
                try:
                    await session.flush()
                finally:
                    await session.rollback()

            await self.probe(
                f"user {user!r}'s session used by user {INTRUDER!r}",
                as_intruder,
                IsolationViolation,
            )
            await self.probe(
                f"user {user!r}'s session used by a later request of the same user",
                in_later_request,
                IsolationViolation,
            )
            await self.probe(
                f"a row for user {INTRUDER!r} written by user {user!r}",
                foreign_write,
                IsolationViolation,
            )

        async def after_block() -> None:
            try:
                await session.execute(select_one)
            finally:  # if it was allowed, it took a connection: give it back
                await session.close()

        await self.probe(
            f"user {user!r}'s session used after its block ended", after_block, SessionScopeError
        )

    def finish(self, violations_before_probes: int) -> None:
        report = self.report
        metrics = self.factory.metrics()
        report.leaked_sessions = metrics.active_sessions + metrics.leaks_detected
        report.checked_out_after = metrics.pool.checked_out if metrics.pool else 0
        report.isolation_violations = violations_before_probes
        report.throughput = report.completed / report.seconds if report.seconds else 0.0
        if report.foreign_rows_seen:
            report.breaches.append(
                f"requests read {report.foreign_rows_seen} row(s) of other users through "
                "the tenant filter"
            )
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
    """Run the workload and the probes, and return the report (database errors propagate).

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
    factory = IsolatedSessionFactory(
        database_url,
        pool=pool,
        max_session_lifetime=120.0,
        # The check's own table has no row-level security policy: ORM tenant filters only.
        tenant=TenantPolicy(rls=False),
    )
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
            metrics = factory.metrics()
            violations = metrics.isolation_violations + metrics.scope_violations
            with _quiet_refusals():
                await workload.probes()
        finally:
            await workload.drop_table()
        workload.report.warnings = list((await factory.health()).warnings)
        workload.finish(violations)
    return workload.report
