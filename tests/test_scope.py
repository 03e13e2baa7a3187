"""CleanupWatchdog: one shared timer bounds every shielded cleanup."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from reqscope import IsolatedSessionFactory, UserExecutionContext
from reqscope._scope import CleanupWatchdog

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


# -- the running task, without get_running_loop()'s system call -----------------------------


async def opened_by(factory: IsolatedSessionFactory) -> asyncio.Task[Any] | None:
    """The task a session scope records as the one that opened it."""
    scope = factory.session(UserExecutionContext.create("u"))
    async with scope:
        return scope.task


async def test_a_scope_records_the_callers_own_task() -> None:
    async with IsolatedSessionFactory() as factory:
        assert await opened_by(factory) is asyncio.current_task()

        async def own() -> bool:
            return await opened_by(factory) is asyncio.current_task()

        assert await asyncio.get_running_loop().create_task(own())
        assert await asyncio.get_running_loop().create_task(own())  # the remembered loop


async def test_a_scope_never_records_another_threads_task() -> None:
    # Another thread's loop was the last one a scope found, and is in the middle of a task
    # step right now (a blocking call inside its task): a scope opened from this thread must
    # still record this thread's task, not that one.
    import threading

    from reqscope import _scope

    in_step = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    def other_thread() -> None:
        async def main() -> None:
            async with IsolatedSessionFactory() as factory:
                scope = factory.session(UserExecutionContext.create("other"))
                async with scope:  # remembers this thread's loop
                    seen["task"] = scope.task
                    in_step.set()
                    release.wait(10)  # blocks the step: this loop's task stays current

        asyncio.run(main())

    async with IsolatedSessionFactory() as factory:
        thread = threading.Thread(target=other_thread)
        thread.start()
        try:
            assert await anyio.to_thread.run_sync(in_step.wait, 10)
            assert _scope._last_loop[1] == thread.ident  # the other thread's loop is remembered
            mine = await opened_by(factory)
        finally:
            release.set()
            thread.join()
    assert seen["task"] is not None
    assert mine is asyncio.current_task()
    assert mine is not seen["task"]


def test_a_scope_outside_a_task_records_none_and_a_new_loop_is_found() -> None:
    from reqscope._scope import _running_loop_and_task

    async def found() -> bool:
        async with IsolatedSessionFactory() as factory:
            return await opened_by(factory) is asyncio.current_task() is not None

    assert asyncio.run(found())  # remembers that loop, on this thread
    assert _running_loop_and_task() == (None, None)  # that loop no longer runs
    assert asyncio.run(found())  # a new loop on the same thread


async def test_a_failed_request_frees_its_scope_without_the_garbage_collector() -> None:
    # The scope keeps the task that opened it while it is open (task_name); once it ends it
    # lets go, or a task whose exception holds the request's frame (which holds the session,
    # which points at its scope) would keep all of them alive until a GC pass.
    import gc
    import weakref

    async with IsolatedSessionFactory() as factory:
        scopes: list[weakref.ref[object]] = []

        async def request() -> None:
            scope = factory.session(UserExecutionContext.create("u"))
            async with scope as session:
                assert scope.task is asyncio.current_task()
            scopes.append(weakref.ref(scope))
            assert scope.task is None
            del scope
            raise RuntimeError(f"after the block of {session!r}")

        gc.disable()
        try:
            task = asyncio.get_running_loop().create_task(request())
            await asyncio.wait([task])
            assert isinstance(task.exception(), RuntimeError)
            del task
            assert scopes[0]() is None
        finally:
            gc.enable()
