"""Framework-neutral request handling shared by the ASGI adapters.

The adapters only translate between their framework and this module: who the user is
(resolvers), the request's context, and :class:`RequestResources` — the request's lazily
opened session and agent scope, closed when the response is finished.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from reqscope._context import UserExecutionContext, new_id, validate_id
from reqscope.exceptions import ContextValidationError, ReqscopeError, SessionScopeError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from reqscope._agents import AgentInstanceFactory, AgentScope
    from reqscope._events import EventHub
    from reqscope._scope import SessionScope
    from reqscope._sessions import IsolatedSessionFactory

__all__ = [
    "ANONYMOUS",
    "NotAuthenticated",
    "RequestResources",
    "UserResolver",
    "from_header",
    "from_state",
    "request_context",
    "resolve_user",
]

logger = logging.getLogger("reqscope")

ANONYMOUS: Final = "anonymous"
REQUEST_ID_HEADER: Final = "x-request-id"
UserResolver = Callable[[Any], "str | Awaitable[str | None] | None"]


class NotAuthenticated(ReqscopeError):  # noqa: N818 - reads as the condition it is
    """No user could be resolved for a request that needs one (adapters answer 401)."""


def from_state(attr: str) -> UserResolver:
    """Resolve the user from ``request.state.<attr>``, set by your authentication middleware."""

    def resolve(connection: Any) -> str | None:
        value = getattr(connection.state, attr, None)
        return None if value is None else str(value)

    resolve.__name__ = f"from_state({attr!r})"
    return resolve


def from_header(name: str) -> UserResolver:
    """Resolve the user from a request header.

    Only behind a trusted gateway that sets the header itself and strips it from client
    requests: otherwise any client can claim to be any user.
    """
    lowered = name.lower()

    def resolve(connection: Any) -> str | None:
        value: str | None = connection.headers.get(lowered)
        return value

    resolve.__name__ = f"from_header({name!r})"
    return resolve


async def resolve_user(resolver: UserResolver, connection: Any) -> str | None:
    """Call a sync or async resolver."""
    result = resolver(connection)
    if inspect.isawaitable(result):
        result = await result
    return result


def request_context(
    user_id: str | None,
    *,
    allow_anonymous: bool,
    request_id: str | None = None,
    websocket: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> UserExecutionContext:
    """Build the context of one HTTP request or WebSocket connection.

    A valid incoming request id (``X-Request-ID``) is kept, an invalid one replaced.
    WebSocket connections get their own ``websocket_client_id``.

    Raises:
        NotAuthenticated: no user and ``allow_anonymous`` is false.
        ContextValidationError: the resolver returned an invalid user id.
    """
    if user_id is None:
        if not allow_anonymous:
            raise NotAuthenticated(
                "no authenticated user for this request; authenticate first (the resolver "
                "found none) or pass allow_anonymous=True"
            )
        user_id = ANONYMOUS
    if request_id is not None:
        try:
            request_id = validate_id("request_id", request_id)
        except ContextValidationError:
            logger.info("reqscope: ignoring an invalid X-Request-ID header")
            request_id = None
    return UserExecutionContext.create(
        user_id,
        request_id=request_id,
        websocket_client_id=new_id() if websocket else None,
        metadata=metadata,
    )


class RequestResources:
    """What one request may use, opened on first use and closed when the response ends.

    ``session()`` returns the request's one session (the same object for every caller in the
    request); ``agents()`` its agent scope. :meth:`aclose` closes both, shielded; the ASGI
    middleware calls it after the last body chunk was sent, so a streaming body keeps its
    session to the end while background tasks that run afterwards cannot use it.
    """

    def __init__(
        self,
        ctx: UserExecutionContext,
        factory: IsolatedSessionFactory | None,
        *,
        agents: AgentInstanceFactory | None = None,
        hub: EventHub | None = None,
    ) -> None:
        self.context = ctx
        self.factory = factory
        self.agent_factory = agents
        self.hub = hub
        self.closed = False
        self._session_scope: SessionScope | None = None
        self._session: AsyncSession | None = None
        self._agent_scope: AgentScope | None = None

    def _check(self, what: str) -> None:
        if self.closed:
            raise SessionScopeError(
                f"the request {self.context.request_id} has finished; its {what} is closed. "
                "Work that runs after the response (background tasks) must open its own: "
                "async with factory.session(current_context())"
            )

    async def session(self) -> AsyncSession:
        """The request's session (opened on first call)."""
        self._check("session")
        if self._session is None:
            if self.factory is None:
                raise ReqscopeError("no IsolatedSessionFactory is configured for this app")
            scope = self.factory.session(self.context)
            self._session = await scope.__aenter__()
            self._session_scope = scope
        return self._session

    async def agents(self) -> AgentScope:
        """The request's agent scope (opened on first call)."""
        self._check("agent scope")
        if self._agent_scope is None:
            if self.agent_factory is None:
                raise ReqscopeError(
                    "no AgentInstanceFactory is configured; pass agents= to setup()"
                )
            scope = self.agent_factory.scope(self.context)
            self._agent_scope = await scope.__aenter__()
        return self._agent_scope

    async def aclose(self, error: BaseException | None = None) -> None:
        """Close the agent scope, then the session (rolling back what was not committed)."""
        if self.closed:
            return
        self.closed = True
        exc_type = None if error is None else type(error)
        # No shield around the two: each scope shields its own cleanup, and one here would
        # make the session's cleanup take anyio's path even in a bare asyncio task
        # (docs/performance.md). A cancellation can only land inside those shields.
        try:
            if self._agent_scope is not None:
                await self._agent_scope.__aexit__(exc_type, error, None)
        finally:  # also when a Task.cancel() cut the agents' cleanup
            if self._session_scope is not None:
                try:
                    await self._session_scope.__aexit__(exc_type, error, None)
                except Exception:
                    logger.exception("reqscope: closing the request session failed")
