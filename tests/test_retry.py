"""factory.run_in_transaction(): conflicts retried in fresh sessions, other errors at once.

The conflicts are real: two SERIALIZABLE transactions in a write skew (PostgreSQL aborts
one with SQLSTATE 40001; MariaDB's deadlock detector picks one, error 1213) and a deadlock
provoked on purpose (40P01 / 1213).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

from conftest import Database, server_url
from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    TransactionConflictError,
)
from reqscope._retry import backoff_delay, is_transaction_conflict

pytestmark = pytest.mark.anyio


class _DriverError(Exception):
    """What a driver raises, as far as the classifier reads it."""

    def __init__(self, *args: object, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        if sqlstate is not None:
            self.sqlstate = sqlstate


def _wrapped(orig: Exception) -> sa_exc.DBAPIError:
    return sa_exc.OperationalError("UPDATE t SET x = 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "conflict"),
    [
        (_wrapped(_DriverError("could not serialize", sqlstate="40001")), True),
        (_wrapped(_DriverError("deadlock detected", sqlstate="40P01")), True),
        (_wrapped(_DriverError(1213, "Deadlock found; try restarting transaction")), True),
        (_wrapped(_DriverError("duplicate key", sqlstate="23505")), False),
        (_wrapped(_DriverError(1205, "Lock wait timeout exceeded")), False),
        (_wrapped(_DriverError("no code at all")), False),
        (ValueError("40001"), False),
    ],
)
def test_conflicts_are_told_from_other_errors(error: BaseException, conflict: bool) -> None:
    assert is_transaction_conflict(error) is conflict


@given(st.integers(min_value=1, max_value=30))
def test_backoff_is_jittered_below_a_doubling_cap(retry: int) -> None:
    delay = backoff_delay(retry, 0.05, 1.0)
    assert 0.0 <= delay <= min(1.0, 0.05 * 2 ** (retry - 1))


async def test_returns_what_the_function_returns_and_commits(factory, tables, alice) -> None:
    from models import Note

    async def work(session: AsyncSession) -> str:
        session.add(Note(user_id="alice", body="kept"))
        return "done"

    assert await factory.run_in_transaction(work, alice) == "done"
    async with factory.session(alice) as session:
        assert (await session.execute(sa.select(Note.body))).scalars().all() == ["kept"]
    assert factory.metrics().transaction_retries == 0


async def test_current_context_is_used_when_none_is_given(factory, alice) -> None:
    from reqscope import use_context

    async def whose(session: AsyncSession) -> str:
        return str(session.info["user_id"])

    with use_context(alice):
        assert await factory.run_in_transaction(whose) == "alice"


async def test_conflict_every_time_gives_up_with_a_library_error(factory, alice) -> None:
    sessions: list[str] = []

    async def always_conflicts(session: AsyncSession) -> None:
        sessions.append(session.info["session_id"])
        await session.execute(sa.text("SELECT 1"))
        raise _wrapped(_DriverError("could not serialize access", sqlstate="40001"))

    with pytest.raises(TransactionConflictError, match="3 time") as caught:
        await factory.run_in_transaction(always_conflicts, alice, retries=2, backoff=0)
    assert caught.value.attempts == 3
    assert is_transaction_conflict(caught.value.__cause__)  # type: ignore[arg-type]
    assert len(set(sessions)) == 3  # a new session for every attempt
    metrics = factory.metrics()
    assert (metrics.transaction_retries, metrics.transaction_conflicts_exhausted) == (2, 1)
    assert metrics.to_dict()["transaction_retries"] == 2
    assert metrics.active_sessions == 0


async def test_retries_zero_runs_once(factory, alice) -> None:
    calls = 0

    async def conflicts(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        raise _wrapped(_DriverError(1213, "Deadlock found"))

    with pytest.raises(TransactionConflictError):
        await factory.run_in_transaction(conflicts, alice, retries=0)
    assert calls == 1


async def test_other_errors_are_raised_at_once(factory, tables, alice) -> None:
    from models import Note

    calls = 0

    async def duplicate(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        session.add(Note(id=1, user_id="alice", body="a"))
        await session.flush()
        session.add(Note(id=1, user_id="alice", body="b"))
        await session.flush()

    with pytest.raises(sa_exc.IntegrityError):
        await factory.run_in_transaction(duplicate, alice, backoff=0)

    async def broken(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("the caller's own bug")

    with pytest.raises(ValueError, match="own bug"):
        await factory.run_in_transaction(broken, alice, backoff=0)
    assert calls == 2
    assert factory.metrics().transaction_retries == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries"),
        ({"backoff": 2.0, "max_backoff": 1.0}, "backoff"),
        ({"backoff": -0.1}, "backoff"),
    ],
)
async def test_bad_settings_are_refused_before_anything_runs(
    factory, alice, kwargs: dict[str, Any], message: str
) -> None:
    async def work(session: AsyncSession) -> None:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match=message):
        await factory.run_in_transaction(work, alice, **kwargs)
    assert factory.metrics().sessions_opened == 0


# -- real conflicts on real servers -------------------------------------------------------


@pytest.fixture(name="server", params=["postgres-asyncpg", "postgres-psycopg", "mysql-asyncmy"])
def _server(request: pytest.FixtureRequest) -> Database:
    return Database(request.param, server_url(request.param))


@pytest.fixture(name="items")
async def _items(server: Database) -> AsyncIterator[tuple[IsolatedSessionFactory, sa.Table]]:
    """A factory on ``server`` and a table of its own (dropped after the test)."""
    table = sa.Table(
        f"retry_items_{uuid.uuid4().hex[:12]}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("n", sa.Integer, nullable=False, default=0),
    )
    async with IsolatedSessionFactory(
        server.url, pool=PoolConfig(pool_size=4, max_overflow=0, pool_timeout=10)
    ) as factory:
        async with factory.engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        try:
            yield factory, table
        finally:
            async with factory.engine.begin() as conn:
                await conn.run_sync(table.metadata.drop_all)
        assert factory.metrics().active_sessions == 0


async def _both(
    first: Callable[[], Awaitable[object]], second: Callable[[], Awaitable[object]]
) -> None:
    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(first)
            group.start_soon(second)


async def test_serializable_write_skew_is_retried_until_both_commit(items, alice, bob) -> None:
    factory, table = items
    read = [anyio.Event(), anyio.Event()]
    sessions: list[list[str]] = [[], []]
    levels: list[str] = []

    def transaction(me: int, seen_kind: str, added_kind: str) -> Callable[[AsyncSession], Any]:
        async def work(session: AsyncSession) -> int:
            sessions[me].append(session.info["session_id"])
            if factory.engine.dialect.name == "postgresql":
                levels.append(
                    (await session.execute(sa.text("SHOW transaction_isolation"))).scalar_one()
                )
            count = sa.select(sa.func.count()).select_from(table).where(table.c.kind == seen_kind)
            seen = (await session.execute(count)).scalar_one()
            if len(sessions[me]) == 1:  # the first attempts read before either writes
                read[me].set()
                await read[1 - me].wait()
            await session.execute(sa.insert(table).values(id=me + 1, kind=added_kind))
            return int(seen)

        return work

    async def alice_adds_b() -> None:
        await factory.run_in_transaction(
            transaction(0, "a", "b"), alice, isolation_level="SERIALIZABLE", backoff=0.01, retries=5
        )

    async def bob_adds_a() -> None:
        await factory.run_in_transaction(
            transaction(1, "b", "a"), bob, isolation_level="SERIALIZABLE", backoff=0.01, retries=5
        )

    await _both(alice_adds_b, bob_adds_a)

    retried = len(sessions[0]) + len(sessions[1]) - 2
    assert retried >= 1, "the write skew must have made one transaction retry"
    metrics = factory.metrics()
    assert metrics.transaction_retries == retried
    assert metrics.transaction_conflicts_exhausted == 0
    # a retried attempt ran in a session of its own, never the one that failed
    assert len({*sessions[0], *sessions[1]}) == len(sessions[0]) + len(sessions[1])
    assert set(levels) <= {"serializable"}
    async with factory.session(alice) as session:
        kinds = (await session.execute(sa.select(table.c.kind).order_by(table.c.id))).scalars()
        assert list(kinds) == ["b", "a"]
        if factory.engine.dialect.name == "postgresql":  # the level was this transaction's
            level = (await session.execute(sa.text("SHOW transaction_isolation"))).scalar_one()
            assert level == "read committed"


async def test_a_deadlock_is_retried_until_both_commit(items, alice, bob) -> None:
    factory, table = items
    async with factory.begin(alice) as session:
        await session.execute(sa.insert(table), [{"id": 1, "kind": "x"}, {"id": 2, "kind": "y"}])
    locked = [anyio.Event(), anyio.Event()]
    attempts = [0, 0]

    def transaction(me: int, first: int, second: int) -> Callable[[AsyncSession], Any]:
        async def work(session: AsyncSession) -> None:
            attempts[me] += 1
            bump = table.update().values(n=table.c.n + 1)
            await session.execute(bump.where(table.c.id == first))
            if attempts[me] == 1:  # each holds one row and then asks for the other's
                locked[me].set()
                await locked[1 - me].wait()
            await session.execute(bump.where(table.c.id == second))

        return work

    async def alice_one_then_two() -> None:
        await factory.run_in_transaction(transaction(0, 1, 2), alice, backoff=0.01)

    async def bob_two_then_one() -> None:
        await factory.run_in_transaction(transaction(1, 2, 1), bob, backoff=0.01)

    await _both(alice_one_then_two, bob_two_then_one)

    assert sum(attempts) >= 3, "the deadlock must have made one transaction retry"
    assert factory.metrics().transaction_retries == sum(attempts) - 2
    async with factory.session(alice) as session:
        counts = (await session.execute(sa.select(table.c.n).order_by(table.c.id))).scalars()
        assert list(counts) == [2, 2]  # both transactions' updates, each applied once
