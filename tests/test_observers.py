"""SessionObserver: what instrumentation hears of each session scope."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from conftest import marked_sqlite
from reqscope import (
    IsolatedSessionFactory,
    ObservedSession,
    ReqscopeError,
    SessionObserver,
    SessionScopeError,
    UserExecutionContext,
)
from reqscope._leaks import LeakReport

pytestmark = pytest.mark.anyio


class Journal(SessionObserver):
    def __init__(self) -> None:
        self.heard: list[tuple[str, str, object]] = []

    def session_opened(self, session: ObservedSession) -> None:
        self.heard.append(("opened", session.ctx.user_id, session.lifetime))

    def session_began(self, session: ObservedSession) -> None:
        self.heard.append(("began", session.ctx.user_id, None))

    def session_closed(
        self, session: ObservedSession, *, committed: bool, error: BaseException | None
    ) -> None:
        self.heard.append(("closed", session.ctx.user_id, (committed, type(error).__name__)))

    def session_leaked(self, session: ObservedSession, report: LeakReport) -> None:
        self.heard.append(("leaked", session.ctx.user_id, report.session_id == session.session_id))

    def session_refused(self, session: ObservedSession, error: ReqscopeError) -> None:
        self.heard.append(("refused", session.ctx.user_id, type(error).__name__))


async def test_an_observer_hears_each_step_until_removed(tmp_path: Path) -> None:
    journal = Journal()
    alice = UserExecutionContext.create("alice")
    async with IsolatedSessionFactory(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}") as factory:
        remove = factory.add_observer(journal)
        async with factory.begin(alice) as session:
            await session.execute(sa.text("SELECT 1"))
        with pytest.raises(KeyError):
            async with factory.session(alice, max_lifetime=0.01) as kept:
                await kept.execute(sa.text("SELECT 1"))
                await anyio.sleep(0.03)
                await factory.leak_detector.ascan()
                raise KeyError("boom")
        with pytest.raises(SessionScopeError):
            await kept.execute(sa.text("SELECT 1"))  # after its scope: refused
        remove()
        remove()  # twice is fine
        async with factory.session(alice):
            pass
    assert journal.heard == [
        ("opened", "alice", 30.0),
        ("began", "alice", None),
        ("closed", "alice", (True, "NoneType")),
        ("opened", "alice", 0.01),
        ("began", "alice", None),
        ("leaked", "alice", True),
        ("closed", "alice", (False, "KeyError")),
        ("refused", "alice", "SessionReclaimedError"),
    ]


async def test_a_failing_observer_is_logged_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(SessionObserver):
        def session_opened(self, session: ObservedSession) -> None:
            raise RuntimeError("observer bug")

    alice = UserExecutionContext.create("alice")
    async with IsolatedSessionFactory(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}") as factory:
        factory.add_observer(Broken())
        factory.add_observer(journal := Journal())
        with caplog.at_level(logging.ERROR, logger="reqscope"):
            async with factory.session(alice) as session:
                await session.execute(sa.text("SELECT 1"))
    assert "a session observer failed" in caplog.text
    assert [step for step, _, _ in journal.heard] == ["opened", "began", "closed"]


async def test_replica_sessions_are_observed_too(tmp_path: Path) -> None:
    primary = await marked_sqlite(tmp_path / "primary.db", "primary")
    replica = await marked_sqlite(tmp_path / "replica.db", "replica")
    closed: list[str] = []
    alice = UserExecutionContext.create("alice")
    async with IsolatedSessionFactory(primary, replicas=[replica]) as factory:
        factory.on_session_close(lambda record: closed.append(record.user_id))
        async with factory.session(alice, read_only=True) as session:
            where = (await session.execute(sa.text("SELECT name FROM whereami"))).scalar()
    assert where == "replica"
    assert closed == ["alice"]


async def test_an_observer_that_removes_itself_skips_no_other(tmp_path: Path) -> None:
    closed: list[str] = []
    alice = UserExecutionContext.create("alice")
    async with IsolatedSessionFactory(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}") as factory:
        stop = factory.on_session_close(lambda _record: (closed.append("once"), stop()))
        factory.on_session_close(lambda _record: closed.append("always"))
        for _ in range(2):
            async with factory.session(alice):
                pass
    assert closed == ["once", "always", "always"]
