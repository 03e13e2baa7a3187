from __future__ import annotations

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from example_loader import load_example
from reqscope import ReqscopeError, UserExecutionContext, current_context
from reqscope.starlette import ReqscopeMiddleware, get_context, message_session, request_session

_example = load_example("starlette_app/app.py", "example_starlette_app")
create_app = _example.create_app

pytestmark = pytest.mark.anyio


async def test_example_app_isolates_users(tmp_path) -> None:
    app = create_app(f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def user(name: str) -> None:
                for i in range(5):
                    r = await client.post(f"/notes?body={name}{i}", headers={"X-User": name})
                    assert r.json().get("user_id") == name, r.text
                    assert r.headers["x-request-id"] == r.json()["request_id"]

            async with anyio.create_task_group() as group:
                for name in ("alice", "bob", "carol"):
                    group.start_soon(user, name)
            listed = await client.get("/notes", headers={"X-User": "bob"})
            assert listed.json() == {"user_id": "bob", "notes": [f"bob{i}" for i in range(5)]}
            assert (await client.get("/notes")).status_code == 401
        metrics = app.state.factory.metrics()
        assert metrics.active_sessions == 0
        assert metrics.pool.checked_out == 0
    assert app.state.factory.closed  # the lifespan closed it


async def test_middleware_sets_the_context_and_guards_misuse() -> None:
    seen = {}

    async def endpoint(request: Request) -> JSONResponse:
        seen["ctx"] = get_context(request)
        seen["current"] = current_context()
        try:
            async with request_session(request):
                pass
        except ReqscopeError as error:
            seen["error"] = str(error)
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[],
    )
    wrapped = ReqscopeMiddleware(app, None, allow_anonymous=True)
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).status_code == 200
    assert seen["ctx"].user_id.startswith("anonymous:")
    assert seen["current"] is seen["ctx"]
    assert "no IsolatedSessionFactory" in seen["error"]

    bare = Starlette(routes=[Route("/", endpoint)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=bare), base_url="http://t"
    ) as client:
        with pytest.raises(ReqscopeError, match="add ReqscopeMiddleware"):
            await client.get("/")


async def test_message_session_is_refused_without_factory() -> None:
    from reqscope._requests import RequestResources
    from reqscope.starlette import STATE_KEY

    class FakeWebSocket:
        scope = {"type": "websocket", "state": {}}

    ws = FakeWebSocket()
    ws.scope["state"][STATE_KEY] = RequestResources(UserExecutionContext.create("a"), None)
    with pytest.raises(ReqscopeError, match="no IsolatedSessionFactory"):
        message_session(ws)  # type: ignore[arg-type]
    with pytest.raises(ReqscopeError, match="message_session"):
        async with request_session(ws):  # type: ignore[arg-type]
            pass
