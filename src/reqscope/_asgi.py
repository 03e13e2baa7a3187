"""ASGI plumbing shared by the adapters: public routes, error answers, serving a request.

Which routes are public, what reqscope's errors answer, and serving one request with its
:class:`~reqscope._requests.RequestResources`.

Framework-neutral: it speaks raw ASGI messages, so the Starlette middleware (and through
it FastAPI) only builds the request's resources and hands over to :func:`serve`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from reqscope._context import log_fields, use_context
from reqscope._logging import get_logger
from reqscope._requests import not_authenticated
from reqscope.exceptions import (
    CircuitOpenError,
    DatabaseUnavailableError,
    NotAuthenticated,
    PoolExhaustedError,
    UserResolverError,
)

if TYPE_CHECKING:
    from reqscope._requests import RequestResources
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["ErrorResponse", "PublicRoutes", "answer", "error_response", "serve"]

logger = get_logger(__name__)

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

WS_POLICY_VIOLATION: Final = 1008
WS_INTERNAL_ERROR: Final = 1011
WS_TRY_AGAIN_LATER: Final = 1013


@dataclass(frozen=True, slots=True)
class PublicRoutes:
    """Which requests may run without a user: ``"/health"`` (any method) or ``"GET /articles"``.

    A path matches its own prefix and what lies below it (``/articles`` matches
    ``/articles`` and ``/articles/7``, not ``/articles-admin``).

    Raises:
        ValueError: an entry is not ``"/path"`` or ``"METHOD /path"``.
    """

    entries: tuple[tuple[str | None, str], ...]

    @classmethod
    def parse(cls, specs: Sequence[str]) -> PublicRoutes:
        """Parse ``public_paths`` entries."""
        if isinstance(specs, str):
            specs = (specs,)
        entries: list[tuple[str | None, str]] = []
        for spec in specs:
            method, _, path = spec.strip().rpartition(" ")
            method = method.strip().upper()
            if not path.startswith("/") or (method and not method.isalpha()):
                raise ValueError(
                    f"public path {spec!r} must be a path ('/health') or a method and a path "
                    "('GET /articles')"
                )
            entries.append((method or None, path.rstrip("/") or "/"))
        return cls(tuple(entries))

    def __call__(self, method: str, path: str) -> bool:
        """Whether ``method path`` is public."""
        for allowed, prefix in self.entries:
            if allowed is not None and allowed != method:
                continue
            if prefix in {"/", path} or path.startswith(prefix + "/"):
                return True
        return False


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The HTTP answer to one of reqscope's errors."""

    status: int
    detail: str
    headers: Mapping[str, str]


def error_response(
    error: BaseException, factory: IsolatedSessionFactory | None
) -> ErrorResponse | None:
    """What to answer for ``error``, or ``None`` when it is not one the adapters answer.

    ``NotAuthenticated`` is 401. A database that is down, a circuit that is open or a pool
    with no free connection is 503 with ``Retry-After`` (the circuit's remaining open time;
    one second when it is not open).
    """
    if isinstance(error, NotAuthenticated):
        return ErrorResponse(401, str(error), {})
    if isinstance(error, (CircuitOpenError, DatabaseUnavailableError, PoolExhaustedError)):
        if isinstance(error, CircuitOpenError):
            wait = error.retry_after
        else:
            wait = 0.0 if factory is None else factory.circuit_breaker.retry_after
        seconds = max(1, math.ceil(wait))
        detail = (
            "the database is unavailable; retry later"
            if not isinstance(error, PoolExhaustedError)
            else "the service is overloaded; retry later"
        )
        return ErrorResponse(503, detail, {"Retry-After": str(seconds)})
    return None


async def answer(
    scope: MutableMapping[str, Any],
    send: Send,
    error: BaseException,
    factory: IsolatedSessionFactory | None,
    request_id: str | None = None,
) -> None:
    """Answer ``error`` for a response that has not started (500 when it is not reqscope's).

    A WebSocket is closed instead: 1008 for no user, 1013 for a database that is down, 1011
    for anything else.
    """
    response = error_response(error, factory)
    if scope["type"] == "websocket":
        code = WS_INTERNAL_ERROR
        if response is not None:
            unauthorized = response.status == 401  # noqa: PLR2004
            code = WS_POLICY_VIOLATION if unauthorized else WS_TRY_AGAIN_LATER
        await send({"type": "websocket.close", "code": code})
        return
    if response is None:  # a bug in the app (its resolver): nothing for the client to fix
        response = ErrorResponse(500, "Internal Server Error", {})
    body = json.dumps({"detail": response.detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in response.headers.items()
        ),
    ]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _GuardedSend:
    """The request's ``send``: settles the database work as the response starts and ends."""

    __slots__ = ("factory", "replaced", "resources", "scope", "started", "upstream")

    def __init__(
        self,
        resources: RequestResources,
        factory: IsolatedSessionFactory | None,
        scope: MutableMapping[str, Any],
        upstream: Send,
    ) -> None:
        self.resources = resources
        self.factory = factory
        self.scope = scope
        self.upstream = upstream
        self.started = False
        self.replaced = False  # the app's own answer was replaced by a refusal

    async def __call__(self, message: Message) -> None:
        if self.replaced:
            return
        kind = message["type"]
        resources = self.resources
        if kind == "http.response.start":
            refused = await resources.response_starting(message["status"])
            self.started = True
            if refused is not None:
                self.replaced = True
                request_id = resources.context.request_id
                await answer(
                    self.scope, self.upstream, not_authenticated(), self.factory, request_id
                )
                return
            headers = list(message.get("headers", []))
            headers.append((b"x-request-id", resources.context.request_id.encode("latin-1")))
            message = {**message, "headers": headers}
        elif kind == "websocket.accept":
            # A connection that would have no user is refused at the handshake instead.
            await resources.require_context()
            self.started = True
        elif kind == "http.response.body" and not message.get("more_body", False):
            await resources.response_ending()  # a failed commit cuts the last chunk off
            await self.upstream(message)
            await resources.aclose()  # the response is complete: nothing may use them now
            return
        await self.upstream(message)


async def serve(
    app: App,
    scope: MutableMapping[str, Any],
    receive: Receive,
    send: Send,
    resources: RequestResources,
    *,
    factory: IsolatedSessionFactory | None,
) -> None:
    """Run ``app`` for one request with ``resources``, current context and all.

    The resources close after the response's last body chunk (or when ``app`` returns). One
    of reqscope's errors raised before the response started is answered (401, 503); any
    other error propagates to the server's handling.
    """
    guarded = _GuardedSend(resources, factory, scope, send)
    with use_context(resources.context):
        error: BaseException | None = None
        try:
            await app(scope, receive, guarded)
        except Exception as exc:
            error = exc
            if isinstance(exc, UserResolverError):
                logger.exception(
                    "reqscope: %s",
                    exc,  # noqa: TRY401 - the message says what to fix
                    extra=log_fields(resources.context),
                )
            if guarded.started or error_response(exc, factory) is None:
                raise
            await resources.aclose(exc)
            await answer(scope, send, exc, factory, resources.context.request_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await resources.aclose(error)
