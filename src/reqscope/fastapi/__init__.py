"""FastAPI integration: ``setup()``, request-scoped dependencies and a monitoring router.

Example:
    >>> app = FastAPI()
    >>> setup(app, factory)
    >>> CurrentUser = Annotated[User, authenticated(get_current_user, user_id=user_name)]
    >>> @app.post("/notes")
    ... async def add(user: CurrentUser, db: CommitOnSuccessDbDep): ...
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.routing import APIRouter
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError("reqscope.fastapi needs FastAPI: pip install 'reqscope[fastapi]'") from exc

from sqlalchemy.ext.asyncio import AsyncSession

from reqscope._agents import AgentScope
from reqscope._context import UserExecutionContext
from reqscope._events import running
from reqscope._monitoring import Monitor
from reqscope._requests import UserResolver, checked_user_id, from_header, from_state
from reqscope.starlette import ReqscopeMiddleware, get_resources

if TYPE_CHECKING:
    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._sessions import IsolatedSessionFactory

__all__ = [
    "CommitOnSuccessDbDep",
    "ReadOnlyDbDep",
    "RequestScopedAgentsDep",
    "RequestScopedContextDep",
    "RequestScopedDbDep",
    "UserScopedDbDep",
    "agent",
    "authenticated",
    "commit_on_success_session",
    "from_header",
    "from_state",
    "monitoring_router",
    "read_only_session",
    "request_agents",
    "request_context",
    "request_session",
    "session_lifetime",
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

    The app's lifespan is wrapped so the factory (and ``hub``, for a hub across processes
    such as :class:`~reqscope.redis_hub.RedisEventHub`) starts with each lifespan and closes
    after it (a test suite may enter it once per test). The user comes from your authentication
    dependency wrapped in :func:`authenticated`, or from ``user_resolver`` (default:
    ``request.state.user_id``, set by a middleware, in either order). A request that uses
    reqscope without a user gets 401, unless ``allow_anonymous`` or its route is in
    ``public_paths`` (``"/health"``, ``"GET /articles"``); it then acts as an anonymous user
    of its own. A database that is down, an open circuit or an exhausted pool answers 503
    with ``Retry-After``; register your own exception handler for those errors (or for
    ``NotAuthenticated``) to answer differently.
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
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with factory, running(hub), inner(application) as state:
            yield state

    app.router.lifespan_context = lifespan


def authenticated(
    dependency: Callable[..., Any], *, user_id: Callable[[Any], str] | None = None
) -> Any:
    """Your authentication dependency, made the source of the request's user.

    ``dependency`` is any FastAPI dependency (sync or async, with its own sub-dependencies,
    the request's session included). What it returns is passed on unchanged; its user id
    (``user_id(result)``, or the result itself) becomes the request's user: the context, the
    session opened before it (the one authentication used), everything after it. Overriding
    ``dependency`` in tests (``app.dependency_overrides``) still identifies the request.

    Example:
        >>> def user_name(user: User) -> str:
        ...     return user.username
        >>> CurrentUser = Annotated[User, authenticated(get_current_user, user_id=user_name)]
        >>> @app.get("/me")
        ... async def me(user: CurrentUser, db: RequestScopedDbDep): ...

    Raises:
        UserResolverError: the dependency gave no valid user id (a bug: answered 500).
        IsolationViolation: the request already acts for another user.
    """

    async def identify(connection: HTTPConnection, result: Any) -> Any:
        value = result if user_id is None else user_id(result)
        name = getattr(dependency, "__name__", "the user dependency")
        await get_resources(connection).identify(checked_user_id(value, name))
        return result

    # Spelled out: this module's annotations are strings, and FastAPI could not resolve
    # one naming `dependency`, a local.
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    identify.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("connection", kind, annotation=HTTPConnection),
            inspect.Parameter("result", kind, annotation=Annotated[Any, Depends(dependency)]),
        ]
    )
    identify.__name__ = f"authenticated_{getattr(dependency, '__name__', 'user')}"
    return Depends(identify)


def session_lifetime(seconds: float) -> Any:
    """A route dependency giving the request's session ``seconds`` before it counts as leaked.

    For streaming responses that run for minutes; put it in the route's ``dependencies=``
    so it runs before anything opens the session.

    Example:
        >>> @app.get("/stream", dependencies=[session_lifetime(600)])
        ... async def stream(db: RequestScopedDbDep): ...
    """

    def set_lifetime(connection: HTTPConnection) -> None:
        get_resources(connection).set_lifetime(seconds)

    return Depends(set_lifetime)


# The dependency functions behind the Annotated aliases below: public, as the keys of
# app.dependency_overrides in tests.


async def request_context(connection: HTTPConnection) -> UserExecutionContext:
    """The dependency behind :data:`RequestScopedContextDep` (its override key)."""
    return await get_resources(connection).require_context()


async def request_session(request: Request) -> AsyncSession:
    """The dependency behind :data:`RequestScopedDbDep` (its override key)."""
    return await get_resources(request).session()


async def commit_on_success_session(request: Request) -> AsyncSession:
    """The dependency behind :data:`CommitOnSuccessDbDep` (its override key)."""
    resources = get_resources(request)
    resources.commit_on_success = True
    return await resources.session()


async def read_only_session(request: Request) -> AsyncSession:
    """The dependency behind :data:`ReadOnlyDbDep` (its override key)."""
    return await get_resources(request).session(read_only=True)


async def request_agents(connection: HTTPConnection) -> AgentScope:
    """The dependency behind :data:`RequestScopedAgentsDep` (its override key)."""
    return await get_resources(connection).agents()


RequestScopedContextDep = Annotated[UserExecutionContext, Depends(request_context)]
"""The request's :class:`~reqscope.UserExecutionContext` (401 without a user, unless public)."""

RequestScopedDbDep = Annotated[AsyncSession, Depends(request_session)]
"""The request's one session, **you commit**: shared by every dependency of the request,
open until the response is finished (streaming bodies included), rolled back unless you
call ``await session.commit()``."""

CommitOnSuccessDbDep = Annotated[AsyncSession, Depends(commit_on_success_session)]
"""The request's one session, **committed on success**: committed before the response
starts when its status is below 400, so a commit that fails is the client's 5xx (and what a
streamed body wrote, before its last chunk); rolled back otherwise. The ``get_db`` that
commits after ``yield``, done so that no write is lost."""

ReadOnlyDbDep = Annotated[AsyncSession, Depends(read_only_session)]
"""The request's one session, **for reading**: on a read replica when the factory has
``replicas`` (see the "Read replicas" page), unless something in the request opened the
session on the primary first. Never committed; a dependency that may write
(:data:`RequestScopedDbDep`, :data:`CommitOnSuccessDbDep`) cannot share it."""

UserScopedDbDep = CommitOnSuccessDbDep
"""Deprecated name of :data:`CommitOnSuccessDbDep`."""

RequestScopedAgentsDep = Annotated[AgentScope, Depends(request_agents)]
"""The request's :class:`~reqscope.AgentScope`; its agents are cleaned up with the request."""


def agent(name: str) -> Any:
    """A dependency that creates a fresh agent ``name`` for the request.

    Example:
        >>> async def chat(triage: Annotated[Triage, agent("triage")]): ...
    """

    async def create(connection: HTTPConnection) -> Any:
        return (await get_resources(connection).agents()).create(name)

    create.__name__ = f"agent_{name}"
    return Depends(create)


def monitoring_router(
    factory: IsolatedSessionFactory,
    *,
    prefix: str = "/reqscope",
    dependencies: Sequence[Any] = (),
    hub: EventHub | None = None,
    agents: AgentInstanceFactory | None = None,
    prometheus: bool = False,
    page: bool = False,
) -> APIRouter:
    """``GET {prefix}/health`` (200, or 503 when down), ``/pool`` and ``/sessions``.

    ``/pool`` and ``/sessions`` (which lists user and request ids) run ``dependencies``:
    pass your operators' check, ``dependencies=[Depends(require_operator)]``. ``/health``
    stays open to probes (list it in ``setup(public_paths=...)``); with ``hub``, it also
    reports the event hub (``"events"``: whether a hub across processes reaches its broker,
    and its counters), which never turns the answer into a 503.

    With ``prometheus=True``, ``{prefix}/metrics`` serves the Prometheus exposition
    (``reqscope[prometheus]``); with ``page=True``, ``{prefix}/`` serves the operator page,
    which refreshes itself from ``{prefix}/state``. Both run ``dependencies`` too.
    """
    monitor = Monitor(factory, hub=hub, agents=agents, prometheus=prometheus)
    router = APIRouter(prefix=prefix, tags=["reqscope"])
    guarded = list(dependencies)

    @router.get("/health")
    async def health() -> JSONResponse:
        body, status = await monitor.health()
        return JSONResponse(body, status_code=status)

    @router.get("/pool", dependencies=guarded)
    async def pool() -> dict[str, Any]:
        return monitor.pool()

    @router.get("/sessions", dependencies=guarded)
    async def sessions() -> list[dict[str, Any]]:
        return monitor.sessions()

    if prometheus:

        @router.get("/metrics", dependencies=guarded, response_class=Response)
        async def metrics() -> Response:
            body, content_type = monitor.metrics_text()
            return Response(body, media_type=content_type)

    if page:

        @router.get("/state", dependencies=guarded, name="reqscope_state")
        async def state() -> dict[str, Any]:
            return monitor.state()

        @router.get("/", dependencies=guarded, response_class=HTMLResponse)
        async def operator_page(request: Request) -> HTMLResponse:
            return HTMLResponse(monitor.page(request.url_for("reqscope_state").path))

    return router
