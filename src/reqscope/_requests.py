"""Framework-neutral request handling shared by the ASGI adapters.

The adapters only translate between their framework and this module: who the user is
(resolvers, or the app's own authentication dependency calling :meth:`identify`), the
request's context and :class:`RequestResources` (the request's lazily opened session and
agent scope, committed before the response starts when asked, closed when the response is
finished). :mod:`reqscope._asgi` serves a request with them.

A request's user may be known when it starts (a resolver reading what an outer middleware
set) or only later: an authentication middleware that runs inside reqscope's, or an
authentication dependency that itself needs the request's session. Until then the request
acts as an anonymous user of its own (``anonymous:<request id>``), so an unauthenticated
request never shares an identity with another; :meth:`RequestResources.identify` makes it
the user's, once.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from reqscope._context import (
    UserExecutionContext,
    _current,
    identified,
    log_fields,
    new_id,
    validate_id,
)
from reqscope._enforcement import hand_over
from reqscope._logging import get_logger
from reqscope.exceptions import (
    ContextValidationError,
    IsolationViolation,
    NotAuthenticated,
    ReqscopeError,
    SessionScopeError,
    UserResolverError,
)

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
    "from_user",
    "resolve_user",
]

logger = get_logger(__name__)

ANONYMOUS: Final = "anonymous"
REQUEST_ID_HEADER: Final = "x-request-id"
UserResolver = Callable[[Any], "str | Awaitable[str | None] | None"]


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


def from_user(attr: str | None = None) -> UserResolver:
    """Resolve the user from ``request.user``, set by Starlette's ``AuthenticationMiddleware``.

    ``attr`` is the attribute of the authenticated user that is the user id; by default its
    ``identity``, or its ``display_name`` where the user class has no ``identity`` (Starlette
    before 0.38). An unauthenticated user, or no user yet, is ``None``.
    """

    def resolve(connection: Any) -> str | None:
        user = connection.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        if attr is not None:
            value = getattr(user, attr)
        else:
            try:
                value = user.identity
            except NotImplementedError:
                value = user.display_name
        return None if value is None else str(value)

    resolve.__name__ = f"from_user({attr!r})"
    return resolve


def _resolver_name(resolver: Callable[..., Any]) -> str:
    name = getattr(resolver, "__qualname__", None) or getattr(resolver, "__name__", None)
    return name if isinstance(name, str) else repr(resolver)


def checked_user_id(value: object, source: str) -> str:
    """``value`` as a user id, or :class:`UserResolverError` naming ``source`` and the fix."""
    if not isinstance(value, str):
        raise UserResolverError(
            f"{source} returned {type(value).__name__}, not a user id: return the user's id "
            "as a str (or None when there is no user)"
        )
    try:
        return validate_id("user_id", value)
    except ContextValidationError as exc:
        raise UserResolverError(f"{source} returned an invalid user id: {exc}") from exc


async def resolve_user(resolver: UserResolver, connection: Any) -> str | None:
    """Call a sync or async resolver and check what it returned.

    Raises:
        NotAuthenticated: raised by the resolver itself.
        UserResolverError: the resolver raised anything else, or returned something that is
            not a valid user id (a bug in the app: answer 500, not 4xx).
    """
    source = f"the user resolver {_resolver_name(resolver)}"
    try:
        result = resolver(connection)
        if inspect.isawaitable(result):
            result = await result
    except NotAuthenticated:
        raise
    except Exception as exc:
        raise UserResolverError(f"{source} raised {type(exc).__name__}: {exc}") from exc
    return None if result is None else checked_user_id(result, source)


class RequestResources:
    """What one request may use, opened on first use and closed when the response ends.

    ``session()`` returns the request's one session (the same object for every caller in the
    request); ``agents()`` its agent scope. :meth:`aclose` closes both, shielded; the ASGI
    middleware calls it after the last body chunk was sent, so a streaming body keeps its
    session to the end while background tasks that run afterwards cannot use it.

    Args:
        ctx: the request's context (an anonymous one of its own while the user is unknown).
        factory: the session factory behind :meth:`session`.
        agents: the agent factory behind :meth:`agents`.
        hub: the event hub WebSocket handlers connect to.
        identified: whether ``ctx`` is the user's (False: the user is not known yet).
        anonymous_ok: whether the request may finish without a user (a public route).
        resolver: asked again when the user is first needed, if it found none at first.
        connection: what ``resolver`` is called with.
    """

    def __init__(
        self,
        ctx: UserExecutionContext,
        factory: IsolatedSessionFactory | None,
        *,
        agents: AgentInstanceFactory | None = None,
        hub: EventHub | None = None,
        identified: bool = True,
        anonymous_ok: bool = False,
        resolver: UserResolver | None = None,
        connection: Any = None,
    ) -> None:
        self.context = ctx
        self.factory = factory
        self.agent_factory = agents
        self.hub = hub
        self.identified = identified
        self.anonymous_ok = anonymous_ok
        self.closed = False
        self.commit_on_success = False
        self.read_only = False  # the request's session was opened read-only (a replica)
        self.max_lifetime: float | None = None
        self.status: int | None = None  # the response's, once it starts
        self._resolver = resolver
        self._connection = connection
        self._session_scope: SessionScope | None = None
        self._session: AsyncSession | None = None
        self._agent_scope: AgentScope | None = None

    @classmethod
    async def start(
        cls,
        connection: Any,
        factory: IsolatedSessionFactory | None,
        *,
        resolver: UserResolver | None,
        public: bool,
        request_id: str | None = None,
        websocket: bool = False,
        metadata: Mapping[str, Any] | None = None,
        agents: AgentInstanceFactory | None = None,
        hub: EventHub | None = None,
    ) -> RequestResources:
        """The resources of a request that just arrived.

        A valid incoming request id (``X-Request-ID``) is kept, an invalid one replaced.
        WebSocket connections get their own ``websocket_client_id``. The resolver is asked
        now and, if it finds no user, again when the user is first needed.

        Raises:
            NotAuthenticated: raised by the resolver.
            UserResolverError: the resolver failed.
        """
        if request_id is not None:
            try:
                request_id = validate_id("request_id", request_id)
            except ContextValidationError:
                logger.info("reqscope: ignoring an invalid X-Request-ID header")
                request_id = None
        request_id = request_id or new_id()
        user_id = None if resolver is None else await resolve_user(resolver, connection)
        ctx = UserExecutionContext.create(
            f"{ANONYMOUS}:{request_id}" if user_id is None else user_id,
            request_id=request_id,
            websocket_client_id=new_id() if websocket else None,
            metadata=metadata,
        )
        return cls(
            ctx,
            factory,
            agents=agents,
            hub=hub,
            identified=user_id is not None,
            anonymous_ok=public,
            resolver=resolver,
            connection=connection,
        )

    # -- who the request acts for ----------------------------------------------------------

    async def identify(self, user_id: str) -> UserExecutionContext:
        """Make the request the user's (its session included), once.

        Called by the adapters with what the app's authentication returned. The same user
        again is a no-op; a different one is refused: a request never changes user.

        Raises:
            UserResolverError: ``user_id`` is not a valid user id.
            IsolationViolation: the request already acts for another user.
            ReqscopeError: the request's agents were created before its user was known.
        """
        if self.identified:
            if user_id != self.context.user_id:
                error = IsolationViolation(
                    f"request {self.context.request_id} acts for user "
                    f"{self.context.user_id!r} and cannot become user {user_id!r}: a request "
                    "(and its session) never changes user; authenticate once per request"
                )
                logger.error("reqscope: %s", error, extra=log_fields(self.context))
                raise error
            return self.context
        previous = self.context
        ctx = identified(previous, checked_user_id(user_id, "the user dependency"))
        if self._agent_scope is not None:
            raise ReqscopeError(
                "the request's agents were created before its user was known; declare the "
                "authentication dependency before the agents dependency"
            )
        if self._session is not None and not self.closed:
            await hand_over(self._session, ctx)
        self._become(ctx)
        return ctx

    def _become(self, ctx: UserExecutionContext) -> None:
        previous, self.context = self.context, ctx
        self.identified = True
        if _current.get() is previous:
            # The rest of the request (dependencies, the endpoint, background tasks and
            # streaming bodies) runs in this task or in copies of its context made later.
            _current.set(ctx)
        logger.debug("reqscope: request identified", extra=log_fields(ctx))

    async def resolve(self) -> UserExecutionContext:
        """The context, after asking the resolver again if no user is known yet."""
        if not self.identified and self._resolver is not None:
            user_id = await resolve_user(self._resolver, self._connection)
            if user_id is not None:
                await self.identify(user_id)
        return self.context

    def resolve_now(self) -> UserExecutionContext:
        """:meth:`resolve` for sync callers (a sync resolver, before the session opens)."""
        resolver = self._resolver
        if (
            not self.identified
            and resolver is not None
            and self._session is None
            and not _is_async(resolver)
        ):
            user_id = resolver(self._connection)
            if user_id is not None:
                self._become(identified(self.context, checked_user_id(user_id, "the resolver")))
        return self.context

    def _require_user(self) -> UserExecutionContext:
        if not self.identified and not self.anonymous_ok:
            raise not_authenticated()
        return self.context

    async def require_context(self) -> UserExecutionContext:
        """The context of a request that has a user, or is public.

        Raises:
            NotAuthenticated: no user, and the route is not public.
        """
        await self.resolve()
        return self._require_user()

    def require_context_now(self) -> UserExecutionContext:
        """:meth:`require_context` for sync callers."""
        self.resolve_now()
        return self._require_user()

    # -- what the request uses -------------------------------------------------------------

    def _check(self, what: str) -> None:
        if self.closed:
            raise SessionScopeError(
                f"the request {self.context.request_id} has finished; its {what} is closed. "
                "Work that runs after the response (background tasks) must open its own: "
                "async with factory.session(current_context())"
            )

    def _factory(self) -> IsolatedSessionFactory:
        if self.factory is None:
            raise ReqscopeError("no IsolatedSessionFactory is configured for this app")
        return self.factory

    async def session(self, *, read_only: bool = False) -> AsyncSession:
        """The request's session (opened on first call).

        It may open before the request's user is known (the authentication dependency that
        loads the user uses it): it then becomes the user's when :meth:`identify` runs.
        Opened ``read_only``, it goes to a read replica when the factory has ones; a session
        already open on the primary serves read-only callers too (the request reads its own
        writes).

        Raises:
            ReqscopeError: a caller that may write asks for the session after it was opened
                read-only.
        """
        self._check("session")
        if self._session is None:
            factory = self._factory()
            scope = factory.session(
                await self.resolve(), max_lifetime=self.max_lifetime, read_only=read_only
            )
            self._session = await scope.__aenter__()
            self._session_scope = scope
            self.read_only = read_only
        elif self.read_only and not read_only:
            raise ReqscopeError(
                "this request's session was opened read-only (ReadOnlyDbDep), possibly on a "
                "read replica, and cannot serve a dependency that may write; use "
                "RequestScopedDbDep or CommitOnSuccessDbDep everywhere in this route"
            )
        return self._session

    def set_lifetime(self, seconds: float) -> None:
        """Give the request's session ``seconds`` before it counts as leaked (long streams).

        Raises:
            ReqscopeError: the session is already open.
            ValueError: ``seconds`` is not positive.
        """
        if seconds <= 0:
            raise ValueError(f"a session lifetime must be positive seconds, got {seconds!r}")
        if self._session is not None:
            raise ReqscopeError(
                "the request's session is already open; set its lifetime before anything "
                "uses it (a route-level dependency runs first)"
            )
        self.max_lifetime = float(seconds)

    async def agents(self) -> AgentScope:
        """The request's agent scope (opened on first call).

        Raises:
            NotAuthenticated: no user, and the route is not public.
        """
        self._check("agent scope")
        if self._agent_scope is None:
            ctx = await self.require_context()
            if self.agent_factory is None:
                raise ReqscopeError(
                    "no AgentInstanceFactory is configured; pass agents= to setup()"
                )
            scope = self.agent_factory.scope(ctx)
            self._agent_scope = await scope.__aenter__()
        return self._agent_scope

    # -- the response ----------------------------------------------------------------------

    async def response_starting(self, status: int) -> int | None:
        """Settle the request's database work before its response starts.

        A request that used its session without ever having a user, on a route that is not
        public, is refused: its work is rolled back and the answer is 401 (returned). Else a
        commit-on-success request is committed now, so that a commit that fails reaches the
        client as an error instead of a 200 for writes that were lost.
        """
        self.status = status
        if self._session is None or status >= 400:  # noqa: PLR2004 - client and server errors
            return None
        if not self.identified and not self.anonymous_ok:
            logger.warning(
                "reqscope: refusing a response for a request that used the database without "
                "a user (no authentication dependency or resolver identified it)",
                extra=log_fields(self.context),
            )
            await self.aclose(not_authenticated())
            return 401
        if self.commit_on_success:
            await self._session.commit()
        return None

    async def response_ending(self) -> None:
        """Commit what a streamed body wrote, before its last chunk is sent."""
        session = self._session
        if (
            self.commit_on_success
            and session is not None
            and not self.closed
            and self.status is not None
            and self.status < 400  # noqa: PLR2004
            and session.in_transaction()
        ):
            await session.commit()

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


def not_authenticated() -> NotAuthenticated:
    """The refusal of a request that needs a user and has none."""
    return NotAuthenticated(
        "no authenticated user for this request; authenticate first (your authentication "
        "dependency or middleware found none), or make the route public: "
        "public_paths=['GET /path'] or allow_anonymous=True"
    )


def _is_async(resolver: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(resolver):
        return True
    method = type(resolver).__dict__.get("__call__")  # a callable object's
    return inspect.iscoroutinefunction(method)
