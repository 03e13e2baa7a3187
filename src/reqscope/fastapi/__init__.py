"""FastAPI integration: ``setup()``, request-scoped dependencies and a monitoring router.

Example:
    >>> app = FastAPI()
    >>> setup(app, factory, user_resolver=from_state("user_id"))
    >>> @app.get("/notes")
    ... async def notes(db: RequestScopedDbDep, ctx: RequestScopedContextDep): ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRouter
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError("reqscope.fastapi needs FastAPI: pip install 'reqscope[fastapi]'") from exc

from sqlalchemy.ext.asyncio import AsyncSession

from reqscope._agents import AgentScope
from reqscope._context import UserExecutionContext
from reqscope._requests import UserResolver, from_header, from_state
from reqscope.starlette import ReqscopeMiddleware, get_context, get_resources

if TYPE_CHECKING:
    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._sessions import IsolatedSessionFactory

__all__ = [
    "RequestScopedAgentsDep",
    "RequestScopedContextDep",
    "RequestScopedDbDep",
    "UserScopedDbDep",
    "agent",
    "from_header",
    "from_state",
    "monitoring_router",
    "setup",
]


def setup(
    app: FastAPI,
    factory: IsolatedSessionFactory,
    *,
    agents: AgentInstanceFactory | None = None,
    hub: EventHub | None = None,
    user_resolver: UserResolver | None = None,
    allow_anonymous: bool = False,
    public_paths: Sequence[str] = (),
) -> None:
    """Install reqscope on ``app``: the context middleware and the factory's lifecycle.

    The app's lifespan is wrapped so the factory starts with the app and closes after it.
    Requests without a user get 401 unless ``allow_anonymous`` or their path starts with
    one of ``public_paths``. Add your authentication middleware *after* calling ``setup()``:
    Starlette runs the last-added middleware first, and ``from_state`` reads what it set.
    """
    app.add_middleware(
        ReqscopeMiddleware,
        factory=factory,
        agents=agents,
        hub=hub,
        user_resolver=user_resolver or from_state("user_id"),
        allow_anonymous=allow_anonymous,
        public_paths=public_paths,
    )
    app.state.reqscope_factory = factory
    app.state.reqscope_hub = hub
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with factory, inner(application) as state:
            yield state

    app.router.lifespan_context = lifespan


async def _context(request: Request) -> UserExecutionContext:
    return get_context(request)


async def _request_db(request: Request) -> AsyncSession:
    return await get_resources(request).session()


async def _user_db(request: Request) -> AsyncIterator[AsyncSession]:
    resources = get_resources(request)
    if resources.factory is None:  # pragma: no cover - setup() always sets one
        raise RuntimeError("no IsolatedSessionFactory configured")
    async with resources.factory.begin(resources.context.child("dependency")) as session:
        yield session


async def _agents(request: Request) -> AgentScope:
    return await get_resources(request).agents()


RequestScopedContextDep = Annotated[UserExecutionContext, Depends(_context)]
"""The request's :class:`~reqscope.UserExecutionContext`."""

RequestScopedDbDep = Annotated[AsyncSession, Depends(_request_db)]
"""The request's one session: shared by every dependency of the request, open until the
response is finished (streaming bodies included), rolled back unless committed."""

UserScopedDbDep = Annotated[AsyncSession, Depends(_user_db)]
"""A session of its own for this dependency, in a child context of the request's; it
commits when the dependency exits without error (``factory.begin``)."""

RequestScopedAgentsDep = Annotated[AgentScope, Depends(_agents)]
"""The request's :class:`~reqscope.AgentScope`; its agents are cleaned up with the request."""


def agent(name: str) -> Any:
    """A dependency that creates a fresh agent ``name`` for the request.

    Example:
        >>> async def chat(triage: Annotated[Triage, agent("triage")]): ...
    """

    async def create(request: Request) -> Any:
        return (await get_resources(request).agents()).create(name)

    create.__name__ = f"agent_{name}"
    return Depends(create)


def monitoring_router(factory: IsolatedSessionFactory, *, prefix: str = "/reqscope") -> APIRouter:
    """``GET {prefix}/health`` (200, or 503 when down), ``/pool`` and ``/sessions``.

    Mount it behind your operators' authentication: ``/sessions`` lists user ids.
    """
    router = APIRouter(prefix=prefix, tags=["reqscope"])

    @router.get("/health")
    async def health() -> JSONResponse:
        report = await factory.health()
        return JSONResponse(report.to_dict(), status_code=200 if report.ok else 503)

    @router.get("/pool")
    async def pool() -> dict[str, Any]:
        return factory.metrics().to_dict()

    @router.get("/sessions")
    async def sessions() -> list[dict[str, Any]]:
        return [
            {
                "session_id": r.session_id,
                "user_id": r.user_id,
                "request_id": r.request_id,
                "age": r.age,
                "max_lifetime": r.max_lifetime,
                "task_name": r.task_name,
            }
            for r in factory.active_sessions()
        ]

    return router
