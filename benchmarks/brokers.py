"""RabbitMQ workers: reqscope's consume_queue() against a plain aio-pika consumer.

    python benchmarks/brokers.py [--messages 2000] [--rounds 5] [--concurrency 20]

Both consume the same kind of message (a context in its headers, a JSON body) from a
RabbitMQ queue with prefetch twice the concurrency and do the same database work: one INSERT into
a ledger on PostgreSQL, committed, then ack. The plain consumer opens an
``async_sessionmaker`` session per message in a task of its own, bounded by a semaphore;
reqscope's builds the message's context, opens an isolated session, contains failures.
Figure: messages per second from the first message to the last ack, per round, and the
median of per-round ratios to the plain consumer; "plain again" is the noise floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import anyio
from sessions import median_ci, round_order  # benchmarks/sessions.py
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from reqscope import IsolatedSessionFactory, PoolConfig, UserExecutionContext, build_engine
from reqscope.brokers.rabbitmq import consume_queue, publish

QUEUE = "reqscope_bench_jobs"
INSERT = text("INSERT INTO reqscope_bench_ledger (message, user_id) VALUES (:n, :user)")


async def fill(channel: Any, count: int) -> None:
    exchange = channel.default_exchange
    async with anyio.create_task_group() as group:
        for n in range(count):
            body = json.dumps({"n": n}).encode()
            ctx = UserExecutionContext.create(f"user-{n % 50}")
            group.start_soon(publish, exchange, QUEUE, body, ctx)


async def plain(queue: Any, url: str, count: int, concurrency: int) -> float:
    engine = build_engine(url, pool=PoolConfig(pool_size=concurrency, max_overflow=0))
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    done = anyio.Event()
    finished = 0
    slots = anyio.Semaphore(concurrency)

    async def work(message: Any) -> None:
        nonlocal finished
        try:
            headers = {k: v for k, v in (message.headers or {}).items() if isinstance(v, str)}
            user = UserExecutionContext.from_headers(headers).user_id
            async with sessionmaker() as session:
                await session.execute(INSERT, {"n": json.loads(message.body)["n"], "user": user})
                await session.commit()
            await message.ack()
        finally:
            slots.release()
        finished += 1
        if finished == count:
            done.set()

    started = time.perf_counter()
    async with queue.iterator() as incoming, anyio.create_task_group() as group:
        group.start_soon(lambda: _stop_when(done, group))
        async for message in incoming:
            await slots.acquire()
            group.start_soon(work, message)
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return count / elapsed


async def _stop_when(done: anyio.Event, group: Any) -> None:
    await done.wait()
    group.cancel_scope.cancel()


async def reqscope_worker(queue: Any, url: str, count: int, concurrency: int) -> float:
    pool = PoolConfig(pool_size=concurrency, max_overflow=0)
    finished = 0
    done = anyio.Event()

    async def handle(message: Any, session: Any) -> None:
        nonlocal finished
        from reqscope import current_context  # noqa: PLC0415

        user = current_context().user_id
        await session.execute(INSERT, {"n": json.loads(message.body)["n"], "user": user})
        finished += 1  # counted before its commit and ack: the wait below covers them
        if finished == count:
            done.set()

    async with IsolatedSessionFactory(url, pool=pool) as factory:
        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: consume_queue(queue, handle, factory=factory, concurrency=concurrency)
            )
            await done.wait()
            with anyio.fail_after(30):  # the last commits and acks
                while factory.metrics().active_sessions:  # noqa: ASYNC110 - a metric, no event
                    await anyio.sleep(0.001)
            elapsed = time.perf_counter() - started
            group.cancel_scope.cancel()
    return count / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    url = os.environ.get(
        "REQSCOPE_BENCH_POSTGRES_URL",
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test?ssl=disable",
    )
    amqp = os.environ.get("REQSCOPE_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    print(
        f"command: python benchmarks/brokers.py --messages {args.messages} "
        f"--rounds {args.rounds} --concurrency {args.concurrency}"
    )
    print(f"aio-pika {aio_pika.__version__}, nproc {os.cpu_count()}")
    engine = build_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS reqscope_bench_ledger"))
        await conn.execute(text("CREATE TABLE reqscope_bench_ledger (message int, user_id text)"))
    connection = await aio_pika.connect_robust(amqp)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2 * args.concurrency)
    variants: dict[str, Callable[..., Awaitable[float]]] = {
        "plain aio-pika consumer": plain,
        "plain again (control)": plain,
        "reqscope consume_queue": reqscope_worker,
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(args.rounds):
        for name in round_order(list(variants), index):
            await channel.queue_delete(QUEUE)
            queue = await channel.declare_queue(QUEUE)
            await fill(channel, args.messages)
            rates[name].append(await variants[name](queue, url, args.messages, args.concurrency))
    await channel.queue_delete(QUEUE)
    await connection.close()
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE reqscope_bench_ledger"))
    await engine.dispose()
    base = rates["plain aio-pika consumer"]
    print(f"\n{'variant':26} {'messages/s':>12} {'ratio to plain':>28}")
    for name, values in rates.items():
        ratios = [value / plain_rate for value, plain_rate in zip(values, base, strict=True)]
        print(
            f"{name:26} {statistics.median(values):12.0f} "
            f"{statistics.median(ratios):8.3f} ({median_ci(ratios)})"
        )


if __name__ == "__main__":
    asyncio.run(main())
