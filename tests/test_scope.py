"""CleanupWatchdog: one shared timer bounds every shielded cleanup."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

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
