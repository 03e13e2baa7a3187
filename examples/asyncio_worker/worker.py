"""A queue worker with reqscope.asyncio.consume: each message its own request.

    pip install -e ".[dev]" && python examples/asyncio_worker/worker.py

Messages carry the producer's context as headers (ctx.to_headers()); a poisoned message
(a bad context, a handler that raises or hangs) fails alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from reqscope import IsolatedSessionFactory, UserExecutionContext
from reqscope.asyncio import ConsumeStats, consume


def make_messages() -> list[dict[str, Any]]:
    messages = [
        {"headers": UserExecutionContext.create(f"user-{i % 3}").to_headers(), "body": f"job {i}"}
        for i in range(9)
    ]
    messages.append({"headers": {}, "body": "no context"})  # poisoned: dropped alone
    messages.append({"headers": UserExecutionContext.create("user-0").to_headers(), "body": "boom"})
    return messages


async def handle(message: dict[str, Any], session: AsyncSession) -> None:
    if message["body"] == "boom":
        raise ValueError("this message is poisoned")
    ctx = UserExecutionContext.from_headers(message["headers"])
    await session.execute(
        text("INSERT INTO jobs (user_id, body) VALUES (:u, :b)"),
        {"u": ctx.user_id, "b": message["body"]},
    )


async def run(factory: IsolatedSessionFactory) -> tuple[ConsumeStats, dict[str, int]]:
    async with factory.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS jobs (user_id TEXT, body TEXT)"))
    stats = await consume(
        make_messages(),
        handle,
        context_from=lambda m: UserExecutionContext.from_headers(m["headers"]),
        factory=factory,
        concurrency=4,
        timeout=5,
    )
    async with factory.engine.connect() as conn:
        rows = await conn.execute(text("SELECT user_id, count(*) FROM jobs GROUP BY user_id"))
        per_user = {row[0]: row[1] for row in rows}
    return stats, per_user


async def main() -> None:
    async with IsolatedSessionFactory() as factory:
        stats, per_user = await run(factory)
    print(f"processed {stats.processed}, failed {stats.failed}, timed out {stats.timed_out}")
    print("jobs per user:", dict(sorted(per_user.items())))


if __name__ == "__main__":
    asyncio.run(main())
