"""IsolatedSessionFactory behaviour, the same tests on every database of the fixture."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import gc
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from models import Note, create_tables, drop_tables
from reqscope import (
    CircuitBreaker,
    IsolatedSessionFactory,
    IsolationViolation,
    NoActiveContextError,
    PoolConfig,
    ReqscopeError,
    SessionScopeError,
    UserExecutionContext,
    current_context,
    current_context_or_none,
    mark_session_as_global,
    session_tags,
    use_context,
    validate_session_is_request_scoped,
)
from reqscope._compat import FALLBACKS_FORCED
from reqscope.tenancy import TenantPolicy
from reqscope.testing import assert_no_leaks

pytestmark = pytest.mark.anyio


async def count_notes(factory: IsolatedSessionFactory, user: str | None = None) -> int:
    async with factory.session(UserExecutionContext.create(user or "counter")) as session:
        query = select(func.count()).select_from(Note)
        if user is not None:
            query = query.where(Note.user_id == user)
        return (await session.execute(query)).scalar_one()


async def test_session_is_a_real_tagged_async_session(factory, alice) -> None:
    async with factory.session(alice) as session:
        assert type(session) is AsyncSession
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        tags = session_tags(session)
        assert (tags.user_id, tags.request_id, tags.thread_id, tags.run_id) == (
            alice.user_id,
            alice.request_id,
            alice.thread_id,
            alice.run_id,
        )
        assert tags.is_request_scoped
        assert tags.factory_managed
        for key in ("user_id", "request_id", "session_id", "created_at", "factory_managed"):
            assert key in session.info
        assert current_context() is alice
        validate_session_is_request_scoped(session, "inside")
    assert current_context_or_none() is None


async def test_the_previous_context_is_current_again_after_the_block(factory, alice, bob) -> None:
    with use_context(bob):
        async with factory.session(alice):
            assert current_context() is alice
        assert current_context() is bob
    assert current_context_or_none() is None
    # A scope entered in one task and exited in another (each has its own contextvars
    # Context): the exit restores the previous context where it runs, and does not fail.
    scope = factory.session(alice)
    loop = asyncio.get_running_loop()

    async def enter() -> UserExecutionContext:
        await scope.__aenter__()
        return current_context()

    async def leave() -> UserExecutionContext | None:
        with use_context(bob):
            await scope.__aexit__(None, None, None)
            return current_context_or_none()

    assert await loop.create_task(enter()) is alice
    assert await loop.create_task(leave()) is None  # what was current when it was entered
    assert factory.metrics().active_sessions == 0
    assert current_context_or_none() is None


async def test_tags_agree_with_the_registry_and_survive_an_info_argument(alice) -> None:
    # Tags are made on first use: the id and opening time they show must be the ones the
    # registry reports, and a session made with info= must get them on top of its own keys.
    factory = IsolatedSessionFactory(session_kwargs={"info": {"team": "blue"}})
    async with factory, factory.session(alice) as session:
        (record,) = factory.active_sessions()
        assert session.info["team"] == "blue"
        tags = session_tags(session)
        assert tags.session_id == record.session_id
        assert tags.created_at == record.opened_at
        assert tags.user_id == alice.user_id
        assert tags.is_request_scoped


async def test_opened_at_is_when_the_scope_opened_not_when_it_is_read(factory, alice) -> None:
    # The datetime is derived on first use from the monotonic opening time: it must still
    # be the opening time, however long after the opening it is first asked for.
    before = dt.datetime.now(dt.timezone.utc)
    async with factory.session(alice) as session:
        after = dt.datetime.now(dt.timezone.utc)
        await anyio.sleep(0.3)
        (record,) = factory.active_sessions()
        slack = dt.timedelta(milliseconds=50)
        assert before - slack <= record.opened_at <= after + slack
        # (the event loop may end a sleep a little early: it was seen 85 µs short)
        assert record.age >= 0.29
        assert session_tags(session).created_at == record.opened_at


async def test_every_scope_gets_a_new_session(factory, alice) -> None:
    async with factory.session(alice) as first:
        pass
    async with factory.session(alice) as second:
        pass
    assert first is not second
    assert session_tags(first).session_id != session_tags(second).session_id


async def test_context_defaults_to_the_current_one(factory, alice) -> None:
    with pytest.raises(NoActiveContextError):
        async with factory.session():
            pass
    with use_context(alice):
        async with factory.session() as session:
            assert session.info["request_id"] == alice.request_id
        assert current_context() is alice


async def test_uncommitted_work_rolls_back_and_begin_commits(factory, alice, tables) -> None:
    async with factory.session(alice) as session:
        session.add(Note(user_id="alice", body="draft"))
        await session.flush()
    assert await count_notes(factory) == 0
    async with factory.begin(alice) as session:
        session.add(Note(user_id="alice", body="kept"))
    assert await count_notes(factory) == 1
    with pytest.raises(RuntimeError, match="boom"):
        async with factory.begin(alice) as session:
            session.add(Note(user_id="alice", body="lost"))
            await session.flush()
            raise RuntimeError("boom")
    assert await count_notes(factory) == 1
    async with factory.session(alice) as session:
        async with session.begin():
            session.add(Note(user_id="alice", body="explicit"))
        assert session.info["user_id"] == "alice"
    assert await count_notes(factory) == 2


async def use_paths(session: AsyncSession) -> list[tuple[str, object]]:
    """Every way a session reaches the database; each must be refused when illegal."""

    async def execute() -> None:
        await session.execute(select(Note))

    async def scalars() -> None:
        await session.scalars(select(Note))

    async def scalar() -> None:
        await session.scalar(select(func.count()).select_from(Note))

    async def get() -> None:
        await session.get(Note, 10_000)

    async def stream() -> None:
        result = await session.stream(select(Note))
        await result.all()

    async def core_text() -> None:
        await session.execute(text("SELECT 1"))

    async def flush() -> None:
        session.add(Note(user_id="x", body="x"))
        await session.flush()

    async def connection() -> None:
        conn = await session.connection()
        await conn.execute(text("SELECT 1"))

    return [
        ("execute", execute),
        ("scalars", scalars),
        ("scalar", scalar),
        ("get", get),
        ("stream", stream),
        ("text", core_text),
        ("flush", flush),
        ("connection", connection),
    ]


async def test_every_path_is_refused_after_the_block(factory, alice, tables) -> None:
    async with factory.session(alice) as session:
        pass
    for _, path in await use_paths(session):
        with pytest.raises(SessionScopeError, match="after its"):
            await path()
        session.expunge_all()
    assert factory.metrics().scope_violations >= 8
    with pytest.raises(SessionScopeError, match="request scope ended"):
        validate_session_is_request_scoped(session)


async def test_every_path_is_refused_for_another_user(factory, alice, bob, tables, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="reqscope")
    async with factory.session(alice) as session:
        for name, path in await use_paths(session):
            with use_context(bob), pytest.raises(IsolationViolation, match="alice") as info:
                await path()
            assert "bob" in str(info.value), name
            session.expunge_all()
        # the owner and its children may still use it
        with use_context(alice.child("tool_call")):
            await session.execute(text("SELECT 1"))
        await session.rollback()
    assert factory.metrics().isolation_violations == 8
    logged = [r for r in caplog.records if "isolation violation" in r.getMessage()]
    assert len(logged) == 8
    assert logged[0].user_id == "alice"
    assert logged[0].current_user_id == "bob"
    assert logged[0].current_request_id == bob.request_id


async def test_a_handed_out_connection_is_checked_on_each_use(factory, alice, bob) -> None:
    async with factory.session(alice) as session:
        conn = await session.connection()  # legitimately, by its owner
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        with use_context(bob), pytest.raises(IsolationViolation, match="alice"):
            await conn.execute(text("SELECT 1"))
        assert await session.connection() is conn  # listened to once, still the owner's
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert factory.metrics().isolation_violations == 1


async def test_another_users_task_cannot_touch_the_data(factory, alice, bob, tables) -> None:
    async with factory.begin(alice) as session:
        session.add(Note(user_id="alice", body="secret"))

    async def bobs_request(stolen: AsyncSession) -> None:
        async with factory.session(bob):
            await stolen.execute(text("DELETE FROM reqscope_test_notes"))

    async with factory.session(alice) as session:
        with pytest.raises(IsolationViolation):
            await bobs_request(session)
    assert await count_notes(factory, "alice") == 1


async def test_another_request_of_the_same_user_is_refused(factory, alice, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="reqscope")
    # the same user; then the same user and even the same (client-chosen) X-Request-ID
    later = UserExecutionContext.create("alice")
    replayed = UserExecutionContext.create("alice", request_id=alice.request_id)
    rebuilt = UserExecutionContext.from_dict(alice.to_dict())
    async with factory.session(alice) as session:
        for other in (later, replayed, rebuilt):
            with use_context(other), pytest.raises(IsolationViolation) as info:
                await session.execute(text("SELECT 1"))
            message = str(info.value)
            assert alice.request_id in message
            assert other.request_id in message
            assert "another request of the same user" in message
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1  # still alice's
    assert factory.metrics().isolation_violations == 3
    logged = [r for r in caplog.records if "isolation violation" in r.getMessage()]
    assert [r.current_request_id for r in logged] == [
        later.request_id,
        replayed.request_id,
        rebuilt.request_id,
    ]


async def test_code_with_no_context_is_refused(factory, alice) -> None:
    """A task started with an empty context (a worker started at boot) is no request."""

    async def worker(stolen: AsyncSession) -> None:
        assert current_context_or_none() is None
        await stolen.execute(text("SELECT 1"))

    async with factory.session(alice) as session:
        task = contextvars.Context().run(asyncio.ensure_future, worker(session))
        with pytest.raises(IsolationViolation, match="no current context") as info:
            await task
        assert alice.request_id in str(info.value)
    assert factory.metrics().isolation_violations == 1


async def test_the_request_lineage_may_use_its_session(factory, alice) -> None:
    """Children (at any depth), copies with metadata, spawned tasks and gather siblings."""
    async with factory.session(alice) as session:
        lock = asyncio.Lock()  # one statement at a time: a session is not concurrency-safe

        async def select_one() -> int:
            async with lock:
                return (await session.execute(text("SELECT 1"))).scalar_one()

        for ctx in (
            alice.child("tool"),
            alice.child("tool").child("nested").with_metadata(step=2),
            alice.with_metadata(plan="pro"),
        ):
            with use_context(ctx):
                assert await select_one() == 1
        with use_context(alice.child("fan-out")):
            assert await asyncio.gather(select_one(), select_one()) == [1, 1]
            async with anyio.create_task_group() as group:
                group.start_soon(select_one)
            assert await asyncio.create_task(select_one()) == 1
    assert factory.metrics().isolation_violations == 0


async def test_a_child_sessions_tags_and_logs_carry_the_root_request_id(
    factory, alice, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="reqscope")
    grandchild = alice.child("dependency").child("tool")
    async with factory.session(grandchild) as session:
        tags = session_tags(session)
        assert tags.request_id == grandchild.request_id
        assert tags.root_request_id == alice.request_id == session.info["root_request_id"]
        with use_context(UserExecutionContext.create("alice")), pytest.raises(IsolationViolation):
            await session.execute(text("SELECT 1"))
    (record,) = [r for r in caplog.records if "isolation violation" in r.getMessage()]
    assert record.root_request_id == alice.request_id


async def test_enforce_owner_can_be_disabled(database, alice, bob) -> None:
    async with (
        IsolatedSessionFactory(database.url, enforce_owner=False) as factory,
        factory.session(alice) as session,
    ):
        with use_context(bob):
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        with use_context(UserExecutionContext.create("alice")):
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


_global_session: AsyncSession | None = None


async def test_a_session_kept_in_a_global_is_refused_next_request(factory, alice) -> None:
    global _global_session  # noqa: PLW0603 - the bug under test

    async def legacy_handler(ctx: UserExecutionContext) -> int:
        global _global_session  # noqa: PLW0603
        if _global_session is None:
            async with factory.session(ctx) as session:
                _global_session = session
                return (await session.execute(text("SELECT 1"))).scalar_one()
        return (await _global_session.execute(text("SELECT 1"))).scalar_one()

    try:
        assert await legacy_handler(alice) == 1
        with pytest.raises(SessionScopeError):
            await legacy_handler(alice.child("next_request"))
    finally:
        _global_session = None


async def test_mark_session_as_global(factory, alice) -> None:
    async with factory.session(alice) as session:
        mark_session_as_global(session)
        assert session.info["is_request_scoped"] is False
        with pytest.raises(SessionScopeError, match="global"):
            await session.execute(text("SELECT 1"))
        with pytest.raises(SessionScopeError, match="global"):
            validate_session_is_request_scoped(session, "legacy")


async def test_unmanaged_sessions_are_not_request_scoped(factory) -> None:
    plain = AsyncSession(factory.engine)
    with pytest.raises(SessionScopeError, match="not managed"):
        validate_session_is_request_scoped(plain, "report")
    with pytest.raises(SessionScopeError, match="not created by"):
        session_tags(plain)
    mark_session_as_global(plain)
    assert plain.info["is_request_scoped"] is False
    await plain.close()


# -- cleanup on every exit --------------------------------------------------------------


def assert_clean(factory: IsolatedSessionFactory) -> None:
    metrics = factory.metrics()
    assert metrics.active_sessions == 0
    assert metrics.pool is not None
    assert metrics.pool.checked_out == 0


async def test_cleanup_on_exception(factory, alice) -> None:
    with pytest.raises(ValueError, match="app"):
        async with factory.session(alice) as session:
            await session.execute(text("SELECT 1"))
            raise ValueError("app")
    assert_clean(factory)
    assert factory.metrics().sessions_failed == 1


async def test_cleanup_on_anyio_cancellation_and_timeout(factory, alice) -> None:
    with anyio.move_on_after(0.05):
        async with factory.session(alice) as session:
            await session.execute(text("SELECT 1"))
            await anyio.sleep(10)
    assert_clean(factory)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            async with factory.session(alice) as session:
                await session.execute(text("SELECT 1"))
                await anyio.sleep(10)
    assert_clean(factory)


async def test_cleanup_on_asyncio_task_cancel(factory, alice) -> None:
    started = asyncio.Event()

    async def request() -> None:
        async with factory.session(alice) as session:
            await session.execute(text("SELECT 1"))
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_clean(factory)


async def test_cancellation_is_never_swallowed(factory, alice) -> None:
    with anyio.CancelScope() as scope:
        async with factory.session(alice):
            scope.cancel()
            await anyio.sleep(1)
        pytest.fail("the cancellation was swallowed")  # pragma: no cover
    assert scope.cancelled_caught


async def test_a_cancelled_commit_is_not_a_success(factory, alice, tables) -> None:
    # Cancel while begin() commits: the error propagates, the connection is dropped.
    scope_exited_cleanly = False
    with anyio.CancelScope() as scope:
        async with factory.begin(alice) as session:
            session.add(Note(user_id="alice", body="maybe"))
            scope.cancel()
        scope_exited_cleanly = True  # pragma: no cover
    assert not scope_exited_cleanly
    assert_clean(factory)


RUNNERS = ["anyio task group", "asyncio task"]


async def run_as(runner: str, request: Callable[[], Awaitable[None]]) -> None:
    """Run ``request`` the way a server would: in an anyio task group or a bare asyncio task.

    The two take different cleanup paths (an anyio shield scope, or a Task.cancel()
    deadline where no anyio scope can reach the task); both must behave the same.
    """
    if runner == "asyncio task":
        await asyncio.get_running_loop().create_task(request())
    else:
        async with anyio.create_task_group() as group:
            group.start_soon(request)


def count_deadline_cleanups(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record each cleanup that took the plain-asyncio path: the watchdog watched the task."""
    from reqscope._cleanup import CleanupWatchdog

    calls: list[bool] = []
    real = CleanupWatchdog.watch

    def spy(self, scope, *args):  # type: ignore[no-untyped-def]
        if isinstance(scope, asyncio.Task):
            calls.append(True)
        real(self, scope, *args)

    monkeypatch.setattr(CleanupWatchdog, "watch", spy)
    return calls


