"""Starlette integration: a pure ASGI middleware, lifespan and getters.

``ReqscopeMiddleware`` is plain ASGI (not ``BaseHTTPMiddleware``, which runs the app in
another task and breaks contextvars). For every HTTP request and WebSocket connection it
resolves the user, builds the context, makes it current, and closes the request's resources
after the response's last body chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

try:
    from starlette.requests import HTTPConnection
    from starlette.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "reqscope.starlette needs Starlette: pip install 'reqscope[starlette]'"
    ) from exc

from reqscope._context import UserExecutionContext, use_context
from reqscope._requests import (
    REQUEST_ID_HEADER,
    NotAuthenticated,
    RequestResources,
    UserResolver,
    from_header,
    from_state,
    request_context,
    resolve_user,
)
from reqscope.exceptions import ReqscopeError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._scope import SessionScope
    from reqscope._sessions import IsolatedSessionFactory

__all__ = [
    "ReqscopeMiddleware",
    "from_header",
    "from_state",
    "get_context",
    "get_resources",
    "lifespan",
    "message_session",
    "request_session",
]

STATE_KEY = "reqscope"
WS_POLICY_VIOLATION = 1008


class ReqscopeMiddleware:
    """Give every HTTP request and WebSocket connection its own context and resources.

    Args:
        app: the ASGI app to wrap.
        factory: the session factory behind :func:`request_session`.
        agents: the agent factory behind the request's agent scope.
        hub: the event hub WebSocket handlers connect to.
        user_resolver: ``from_state("user_id")`` by default; any sync or async callable
            taking the Starlette ``HTTPConnection``.
        allow_anonymous: serve requests without a user as ``"anonymous"`` instead of 401.
        public_paths: path prefixes served anonymously when no user resolves (health
            probes: ``("/reqscope/health",)``).
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
        self.public_paths = tuple(public_paths)
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
        try:
            ctx = request_context(
                await resolve_user(self.user_resolver, connection),
                allow_anonymous=self.allow_anonymous or path.startswith(self.public_paths),
                request_id=connection.headers.get(REQUEST_ID_HEADER),
                websocket=websocket,
                metadata={"path": path, "method": scope.get("method", "WS")},
            )
        except (NotAuthenticated, ReqscopeError) as refusal:
            await self._refuse(scope, receive, send, refusal, websocket=websocket)
            return
        resources = RequestResources(ctx, self.factory, agents=self.agents, hub=self.hub)
        scope.setdefault("state", {})[STATE_KEY] = resources

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", ctx.request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await resources.aclose()  # the response is complete: nothing may use them now

        with use_context(ctx):
            error: BaseException | None = None
            try:
                await self.app(scope, receive, send_wrapper)
            except BaseException as exc:
                error = exc
                raise
            finally:
                await resources.aclose(error)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, error: Exception, *, websocket: bool
    ) -> None:
        if websocket:
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        status = 401 if isinstance(error, NotAuthenticated) else 400
        response = JSONResponse({"detail": str(error)}, status_code=status)
        await response(scope, receive, send)


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
    """The context of this request or WebSocket connection."""
    return get_resources(connection).context


@asynccontextmanager
async def request_session(request: HTTPConnection) -> AsyncIterator[AsyncSession]:
    """Yield the request's one session, for an ``async with`` block.

    It stays open until the response is finished (so a streaming body can read from it) and
    is rolled back then unless committed. Not for WebSockets: use :func:`message_session`.
    """
    if request.scope["type"] == "websocket":
        raise ReqscopeError(
            "request_session() would hold one session for a WebSocket's whole life; use "
            "message_session(websocket) for each message instead"
        )
    yield await get_resources(request).session()


def message_session(websocket: HTTPConnection, operation: str = "ws_message") -> SessionScope:
    """A short session for one WebSocket message, in a child context of the connection's."""
    resources = get_resources(websocket)
    if resources.factory is None:
        raise ReqscopeError("no IsolatedSessionFactory is configured for this app")
    return resources.factory.session(resources.context.child(operation))


def lifespan(
    factory: IsolatedSessionFactory,
    inner: Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]] | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]:
    """A Starlette ``lifespan=`` that starts the factory with the app and closes it after.

    ``inner`` is your own lifespan, run inside it (its state is passed through).
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        async with factory:
            if inner is None:
                yield None
            else:
                async with inner(app) as state:
                    yield state

    return run
