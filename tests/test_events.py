from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy.orm import Session

from reqscope import (
    ContextValidationError,
    Event,
    EventHub,
    IsolationViolation,
    ReqscopeError,
    UserExecutionContext,
)

pytestmark = pytest.mark.anyio


async def test_events_reach_only_their_users_channels() -> None:
    hub = EventHub()
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    async with hub.connect(alice) as a1, hub.connect(alice) as a2, hub.connect(bob) as b1:
        assert await hub.emitter(alice).emit("token", {"text": "hi"}) == 2
        assert hub.stats().per_user == {"alice": 2, "bob": 1}
        for channel in (a1, a2):
            event = await channel.receive()
            assert (event.type, event.payload["text"], event.user_id) == ("token", "hi", "alice")
            assert event.run_id == alice.run_id
        with anyio.move_on_after(0.05) as nothing:
            await b1.receive()
        assert nothing.cancelled_caught
        assert event.to_dict()["payload"] == {"text": "hi"}
        with pytest.raises(TypeError):
            event.payload["text"] = "changed"  # type: ignore[index]
    assert hub.stats().connections == 0


async def test_emitting_to_a_user_without_connections_is_zero() -> None:
    hub = EventHub()
    assert await hub.emitter(UserExecutionContext.create("ghost")).emit("x") == 0


async def test_websocket_client_id_targets_one_connection() -> None:
    hub = EventHub()
    base = UserExecutionContext.create("alice")
    tab1 = UserExecutionContext.create("alice", websocket_client_id="tab-1")
    async with hub.connect(tab1) as first, hub.connect(base, connection_id="tab-2") as second:
        assert first.connection_id == "tab-1"
        assert hub.emitter(tab1).emit_nowait("only-tab-1") == 1
        assert (await first.receive()).type == "only-tab-1"
        assert second._receive.statistics().current_buffer_used == 0


async def test_send_into_another_users_channel_is_refused() -> None:
    hub = EventHub()
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    async with hub.connect(alice, connection_id="alice-ws") as channel:
        with pytest.raises(IsolationViolation, match="another user"):
            await hub.send("alice-ws", "steal", {"x": 1}, ctx=bob)
        assert channel._receive.statistics().current_buffer_used == 0
        assert hub.stats().violations == 1
        assert await hub.send("alice-ws", "mine", ctx=alice) is True
        assert (await channel.receive()).type == "mine"
        assert await hub.send("nobody", "x", ctx=alice) is False
        with pytest.raises(ReqscopeError, match="already connected"):
            hub.connect(alice, connection_id="alice-ws")


async def test_payloads_are_validated_like_metadata() -> None:
    hub = EventHub()
    with pytest.raises(ContextValidationError, match=r"payload\['db'\]"):
        await hub.emitter(UserExecutionContext.create("a")).emit("x", {"db": Session()})
    with pytest.raises(ValueError, match="non-empty"):
        await hub.emitter(UserExecutionContext.create("a")).emit("")


async def test_overflow_drop_oldest_delays_nobody() -> None:
    hub = EventHub(max_queue=3)
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    async with hub.connect(alice) as stuck, hub.connect(bob) as reader:
        for i in range(10):
            hub.emitter(alice).emit_nowait("n", {"i": i})
            hub.emitter(bob).emit_nowait("n", {"i": i})
            assert (await reader.receive()).payload["i"] == i
        gap = await stuck.receive()  # the reader learns what it missed
        assert (gap.type, dict(gap.payload), gap.user_id) == (Event.GAP, {"dropped": 7}, "alice")
        assert [(await stuck.receive()).payload["i"] for _ in range(3)] == [7, 8, 9]
        assert stuck.dropped == 7
        assert hub.stats().dropped == 7


async def test_overflow_disconnect_closes_only_the_slow_channel() -> None:
    hub = EventHub(max_queue=2, overflow="disconnect")
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    async with hub.connect(alice) as stuck, hub.connect(bob) as reader:
        emitter = hub.emitter(alice)
        assert [emitter.emit_nowait("n") for _ in range(4)] == [1, 1, 0, 0]
        assert stuck.closed
        # the queued events are freed at once, and the stream ends
        assert [event.type async for event in stuck] == []
        assert hub.stats().disconnected == 1
        assert hub.emitter(bob).emit_nowait("fine") == 1
        assert (await reader.receive()).type == "fine"


def test_bad_hub_arguments() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        EventHub(max_queue=0)
    with pytest.raises(ValueError, match="overflow"):
        EventHub(overflow="block")  # type: ignore[arg-type]


async def test_ten_thousand_events_hundred_users_three_connections() -> None:  # noqa: C901
    hub = EventHub(max_queue=200)
    users = [f"user-{i}" for i in range(100)]
    contexts = {user: UserExecutionContext.create(user) for user in users}
    received: dict[str, list[tuple[str, int]]] = {}
    ready = anyio.Event()
    connected = 0

    async def client(user: str, index: int) -> None:
        nonlocal connected
        async with hub.connect(contexts[user], connection_id=f"{user}/{index}") as channel:
            connected += 1
            if connected == 300:
                ready.set()
            events = received.setdefault(f"{user}/{index}", [])
            async for event in channel:
                events.append((event.user_id, event.payload["n"]))
                if len(events) == 100:
                    return

    async def emitter(user: str) -> None:
        emit = hub.emitter(contexts[user])
        for n in range(100):
            assert await emit.emit("n", {"n": n}) == 3
            if random.random() < 0.1:
                await anyio.lowlevel.checkpoint()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for user in users:
                for index in range(3):
                    group.start_soon(client, user, index)
            await ready.wait()
            async with anyio.create_task_group() as emitters:
                for user in users:
                    emitters.start_soon(emitter, user)
    assert len(received) == 300
    for connection, events in received.items():
        user = connection.split("/")[0]
        assert {owner for owner, _ in events} == {user}
        assert [n for _, n in events] == list(range(100))  # emission order per emitter
    assert hub.stats().dropped == 0
    assert hub.stats().delivered == 30_000


async def test_a_connection_opens_its_channel_only_inside_its_block() -> None:
    hub = EventHub()
    alice = UserExecutionContext.create("alice")
    never_entered = hub.connect(alice, connection_id="a-1")
    assert never_entered._channel is None  # nothing to close: no stream was made
    # Two connects of one id, both asked for before either is entered: the second refused.
    first, second = hub.connect(alice, "a-2"), hub.connect(alice, "a-2")
    async with first as channel:
        with pytest.raises(ReqscopeError, match="already connected"):
            await second.__aenter__()
        assert second._channel is not None
        assert second._channel.closed
        with pytest.raises(anyio.ClosedResourceError):  # both ends released
            second._channel._receive.receive_nowait()
        assert hub.stats().connections == 1
    assert channel.closed
    with pytest.raises(RuntimeError, match="entered before"):
        async with first:
            pass