@pytest.mark.parametrize("runner", RUNNERS)
async def test_a_hung_cleanup_is_cut_at_cleanup_timeout(
    database, alice, monkeypatch, caplog, runner
) -> None:
    # A rollback the database never answers: the shielded cleanup must not wait forever.
    from sqlalchemy.util import await_only

    from reqscope import ReqscopeSession

    real_close = ReqscopeSession.close
    hung = []

    def hanging_close(session) -> None:
        if not hung:
            hung.append(True)
            await_only(asyncio.sleep(30))
        real_close(session)

    monkeypatch.setattr(ReqscopeSession, "close", hanging_close)
    deadline_cleanups = count_deadline_cleanups(monkeypatch)
    caplog.set_level(logging.ERROR, logger="reqscope")
    after_the_block: list[bool] = []
    async with IsolatedSessionFactory(database.url, cleanup_timeout=0.2) as factory:

        async def request() -> None:
            async with factory.session(alice) as session:
                await session.execute(text("SELECT 1"))
            # The cut is taken back: the request goes on, nothing is left pending on it.
            await asyncio.sleep(0.01)
            task = asyncio.current_task()
            assert task is not None
            after_the_block.append(getattr(task, "cancelling", int)() == 0)

        started = anyio.current_time()
        await run_as(runner, request)
        assert anyio.current_time() - started < 5
        assert after_the_block == [True]
        assert bool(deadline_cleanups) is (runner == "asyncio task" and not FALLBACKS_FORCED)
        metrics = factory.metrics()
        assert metrics.cleanup_failures == 1
        assert_clean(factory)  # the connection was invalidated, its slot is free
        assert any("cleanup_timeout" in r.getMessage() for r in caplog.records)
        async with factory.session(alice) as session:  # and the factory still works
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        assert len(factory._keeper.cleanup.watchdog) == 0


