"""serve_websocket(): one bad message never ends its connection; overflow reaches the socket."""

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.websockets import WebSocketDisconnect

from models import Note
from reqscope import EventHub, IsolatedSessionFactory, UserExecutionContext, current_context
from reqscope.fastapi import from_header, setup
from reqscope.starlette import serve_websocket


def chat_app(factory: IsolatedSessionFactory, hub: EventHub, outcomes: list[Any]) -> FastAPI:
    app = FastAPI()
    setup(app, factory, hub=hub, user_resolver=from_header("x-user"))

    async def handle(message: dict[str, Any], session: AsyncSession) -> Any:
        kind = message["kind"]
        if kind == "boom":
            raise RuntimeError("this message is poisoned")
        if kind == "slow":
            await anyio.sleep(5)
        if kind == "flood":
            emitter = hub.emitter(current_context())
            for i in range(message["count"]):
                emitter.emit_nowait("token", {"i": i})  # faster than anyone can read
            return None
        session.add(Note(user_id=current_context().user_id, body=message["body"]))
        return {"type": "stored", "body": message["body"]}

    @app.websocket("/ws")
    async def websocket_chat(websocket: WebSocket) -> None:
        outcomes.append(await serve_websocket(websocket, handle, timeout=0.5))

    return app


@pytest.fixture(name="served")
def _served(tmp_path) -> Iterator[tuple[TestClient, IsolatedSessionFactory, list[Any], EventHub]]:
    factory = IsolatedSessionFactory(f"sqlite+aiosqlite:///{tmp_path / 'ws.sqlite3'}")
    hub = EventHub(max_queue=4, overflow="disconnect")
    outcomes: list[Any] = []
    app = chat_app(factory, hub, outcomes)

    async def tables() -> None:
        from models import create_tables

        await create_tables(factory.engine)

    with TestClient(app) as client:
        client.portal.call(tables)  # type: ignore[union-attr]
        yield client, factory, outcomes, hub


def stored(client: TestClient, factory: IsolatedSessionFactory) -> int:
    async def count() -> int:
        async with factory.session(UserExecutionContext.create("auditor")) as session:
            return int(await session.scalar(select(func.count()).select_from(Note)) or 0)

    return client.portal.call(count)  # type: ignore[union-attr,no-any-return]


def test_a_bad_message_gets_an_error_reply_and_the_connection_goes_on(served, caplog) -> None:
    client, factory, _outcomes, _hub = served
    with client.websocket_connect("/ws", headers={"x-user": "alice"}) as ws:
        ws.send_json({"kind": "note", "body": "first"})
        assert ws.receive_json() == {"type": "stored", "body": "first"}
        ws.send_json({"kind": "boom"})
        error = ws.receive_json()
        assert (error["type"], error["error"]) == ("error", "RuntimeError")
        ws.send_text("this is not JSON")
        assert ws.receive_json()["error"] == "JSONDecodeError"
        ws.send_json({"kind": "slow"})
        assert ws.receive_json()["error"] == "timeout"
        ws.send_json({"kind": "note", "body": "after the failures"})
        assert ws.receive_json() == {"type": "stored", "body": "after the failures"}
    # each message's session was committed when its handler returned, the failed ones not
    assert stored(client, factory) == 2
    failed = [r for r in caplog.records if "WebSocket message failed" in r.getMessage()]
    assert [r.args for r in failed] == [("RuntimeError",), ("JSONDecodeError",), ("timeout",)]
    assert {r.user_id for r in failed} == {"alice"}  # type: ignore[attr-defined]


def test_overflow_disconnect_closes_the_socket(served) -> None:
    client, _factory, outcomes, hub = served
    with client.websocket_connect("/ws", headers={"x-user": "bob"}) as ws:
        ws.send_json({"kind": "flood", "count": 50})
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:  # whatever was delivered before the queue overflowed, then the close
                ws.receive_json()
        for _ in range(200):  # the server returns right after its close
            if outcomes:
                break
            client.portal.call(anyio.sleep, 0.01)  # type: ignore[union-attr]
    assert closed.value.code == 1013
    assert outcomes[0].overflowed
    assert hub.stats().connections == 0  # and nothing of it is kept


def test_drop_oldest_tells_the_client_how_many_events_it_missed(tmp_path) -> None:
    factory = IsolatedSessionFactory(f"sqlite+aiosqlite:///{tmp_path / 'ws.sqlite3'}")
    hub = EventHub(max_queue=2, overflow="drop_oldest")
    app = chat_app(factory, hub, [])
    with (
        TestClient(app) as client,
        client.websocket_connect("/ws", headers={"x-user": "c"}) as ws,
    ):
        ws.send_json({"kind": "flood", "count": 20})
        seen: list[int] = []
        dropped = 0
        while 19 not in seen:  # the last event always arrives
            event = ws.receive_json()
            if event["type"] == "reqscope.gap":
                assert not dropped  # one gap: the flood came all at once
                dropped = event["payload"]["dropped"]
            else:
                seen.append(event["payload"]["i"])
    assert dropped > 0
    assert len(seen) + dropped == 20  # every event either arrived or was counted


@pytest.mark.anyio
async def test_a_client_that_leaves_mid_send_ends_the_connection_quietly(tmp_path) -> None:
    # As under uvicorn: the client is gone, and the server's next send raises.
    factory = IsolatedSessionFactory(f"sqlite+aiosqlite:///{tmp_path / 'ws.sqlite3'}")
    outcomes: list[Any] = []
    app = chat_app(factory, EventHub(), outcomes)
    incoming = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": '{"kind": "boom"}'},
        {"type": "websocket.disconnect", "code": 1001},
    ]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1001}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            raise OSError("the client disconnected")

    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [(b"x-user", b"dave")],
        "subprotocols": [],
        "state": {},
    }
    async with app.router.lifespan_context(app):
        with anyio.fail_after(5):
            await app(scope, receive, send)  # returns: no ExceptionGroup, nothing to log
    (stats,) = outcomes
    assert (stats.messages, stats.failures) == (1, 1)


def test_a_websocket_without_a_user_is_refused_at_the_handshake(served) -> None:
    client, *_ = served
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws") as ws:
        ws.receive_json()
    assert refused.value.code == 1008
