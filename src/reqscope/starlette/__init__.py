"""Starlette integration: a pure ASGI middleware, lifespan and getters.

``ReqscopeMiddleware`` is plain ASGI (not ``BaseHTTPMiddleware``, which runs the app in
another task and breaks contextvars). For every HTTP request and WebSocket connection it
resolves the user, builds the context, makes it current, and closes the request's resources
after the response's last body chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

try:
    from starlette.requests import HTTPConnection
    from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "reqscope.starlette needs Starlette: pip install 'reqscope[starlette]'"
    ) from exc

from reqscope._asgi import PublicRoutes, answer, serve
from reqscope._connections import ConnectionStats, serve_connection
from reqscope._containment import DEFAULT_TIMEOUT
from reqscope._context import UserExecutionContext
from reqscope._events import running
from reqscope._logging import get_logger
from reqscope._requests import (
    REQUEST_ID_HEADER,
    RequestResources,
    UserResolver,
    from_header,
    from_state,
    from_user,
)
from reqscope.exceptions import ReqscopeError, UserResolverError
from reqscope.starlette._monitoring import monitoring_routes

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from starlette.types import ASGIApp, Receive, Scope, Send

    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._scope import SessionScope
    from reqscope._sessions import IsolatedSessionFactory

__all__ = [
    "ReqscopeMiddleware",
    "from_header",
    "from_state",
    "from_user",
    "get_context",
    "get_resources",
    "lifespan",
    "message_session",
    "monitoring_routes",
    "request_session",
    "serve_websocket",
]

logger = get_logger(__name__)

STATE_KEY = "reqscope"


class ReqscopeMiddleware:
    """Give every HTTP request and WebSocket connection its own context and resources.

    The user is asked of ``user_resolver`` when the request arrives and, if it finds none
    then (an authentication middleware that runs inside this one), again when the request
    first needs its user; so the order of the two middlewares does not matter. Until a user
    is known the request acts as an anonymous user of its own.

    Args:
        app: the ASGI app to wrap.
        factory: the session factory behind :func:`request_session`.
        agents: the agent factory behind the request's agent scope.
        hub: the event hub WebSocket handlers connect to.
        user_resolver: ``from_state("user_id")`` by default; any sync or async callable
            taking the Starlette ``HTTPConnection`` and returning the user id or ``None``
            (``from_user()`` reads Starlette's ``AuthenticationMiddleware``).
        allow_anonymous: serve requests without a user, each as an anonymous user of its
            own, instead of 401.
        public_paths: routes served without a user: ``"/health"`` (every method) or
            ``"GET /articles"`` (that method only); a path covers what lies below it.
    """

    def __init__(
        self,
        app: ASGIApp,
        factory: IsolatedSessionFactory | None = None,
        *,
        agents: AgentInstanceFactory | None = None,
        hub: EventHub | None = None,
        user_resolver: UserResolver | None = None,
        allow_anonymous: bool = False,
        public_paths: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.public = PublicRoutes.parse(public_paths)
        self.factory = factory
        self.agents = agents
        self.hub = hub
        self.user_resolver = user_resolver or from_state("user_id")
        self.allow_anonymous = allow_anonymous

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call (lifespan and other scopes pass straight through)."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        websocket = scope["type"] == "websocket"
        path: str = scope.get("path", "")
        method: str = scope.get("method", "WEBSOCKET")
        try:
            resources = await RequestResources.start(
                connection,
                self.factory,
                resolver=self.user_resolver,
                public=self.allow_anonymous or self.public(method, path),
                request_id=connection.headers.get(REQUEST_ID_HEADER),
                websocket=websocket,
                metadata={"path": path, "method": method},
                agents=self.agents,
                hub=self.hub,
            )
        except ReqscopeError as refusal:
            if isinstance(refusal, UserResolverError):
                logger.exception("reqscope: %s", refusal)  # noqa: TRY401 - it says what to fix
            await answer(scope, send, refusal, self.factory)
            return
        scope.setdefault("state", {})[STATE_KEY] = resources
        await serve(self.app, scope, receive, send, resources, factory=self.factory)


def get_resources(connection: HTTPConnection) -> RequestResources:
    """The request's :class:`RequestResources` (set by :class:`ReqscopeMiddleware`)."""
    resources = connection.scope.get("state", {}).get(STATE_KEY)
    if resources is None:
        raise ReqscopeError(
            "no reqscope context on this request: add ReqscopeMiddleware to the app "
            "(reqscope.fastapi.setup() does it for FastAPI)"
        )
    return resources  # type: ignore[no-any-return]


def get_context(connection: HTTPConnection) -> UserExecutionContext:
    """The context of this request or WebSocket connection.

    Raises:
        NotAuthenticated: the request has no user and its route is not public.
    """
    return get_resources(connection).require_context_now()


@asynccontextmanager
async def request_session(
    request: HTTPConnection, *, commit: bool = False, max_lifetime: float | None = None
) -> AsyncIterator[AsyncSession]:
    """Yield the request's one session, for an ``async with`` block.

    It stays open until the response is finished (so a streaming body can read from it) and
    is rolled back then unless committed.

    Args:
        request: the request.
        commit: commit-on-success: commit the session before the response starts when its
            status is below 400 (a failed commit is then the client's 5xx), and what a
            streamed body wrote before its last chunk. Without it, you commit.
        max_lifetime: seconds the session may stay open before it counts as leaked (a long
            stream); set it before anything opened the session.

    Not for WebSockets: use :func:`message_session`.
    """
    if request.scope["type"] == "websocket":
        raise ReqscopeError(
            "request_session() would hold one session for a WebSocket's whole life; use "
            "message_session(websocket) for each message instead"
        )
    resources = get_resources(request)
    if max_lifetime is not None:
        resources.set_lifetime(max_lifetime)
    resources.commit_on_success = resources.commit_on_success or commit
    yield await resources.session()


def message_session(websocket: HTTPConnection, operation: str = "ws_message") -> SessionScope:
    """A short session for one WebSocket message, in a child context of the connection's.

    It rolls back unless you commit, as every reqscope session does.
    """
    resources = get_resources(websocket)
    if resources.factory is None:
        raise ReqscopeError("no IsolatedSessionFactory is configured for this app")
    return resources.factory.session(resources.require_context_now().child(operation))


async def serve_websocket(
    websocket: WebSocket,
    handler: Callable[..., Awaitable[Any]],
    *,
    json_messages: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> ConnectionStats:
    """Serve a WebSocket until the client leaves: each message its own request.

    Accepts the connection if it is not yet, forwards the connection's events (when the app
    has a hub), and runs ``await handler(message, session)`` for every message, in a child
    context of the connection's and a session of its own that is committed when the handler
    returns (``handler(message)`` without a factory). What the handler returns, unless
    ``None``, is sent back as JSON. A handler that raises or runs past ``timeout`` (or a
    message that is not JSON) gets the client ``{"type": "error", "error": ..., "request_id":
    ...}``, is counted and logged, and the connection goes on. A client that falls so far
    behind its events that ``overflow="disconnect"`` drops it is closed with code 1013; one
    that goes away, even mid-send, ends the connection quietly.

    Raises:
        NotAuthenticated: the connection has no user and its route is not public.
    """
    resources = get_resources(websocket)
    ctx = await resources.require_context()
    if websocket.client_state == WebSocketState.CONNECTING:
        await websocket.accept()

    async def receive() -> str | bytes:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text: str | None = message.get("text")
        return text if text is not None else message.get("bytes", b"")

    async def close(code: int, reason: str) -> None:
        await websocket.close(code, reason)

    return await serve_connection(
        ctx,
        receive=receive,
        send=websocket.send_json,
        close=close,
        handler=handler,
        disconnects=(
            WebSocketDisconnect,
            OSError,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
        ),
        factory=resources.factory,
        hub=resources.hub,
        decode=json.loads if json_messages else None,
        timeout=timeout,
    )


def lifespan(
    factory: IsolatedSessionFactory,
    inner: Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]] | None = None,
    *,
    hub: EventHub | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]:
    """A Starlette ``lifespan=`` that starts the factory with the app and closes it after.

    ``inner`` is your own lifespan, run inside it (its state is passed through). ``hub``
    starts and stops with the app too (a hub across processes connects to its broker).
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        async with factory, running(hub):
            if inner is None:
                yield None
            else:
                async with inner(app) as state:
                    yield state

    return run