@pytest.mark.parametrize("runner", RUNNERS)
async def test_a_close_that_raises_is_logged_and_its_connection_invalidated(
    database, alice, monkeypatch, caplog, runner
) -> None:
    from reqscope import ReqscopeSession

    real_close = ReqscopeSession.close
    failed: list[bool] = []

    def failing_close(session) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("driver fell over while resetting the connection")
        real_close(session)

    monkeypatch.setattr(ReqscopeSession, "close", failing_close)
    deadline_cleanups = count_deadline_cleanups(monkeypatch)
    caplog.set_level(logging.ERROR, logger="reqscope")
    async with IsolatedSessionFactory(database.url) as factory:

        async def request() -> None:
            async with factory.session(alice) as session:
                await session.execute(text("SELECT 1"))

        await run_as(runner, request)  # the request itself does not fail
        assert failed == [True]
        assert bool(deadline_cleanups) is (runner == "asyncio task" and not FALLBACKS_FORCED)
        assert factory.metrics().cleanup_failures == 1
        assert_clean(factory)  # invalidated: the slot is free, never returned half-reset
        [record] = [r for r in caplog.records if "failed; invalidating" in r.getMessage()]
        assert record.exc_info is not None
        assert "driver fell over" in str(record.exc_info[1])
        assert record.user_id == alice.user_id  # type: ignore[attr-defined]
        async with factory.session(alice) as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        assert len(factory._keeper.cleanup.watchdog) == 0


