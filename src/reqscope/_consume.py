"""consume(): a queue worker where every message is its own request."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from reqscope._containment import DEFAULT_TIMEOUT, RunResult, run_isolated

if TYPE_CHECKING:
    from reqscope._context import UserExecutionContext
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["ConsumeStats", "consume"]

logger = logging.getLogger("reqscope")

M = TypeVar("M")


@dataclass
class ConsumeStats:
    """What a :func:`consume` run did."""

    processed: int = 0
    failed: int = 0
    timed_out: int = 0
    failures: list[RunResult[Any]] = field(default_factory=list)


async def consume(  # noqa: C901 - nested workers keep one run's state local
    source: AsyncIterable[M] | Iterable[M],
    handler: Callable[..., Awaitable[Any]],
    *,
    context_from: Callable[[M], UserExecutionContext],
    factory: IsolatedSessionFactory | None = None,
    concurrency: int = 10,
    timeout: float | None = DEFAULT_TIMEOUT,
    on_result: Callable[[M, RunResult[Any]], Awaitable[None] | None] | None = None,
) -> ConsumeStats:
    """Process messages concurrently, each in its own context, session and containment.

    Args:
        source: the messages (an async iterator over a queue, or any iterable).
        handler: ``await handler(message)``, or ``await handler(message, session)`` when
            ``factory`` is given (the session commits when the handler returns).
        context_from: builds each message's context (``UserExecutionContext.from_headers``
            of the message's headers, typically).
        factory: opens one session per message.
        concurrency: messages in flight at once.
        timeout: each message's own timeout in seconds.
        on_result: called with every message's :class:`RunResult` (ack/nack here).

    A poisoned message (its context invalid, its handler raising or hanging) fails alone:
    it is counted, logged and reported to ``on_result``; the others go on.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    stats = ConsumeStats()
    send, receive = anyio.create_memory_object_stream[M](concurrency)

    async def process(message: M, ctx: UserExecutionContext) -> Any:
        if factory is None:
            return await handler(message)
        async with factory.begin(ctx) as session:
            return await handler(message, session)

    async def one(message: M) -> None:
        try:
            ctx = context_from(message)
        except Exception:
            stats.failed += 1
            logger.exception("reqscope: message without a valid context dropped")
            return
        result = await run_isolated(ctx, process, message, ctx, timeout=timeout)
        if result.status == "ok":
            stats.processed += 1
        else:
            stats.failed += result.status == "error"
            stats.timed_out += result.status == "timeout"
            stats.failures.append(result)
        if on_result is not None:
            outcome = on_result(message, result)
            if inspect.isawaitable(outcome):
                await outcome

    async def worker(messages: MemoryObjectReceiveStream[M]) -> None:
        async with messages:
            async for message in messages:
                await one(message)

    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(worker, receive.clone())
        receive.close()
        async with send:
            if isinstance(source, AsyncIterable):
                async for message in source:
                    await send.send(message)
            else:
                for message in source:
                    await send.send(message)
    return stats
