"""WebSockets through the example chat app, driven at the ASGI level (50 clients, one loop)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest

from example_loader import load_example
from reqscope import PoolConfig

_example = load_example("fastapi_chat/app.py", "example_fastapi_chat")
ChatMessage = _example.ChatMessage
create_app = _example.create_app

pytestmark = pytest.mark.anyio


class FakeWebSocketClient:
    """Just enough of an ASGI WebSocket client to run many in one event loop."""

    def __init__(self, app, user: str | None) -> None:
        self.app = app
        headers = [] if user is None else [(b"authorization", f"Bearer {user}".encode())]
        self.scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": "/ws",
            "raw_path": b"/ws",
            "query_string": b"",
            "headers": headers,
            "scheme": "ws",
            "server": ("test", 80),
            "client": ("127.0.0.1", 1),
            "root_path": "",
            "subprotocols": [],
            "state": {},
        }
        self.to_app, self._from_client = anyio.create_memory_object_stream[dict](100)
        self._to_client, self.from_app = anyio.create_memory_object_stream[dict](1000)

    async def run(self) -> None:
        await self.to_app.send({"type": "websocket.connect"})
        try:
            await self.app(self.scope, self._from_client.receive, self._to_client.send)
        finally:
            self._from_client.close()
            self._to_client.close()

    async def send_text(self, text: str) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": text})

    async def events(self, count: int) -> list[dict]:
        received = []
        while len(received) < count:
            message = await self.from_app.receive()
            if message["type"] == "websocket.send":
                received.append(json.loads(message["text"]))
        return received

    async def close(self) -> None:
        await self.to_app.send({"type": "websocket.disconnect", "code": 1000})
        self.to_app.close()

    def __del__(self) -> None:
        for stream in (self.to_app, self.from_app, self._from_client, self._to_client):
            stream.close()


@pytest.fixture(name="app")
async def _app(database) -> AsyncIterator:
    app = create_app(database.url, pool=PoolConfig(pool_size=5, max_overflow=0, pool_timeout=30))
    async with app.router.lifespan_context(app):
        yield app
        async with app.state.factory.engine.begin() as conn:
            await conn.run_sync(ChatMessage.metadata.drop_all)


async def test_fifty_clients_of_ten_users_see_only_their_own_events(app) -> None:
    factory, hub = app.state.factory, app.state.hub
    clients = [FakeWebSocketClient(app, f"user-{i % 10}") for i in range(50)]
    checked_out_between: list[int] = []
    received: dict[int, list[dict]] = {}
    async with anyio.create_task_group() as group:
        for client in clients:
            group.start_soon(client.run)
        with anyio.fail_after(20):
            while hub.stats().connections < 50:
                await anyio.sleep(0.01)
        for round_ in range(3):
            for index, client in enumerate(clients):
                await client.send_text(f"c{index}-r{round_}")

            # the handler's emitter targets its own connection (websocket_client_id)
            async def collect(index: int, client: FakeWebSocketClient) -> None:
                received.setdefault(index, []).extend(await client.events(1))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as readers:
                    for index, client in enumerate(clients):
                        readers.start_soon(collect, index, client)
            await anyio.sleep(0.05)
            checked_out_between.append(factory.metrics().pool.checked_out)
        for client in clients:
            await client.close()
    for index, events in received.items():
        assert {event["user_id"] for event in events} == {f"user-{index % 10}"}
        assert [e["payload"]["text"] for e in events] == [f"c{index}-r{r}" for r in range(3)]
    assert checked_out_between == [0, 0, 0]  # no pooled connection held between messages
    assert factory.metrics().active_sessions == 0
    assert hub.stats().connections == 0


async def test_websocket_without_user_is_refused(app) -> None:
    client = FakeWebSocketClient(app, None)
    with anyio.fail_after(5):
        await client.run()
    first = await client.from_app.receive()
    assert first == {"type": "websocket.close", "code": 1008}
    client.to_app.close()
    client.from_app.close()