def swallowing_close(monkeypatch: pytest.MonkeyPatch, cut: asyncio.Event) -> None:
    """Make the next close hang, swallow its first cancellation, and hang again."""
    from sqlalchemy.util import await_only

    from reqscope import ReqscopeSession

    real_close = ReqscopeSession.close
    used: list[bool] = []

    def close(session) -> None:
        if not used:
            used.append(True)
            try:
                await_only(asyncio.sleep(30))
            except asyncio.CancelledError:
                cut.set()
            await_only(asyncio.sleep(30))
        real_close(session)

    monkeypatch.setattr(ReqscopeSession, "close", close)


@pytest.mark.parametrize("runner", RUNNERS)
async def test_a_cleanup_that_swallows_the_cut_is_cut_again(
    database, alice, monkeypatch, runner
) -> None:
    swallowing_close(monkeypatch, asyncio.Event())
    async with IsolatedSessionFactory(database.url, cleanup_timeout=0.2) as factory:

        async def request() -> None:
            async with factory.session(alice) as session:
                await session.execute(text("SELECT 1"))

        with anyio.fail_after(10):
            await run_as(runner, request)
        assert factory.metrics().cleanup_failures == 1
        assert_clean(factory)
        assert len(factory._keeper.cleanup.watchdog) == 0


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 cannot tell one Task.cancel() from another"
)
async def test_a_task_cancel_during_a_cut_cleanup_still_propagates(
    database, alice, monkeypatch
) -> None:
    # The deadline cut the cleanup and a Task.cancel() from elsewhere lands as well: taking
    # back the deadline's own cancellation must not swallow the other one.
    cut = asyncio.Event()
    swallowing_close(monkeypatch, cut)
    async with IsolatedSessionFactory(database.url, cleanup_timeout=0.2) as factory:

        async def request() -> None:
            async with factory.session(alice) as session:
                await session.execute(text("SELECT 1"))
            pytest.fail("the request went on after it was cancelled")  # pragma: no cover

        task = asyncio.get_running_loop().create_task(request())
        await cut.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_clean(factory)
        assert len(factory._keeper.cleanup.watchdog) == 0
        async with factory.session(alice) as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def test_a_scope_works_in_an_async_exit_stack(database, alice) -> None:
    # __aexit__ hands back the coroutine that releases the session instead of being one:
    # everything that drives async context managers by hand must still release it.
    async with IsolatedSessionFactory(database.url) as factory:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(factory.session(alice))
            await session.execute(text("SELECT 1"))
            assert factory.metrics().active_sessions == 1
        assert_clean(factory)
        with pytest.raises(ValueError, match="boom"):
            async with contextlib.AsyncExitStack() as stack:
                session = await stack.enter_async_context(factory.begin(alice))
                await session.execute(text("SELECT 1"))
                raise ValueError("boom")
        assert_clean(factory)
        assert factory.metrics().sessions_failed == 1


