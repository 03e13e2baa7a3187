"""CleanupWatchdog (one shared timer bounds every shielded cleanup), and a scope's task."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from reqscope import IsolatedSessionFactory, UserExecutionContext
from reqscope._cleanup import CleanupWatchdog
from reqscope._compat import FALLBACKS_FORCED

pytestmark = pytest.mark.anyio


async def test_only_overdue_scopes_are_cancelled() -> None:
    watchdog = CleanupWatchdog()
    outcomes: dict[str, bool] = {}

    async def cleanup(name: str, timeout: float, duration: float) -> None:
        with anyio.CancelScope(shield=True) as scope:
            watchdog.watch(scope, timeout)
            try:
                await anyio.sleep(duration)
            finally:
                watchdog.unwatch(scope)
        outcomes[name] = scope.cancelled_caught

    async with anyio.create_task_group() as group:
        group.start_soon(cleanup, "fast", 0.3, 0.01)
        group.start_soon(cleanup, "hung-short", 0.1, 10)
        group.start_soon(cleanup, "hung-long", 0.4, 10)
        group.start_soon(cleanup, "slow-but-in-time", 1.0, 0.6)
    assert outcomes == {
        "fast": False,
        "hung-short": True,
        "hung-long": True,
        "slow-but-in-time": False,
    }
    assert len(watchdog) == 0


async def test_a_finished_cleanup_is_never_cancelled_later() -> None:
    watchdog = CleanupWatchdog()
    with anyio.CancelScope(shield=True) as done:
        watchdog.watch(done, 0.05)
        await anyio.lowlevel.checkpoint()
        watchdog.unwatch(done)
    await anyio.sleep(0.1)  # the timer fires with nothing to cancel
    assert not done.cancel_called
    with anyio.CancelScope(shield=True) as late:  # and a later cleanup re-arms it
        watchdog.watch(late, 0.05)
        await anyio.sleep(1)
    assert late.cancelled_caught


async def test_shielded_cleanup_ignores_outer_cancellation_but_not_the_watchdog() -> None:
    watchdog = CleanupWatchdog()
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(shield=True) as shield:
            watchdog.watch(shield, 0.1)
            await anyio.sleep(0.05)  # survives the outer cancellation
            survived = True
            await anyio.sleep(10)  # cut by the watchdog
    assert survived
    assert shield.cancelled_caught


# -- which cleanups need anyio's shield -----------------------------------------------------


@pytest.mark.skipif(FALLBACKS_FORCED, reason="without anyio's task records every task gets one")
async def test_only_cleanups_in_tasks_inside_an_anyio_scope_get_a_shield(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The scope reads anyio's private per-task records: if an anyio release changes them, this
    # test is what says so (reqscope then falls back to anyio.CancelScope, never to less).
    watched: dict[str, object] = {}
    real = CleanupWatchdog.watch
    current = ["?"]

    def spy(self: CleanupWatchdog, scope: object, *args: Any) -> None:
        watched[current[0]] = scope  # the task itself, or the shield scope it closes in
        real(self, scope, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(CleanupWatchdog, "watch", spy)
    async with IsolatedSessionFactory() as factory:

        async def request(name: str) -> None:
            current[0] = name
            async with factory.session(UserExecutionContext.create("u")):
                pass

        async def enters_and_leaves_a_scope() -> None:
            with anyio.CancelScope():
                await request("plain task, inside a CancelScope")
            await request("plain task, after its CancelScope")

        loop = asyncio.get_running_loop()
        await loop.create_task(request("plain asyncio task"))
        await loop.create_task(enters_and_leaves_a_scope())
        async with anyio.create_task_group() as group:
            group.start_soon(request, "task-group task")
    assert isinstance(watched["plain asyncio task"], asyncio.Task)
    assert isinstance(watched["plain task, after its CancelScope"], asyncio.Task)
    for name in ("plain task, inside a CancelScope", "task-group task"):
        shield = watched[name]
        assert isinstance(shield, anyio.CancelScope), name
        assert shield.shield, name


async def test_a_watched_task_is_cut_again_when_the_first_cut_is_swallowed() -> None:
    watchdog = CleanupWatchdog()
    cuts = 0
    sent: list[int] = []

    async def cleanup() -> None:
        nonlocal cuts
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # a driver that swallows the first cancellation
            cuts += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cuts += 1
        sent.append(watchdog.unwatch(task))

    task = asyncio.get_running_loop().create_task(cleanup())
    watchdog.watch(task, 0.05)
    started = anyio.current_time()
    await task
    assert cuts == 2
    assert sent == [2]  # unwatch says how many cancellations the watchdog sent
    assert anyio.current_time() - started < 5
    assert len(watchdog) == 0
    assert watchdog.unwatch(task) == 0  # and forgets them


async def test_an_unwatched_task_in_time_was_never_cut() -> None:
    watchdog = CleanupWatchdog()
    task = asyncio.current_task()
    assert task is not None
    watchdog.watch(task, 5)
    await asyncio.sleep(0)
    assert watchdog.unwatch(task) == 0
    assert len(watchdog) == 0


# -- the task that opened a session -------------------------------------------------------


async def opened_by(factory: IsolatedSessionFactory) -> str | None:
    """The name of the task a session's record says opened it."""
    async with factory.session(UserExecutionContext.create("u")):
        (record,) = factory.active_sessions()
        return record.task_name


async def test_a_session_records_the_task_that_opened_it() -> None:
    async with IsolatedSessionFactory() as factory:
        assert await opened_by(factory) == asyncio.current_task().get_name()  # type: ignore[union-attr]

        async def own() -> bool:
            return await opened_by(factory) == asyncio.current_task().get_name()  # type: ignore[union-attr]

        assert await asyncio.get_running_loop().create_task(own(), name="request-1")
        assert await asyncio.get_running_loop().create_task(own(), name="request-2")


async def test_a_failed_request_is_freed_without_the_garbage_collector() -> None:
    # A session's record keeps the task that opened it while it is open (task_name); once
    # the scope ends it lets go, or a task whose exception holds the request's frame (which
    # holds the session, which points at its record) would stay alive until a GC pass.
    import gc
    import weakref

    async with IsolatedSessionFactory() as factory:

        async def request() -> None:
            async with factory.session(UserExecutionContext.create("u")) as session:
                pass
            raise RuntimeError(f"after the block of {session!r}")

        gc.disable()
        try:
            task = asyncio.get_running_loop().create_task(request())
            await asyncio.wait([task])
            assert isinstance(task.exception(), RuntimeError)
            freed = weakref.ref(task)
            del task
            assert freed() is None
        finally:
            gc.enable()
