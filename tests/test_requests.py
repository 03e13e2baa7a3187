"""RequestResources: what the ASGI adapters open per request and close after the response."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.util import await_only

from reqscope import AgentInstanceFactory, AgentRegistry, ReqscopeSession
from reqscope._requests import RequestResources

pytestmark = pytest.mark.anyio


def slow_close(monkeypatch: pytest.MonkeyPatch, finished: list[bool]) -> None:
    """Make session closes take 50 ms (a rollback round trip), noting each that finishes."""
    real_close = ReqscopeSession.close

    def close(session: ReqscopeSession) -> None:
        await_only(asyncio.sleep(0.05))
        real_close(session)
        finished.append(True)

    monkeypatch.setattr(ReqscopeSession, "close", close)


async def test_a_cancelled_request_still_rolls_back_and_returns_its_session(
    factory, alice, monkeypatch
) -> None:
    # The client went away: the request's scope is cancelled before aclose() runs. The
    # session's cleanup must still run to the end (not be cut into a dropped connection).
    resources = RequestResources(alice, factory)
    session = await resources.session()
    await session.execute(text("SELECT 1"))
    finished: list[bool] = []
    slow_close(monkeypatch, finished)
    with anyio.CancelScope() as request_scope:
        request_scope.cancel()
        await resources.aclose()
    assert finished == [True]
    metrics = factory.metrics()
    assert metrics.cleanup_failures == 0
    assert metrics.active_sessions == 0


class Stuck:
    """An agent whose cleanup hangs."""

    async def aclose(self) -> None:
        await asyncio.sleep(30)


async def test_a_task_cancel_during_agent_cleanup_still_closes_the_session(factory, alice) -> None:
    registry = AgentRegistry()
    registry.register("stuck", Stuck)
    agents = AgentInstanceFactory(registry, cleanup_timeout=30)
    resources = RequestResources(alice, factory, agents=agents)
    stuck = asyncio.Event()

    async def request() -> None:
        session = await resources.session()
        await session.execute(text("SELECT 1"))
        (await resources.agents()).create("stuck")
        stuck.set()
        await resources.aclose()

    task = asyncio.get_running_loop().create_task(request())
    await stuck.wait()
    await asyncio.sleep(0.05)  # inside the agent's cleanup
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    metrics = factory.metrics()
    assert metrics.active_sessions == 0
    assert metrics.pool is None or metrics.pool.checked_out == 0