async def test_closed_factory_refuses_new_sessions(database, alice) -> None:
    factory = IsolatedSessionFactory(database.url)
    async with factory:
        pass
    assert factory.closed
    with pytest.raises(Exception, match="closed"):
        async with factory.session(alice):
            pass
    await factory.aclose()  # idempotent


async def test_a_closed_factory_starts_again(database, alice, tables) -> None:
    # An app whose lifespan is entered once per test (`with TestClient(app)` in each test)
    # closes and starts its factory again: each lifespan gets a working factory.
    factory = IsolatedSessionFactory(database.url, max_session_lifetime=0.05)
    for round_ in range(2):
        async with factory:
            assert not factory.closed
            # only the scope below may count as a leak, however slow a busy machine is
            async with factory.begin(alice, max_lifetime=60) as session:
                session.add(Note(user_id=alice.user_id, body=f"round {round_}"))
            scope = factory.session(alice)
            await scope.__aenter__()  # held past its lifetime: the detector must see it
            with anyio.fail_after(5):
                while factory.metrics().leaks_detected == round_:
                    await anyio.sleep(0.01)
            await scope.__aexit__(None, None, None)
        assert factory.closed
    async with factory, factory.session(alice) as session:
        assert await session.scalar(select(func.count()).select_from(Note)) == 2


