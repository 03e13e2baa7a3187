"""One WebSocket connection, served message by message: every message is its own request.

Framework-neutral: the adapters pass the connection's receive, send and close. Each message
runs in a child context of the connection's, in its own session (committed when the handler
returns: the library runs the handler and sees its outcome), contained: a handler that
raises or runs past its timeout gets the client an error reply, is counted and logged, and
the connection goes on. The connection's events are forwarded from its own channel; a
channel closed by ``overflow="disconnect"`` closes the connection with code 1013. A client
that goes away, even in the middle of a send, ends the connection quietly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio

from reqscope._containment import DEFAULT_TIMEOUT, run_isolated
from reqscope._context import log_fields
from reqscope._logging import get_logger

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from reqscope._context import UserExecutionContext
    from reqscope._events import EventChannel, EventHub
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["OVERFLOW_CLOSE_CODE", "ConnectionStats", "serve_connection"]

logger = get_logger(__name__)

OVERFLOW_CLOSE_CODE: Final = 1013  # "Try Again Later": the client fell behind its events


@dataclass
class ConnectionStats:
    """What one served connection did."""

    messages: int = 0
    failures: int = 0  # handlers that raised
    timeouts: int = 0  # handlers that ran past their timeout
    overflowed: bool = False  # closed because its event queue overflowed


async def serve_connection(
    ctx: UserExecutionContext,
    *,
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[Any], Awaitable[None]],
    close: Callable[[int, str], Awaitable[None]],
    handler: Callable[..., Awaitable[Any]],
    disconnects: tuple[type[BaseException], ...],
    factory: IsolatedSessionFactory | None = None,
    hub: EventHub | None = None,
    decode: Callable[[Any], Any] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> ConnectionStats:
    """Serve the connection of ``ctx`` until the client leaves (or its events overflow).

    Args:
        ctx: the connection's context.
        receive: the next message from the client; raises one of ``disconnects`` when the
            client has gone.
        send: sends one JSON-like value to the client.
        close: closes the connection with a code and a reason.
        handler: ``await handler(message)``, or ``await handler(message, session)`` with a
            ``factory``; what it returns (unless ``None``) is sent as the reply.
        disconnects: the exceptions that mean the client has gone.
        factory: opens each message's session, committed when the handler returns.
        hub: forwards the events of the connection's channel (``hub.connect(ctx)``).
        decode: turns a received message into the handler's argument (``json.loads``); a
            message it refuses is that message's error, like a handler's.
        timeout: each message's own timeout in seconds.
    """
    served = _Served(ctx, send, handler, disconnects, factory, decode, timeout)
    async with contextlib.AsyncExitStack() as stack:
        channel = None if hub is None else await stack.enter_async_context(hub.connect(ctx))
        async with anyio.create_task_group() as group:
            if channel is not None:
                group.start_soon(served.events, channel, close, group)
            group.start_soon(served.messages, receive, group)
    return served.stats


class _Served:
    """The state of one :func:`serve_connection` call."""

    def __init__(  # noqa: PLR0917 - built in one place
        self,
        ctx: UserExecutionContext,
        send: Callable[[Any], Awaitable[None]],
        handler: Callable[..., Awaitable[Any]],
        disconnects: tuple[type[BaseException], ...],
        factory: IsolatedSessionFactory | None,
        decode: Callable[[Any], Any] | None,
        timeout: float | None,
    ) -> None:
        self.ctx = ctx
        self.send = send
        self.handler = handler
        self.disconnects = disconnects
        self.factory = factory
        self.decode = decode
        self.timeout = timeout
        self.stats = ConnectionStats()

    async def process(self, message: Any, child: UserExecutionContext) -> Any:
        value = message if self.decode is None else self.decode(message)
        if self.factory is None:
            return await self.handler(value)
        async with self.factory.begin(child) as session:
            return await self.handler(value, session)

    async def reply_to(self, message: Any) -> Any:
        """Run one message as its own request; what to send back (``None``: nothing)."""
        self.stats.messages += 1
        child = self.ctx.child("ws_message")
        result = await run_isolated(child, self.process, message, child, timeout=self.timeout)
        if result.ok:
            return result.value
        self.stats.failures += result.status == "error"
        self.stats.timeouts += result.status == "timeout"
        error = "timeout" if result.error is None else type(result.error).__name__
        logger.warning(
            "reqscope: a WebSocket message failed (%s); the connection goes on",
            error,
            extra=log_fields(child),
        )
        return {"type": "error", "error": error, "request_id": child.request_id}

    async def messages(self, receive: Callable[[], Awaitable[Any]], group: TaskGroup) -> None:
        try:
            while True:
                reply = await self.reply_to(await receive())
                if reply is not None:
                    await self.send(reply)
        except self.disconnects:
            pass  # the client has gone: not an error
        group.cancel_scope.cancel()

    async def events(
        self, channel: EventChannel, close: Callable[[int, str], Awaitable[None]], group: TaskGroup
    ) -> None:
        try:
            async for event in channel:
                await self.send(event.to_dict())
            if channel.overflowed:
                self.stats.overflowed = True
                await close(OVERFLOW_CLOSE_CODE, "event queue overflow")
        except self.disconnects:
            pass
        group.cancel_scope.cancel()
