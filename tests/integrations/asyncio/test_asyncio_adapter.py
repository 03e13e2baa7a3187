from __future__ import annotations

import sys
import threading

import anyio
import pytest

from example_loader import load_example
from reqscope import (
    IsolatedSessionFactory,
    UserExecutionContext,
    current_context,
    current_context_or_none,
)
from reqscope.asyncio import consume, create_task, to_thread

worker = load_example("asyncio_worker/worker.py", "example_asyncio_worker")

pytestmark = pytest.mark.anyio


async def test_create_task_and_to_thread_carry_the_context() -> None:
    ctx = UserExecutionContext.create("alice")

    async def who() -> str:
        return current_context().user_id

    task = create_task(ctx, who())
    assert await task == "alice"
    assert task.get_name() == f"reqscope:{ctx.request_id}"
    assert current_context_or_none() is None

    def in_thread() -> tuple[str, bool]:
        return current_context().user_id, threading.current_thread() is threading.main_thread()

    assert await to_thread(ctx, in_thread) == ("alice", False)


async def test_worker_example_poisoned_messages_fail_alone(database) -> None:
    async with IsolatedSessionFactory(database.url) as factory:
        stats, per_user = await worker.run(factory)
        async with factory.engine.begin() as conn:
            from sqlalchemy import text

            await conn.execute(text("DROP TABLE jobs"))
    assert (stats.processed, stats.failed, stats.timed_out) == (9, 2, 0)
    assert per_user == {"user-0": 3, "user-1": 3, "user-2": 3}
    assert stats.failures[0].user_id == "user-0"  # the raising one, with its own result


async def test_consume_hangs_time_out_alone_and_async_sources_work() -> None:
    async def source():
        for i in range(6):
            yield i

    results = []

    async def handler(n: int) -> int:
        if n == 3:
            await anyio.sleep(60)
        assert current_context().user_id == f"u{n}"
        return n

    stats = await consume(
        source(),
        handler,
        context_from=lambda n: UserExecutionContext.create(f"u{n}"),
        concurrency=3,
        timeout=0.2,
        on_result=lambda n, r: results.append((n, r.status)),
    )
    assert (stats.processed, stats.failed, stats.timed_out) == (5, 0, 1)
    assert sorted(results) == [
        (0, "ok"),
        (1, "ok"),
        (2, "ok"),
        (3, "timeout"),
        (4, "ok"),
        (5, "ok"),
    ]
    with pytest.raises(ValueError, match="concurrency"):
        await consume([], handler, context_from=lambda n: n, concurrency=0)


def test_adapters_name_their_extra_when_the_framework_is_missing() -> None:
    import subprocess

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name.startswith(('starlette', 'fastapi')): raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "for mod, extra in (('reqscope.starlette', 'reqscope[starlette]'), ('reqscope.fastapi', 'reqscope[fastapi]')):\n"
        "    try:\n"
        "        __import__(mod)\n"
        "    except ImportError as e:\n"
        "        assert extra in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(mod + ' imported')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # noqa: S603