async def test_a_factory_nobody_started_starts_on_first_use(tmp_path, alice, caplog) -> None:
    # Forgetting `async with factory` must not mean sessions without a leak detector.
    factory = IsolatedSessionFactory(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}", max_session_lifetime=0.05
    )
    with caplog.at_level(logging.INFO, logger="reqscope"):
        scope = factory.session(alice)
        await scope.__aenter__()
    assert "started on first use" in caplog.text
    with anyio.fail_after(5):
        while factory.metrics().leaks_detected == 0:
            await anyio.sleep(0.01)
    await scope.__aexit__(None, None, None)
    await factory.aclose()


async def test_the_embedded_database_directory_is_removed_when_nobody_closes_it() -> None:
    factory = IsolatedSessionFactory()
    tempdir = factory._tempdir
    assert tempdir is not None
    assert tempdir.exists()
    await factory.engine.dispose()
    del factory
    gc.collect()
    assert not tempdir.exists()


async def test_a_factory_may_close_in_another_task_than_it_started(database, alice) -> None:
    factory = IsolatedSessionFactory(database.url)
    await asyncio.get_running_loop().create_task(factory.start())
    async with factory.session(alice) as session:
        await session.execute(text("SELECT 1"))
    await asyncio.get_running_loop().create_task(factory.aclose())
    assert factory.closed


async def test_unusable_binds_are_refused_at_construction(database) -> None:
    engine = create_async_engine(database.url)
    try:
        with pytest.raises(ReqscopeError, match="first argument"):
            IsolatedSessionFactory(engine, session_kwargs={"bind": engine})
        async with engine.connect() as conn:
            with pytest.raises(ReqscopeError, match="not an AsyncConnection"):
                IsolatedSessionFactory(conn)  # type: ignore[arg-type]
        with pytest.raises(ReqscopeError, match="create_async_engine"):
            IsolatedSessionFactory(engine.sync_engine)  # type: ignore[arg-type]
    finally:
        await engine.dispose()


async def test_aclose_invalidates_sessions_still_open(database, alice) -> None:
    factory = IsolatedSessionFactory(database.url)
    scope = factory.session(alice)
    session = await scope.__aenter__()
    await session.execute(text("SELECT 1"))
    await factory.aclose()
    assert factory.metrics().active_sessions == 0
    await scope.__aexit__(None, None, None)


async def test_scope_objects_are_single_use(factory, alice) -> None:
    scope = factory.session(alice)
    async with scope:
        with pytest.raises(RuntimeError, match="already open"):
            await scope.__aenter__()
    with pytest.raises(RuntimeError, match="used before"):  # nor reopened once closed
        await scope.__aenter__()
    assert factory.metrics().active_sessions == 0


async def test_bad_arguments(factory) -> None:
    with pytest.raises(TypeError, match="UserExecutionContext"):
        factory.session("alice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_lifetime"):
        factory.session(UserExecutionContext.create("a"), max_lifetime=0)


# -- concurrency --------------------------------------------------------------------------


async def test_concurrent_users_see_only_their_own_rows(database, tables_factory) -> None:
    factory = tables_factory
    users = [f"user-{i}" for i in range(100)]
    seen: dict[str, list[str]] = {}

    async def request(n: int) -> None:
        user = users[n % len(users)]
        ctx = UserExecutionContext.create(user)
        async with factory.begin(ctx) as session:
            session.add(Note(user_id=user, body=f"{user}:{n}"))
        async with factory.session(ctx) as session:
            rows = (await session.scalars(select(Note).where(Note.user_id == user))).all()
            seen.setdefault(user, []).extend(row.user_id for row in rows)

    async with anyio.create_task_group() as group:
        for n in range(1000):
            group.start_soon(request, n)
    for user, owners in seen.items():
        assert set(owners) == {user}
    async with factory.session(UserExecutionContext.create("auditor")) as session:
        per_user = dict(
            (await session.execute(select(Note.user_id, func.count()).group_by(Note.user_id))).all()
        )
    assert per_user == dict.fromkeys(users, 10)
    metrics = factory.metrics()
    assert metrics.active_sessions == 0
    assert metrics.pool is not None
    assert metrics.pool.checked_out == 0
    assert metrics.isolation_violations == 0


