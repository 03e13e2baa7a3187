"""consume_stream() on the real Redis, writing a ledger on the real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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

redis_asyncio = pytest.importorskip("redis.asyncio")
from reqscope.brokers.redis_streams import StreamEntry, consume_stream, publish  # noqa: E402

pytestmark = pytest.mark.anyio

STREAM, GROUP = "reqscope:test:jobs", "reqscope-test-workers"
LEDGER = "reqscope_test_stream_ledger"
LEDGER_INSERT = insert_sql(LEDGER)


@pytest.fixture(name="pg_url")
def _pg_url() -> str:
    return server_url("postgres-asyncpg")


@pytest.fixture(name="client")
async def _client(pg_url: str) -> AsyncIterator[Any]:
    client = redis_asyncio.Redis.from_url(server_url("redis"), decode_responses=True)
    await client.delete(STREAM, f"{STREAM}:dead")
    await reset(pg_url, LEDGER)
    yield client
    await client.delete(STREAM, f"{STREAM}:dead")
    await client.aclose()
    await reset(pg_url, LEDGER, create=False)


async def add_all(client: Any, count: int, *, bad_context: bool = False) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for n in range(count):
            fields = {"body": json.dumps({"n": n, "user": user_of(n)})}
            if bad_context and without_context(n):
                pipe.xadd(STREAM, fields)
            else:
                pipe.xadd(
                    STREAM, {**fields, **UserExecutionContext.create(user_of(n)).to_headers()}
                )
        await pipe.execute()
    assert await client.xlen(STREAM) == count  # publish() in bulk; publish() is tested below


async def ledger(pg_url: str) -> list[tuple[int, str, str]]:
    return await rows(pg_url, LEDGER)


async def record(entry: StreamEntry, session: AsyncSession) -> dict[str, Any]:
    job = json.loads(entry.fields["body"])
    params = {
        "n": job["n"],
        "user": current_context().user_id,
        "owner": session_tags(session).user_id,
    }
    await session.execute(text(LEDGER_INSERT), params)
    return job


@pytest.mark.slow
async def test_five_thousand_entries_each_acked_or_dead_lettered_once(client, pg_url) -> None:
    await add_all(client, TOTAL, bad_context=True)

    async def handle(entry: StreamEntry, session: AsyncSession) -> None:
        job = json.loads(entry.fields["body"])
        if poisoned(job["n"]):
            raise ValueError(f"job {job['n']} is poisoned")
        assert current_context().user_id == job["user"]
        await record(entry, session)

    async with IsolatedSessionFactory(pg_url) as factory:
        with anyio.fail_after(120):
            stats = await consume_stream(
                client,
                STREAM,
                handle,
                group=GROUP,
                consumer="w1",
                factory=factory,
                concurrency=20,
                idle_timeout=1.5,
                block=0.2,
            )
    dead_letters = await check_five_thousand(stats, pg_url, LEDGER)
    assert (await client.xpending(STREAM, GROUP))["pending"] == 0  # every entry acknowledged
    dead = await client.xrange(f"{STREAM}:dead")
    assert len(dead) == dead_letters  # each failure dead-lettered once
    statuses = {fields["reqscope-status"] for _, fields in dead}
    assert statuses == {"error"}
    assert any("is poisoned" in fields["reqscope-error"] for _, fields in dead)


async def test_entries_of_a_crashed_consumer_are_claimed_and_processed_once(client, pg_url) -> None:
    ctx = UserExecutionContext.create("alice")
    for n in range(60):
        await publish(client, STREAM, {"body": json.dumps({"n": n, "user": "alice"})}, ctx)
    await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    # A consumer reads 25 entries and dies before acknowledging any of them.
    taken = await client.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=25)
    assert len(taken[0][1]) == 25
    await anyio.sleep(0.6)  # they have been pending longer than claim_idle
    async with IsolatedSessionFactory(pg_url) as factory:
        with anyio.fail_after(30):
            stats = await consume_stream(
                client,
                STREAM,
                record,
                group=GROUP,
                consumer="w2",
                factory=factory,
                timeout=0.4,
                claim_idle=0.5,
                idle_timeout=1.0,
                block=0.2,
            )
    rows = await ledger(pg_url)
    assert sorted(n for n, _, _ in rows) == list(range(60))
    assert stats.processed == 60  # the claimed 25 and the 35 nobody had read, each once
    assert (await client.xpending(STREAM, GROUP))["pending"] == 0
    with pytest.raises(ValueError, match="claim_idle"):
        await consume_stream(client, STREAM, record, group=GROUP, consumer="w3", timeout=120)
