"""Per-connection event channels: one user's WebSocket never sees another's events."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from typing_extensions import Self

from reqscope._context import UserExecutionContext, new_id
from reqscope._freeze import EMPTY, encode_json_value, freeze_mapping
from reqscope._logging import get_logger
from reqscope.exceptions import IsolationViolation, ReqscopeError

__all__ = ["Event", "EventChannel", "EventHub", "HubStats", "UserEventEmitter"]

logger = get_logger(__name__)

Overflow = Literal["drop_oldest", "disconnect"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event for one user; the payload is deep-frozen."""

    GAP: ClassVar[str] = "reqscope.gap"
    """The type of the event a channel yields before the events that follow dropped ones
    (``overflow="drop_oldest"``); its payload is ``{"dropped": n}``."""

    type: str
    payload: Mapping[str, Any]
    user_id: str
    run_id: str
    thread_id: str
    request_id: str
    at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        """Return the event as JSON-safe data (what a WebSocket handler sends)."""
        return {
            "type": self.type,
            "payload": encode_json_value(self.payload),
            "user_id": self.user_id,
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "request_id": self.request_id,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class HubStats:
    """A snapshot of an :class:`EventHub`.

    ``connected``, ``published``, ``publish_failures``, ``publish_dropped``, ``received``
    and ``reconnects`` concern a hub that crosses processes
    (:class:`reqscope.redis_hub.RedisEventHub`); the in-memory hub is always connected.
    """

    connections: int
    per_user: Mapping[str, int]
    dropped: int
    disconnected: int
    delivered: int
    violations: int
    backend: str = "memory"
    connected: bool = True
    published: int = 0
    publish_failures: int = 0
    publish_dropped: int = 0
    received: int = 0
    reconnects: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-safe data (a monitoring endpoint's)."""
        return {
            "backend": self.backend,
            "connected": self.connected,
            "connections": self.connections,
            "users": len(self.per_user),
            "delivered": self.delivered,
            "dropped": self.dropped,
            "disconnected": self.disconnected,
            "violations": self.violations,
            "published": self.published,
            "publish_failures": self.publish_failures,
            "publish_dropped": self.publish_dropped,
            "received": self.received,
            "reconnects": self.reconnects,
        }


class EventChannel:
    """One connection's bounded queue of events; ``async for event in channel``.

    ``max_queue`` counts events, not bytes: bound the payloads you emit (a channel of 256
    events of 16 KB holds 4 MB).
    """

    def __init__(self, hub: EventHub, ctx: UserExecutionContext, connection_id: str) -> None:
        self.hub = hub
        self.context = ctx
        self.user_id = ctx.user_id
        self.connection_id = connection_id
        self.dropped = 0
        self.closed = False
        self.overflowed = False  # closed by the "disconnect" policy
        self._unreported = 0  # dropped since the reader last heard of it
        send, receive = anyio.create_memory_object_stream[Event](hub.max_queue)
        self._send: MemoryObjectSendStream[Event] = send
        self._receive: MemoryObjectReceiveStream[Event] = receive

    def deliver(self, event: Event) -> bool:
        """Queue ``event`` without ever blocking; apply the overflow policy when full."""
        if self.closed:
            return False
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            if self.hub.overflow == "disconnect":
                self._overflow()
                return False
            self._receive.receive_nowait()  # drop the oldest to make room
            self.dropped += 1
            self._unreported += 1
            self.hub.dropped += 1
            self._send.send_nowait(event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.close()
            return False
        return True

    def _overflow(self) -> None:
        self.hub.disconnected += 1
        logger.warning(
            "reqscope: disconnecting channel %s of user %r: its queue of %d is full",
            self.connection_id,
            self.user_id,
            self.hub.max_queue,
            extra={"user_id": self.user_id, "connection_id": self.connection_id},
        )
        self.overflowed = True
        self.close()
        # Nobody will read what is queued: free it now, not when the connection ends.
        with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
            while True:
                self._receive.receive_nowait()

    async def receive(self) -> Event:
        """Wait for the next event (a :data:`Event.GAP` event first, after events were dropped).

        Raises:
            anyio.EndOfStream: the channel was closed (disconnected or its block ended).
        """
        if self._unreported:
            dropped, self._unreported = self._unreported, 0
            return self.hub.event(self.context, Event.GAP, {"dropped": dropped})
        return await self._receive.receive()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Close the channel; pending events can still be read, then iteration ends."""
        if not self.closed:
            self.closed = True
            self._send.close()
            self.hub._forget(self)  # noqa: SLF001

    def _release(self) -> None:
        """The connection's block ended: close the channel and both ends of its stream."""
        self.close()
        self._receive.close()


class UserEventEmitter:
    """Emits events to one user's channels (only ``ctx.websocket_client_id``'s when set)."""

    def __init__(self, hub: EventHub, ctx: UserExecutionContext) -> None:
        self.hub = hub
        self.context = ctx

    async def emit(self, type: str, payload: Mapping[str, Any] | None = None) -> int:  # noqa: A002
        """Deliver a frozen :class:`Event` and return how many channels received it.

        A user with no connection receives nothing: that returns 0, it is not an error.
        """
        await anyio.lowlevel.checkpoint()
        return self.emit_nowait(type, payload)

    def emit_nowait(self, type: str, payload: Mapping[str, Any] | None = None) -> int:  # noqa: A002
        """:meth:`emit` for sync code (it never blocks either)."""
        ctx = self.context
        return self.hub.dispatch(self.hub.event(ctx, type, payload), ctx.websocket_client_id)


class _Connection:
    def __init__(self, hub: EventHub, ctx: UserExecutionContext, connection_id: str) -> None:
        self._hub = hub
        self._ctx = ctx
        self._connection_id = connection_id
        self._channel: EventChannel | None = None

    async def __aenter__(self) -> EventChannel:
        # The channel (and its streams, which must be closed) exists only inside the block:
        # a connect() never entered leaves nothing open.
        if self._channel is not None:
            raise RuntimeError("this connection was entered before; call hub.connect() again")
        channel = self._channel = EventChannel(self._hub, self._ctx, self._connection_id)
        try:
            self._hub._add(channel)  # noqa: SLF001
        except BaseException:
            channel._release()  # noqa: SLF001
            raise
        return channel

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._channel is not None  # noqa: S101 - entered
        self._channel._release()  # noqa: SLF001


class EventHub:
    """Routes events to per-connection channels, never across users.

    Args:
        max_queue: events a channel holds before the overflow policy applies.
        overflow: ``"drop_oldest"`` keeps the newest events; ``"disconnect"`` closes a
            channel that does not keep up. Either way, no other channel waits.
    """

    def __init__(self, max_queue: int = 256, overflow: Overflow = "drop_oldest") -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if overflow not in ("drop_oldest", "disconnect"):
            raise ValueError(f"overflow must be 'drop_oldest' or 'disconnect', got {overflow!r}")
        self.max_queue = max_queue
        self.overflow: Overflow = overflow
        self._by_user: dict[str, dict[str, EventChannel]] = {}
        self._by_id: dict[str, EventChannel] = {}
        self.dropped = 0
        self.disconnected = 0
        self.delivered = 0
        self.violations = 0

    async def __aenter__(self) -> Self:
        """Start the hub (nothing to start in memory; a hub across processes connects)."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the hub (nothing to stop in memory)."""

    def dispatch(self, event: Event, target: str | None = None) -> int:
        """Deliver ``event`` to its user's channels (only ``target``'s when given).

        Returns how many channels queued it. A hub across processes publishes it instead,
        and returns 1 when it was queued for publishing.
        """
        return self.deliver_here(event, target)

    def deliver_here(self, event: Event, target: str | None = None) -> int:
        """Deliver ``event`` to the channels of its user open in this process."""
        delivered = 0
        for channel in list(self._by_user.get(event.user_id, {}).values()):
            if (target is None or channel.connection_id == target) and channel.deliver(event):
                delivered += 1
        self.delivered += delivered
        return delivered

    def connect(self, ctx: UserExecutionContext, connection_id: str | None = None) -> _Connection:
        """Open a channel owned by ``ctx.user_id`` for the ``async with`` block.

        ``connection_id`` defaults to ``ctx.websocket_client_id`` or a new id.
        """
        if not isinstance(ctx, UserExecutionContext):
            raise TypeError(f"connect() takes a UserExecutionContext, got {type(ctx).__name__}")
        connection_id = connection_id or ctx.websocket_client_id or new_id()
        if connection_id in self._by_id:
            raise ReqscopeError(
                f"connection id {connection_id!r} is already connected; use a unique id "
                "per WebSocket"
            )
        return _Connection(self, ctx, connection_id)

    def emitter(self, ctx: UserExecutionContext) -> UserEventEmitter:
        """An emitter that delivers to ``ctx``'s user only."""
        return UserEventEmitter(self, ctx)

    def event(
        self,
        ctx: UserExecutionContext,
        type: str,  # noqa: A002 - mirrors Event.type
        payload: Mapping[str, Any] | None,
    ) -> Event:
        """Build a frozen event of ``ctx``'s user (payload validated like metadata)."""
        given: object = type
        if not isinstance(given, str) or not given:
            raise ValueError(f"event types are non-empty strings, got {type!r}")
        return Event(
            type=type,
            payload=EMPTY if payload is None else freeze_mapping(payload, root="payload"),
            user_id=ctx.user_id,
            run_id=ctx.run_id,
            thread_id=ctx.thread_id,
            request_id=ctx.request_id,
            at=dt.datetime.now(dt.timezone.utc),
        )

    async def send(
        self,
        connection_id: str,
        type: str,  # noqa: A002
        payload: Mapping[str, Any] | None = None,
        *,
        ctx: UserExecutionContext,
    ) -> bool:
        """Deliver to one connection of ``ctx``'s user; returns whether it was queued.

        Raises:
            IsolationViolation: the connection belongs to another user (nothing delivered).
        """
        await anyio.lowlevel.checkpoint()
        channel = self._by_id.get(connection_id)
        if channel is None:
            return False
        if channel.user_id != ctx.user_id:
            self.violations += 1
            logger.error(
                "reqscope: user %r (request %s) tried to send %r into connection %s of user %r",
                ctx.user_id,
                ctx.request_id,
                type,
                connection_id,
                channel.user_id,
                extra={"user_id": ctx.user_id, "target_user_id": channel.user_id},
            )
            raise IsolationViolation(
                f"connection {connection_id} belongs to another user; user "
                f"{ctx.user_id!r} can only send to its own connections (use "
                "hub.emitter(ctx).emit())"
            )
        delivered = channel.deliver(self.event(ctx, type, payload))
        self.delivered += delivered
        return delivered

    def stats(self) -> HubStats:
        """Connections, per-user counts and overflow counters."""
        return HubStats(
            connections=len(self._by_id),
            per_user={user: len(channels) for user, channels in self._by_user.items()},
            dropped=self.dropped,
            disconnected=self.disconnected,
            delivered=self.delivered,
            violations=self.violations,
        )

    def _add(self, channel: EventChannel) -> None:
        if channel.connection_id in self._by_id:
            raise ReqscopeError(f"connection id {channel.connection_id!r} is already connected")
        self._by_id[channel.connection_id] = channel
        self._by_user.setdefault(channel.user_id, {})[channel.connection_id] = channel

    def _forget(self, channel: EventChannel) -> None:
        if self._by_id.get(channel.connection_id) is channel:
            del self._by_id[channel.connection_id]
            channels = self._by_user.get(channel.user_id, {})
            channels.pop(channel.connection_id, None)
            if not channels:
                self._by_user.pop(channel.user_id, None)


def running(hub: EventHub | None) -> contextlib.AbstractAsyncContextManager[object]:
    """What starts ``hub`` for an ``async with`` block and stops it after (nothing for None)."""
    return hub if hub is not None else contextlib.nullcontext()
