"""The FastAPI adapter through the example chat app, over httpx, on every database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from example_loader import load_example
from reqscope import IsolatedSessionFactory, PoolConfig
from reqscope.fastapi import RequestScopedContextDep, RequestScopedDbDep, setup

_example = load_example("fastapi_chat/app.py", "example_fastapi_chat")
ChatMessage = _example.ChatMessage
bearer_user = _example.bearer_user
create_app = _example.create_app
create_tables = _example.create_tables

pytestmark = pytest.mark.anyio


def auth(user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {user}"}


@pytest.fixture(name="app")
async def _app(database) -> AsyncIterator:
    # SQLite has one writer and an unfair, sleeping busy handler: with 20 connections a
    # writer can starve past the busy timeout on a slow machine (test_sessions.py says more).
    size = 4 if database.name == "sqlite" else 20
    app = create_app(database.url, pool=PoolConfig(pool_size=size, max_overflow=0, pool_timeout=30))
    async with app.router.lifespan_context(app):
        yield app
        factory = app.state.factory
        metrics = factory.metrics()
        assert metrics.active_sessions == 0
        assert metrics.pool.checked_out == 0
        async with factory.engine.begin() as conn:
            await conn.run_sync(ChatMessage.metadata.drop_all)


@pytest.fixture(name="client")
async def _client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_auth_request_id_and_monitoring(client, database) -> None:
    missing = await client.get("/messages")
    assert missing.status_code == 401
    assert "allow_anonymous" in missing.json()["detail"]
    ok = await client.get("/messages", headers={**auth("alice"), "x-request-id": "req-42"})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "req-42"
    replaced = await client.get("/messages", headers={**auth("alice"), "x-request-id": "null"})
    assert replaced.headers["x-request-id"] != "null"
    bad_user = await client.get("/messages", headers=auth("undefined"))
    assert bad_user.status_code == 500  # a resolver returning a bad id is the app's bug
    health = await client.get("/reqscope/health")  # public path
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    pool = await client.get("/reqscope/pool", headers=auth("ops"))
    assert pool.json()["pool"]["capacity"] == (4 if database.name == "sqlite" else 20)
    sessions = await client.get("/reqscope/sessions", headers=auth("ops"))
    assert sessions.json() == []
    # FastAPI's own pages use nothing of reqscope's: no user needed
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200
    # mallory is logged in, but not an operator: bob's live sessions are not hers to see
    assert (await client.get("/reqscope/sessions", headers=auth("mallory"))).status_code == 403
    assert (await client.get("/reqscope/pool", headers=auth("mallory"))).status_code == 403


async def test_five_hundred_requests_fifty_users_pool_twenty(client, app) -> None:
    users = [f"user-{i}" for i in range(50)]
    failures: list[str] = []

    async def request(n: int) -> None:
        user = users[n % 50]
        posted = await client.post("/messages", json={"body": f"{user}:{n}"}, headers=auth(user))
        listed = await client.get("/messages", headers=auth(user))
        if posted.status_code != 200 or listed.status_code != 200:
            failures.append(f"{n}: {posted.status_code} {listed.status_code}")
            return
        if {m["user_id"] for m in listed.json()} != {user}:
            failures.append(f"{user} saw {listed.json()}")

    async with anyio.create_task_group() as group:
        for n in range(500):
            group.start_soon(request, n)
    assert failures == []
    metrics = app.state.factory.metrics()
    assert metrics.active_sessions == 0
    assert metrics.pool.checked_out == 0
    assert metrics.isolation_violations == 0


async def test_streaming_response_keeps_its_session_to_the_last_chunk(client, app) -> None:
    for i in range(3):
        await client.post("/messages", json={"body": str(i)}, headers=auth("alice"))
    factory = app.state.factory
    chunks: list[tuple[bytes, int]] = []  # (body, sessions open while the app sent it)

    async def receive() -> dict:
        await anyio.sleep(5)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            chunks.append((message.get("body", b""), factory.metrics().active_sessions))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/messages/stream",
        "raw_path": b"/messages/stream",
        "query_string": b"delay=0.02",
        "headers": [(b"authorization", b"Bearer alice"), (b"host", b"test")],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
        "state": {},
    }
    await app(scope, receive, send)
    rows = [json.loads(body) for body, _ in chunks if body.strip()]
    assert [row["user_id"] for row in rows] == ["alice"] * 3
    assert all(active == 1 for body, active in chunks if body.strip())  # live to the last row
    assert factory.metrics().active_sessions == 0  # and closed after it


async def test_client_disconnect_rolls_back_and_returns(database) -> None:
    factory = IsolatedSessionFactory(database.url)
    app = FastAPI()
    setup(app, factory, user_resolver=bearer_user)

    @app.post("/slow-write")
    async def slow_write(db: RequestScopedDbDep, ctx: RequestScopedContextDep) -> None:
        db.add(ChatMessage(user_id=ctx.user_id, thread_id=ctx.thread_id, role="user", body="x"))
        await db.flush()
        await anyio.sleep(10)  # the client goes away here
        await db.commit()

    @app.get("/count")
    async def count(db: RequestScopedDbDep) -> int:
        return (await db.execute(select(func.count()).select_from(ChatMessage))).scalar_one()

    async with app.router.lifespan_context(app):
        await create_tables(factory.engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with anyio.move_on_after(0.3) as gone:
                await client.post("/slow-write", headers=auth("alice"))
            assert gone.cancelled_caught
            assert factory.metrics().active_sessions == 0
            assert factory.metrics().pool.checked_out == 0
            assert (await client.get("/count", headers=auth("bob"))).json() == 0
        async with factory.engine.begin() as conn:
            await conn.run_sync(ChatMessage.metadata.drop_all)


async def test_background_tasks_get_the_context_and_their_own_session(client) -> None:
    response = await client.post("/audit", headers=auth("alice"))
    assert response.json() == {"queued": True}
    listed = await client.get("/messages", headers=auth("alice"))
    # the background task committed through its own session, as alice
    assert [m["body"] for m in listed.json()] == ["seen"]


async def test_agents_are_fresh_per_request_and_stream(client) -> None:
    first = await client.post("/chat", json={"body": "one"}, headers=auth("alice"))
    second = await client.post("/chat", json={"body": "two"}, headers=auth("alice"))
    assert first.json() == {"answer": "you said: one"}
    assert second.json() == {"answer": "you said: two"}  # no tokens left from the first agent
    listed = await client.get("/messages", headers=auth("alice"))
    assert [m["body"] for m in listed.json()] == ["you said: one", "you said: two"]


async def test_slow_streams_do_not_pin_connections(database) -> None:
    # 100 concurrent streamed replies, each waiting on the "model", on a pool of 5.
    pool = PoolConfig(pool_size=5, max_overflow=0, pool_timeout=30)
    app = create_app(database.url, pool=pool, llm_delay=0.05)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answers: list[str] = []

            async def stream(n: int) -> None:
                response = await client.post(
                    "/chat/stream", json={"body": f"q{n}"}, headers=auth(f"user-{n % 10}")
                )
                answers.append(json.loads(response.text.strip().splitlines()[-1])["answer"])

            async with anyio.create_task_group() as group:
                for n in range(100):
                    group.start_soon(stream, n)
        assert sorted(answers) == sorted(f"you said: q{n}" for n in range(100))
        metrics = app.state.factory.metrics()
        assert metrics.pool.checked_out == 0
        async with app.state.factory.engine.begin() as conn:
            await conn.run_sync(ChatMessage.metadata.drop_all)
