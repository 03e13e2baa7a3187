from __future__ import annotations

import gc
import logging
import sys
import threading
import weakref

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

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
    assert (stats.processed, stats.failed, stats.timed_out, stats.rejected) == (9, 1, 0, 1)
    assert per_user == {"user-0": 3, "user-1": 3, "user-2": 3}
    by_status = {failure.status: failure for failure in stats.failures}
    assert by_status["error"].user_id == "user-0"  # the raising one, with its own result
    assert by_status["error"].error == "this message is poisoned"
    assert by_status["rejected"].error_type == "ContextValidationError"


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
        "    if name.startswith(('starlette', 'fastapi', 'aio_pika', 'redis')):\n"
        "        raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "for mod, extra in (('reqscope.starlette', 'reqscope[starlette]'),\n"
        "                   ('reqscope.fastapi', 'reqscope[fastapi]'),\n"
        "                   ('reqscope.brokers.rabbitmq', 'reqscope[rabbitmq]'),\n"
        "                   ('reqscope.brokers.redis_streams', 'reqscope[redis]'),\n"
        "                   ('reqscope.redis_hub', 'reqscope[redis]')):\n"
        "    try:\n"
        "        __import__(mod)\n"
        "    except ImportError as e:\n"
        "        assert extra in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(mod + ' imported')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # noqa: S603


async def test_every_message_reaches_on_result_exactly_once_bad_context_included() -> None:
    # An ack-based broker with prefetch 5: it delivers no more until earlier messages are
    # acked or nacked in on_result. A message with no valid context that skipped on_result
    # was never answered, and after 5 of them the worker stalled for good.
    prefetch = anyio.Semaphore(5)
    answered: dict[int, list[str]] = {}

    async def broker():
        for n in range(200):
            await prefetch.acquire()
            yield n

    def context_of(n: int) -> UserExecutionContext:
        if n % 10 == 0:
            raise ValueError(f"message {n} has no context headers")
        return UserExecutionContext.create(f"user-{n % 7}")

    async def handler(n: int) -> int:
        if n % 10 == 5:
            raise RuntimeError("poisoned")
        return n

    def ack_or_nack(n: int, result) -> None:
        answered.setdefault(n, []).append(result.status)
        prefetch.release()

    with anyio.fail_after(10):
        stats = await consume(
            broker(), handler, context_from=context_of, concurrency=4, on_result=ack_or_nack
        )
    assert sorted(answered) == list(range(200))
    assert all(len(statuses) == 1 for statuses in answered.values())  # exactly once
    assert (stats.processed, stats.failed, stats.rejected) == (160, 20, 20)
    rejected = [f for f in stats.failures if f.status == "rejected"]
    assert rejected
    assert "has no context headers" in rejected[0].error


async def test_a_worker_keeps_counts_not_failed_sessions(database, caplog) -> None:
    # A worker never returns: what it keeps of failures must be bounded. Each failure's
    # traceback holds the handler's frame, and with it the message's session.
    sessions: list[weakref.ref[AsyncSession]] = []
    # (each failure is logged with its traceback, and pytest keeps the records it captures)
    caplog.set_level(logging.ERROR, logger="reqscope._containment")

    async def handler(n: int, session: AsyncSession) -> None:
        sessions.append(weakref.ref(session))
        await session.execute(text("SELECT 1"))
        raise ValueError(f"message {n} is poisoned")

    async with IsolatedSessionFactory(database.url) as factory:
        stats = await consume(
            range(2000),
            handler,
            context_from=lambda n: UserExecutionContext.create(f"user-{n % 50}"),
            factory=factory,
            concurrency=10,
            keep_failures=50,
        )
    gc.collect()
    assert stats.failed == 2000
    assert len(stats.failures) == 50
    assert stats.failures[-1].error.startswith("message ")
    assert sum(ref() is not None for ref in sessions) == 0  # no failed message's session lives
    with pytest.raises(ValueError, match="keep_failures"):
        await consume([], handler, context_from=lambda n: n, keep_failures=-1)


async def test_a_failed_handler_is_logged_at_warning_with_its_traceback(caplog) -> None:
    async def handler(n: int) -> None:
        raise ValueError(f"message {n} is poisoned")

    with caplog.at_level(logging.WARNING, logger="reqscope"):
        stats = await consume(
            [7], handler, context_from=lambda _n: UserExecutionContext.create("alice")
        )
    assert stats.failed == 1
    (record,) = [r for r in caplog.records if r.name == "reqscope._containment"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert "ValueError: message 7 is poisoned" in record.getMessage()
    assert record.user_id == "alice"
    assert record.request_id == stats.failures[0].request_id
