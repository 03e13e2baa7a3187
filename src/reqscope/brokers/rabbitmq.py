"""RabbitMQ (aio-pika): consume a queue with manual acks, one request per message.

Example:
    >>> async with connection.channel() as channel:
    ...     await channel.set_qos(prefetch_count=40)
    ...     queue = await channel.declare_queue("jobs", durable=True, arguments=dead_lettered)
    ...     stats = await consume_queue(queue, handle, factory=factory, concurrency=10)
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

try:
    import aio_pika
    from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "reqscope.brokers.rabbitmq needs aio-pika: pip install 'reqscope[rabbitmq]'"
    ) from exc

import anyio

from reqscope._consume import ConsumeStats, consume
from reqscope._containment import DEFAULT_TIMEOUT, RunResult
from reqscope._context import UserExecutionContext
from reqscope._sessions import IsolatedSessionFactory

__all__ = ["consume_queue", "context_of", "publish"]


def context_of(message: AbstractIncomingMessage) -> UserExecutionContext:
    """The producer's context, from the message's headers.

    Raises:
        ContextValidationError: the headers carry no valid context.
    """
    headers: dict[str, str] = {
        name: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        for name, value in (message.headers or {}).items()
        if isinstance(value, (str, bytes))
    }
    return UserExecutionContext.from_headers(headers)


async def publish(
    exchange: AbstractExchange,
    routing_key: str,
    body: bytes,
    ctx: UserExecutionContext,
    **properties: Any,
) -> None:
    """Publish ``body`` with ``ctx`` in its headers (persistent unless told otherwise)."""
    properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    headers = {**properties.pop("headers", {}), **ctx.to_headers()}
    await exchange.publish(aio_pika.Message(body, headers=headers, **properties), routing_key)


async def _messages(
    queue: AbstractQueue, idle_timeout: float | None
) -> AsyncIterator[AbstractIncomingMessage]:
    async with queue.iterator() as incoming:
        while True:
            message: AbstractIncomingMessage | None = None
            # The wait is bounded here, never across the yield: a cancel scope left open
            # while the generator is suspended would cancel its consumer instead.
            with anyio.move_on_after(math.inf if idle_timeout is None else idle_timeout):
                message = await anext(incoming)
            if message is None:
                return  # nothing arrived for idle_timeout seconds
            yield message


async def _settle(message: AbstractIncomingMessage, result: RunResult[Any]) -> None:
    if result.ok:
        await message.ack()
    else:  # to the queue's dead-letter exchange, if it has one; never redelivered here
        await message.reject(requeue=False)


async def consume_queue(
    queue: AbstractQueue,
    handler: Callable[..., Awaitable[Any]],
    *,
    factory: IsolatedSessionFactory | None = None,
    concurrency: int = 10,
    timeout: float | None = DEFAULT_TIMEOUT,
    idle_timeout: float | None = None,
    keep_failures: int = 100,
) -> ConsumeStats:
    """Consume ``queue`` until cancelled (or ``idle_timeout`` seconds without a message).

    Each message runs as ``await handler(message, session)`` (``handler(message)`` without a
    factory) in the context its headers carry; it is acked once its session committed, and
    rejected without requeue (dead-lettered, when the queue has ``x-dead-letter-exchange``)
    when it had no valid context, raised, or ran past ``timeout``. Set the channel's
    prefetch (``channel.set_qos``) to at least ``concurrency``.
    """
    return await consume(
        _messages(queue, idle_timeout),
        handler,
        context_from=context_of,
        factory=factory,
        concurrency=concurrency,
        timeout=timeout,
        on_result=_settle,
        keep_failures=keep_failures,
    )
