"""Redis streams (redis-py asyncio): consume with a consumer group, one request per entry.

Example:
    >>> client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    >>> await publish(client, "jobs", {"body": "..."}, ctx)
    >>> stats = await consume_stream(client, "jobs", handle, group="workers", consumer="w1",
    ...                              factory=factory)

An entry is acknowledged (``XACK``) once its session committed; a failed one is copied to the
dead-letter stream (``<stream>:dead``, with ``reqscope-status`` and ``reqscope-error``) and
acknowledged, atomically. Entries another consumer of the group read and never acknowledged
(it crashed) are claimed (``XAUTOCLAIM``) once idle for ``claim_idle`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

try:
    from redis.asyncio import Redis
    from redis.exceptions import ResponseError
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "reqscope.brokers.redis_streams needs redis-py: pip install 'reqscope[redis]'"
    ) from exc

from reqscope._consume import ConsumeStats, consume
from reqscope._containment import DEFAULT_TIMEOUT, RunResult
from reqscope._context import UserExecutionContext
from reqscope._sessions import IsolatedSessionFactory

__all__ = ["StreamEntry", "consume_stream", "context_of", "publish"]


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry of a stream, as the handler receives it."""

    stream: str
    id: str
    fields: Mapping[str, str]


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def context_of(entry: StreamEntry) -> UserExecutionContext:
    """The producer's context, from the entry's fields.

    Raises:
        ContextValidationError: the fields carry no valid context.
    """
    return UserExecutionContext.from_headers(entry.fields)


async def publish(
    client: Redis, stream: str, fields: Mapping[str, str], ctx: UserExecutionContext
) -> str:
    """``XADD`` ``fields`` with ``ctx`` in them; returns the entry's id."""
    entry: dict[Any, Any] = {**fields, **ctx.to_headers()}
    entry_id = await client.xadd(stream, entry)
    return _text(entry_id)


class _Stream:
    """One consumer's view of a stream in its group."""

    def __init__(  # noqa: PLR0917 - consume_stream's arguments, kept together
        self,
        client: Redis,
        stream: str,
        group: str,
        consumer: str,
        dead_letter: str | None,
        claim_idle: float,
        batch: int,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_letter = dead_letter
        self.claim_idle = claim_idle
        self.batch = batch

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists already: fine
                raise

    def _entries(self, raw: list[Any]) -> list[StreamEntry]:
        return [
            StreamEntry(
                self.stream,
                _text(entry_id),
                {_text(key): _text(value) for key, value in (fields or {}).items()},
            )
            for entry_id, fields in raw
        ]

    async def claim(self) -> list[StreamEntry]:
        """Entries of crashed consumers, idle for ``claim_idle`` seconds."""
        reply: Any = await self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=int(self.claim_idle * 1000),
            start_id="0-0",
            count=self.batch,
        )
        return self._entries(reply[1])

    async def read(self, block: float) -> list[StreamEntry]:
        reply: Any = await self.client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=int(block * 1000)
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {stream: [entries]}
            return self._entries(next(iter(reply.values())))
        return self._entries(reply[0][1])  # RESP2: [[stream, [entries]]]

    async def entries(self, block: float, idle_timeout: float | None) -> AsyncIterator[StreamEntry]:
        await self.ensure_group()
        last_claim = -math.inf
        idle_since = time.monotonic()
        while True:
            batch: list[StreamEntry] = []
            if time.monotonic() - last_claim >= self.claim_idle:
                last_claim = time.monotonic()
                batch = await self.claim()
            if not batch:
                batch = await self.read(block)
            if not batch:
                if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    return
                continue
            idle_since = time.monotonic()
            for entry in batch:
                yield entry

    async def settle(self, entry: StreamEntry, result: RunResult[Any]) -> None:
        if result.ok or self.dead_letter is None:
            await self.client.xack(self.stream, self.group, entry.id)
            return
        error = "" if result.error is None else f"{type(result.error).__name__}: {result.error}"
        dead: dict[Any, Any] = {
            **entry.fields,
            "reqscope-status": result.status,
            "reqscope-error": error,
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter, dead)
            pipe.xack(self.stream, self.group, entry.id)
            await pipe.execute()


async def consume_stream(
    client: Redis,
    stream: str,
    handler: Callable[..., Awaitable[Any]],
    *,
    group: str,
    consumer: str,
    factory: IsolatedSessionFactory | None = None,
    concurrency: int = 10,
    timeout: float | None = DEFAULT_TIMEOUT,
    dead_letter: str | None = "",
    claim_idle: float = 60.0,
    block: float = 1.0,
    idle_timeout: float | None = None,
    keep_failures: int = 100,
) -> ConsumeStats:
    """Consume ``stream`` as ``consumer`` of ``group`` until cancelled (or idle).

    Each entry runs as ``await handler(entry, session)`` (``handler(entry)`` without a
    factory) in the context its fields carry, as a :class:`StreamEntry`.

    Args:
        client: a redis-py asyncio client.
        stream: the stream's key.
        handler: the work for one entry.
        group: the consumer group (created, with the stream, if missing).
        consumer: this worker's name in the group (unique per worker).
        factory: opens each entry's session, committed when the handler returns.
        concurrency: entries in flight at once.
        timeout: each entry's own timeout in seconds.
        dead_letter: the stream failed entries go to; ``""`` (default) is
            ``<stream>:dead``, ``None`` acknowledges failed entries without keeping them.
        claim_idle: seconds after which an entry another consumer read and did not
            acknowledge is claimed; keep it well above ``timeout``.
        block: seconds one read waits for new entries.
        idle_timeout: stop after this many seconds without an entry (``None``: run on).
        keep_failures: how many recent failures the returned stats keep.
    """
    if timeout is not None and claim_idle <= timeout:
        raise ValueError(
            f"claim_idle ({claim_idle} s) must exceed timeout ({timeout} s): an entry still "
            "being processed would be claimed and run a second time"
        )
    source = _Stream(
        client,
        stream,
        group,
        consumer,
        f"{stream}:dead" if dead_letter == "" else dead_letter,
        claim_idle,
        concurrency,
    )
    return await consume(
        source.entries(block, idle_timeout),
        handler,
        context_from=context_of,
        factory=factory,
        concurrency=concurrency,
        timeout=timeout,
        on_result=source.settle,
        keep_failures=keep_failures,
    )
