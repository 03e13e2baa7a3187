"""factory.outer_transaction(): every session of a test joins one transaction, rolled back after.

On every database: request sessions are still separate, owner-checked and rolled back on
error inside it; nothing a test wrote survives it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text

from models import Note
from reqscope import IsolatedSessionFactory, UserExecutionContext, use_context
from reqscope.exceptions import IsolationViolation, ReqscopeError, SessionScopeError

pytestmark = pytest.mark.anyio


async def count_notes(factory: IsolatedSessionFactory) -> int:
    """Rows in the notes table, read on a connection of its own (outside any test transaction)."""
    async with factory.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(Note))).scalar_one())


async def test_what_sessions_committed_inside_is_gone_after(
    factory: IsolatedSessionFactory, tables: None, alice: UserExecutionContext
) -> None:
    async with factory.outer_transaction():
        for body in ("one", "two"):
            async with factory.begin(alice) as session:
                session.add(Note(user_id="alice", body=body))
        async with factory.session(alice) as session:  # a later request sees them
            bodies = await session.scalars(select(Note.body).order_by(Note.body))
            assert list(bodies) == ["one", "two"]
    assert await count_notes(factory) == 0
    async with factory.session(alice) as session:  # and the factory works as before
        assert await session.scalar(select(func.count()).select_from(Note)) == 0


async def test_a_failed_request_rolls_back_only_its_own_writes(
    factory: IsolatedSessionFactory, tables: None, alice: UserExecutionContext
) -> None:
    async with factory.outer_transaction():
        async with factory.begin(alice) as session:
            session.add(Note(user_id="alice", body="kept"))
        with pytest.raises(RuntimeError, match="handler failed"):
            async with factory.begin(alice) as session:
                session.add(Note(user_id="alice", body="lost"))
                await session.flush()
                raise RuntimeError("handler failed")
        async with factory.session(alice) as session:  # you commit: this one never does
            session.add(Note(user_id="alice", body="never committed"))
            await session.flush()
        async with factory.session(alice) as session:
            assert list(await session.scalars(select(Note.body))) == ["kept"]
    assert await count_notes(factory) == 0


async def test_sessions_stay_separate_and_owner_checked(
    factory: IsolatedSessionFactory,
    tables: None,
    alice: UserExecutionContext,
    bob: UserExecutionContext,
) -> None:
    async with factory.outer_transaction():
        async with factory.session(alice) as first:
            with use_context(bob), pytest.raises(IsolationViolation, match="belongs to user"):
                await first.execute(text("SELECT 1"))
        async with factory.session(alice) as second:
            assert second is not first
            assert second.info["request_id"] == alice.request_id
        with pytest.raises(SessionScopeError, match="after its"):
            await first.execute(text("SELECT 1"))
    assert factory.metrics().isolation_violations == 1
    assert factory.metrics().scope_violations == 1


async def test_outer_transactions_do_not_nest(factory: IsolatedSessionFactory) -> None:
    async with factory.outer_transaction():
        with pytest.raises(ReqscopeError, match="already inside"):
            async with factory.outer_transaction():
                pass  # pragma: no cover - refused on entry


async def test_a_closed_factory_refuses_an_outer_transaction() -> None:
    factory = IsolatedSessionFactory()
    await factory.aclose()
    with pytest.raises(ReqscopeError, match="closed"):
        async with factory.outer_transaction():
            pass  # pragma: no cover - refused on entry


async def test_a_connection_lost_inside_ends_the_block_cleanly(
    factory: IsolatedSessionFactory, tables: None, alice: UserExecutionContext
) -> None:
    """A test that kills the shared connection (a reclaimed leak) still leaves nothing."""
    async with factory.outer_transaction() as conn:
        async with factory.begin(alice) as session:
            session.add(Note(user_id="alice", body="gone"))
        await conn.invalidate()
    assert await count_notes(factory) == 0