@pytest.fixture(name="tables_factory")
async def _tables_factory(database) -> AsyncIterator[IsolatedSessionFactory]:
    from reqscope import PoolConfig

    # SQLite has one writer; its busy handler polls with sleeps and is unfair, so with 20
    # connections contending a writer can starve past the 5 s busy timeout on a slow machine
    # (DatabaseBusyError, by design). Four connections keep the test about isolation.
    size = 4 if database.name == "sqlite" else 20
    async with IsolatedSessionFactory(
        database.url, pool=PoolConfig(pool_size=size, max_overflow=0, pool_timeout=30.0)
    ) as factory:
        await create_tables(factory.engine)
        yield factory
        await drop_tables(factory.engine)


@pytest.mark.skipif(
    FALLBACKS_FORCED,
    reason="without reqscope's aiosqlite fix (a private access) this is aiosqlite's bug",
)
async def test_a_cancelled_sqlite_statement_leaves_no_close_that_never_ends(tmp_path, alice):
    # A statement cancelled while SQLite busy-waits for another writer: SQLAlchemy starts
    # a graceful aiosqlite close in a task of its own, then (cancelled again) force-stops
    # the worker thread. aiosqlite's close() then queued a second stop on the dead thread
    # and awaited it forever, so the event loop could never shut down (asyncio.run hangs).
    import sqlite3

    path = tmp_path / "busy.sqlite3"
    async with IsolatedSessionFactory(f"sqlite+aiosqlite:///{path}") as factory:
        async with factory.begin(alice) as session:
            await session.execute(text("CREATE TABLE t (x INTEGER)"))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
        try:
            with anyio.move_on_after(0.3) as scope:
                async with factory.session(alice) as session:
                    await session.execute(text("INSERT INTO t VALUES (1)"))
            assert scope.cancelled_caught
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert_clean(factory)

    def closing() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if "graceful_close" in repr(t.get_coro())]

    with anyio.move_on_after(5):
        while closing():
            await anyio.sleep(0.05)
    assert closing() == []


async def test_a_native_cancel_during_cleanup_still_unregisters_and_frees(database, alice):
    # anyio's shield does not stop asyncio's Task.cancel(): a cancel that lands inside the
    # cleanup interrupts it. The session must still leave the registry and its connection
    # must not stay checked out (it is invalidated, never returned half-cleaned).
    from sqlalchemy.util import await_only

    from reqscope import ReqscopeSession

    real_close = ReqscopeSession.close
    in_cleanup = asyncio.Event()

    def slow_close(session) -> None:
        if not in_cleanup.is_set():
            in_cleanup.set()
            await_only(asyncio.sleep(30))
        real_close(session)

    async with IsolatedSessionFactory(database.url) as factory:

        async def request() -> None:
            async with factory.session(alice) as session:
                await session.execute(text("SELECT 1"))

        ReqscopeSession.close = slow_close  # type: ignore[method-assign]
        try:
            task = asyncio.get_running_loop().create_task(request())
            await in_cleanup.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            ReqscopeSession.close = real_close  # type: ignore[method-assign]
        assert_clean(factory)
        assert len(factory._keeper.cleanup.watchdog) == 0
        async with factory.session(alice) as session:  # the factory still works
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


# -- a COMMIT that SQLite refuses ---------------------------------------------------------


