"""``monitoring_routes()``: the monitoring endpoints as Starlette routes."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from reqscope._monitoring import Monitor

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.requests import Request

    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._sessions import IsolatedSessionFactory

    Guard = Callable[[Request], bool | Awaitable[bool]]

__all__ = ["monitoring_routes"]


def monitoring_routes(
    factory: IsolatedSessionFactory,
    *,
    prefix: str = "/reqscope",
    guard: Guard | None = None,
    hub: EventHub | None = None,
    agents: AgentInstanceFactory | None = None,
    prometheus: bool = False,
    page: bool = False,
) -> Mount:
    """``{prefix}/health``, ``/pool``, ``/sessions`` (and ``/metrics``, ``/`` and ``/state``).

    The same endpoints as ``reqscope.fastapi.monitoring_router``: add the returned mount to
    your app's routes. ``guard(request)`` (sync or async) decides who may read everything
    but ``/health``, which stays open to probes: a request it refuses gets a 403.

    Example:
        >>> app = Starlette(routes=[..., monitoring_routes(factory, guard=is_operator)])
    """
    endpoints = _Endpoints(Monitor(factory, hub=hub, agents=agents, prometheus=prometheus), guard)
    guarded = endpoints.guarded
    routes = [
        Route("/health", endpoints.health),
        Route("/pool", guarded(endpoints.pool)),
        Route("/sessions", guarded(endpoints.sessions)),
    ]
    if prometheus:
        routes.append(Route("/metrics", guarded(endpoints.metrics)))
    if page:
        routes.append(Route("/state", guarded(endpoints.state), name="reqscope_state"))
        routes.append(Route("/", guarded(endpoints.operator_page)))
    return Mount(prefix, routes=routes)


class _Endpoints:
    def __init__(self, monitor: Monitor, guard: Guard | None) -> None:
        self.monitor = monitor
        self.guard = guard

    def guarded(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def checked(request: Request) -> Response:
            if self.guard is not None:
                verdict = self.guard(request)
                if not (await verdict if inspect.isawaitable(verdict) else verdict):
                    return JSONResponse({"detail": "operators only"}, status_code=403)
            return await endpoint(request)

        return checked

    async def health(self, _request: Request) -> Response:
        body, status = await self.monitor.health()
        return JSONResponse(body, status_code=status)

    async def pool(self, _request: Request) -> Response:
        return JSONResponse(self.monitor.pool())

    async def sessions(self, _request: Request) -> Response:
        return JSONResponse(self.monitor.sessions())

    async def metrics(self, _request: Request) -> Response:
        body, content_type = self.monitor.metrics_text()
        return Response(body, media_type=content_type)

    async def state(self, _request: Request) -> Response:
        return JSONResponse(self.monitor.state())

    async def operator_page(self, request: Request) -> Response:
        return HTMLResponse(self.monitor.page(request.url_for("reqscope_state").path))
