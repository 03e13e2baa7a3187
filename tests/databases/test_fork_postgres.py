"""A factory made before a fork (gunicorn ``--preload``, ``multiprocessing``) on real PostgreSQL.

The child must start afresh: a pooled connection's socket is shared with the parent, and a
child that used or closed it would corrupt or end the parent's conversation with the server.
"""

from __future__ import annotations

import asyncio
import os
from multiprocessing.connection import Connection
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from conftest import POOLER, in_forked_child
from reqscope import IsolatedSessionFactory, PoolConfig, UserExecutionContext

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform"),
    # Python 3.12+ warns on any fork of a process with threads (pytest's, aiosqlite's);
    # the child below only runs its own event loop.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

BACKEND_PID = text("SELECT pg_backend_pid()")


def _in_child(factory: IsolatedSessionFactory, report: Connection) -> None:
    """Runs in the forked child: use the inherited factory on a loop of the child's own."""

    async def main() -> dict[str, Any]:
        inherited = len(factory.active_sessions())
        pids = []
        for user in ("carol", "dave"):
            async with factory.session(UserExecutionContext.create(user)) as session:
                pids.append((await session.execute(BACKEND_PID)).scalar_one())
        detector_runs = factory.leak_detector.passes
        await anyio.sleep(0.2)
        detector_ran = factory.leak_detector.passes > detector_runs
        await factory.aclose()
        return {"inherited": inherited, "pids": pids, "detector_ran": detector_ran}

    try:
        report.send(asyncio.run(asyncio.wait_for(main(), 20)))
    except BaseException as error:  # the parent asserts on what happened here
        report.send({"error": repr(error)})


async def test_a_forked_child_never_touches_the_parents_connections(postgres) -> None:
    factory = IsolatedSessionFactory(
        postgres.url,
        pool=PoolConfig(pool_size=2, max_overflow=0, pool_timeout=5.0),
        leak_check_interval=0.05,
    )
    async with factory:
        async with factory.session(UserExecutionContext.create("bob")) as idle:
            idle_pid = (await idle.execute(BACKEND_PID)).scalar_one()  # back in the pool after
        async with factory.session(UserExecutionContext.create("alice")) as held:
            held_pid = (await held.execute(BACKEND_PID)).scalar_one()
            outcome = await in_forked_child(_in_child, factory)
            assert "error" not in outcome, outcome["error"]
            assert outcome["inherited"] == 0  # the parent's open session is not the child's
            assert outcome["detector_ran"]  # started again in the child, on its loop
            # the parent's connections are intact: same backends, still answering (behind a
            # pooler a backend serves any client between transactions: pids say nothing)
            assert (await held.execute(BACKEND_PID)).scalar_one() == held_pid
            if POOLER is None:
                assert not {idle_pid, held_pid} & set(outcome["pids"])  # backends of its own
        async with factory.session(UserExecutionContext.create("bob")) as again:
            pid = (await again.execute(BACKEND_PID)).scalar_one()
            assert POOLER is not None or pid in {idle_pid, held_pid}
        assert factory.metrics().active_sessions == 0
