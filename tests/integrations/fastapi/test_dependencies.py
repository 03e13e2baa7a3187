from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from sqlalchemy import text

from reqscope import (
    AgentInstanceFactory,
    AgentRegistry,
    AgentScope,
    CircuitBreaker,
    IsolatedSessionFactory,
    UserExecutionContext,
    session_tags,
)
from reqscope.fastapi import (
    RequestScopedAgentsDep,
    RequestScopedContextDep,
    RequestScopedDbDep,
    UserScopedDbDep,
    from_state,
    monitoring_router,
    setup,
)

pytestmark = pytest.mark.anyio


class Probe:
    closed = 0

    def __init__(self, context: UserExecutionContext) -> None:
        self.context = context

    def close(self) -> None:
        Probe.closed += 1


async def test_dependencies_and_state_resolver(factory) -> None:
    Probe.closed = 0
    registry = AgentRegistry()
    registry.register("probe", Probe)
    app = FastAPI()
    setup(app, factory, agents=AgentInstanceFactory(registry), user_resolver=from_state("user_id"))

    # Added after setup(), so it runs first (Starlette: the last added is the outermost).
    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        request.state.user_id = request.headers.get("x-test-user")
        return await call_next(request)

    @app.get("/deps")
    async def deps(
        ctx: RequestScopedContextDep,
        request_db: RequestScopedDbDep,
        own_db: UserScopedDbDep = None,
        scope: RequestScopedAgentsDep = None,
    ) -> dict:
        assert isinstance(scope, AgentScope)
        probe = scope.create("probe")
        own = session_tags(own_db)
        shared = session_tags(request_db)
        await own_db.execute(text("SELECT 1"))
        return {
            "user": ctx.user_id,
            "same_request": shared.request_id == ctx.request_id,
            "commit_db_is_the_request_session": own_db is request_db and own == shared,
            "probe_user": probe.context.user_id,
        }

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/deps", headers={"x-test-user": "alice"})
        assert (await client.get("/deps")).status_code == 401
    assert response.json() == {
        "user": "alice",
        "same_request": True,
        "commit_db_is_the_request_session": True,
        "probe_user": "alice",
    }
    assert Probe.closed == 1  # the agent was cleaned up with the request


async def test_async_resolver_and_anonymous(factory) -> None:
    async def resolver(connection) -> str | None:
        return connection.query_params.get("user")

    app = FastAPI()
    setup(app, factory, user_resolver=resolver, allow_anonymous=True)

    @app.get("/")
    async def index(ctx: RequestScopedContextDep) -> str:
        return ctx.user_id

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/?user=bob")).json() == "bob"
        first, second = (await c.get("/")).json(), (await c.get("/")).json()
    # every anonymous request is an anonymous user of its own
    assert first.startswith("anonymous:")
    assert second.startswith("anonymous:")
    assert first != second


async def test_health_is_503_when_the_database_is_down(tmp_path) -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    factory = IsolatedSessionFactory(
        "postgresql+asyncpg://postgres@127.0.0.1:1/none", circuit_breaker=breaker
    )
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)
    app.include_router(monitoring_router(factory))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            health = await client.get("/reqscope/health")
    assert health.status_code == 503
    assert health.json()["status"] == "down"
    assert factory.closed
