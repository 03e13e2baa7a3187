"""An :class:`~reqscope.EventHub` across processes, on Redis pub/sub (``reqscope[redis]``).

Several app instances (uvicorn workers, pods) share one Redis. An event emitted by a request
on any instance reaches every connection of its user on every instance, and no connection
of another user:

    >>> hub = RedisEventHub("redis://127.0.0.1:6379/0")
    >>> async with hub:  # or setup(app, factory, hub=hub): the app's lifespan runs it
    ...     await hub.emitter(ctx).emit("token", {"text": "hi"})

Each event is published on its user's Redis channel (``<prefix>:user:<user id>``); every
instance listens to all of them (one pattern subscription) and delivers an event only to
its user's connections open there, each through its own bounded queue with the hub's
overflow policy, as the in-memory hub does.

Publishing never waits for Redis: an emitted event goes to a bounded outbox that a task
of the hub drains. While Redis is unreachable the outbox keeps the newest ``max_outbox``
events and publishes them when it is back; older ones are dropped and counted
(``stats().publish_dropped``). The listener reconnects with backoff and, once subscribed
again, gives every local connection a :data:`~reqscope.Event.GAP` event (payload
``{"reconnected": true}``): pub/sub keeps nothing for a listener that was away, so a client
should refetch what it shows. ``stats().connected`` says whether both directions work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

try:
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError("reqscope.redis_hub needs redis-py: pip install 'reqscope[redis]'") from exc

from typing_extensions import Self

from reqscope._context import UserExecutionContext, new_id
from reqscope._events import Event, EventHub, HubStats, Overflow
from reqscope._freeze import freeze_mapping
from reqscope._logging import get_logger
from reqscope.exceptions import ContextValidationError, ReqscopeError

__all__ = ["RedisEventHub"]

logger = get_logger(__name__)

_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
_FIRST_RETRY: Final = 0.1  # seconds before reconnecting, doubled up to MAX_RETRY
MAX_RETRY: Final = 2.0


class RedisEventHub(EventHub):
    """Routes events to per-connection channels on every instance sharing one Redis.

    Args:
        url: the Redis URL (``redis://host:6379/0``), or ``client``.
        client: a ``redis.asyncio.Redis`` you own (left open by :meth:`aclose`). Give a URL
            to a hub that a forked worker starts again: its client is then made anew there.
        prefix: the prefix of the hub's Redis channels; instances of one service share it.
        max_queue: events a connection's queue holds before ``overflow`` applies.
        overflow: ``"drop_oldest"`` or ``"disconnect"``, per connection, as in memory.
        max_outbox: events waiting to be published (while Redis is slow or away) before the
            oldest are dropped.
        timeout: seconds one Redis operation may take before it counts as a failure.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "reqscope:events",
        max_queue: int = 256,
        overflow: Overflow = "drop_oldest",
        max_outbox: int = 10_000,
        timeout: float = 2.0,
    ) -> None:
        super().__init__(max_queue=max_queue, overflow=overflow)
        if (url is None) == (client is None):
            raise ReqscopeError("RedisEventHub takes a Redis URL or a client, one of the two")
        if max_outbox < 1:
            raise ValueError(f"max_outbox must be >= 1, got {max_outbox}")
        self.prefix = prefix
        self.timeout = timeout
        self.instance_id = new_id()
        self._url = url
        self._client: Redis = client or self._new_client()
        self._outbox: deque[tuple[str, str]] = deque(maxlen=max_outbox)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._publishing_ok = True
        self.published = 0
        self.publish_failures = 0
        self.publish_dropped = 0
        self.received = 0
        self.reconnects = 0

    def _new_client(self) -> Redis:
        return Redis.from_url(
            self._url or "", socket_timeout=self.timeout, socket_connect_timeout=self.timeout
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self) -> None:
        """Start listening and publishing; waits (up to ``timeout``) for the subscription.

        Idempotent on one event loop. A Redis that is down does not fail the start: the hub
        keeps trying, and ``stats().connected`` is False until it is reachable.
        """
        loop = asyncio.get_running_loop()
        if self._tasks and self._tasks[0].get_loop() is loop:
            return
        if self._tasks:  # started on another loop: a parent that forked this worker
            self._tasks = []
            if self._url is not None:  # its connections are the parent's: leave them be
                self._client = self._new_client()
        self._subscribed = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks = [
            loop.create_task(self._listen(), name="reqscope event hub listener"),
            loop.create_task(self._publish_outbox(), name="reqscope event hub publisher"),
        ]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), self.timeout)

    async def aclose(self) -> None:
        """Stop the tasks; publish what the outbox holds if Redis answers within ``timeout``."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        self._wake.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), self.timeout)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._url is not None:  # a client of ours
            await self._client.aclose()

    async def _drained(self) -> None:
        while self._outbox and self._publishing_ok:  # noqa: ASYNC110 - polls two conditions
            await asyncio.sleep(0.01)

    # -- emitting ----------------------------------------------------------------------

    def dispatch(self, event: Event, target: str | None = None) -> int:
        """Queue ``event`` for publishing to every instance; 1 when queued, never blocks.

        The outbox keeps the newest ``max_outbox`` events: a full one drops its oldest
        (counted in ``stats().publish_dropped``).
        """
        message = {**event.to_dict(), "target": target, "origin": self.instance_id}
        if len(self._outbox) == self._outbox.maxlen:
            self.publish_dropped += 1
        self._outbox.append((self._channel(event.user_id), json.dumps(message)))
        self._wake.set()
        return 1

    async def send(
        self,
        connection_id: str,
        type: str,  # noqa: A002 - mirrors Event.type
        payload: Mapping[str, Any] | None = None,
        *,
        ctx: UserExecutionContext,
    ) -> bool:
        """Deliver to one connection of ``ctx``'s user, on this instance or another.

        A connection open here is checked as in memory (another user's raises
        :class:`~reqscope.IsolationViolation`); one elsewhere gets the event only if it
        belongs to ``ctx``'s user (it is published on that user's channel), and this
        returns True once it is queued for publishing.
        """
        if connection_id in self._by_id:
            return await super().send(connection_id, type, payload, ctx=ctx)
        await asyncio.sleep(0)
        return bool(self.dispatch(self.event(ctx, type, payload), connection_id))

    def _channel(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    async def _publish_outbox(self) -> None:
        delay = _FIRST_RETRY
        while True:
            if not self._outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            channel, message = self._outbox[0]
            try:
                await self._client.publish(channel, message)
            except _UNAVAILABLE as error:
                self.publish_failures += 1
                if self._publishing_ok:
                    logger.warning(
                        "reqscope: cannot publish events to Redis (%s: %s); keeping the newest "
                        "%d in the outbox and retrying",
                        type(error).__name__,
                        error,
                        self._outbox.maxlen,
                    )
                self._publishing_ok = False
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY, delay * 2)
                continue
            if not self._publishing_ok:
                logger.warning("reqscope: publishing events to Redis again")
            self._publishing_ok, delay = True, _FIRST_RETRY
            if self._outbox and self._outbox[0] == (channel, message):
                self._outbox.popleft()
            self.published += 1

    # -- listening ---------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = _FIRST_RETRY
        first = True
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(f"{self.prefix}:user:*")
                if not first:
                    self.reconnects += 1
                    logger.warning("reqscope: listening to Redis events again")
                    self._tell_everyone_they_may_have_missed_events()
                first, delay = False, _FIRST_RETRY
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._receive(message)
            except _UNAVAILABLE as error:
                if self._subscribed.is_set():
                    logger.warning(
                        "reqscope: lost the Redis event subscription (%s: %s); reconnecting",
                        type(error).__name__,
                        error,
                    )
                self._subscribed.clear()
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY, delay * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _receive(self, message: dict[str, Any]) -> None:
        """Deliver one published event to its user's connections here (a bad one is logged)."""
        self.received += 1
        channel = message.get("channel", b"")
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        try:
            data = json.loads(message["data"])
            event = Event(
                type=data["type"],
                payload=freeze_mapping(data["payload"], root="payload"),
                user_id=data["user_id"],
                run_id=data["run_id"],
                thread_id=data["thread_id"],
                request_id=data["request_id"],
                at=dt.datetime.fromisoformat(data["at"]),
            )
            target = data.get("target")
        except (KeyError, TypeError, ValueError, ContextValidationError) as error:
            logger.warning("reqscope: ignored a malformed event on %s: %s", channel, error)
            return
        if channel != self._channel(event.user_id):  # published on another user's channel
            self.violations += 1
            logger.error(
                "reqscope: ignored an event of user %r published on %s",
                event.user_id,
                channel,
                extra={"user_id": event.user_id},
            )
            return
        self.deliver_here(event, target)

    def _tell_everyone_they_may_have_missed_events(self) -> None:
        for channel in list(self._by_id.values()):
            channel.deliver(self.event(channel.context, Event.GAP, {"reconnected": True}))

    def stats(self) -> HubStats:
        """The in-memory figures, plus whether Redis answers and the traffic through it."""
        return dataclasses.replace(
            super().stats(),
            backend="redis",
            connected=self._subscribed.is_set() and self._publishing_ok,
            published=self.published,
            publish_failures=self.publish_failures,
            publish_dropped=self.publish_dropped,
            received=self.received,
            reconnects=self.reconnects,
        )