@pytest.fixture
async def deferred_sqlite(tmp_path) -> AsyncIterator[IsolatedSessionFactory]:
    """A one-connection SQLite factory with a deferred foreign key."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'deferred.sqlite3'}"
    pool = PoolConfig(pool_size=1, max_overflow=0, pool_timeout=5)
    async with IsolatedSessionFactory(url, pool=pool) as factory:
        async with factory.begin(UserExecutionContext.create("setup")) as session:
            await session.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
            await session.execute(
                text(
                    "CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER "
                    "REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED)"
                )
            )
        yield factory


async def _children(factory: IsolatedSessionFactory) -> list[int]:
    async with factory.session(UserExecutionContext.create("reader")) as session:
        return list((await session.scalars(text("SELECT id FROM children ORDER BY id"))).all())


async def test_a_commit_sqlite_refused_leaves_nothing_for_the_next_request(
    deferred_sqlite, alice
) -> None:
    # SQLite keeps the refused transaction open; SQLAlchemy believes it ended and skips its
    # rollback on return, so without reqscope's hook the next request (same connection)
    # reads the refused row.
    factory = deferred_sqlite
    async with factory.session(alice) as session:
        await session.execute(text("INSERT INTO children (id, parent) VALUES (1, 99)"))
        with pytest.raises(IntegrityError, match="FOREIGN KEY"):
            await session.commit()
    assert await _children(factory) == []
    assert_no_leaks(factory)


async def test_after_a_refused_commit_the_session_starts_afresh(deferred_sqlite, alice) -> None:
    # Within the same session too: the next transaction does not carry the refused row.
    factory = deferred_sqlite
    async with factory.session(alice) as session:
        await session.execute(text("INSERT INTO children (id, parent) VALUES (1, 99)"))
        with pytest.raises(IntegrityError):
            await session.commit()
        await session.rollback()  # as SQLAlchemy asks after a failed commit
        await session.execute(text("INSERT INTO parents (id) VALUES (7)"))
        await session.execute(text("INSERT INTO children (id, parent) VALUES (2, 7)"))
        await session.commit()
    assert await _children(factory) == [2]


async def test_a_refused_commit_that_cannot_be_rolled_back_invalidates_its_connection(
    deferred_sqlite, alice, monkeypatch
) -> None:
    from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection

    def broken_rollback(self: object) -> None:
        raise RuntimeError("rollback failed")

    factory = deferred_sqlite
    async with factory.session(alice) as session:
        await session.execute(text("INSERT INTO children (id, parent) VALUES (1, 99)"))
        monkeypatch.setattr(AsyncAdapt_aiosqlite_connection, "rollback", broken_rollback)
        with pytest.raises(IntegrityError):
            await session.commit()
        monkeypatch.undo()
    assert await _children(factory) == []  # a new connection: the refused one is gone


# -- the process-wide default factory and the settings a factory shows ---------------------


async def test_the_default_factory(monkeypatch, tmp_path, alice) -> None:
    import reqscope
    import reqscope._sessions

    monkeypatch.setattr(reqscope._sessions, "_default", None)
    with pytest.raises(ReqscopeError, match=r"call reqscope.configure\(bind=...\)"):
        reqscope.get_default_factory()
    factory = reqscope.configure(f"sqlite+aiosqlite:///{tmp_path / 'default.db'}")
    assert reqscope.get_default_factory() is factory
    async with factory, reqscope.isolated_session(alice, max_lifetime=7.0) as session:
        assert session.info["user_id"] == "alice"
        assert [record.max_lifetime for record in factory.active_sessions()] == [7.0]
    replacement = reqscope.configure()  # replaced, not closed
    assert reqscope.get_default_factory() is replacement
    await replacement.aclose()


def test_a_factory_shows_its_settings() -> None:
    breaker = CircuitBreaker()
    policy = TenantPolicy(rls=False)
    factory = IsolatedSessionFactory(
        enforce_owner=False,
        capture_stacks=True,
        circuit_breaker=breaker,
        cleanup_timeout=2.5,
        tenant=policy,
        max_session_lifetime=12.0,
    )
    assert not factory.enforce_owner
    assert factory.capture_stacks
    assert factory.circuit_breaker is breaker
    assert factory.cleanup_timeout == 2.5
    assert factory.tenant is policy
    assert factory.max_session_lifetime == 12.0
    assert factory.statement_timeout is None
    with pytest.raises(AttributeError):
        factory.enforce_owner = True  # type: ignore[misc]  # read-only: the keeper's


def test_a_lifetime_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_session_lifetime must be positive"):
        IsolatedSessionFactory(max_session_lifetime=0)


def test_a_sync_session_class_must_carry_the_checks() -> None:
    from sqlalchemy.orm import Session

    with pytest.raises(ReqscopeError, match=r"must subclass reqscope\.ReqscopeSession"):
        IsolatedSessionFactory(session_kwargs={"sync_session_class": Session})


async def test_on_session_close_reports_and_survives_a_failing_observer(
    factory, alice, caplog
) -> None:
    seen: list[str] = []
    stop_failing = factory.on_session_close(lambda _record: 1 / 0)
    stop = factory.on_session_close(lambda record: seen.append(record.user_id))
    with caplog.at_level(logging.ERROR, logger="reqscope"):
        async with factory.session(alice) as session:
            await session.execute(text("SELECT 1"))
    assert seen == ["alice"]
    assert "a session observer failed" in caplog.text
    stop()
    stop()  # stopping twice is harmless
    stop_failing()
    async with factory.session(alice):
        pass
    assert seen == ["alice"]
