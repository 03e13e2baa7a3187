"""consume_queue() on the real RabbitMQ, writing a ledger on the real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from broker_ledger import (
    TOTAL,
    check_five_thousand,
    insert_sql,
    poisoned,
    reset,
    rows,
    user_of,
    without_context,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from conftest import server_url
from reqscope import IsolatedSessionFactory, UserExecutionContext, current_context, session_tags

aio_pika = pytest.importorskip("aio_pika")
from reqscope.brokers.rabbitmq import consume_queue, publish  # noqa: E402

pytestmark = pytest.mark.anyio

QUEUE, DEAD, DLX = "reqscope_test_jobs", "reqscope_test_jobs_dead", "reqscope_test_dlx"
LEDGER = "reqscope_test_ledger"
LEDGER_INSERT = insert_sql(LEDGER)


@pytest.fixture(name="amqp_url")
def _amqp_url() -> str:
    return server_url("rabbitmq")


@pytest.fixture(name="pg_url")
def _pg_url() -> str:
    return server_url("postgres-asyncpg")


@pytest.fixture(name="broker")
async def _broker(amqp_url: str, pg_url: str) -> AsyncIterator[Any]:
    """A fresh work queue dead-lettering into its own queue, and an empty ledger."""
    await reset(pg_url, LEDGER)
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    for name in (QUEUE, DEAD):
        await channel.queue_delete(name)
    dlx = await channel.declare_exchange(DLX, aio_pika.ExchangeType.FANOUT)
    dead = await channel.declare_queue(DEAD, durable=True)
    await dead.bind(dlx)
    await channel.declare_queue(QUEUE, durable=True, arguments={"x-dead-letter-exchange": DLX})
    yield channel
    for name in (QUEUE, DEAD):
        await channel.queue_delete(name)
    await connection.close()
    await reset(pg_url, LEDGER, create=False)


async def publish_all(channel: Any, count: int, *, bad_context: bool = False) -> None:
    """``count`` jobs from 50 users; with ``bad_context``, 1 % carry no context."""
    exchange = channel.default_exchange

    async def one(n: int) -> None:
        body = json.dumps({"n": n, "user": user_of(n)}).encode()
        if bad_context and without_context(n):
            await exchange.publish(aio_pika.Message(body), QUEUE)
        else:
            await publish(exchange, QUEUE, body, UserExecutionContext.create(user_of(n)))

    for start in range(0, count, 500):
        async with anyio.create_task_group() as group:
            for n in range(start, min(count, start + 500)):
                group.start_soon(one, n)


async def ledger(pg_url: str) -> list[tuple[int, str, str]]:
    return await rows(pg_url, LEDGER)


async def count_messages(amqp_url: str, name: str, expected: int = 0) -> int:
    """Messages ready in queue ``name``, once it holds ``expected`` (or after 5 s).

    The broker routes dead letters asynchronously: a count read at once may lag behind. A
    plain connection each time: a robust channel answers a redeclaration from its cache.
    """
    count = -1
    with anyio.move_on_after(5):
        while count != expected:
            connection = await aio_pika.connect(amqp_url)
            async with connection, connection.channel() as channel:
                queue = await channel.declare_queue(name, passive=True)
                count = int(queue.declaration_result.message_count)
            await anyio.sleep(0.05)
    return count


@pytest.mark.slow
async def test_five_thousand_messages_each_acked_or_dead_lettered_once(
    broker, amqp_url, pg_url
) -> None:
    await publish_all(broker, TOTAL, bad_context=True)
    mismatches: list[int] = []

    async def handle(message: Any, session: AsyncSession) -> None:
        job = json.loads(message.body)
        if poisoned(job["n"]):
            raise ValueError(f"job {job['n']} is poisoned")
        user = current_context().user_id
        if user != job["user"]:
            mismatches.append(job["n"])
        params = {"n": job["n"], "user": user, "owner": session_tags(session).user_id}
        await session.execute(text(LEDGER_INSERT), params)

    await broker.set_qos(prefetch_count=40)
    queue = await broker.declare_queue(QUEUE, passive=True)
    async with IsolatedSessionFactory(pg_url) as factory:
        with anyio.fail_after(120):
            stats = await consume_queue(
                queue, handle, factory=factory, concurrency=20, idle_timeout=2
            )
    dead = await check_five_thousand(stats, pg_url, LEDGER)
    assert mismatches == []
    assert await count_messages(amqp_url, QUEUE) == 0  # every message acked or dead-lettered
    assert await count_messages(amqp_url, DEAD, dead) == dead  # exactly once


WORKER = """
import asyncio, json, sys
import aio_pika
from sqlalchemy import text
from reqscope import IsolatedSessionFactory, current_context, session_tags
from reqscope.brokers.rabbitmq import consume_queue

async def main(amqp_url, pg_url):
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=20)
    queue = await channel.declare_queue(sys.argv[3], passive=True)

    async def handle(message, session):
        job = json.loads(message.body)
        await asyncio.sleep(0.005)
        await session.execute(text(sys.argv[4]), {
            "n": job["n"], "user": current_context().user_id,
            "owner": session_tags(session).user_id})

    async with IsolatedSessionFactory(pg_url) as factory:
        await consume_queue(queue, handle, factory=factory, concurrency=10)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
async def test_a_worker_killed_mid_run_loses_nothing(broker, amqp_url, pg_url, tmp_path) -> None:
    total = 1000
    await publish_all(broker, total)
    script = Path(tmp_path) / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    worker = subprocess.Popen(  # noqa: S603, ASYNC220 - a worker process to kill
        [sys.executable, str(script), amqp_url, pg_url, QUEUE, LEDGER_INSERT],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        with anyio.fail_after(60):
            while len(await ledger(pg_url)) < 200:  # well under way
                await anyio.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGKILL)  # no goodbye: its unacked messages go back
        worker.wait()
    assert len(await ledger(pg_url)) < total

    async def handle(message: Any, session: AsyncSession) -> None:
        job = json.loads(message.body)
        owner = session_tags(session).user_id
        params = {"n": job["n"], "user": current_context().user_id, "owner": owner}
        await session.execute(text(LEDGER_INSERT), params)

    await broker.set_qos(prefetch_count=40)
    queue = await broker.declare_queue(QUEUE, passive=True)
    async with IsolatedSessionFactory(pg_url) as factory:
        with anyio.fail_after(60):
            stats = await consume_queue(
                queue, handle, factory=factory, concurrency=10, idle_timeout=2
            )
    rows = await ledger(pg_url)
    assert sorted(n for n, _, _ in rows) == list(range(total))  # every job, once
    assert all(user == user_of(n) == owner for n, user, owner in rows)
    assert stats.failed == stats.rejected == 0
    assert await count_messages(amqp_url, QUEUE) == 0
    assert await count_messages(amqp_url, DEAD) == 0
