"""consume(): a queue worker where every message is its own request."""

from __future__ import annotations

import collections
import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from reqscope._containment import DEFAULT_TIMEOUT, RunResult, run_isolated
from reqscope._logging import get_logger

if TYPE_CHECKING:
    from reqscope._context import UserExecutionContext
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["ConsumeStats", "FailedMessage", "consume"]

logger = get_logger(__name__)

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class FailedMessage:
    """What is kept of one failed message: text only, never the exception or its frames.

    (A traceback holds the handler's frames, and with them its session: keeping thousands
    of them kept thousands of sessions alive in a worker that never returns.)
    """

    status: str  # "error", "timeout", or "rejected" (no valid context)
    error_type: str
    error: str
    user_id: str
    request_id: str
    duration: float


@dataclass
class ConsumeStats:
    """What a :func:`consume` run did: counts, and its most recent failures.

    ``failures`` keeps the last ``keep_failures`` (a :func:`consume` argument) failed
    messages as :class:`FailedMessage` records: a worker that runs for weeks stays bounded.
    """

    processed: int = 0
    failed: int = 0
    timed_out: int = 0
    rejected: int = 0
    failures: collections.deque[FailedMessage] = field(
        default_factory=lambda: collections.deque(maxlen=100)
    )


def _record(stats: ConsumeStats, result: RunResult[Any], status: str) -> None:
    """Keep ``result`` in ``stats.failures`` as text: never the exception or its frames."""
    error = result.error
    stats.failures.append(
        FailedMessage(
            status=status,
            error_type="" if error is None else type(error).__name__,
            error="" if error is None else str(error),
            user_id=result.user_id,
            request_id=result.request_id,
            duration=result.duration,
        )
    )


async def consume(  # noqa: C901 - nested workers keep one run's state local
    source: AsyncIterable[M] | Iterable[M],
    handler: Callable[..., Awaitable[Any]],
    *,
    context_from: Callable[[M], UserExecutionContext],
    factory: IsolatedSessionFactory | None = None,
    concurrency: int = 10,
    timeout: float | None = DEFAULT_TIMEOUT,
    on_result: Callable[[M, RunResult[Any]], Awaitable[None] | None] | None = None,
    keep_failures: int = 100,
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
        on_result: called exactly once with every message's :class:`RunResult` (ack or
            nack here), a message without a valid context included (status ``"error"``,
            its ``error`` the reason, empty ids).
        keep_failures: how many recent failures :attr:`ConsumeStats.failures` keeps.

    A poisoned message (its context invalid, its handler raising or hanging) fails alone:
    it is counted, logged and reported to ``on_result``; the others go on.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if keep_failures < 0:
        raise ValueError(f"keep_failures must be >= 0, got {keep_failures}")
    stats = ConsumeStats(failures=collections.deque(maxlen=keep_failures))
    send, receive = anyio.create_memory_object_stream[M](concurrency)

    async def process(message: M, ctx: UserExecutionContext) -> Any:
        if factory is None:
            return await handler(message)
        async with factory.begin(ctx) as session:
            return await handler(message, session)

    async def one(message: M) -> None:
        result: RunResult[Any]
        try:
            ctx = context_from(message)
        except Exception as exc:  # the message cannot be processed, but must be answered
            logger.exception("reqscope: message without a valid context rejected")
            result = RunResult(
                ok=False,
                value=None,
                error=exc,
                status="error",
                user_id="",
                run_id="",
                request_id="",
                duration=0.0,
            )
            stats.rejected += 1
            _record(stats, result, "rejected")
        else:
            result = await run_isolated(ctx, process, message, ctx, timeout=timeout)
            if result.status == "ok":
                stats.processed += 1
            else:
                stats.failed += result.status == "error"
                stats.timed_out += result.status == "timeout"
                _record(stats, result, result.status)
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
