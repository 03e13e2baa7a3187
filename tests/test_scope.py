"""CleanupWatchdog: one shared timer bounds every shielded cleanup."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from reqscope._scope import CleanupWatchdog, _anyio_shield

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


async def test_only_tasks_inside_an_anyio_scope_get_a_shield() -> None:
    # This reads anyio's private per-task records: if an anyio release changes them, this
    # test is what says so (reqscope then falls back to anyio.CancelScope, never to less).
    seen: dict[str, anyio.CancelScope | None] = {}

    async def look(name: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        seen[name] = _anyio_shield(task)

    async def enters_and_leaves_a_scope() -> None:
        with anyio.CancelScope():
            await look("plain task, inside a CancelScope")
        await look("plain task, after its CancelScope")

    await asyncio.get_running_loop().create_task(look("plain asyncio task"))
    await asyncio.get_running_loop().create_task(enters_and_leaves_a_scope())
    async with anyio.create_task_group() as group:
        group.start_soon(look, "task-group task")
    assert seen["plain asyncio task"] is None
    assert seen["plain task, after its CancelScope"] is None
    for name in ("plain task, inside a CancelScope", "task-group task"):
        shield = seen[name]
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


async def test_current_task_is_the_callers_own_task() -> None:
    from reqscope._scope import _current_task

    assert _current_task() is asyncio.current_task()

    async def own() -> bool:
        return _current_task() is asyncio.current_task()

    assert await asyncio.get_running_loop().create_task(own())


async def test_current_task_is_never_another_threads_task() -> None:
    # Another thread's loop was the last one remembered, and is in the middle of a task step
    # right now (a blocking call inside its task): asking from this thread must still give
    # this thread's task, not that one.
    import threading

    from reqscope import _scope

    in_step = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    def other_thread() -> None:
        async def main() -> None:
            seen["task"] = _scope._current_task()  # remembers this thread's loop
            in_step.set()
            release.wait(10)  # blocks the step: this loop's task stays current

        asyncio.run(main())

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert await anyio.to_thread.run_sync(in_step.wait, 10)
        assert _scope._last_loop[1] == thread.ident  # the other thread's loop is remembered
        mine = _scope._current_task()
    finally:
        release.set()
        thread.join()
    assert seen["task"] is not None
    assert mine is asyncio.current_task()
    assert mine is not seen["task"]


def test_current_task_outside_a_task_is_none_and_a_new_loop_is_found() -> None:
    from reqscope._scope import _current_task

    async def found() -> bool:
        return _current_task() is asyncio.current_task() is not None

    assert asyncio.run(found())  # remembers that loop, on this thread
    assert _current_task() is None  # that loop no longer runs
    assert asyncio.run(found())  # a new loop on the same thread
