from __future__ import annotations

import anyio
import httpx
import pytest
from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from example_loader import load_example
from models import Note, create_tables, drop_tables
from reqscope import ReqscopeError, UserExecutionContext, current_context, session_tags
from reqscope.starlette import (
    ReqscopeMiddleware,
    from_user,
    get_context,
    message_session,
    request_session,
)

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


class HeaderBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("x-user")
        return None if name is None else (AuthCredentials(["authenticated"]), SimpleUser(name))


@pytest.mark.parametrize("order", ["reqscope outermost", "authentication outermost"])
async def test_request_user_from_starlettes_authentication_middleware(factory, order) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        async with request_session(request, commit=True) as session:
            await session.execute(text("SELECT 1"))
            return JSONResponse([get_context(request).user_id, session_tags(session).user_id])

    stack = [
        Middleware(ReqscopeMiddleware, factory=factory, user_resolver=from_user()),
        Middleware(AuthenticationMiddleware, backend=HeaderBackend()),
    ]
    if order == "authentication outermost":
        stack.reverse()
    app = Starlette(routes=[Route("/", endpoint)], middleware=stack)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/", headers={"x-user": "alice"})).json() == ["alice", "alice"]
        refused = await client.get("/")
    assert refused.status_code == 401


async def test_request_session_commit_on_success(factory, tmp_path) -> None:
    await create_tables(factory.engine)

    async def endpoint(request: Request) -> JSONResponse:
        commit = request.query_params.get("commit") == "1"
        async with request_session(request, commit=commit) as session:
            session.add(Note(user_id="alice", body=request.query_params["body"]))
        return JSONResponse({})

    app = ReqscopeMiddleware(
        Starlette(routes=[Route("/", endpoint, methods=["POST"])]),
        factory,
        allow_anonymous=True,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/?body=kept&commit=1")
        await c.post("/?body=dropped")
    async with factory.session(UserExecutionContext.create("auditor")) as session:
        bodies = (await session.scalars(select(Note.body))).all()
    await drop_tables(factory.engine)
    assert bodies == ["kept"]
