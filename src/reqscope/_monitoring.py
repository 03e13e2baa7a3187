"""What the monitoring routes answer, for any framework.

``reqscope.fastapi.monitoring_router`` and ``reqscope.starlette.monitoring_routes`` only map
paths to these methods: health, pool metrics, open sessions, the Prometheus exposition, and
the operator page with the state it refreshes from.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
from typing import TYPE_CHECKING, Any

from reqscope.exceptions import ReqscopeError

if TYPE_CHECKING:
    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._sessions import IsolatedSessionFactory
    from reqscope.prometheus import PrometheusMetrics

__all__ = ["Monitor"]


class Monitor:
    """The answers of the monitoring routes of one factory (and its hub and agents).

    Args:
        factory: the factory to report on.
        hub: an event hub to report on too (``/health``'s ``"events"``, metrics).
        agents: an agent factory to count too (metrics).
        prometheus: answer ``/metrics`` (needs ``reqscope[prometheus]``).
    """

    def __init__(
        self,
        factory: IsolatedSessionFactory,
        *,
        hub: EventHub | None = None,
        agents: AgentInstanceFactory | None = None,
        prometheus: bool = False,
    ) -> None:
        self.factory = factory
        self.hub = hub
        self.prometheus: PrometheusMetrics | None = None
        if prometheus:
            try:
                from reqscope.prometheus import PrometheusMetrics  # noqa: PLC0415 - an extra
            except ImportError as error:
                raise ReqscopeError(
                    "prometheus=True needs the Prometheus client: "
                    'pip install "reqscope[prometheus]"'
                ) from error
            self.prometheus = PrometheusMetrics(factory, hub=hub, agents=agents)

    async def health(self) -> tuple[dict[str, Any], int]:
        """The health report and its HTTP status (503 when the database is down).

        With a hub, its counters under ``"events"``: a hub cut off from its broker never
        turns the answer into a 503.
        """
        report = await self.factory.health()
        body = report.to_dict()
        if self.hub is not None:
            body["events"] = self.hub.stats().to_dict()
        return body, 200 if report.ok else 503

    def pool(self) -> dict[str, Any]:
        """The factory's metrics."""
        return self.factory.metrics().to_dict()

    def sessions(self) -> list[dict[str, Any]]:
        """Every open session, oldest first (names users: serve it to operators only)."""
        return [
            {
                "session_id": record.session_id,
                "user_id": record.user_id,
                "request_id": record.request_id,
                "age": record.age,
                "max_lifetime": record.max_lifetime,
                "task_name": record.task_name,
            }
            for record in self.factory.active_sessions()
        ]

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type (``prometheus=True``)."""
        if self.prometheus is None:
            raise ReqscopeError("no Prometheus exposition: make the monitor with prometheus=True")
        return self.prometheus.exposition(), self.prometheus.content_type

    def state(self) -> dict[str, Any]:
        """Everything the operator page shows, as JSON-safe data."""
        factory = self.factory
        breaker = factory.circuit_breaker
        return {
            "name": factory.name,
            "now": dt.datetime.now(dt.timezone.utc).isoformat(),
            "metrics": self.pool(),
            "sessions": self.sessions(),
            "leaks": [
                report.to_dict() for report in reversed(factory.leak_detector.recent_reports)
            ],
            "breaker": {
                "state": breaker.state.value,
                "retry_after": breaker.retry_after,
                "consecutive_failures": breaker.consecutive_failures,
                "history": [transition.to_dict() for transition in reversed(breaker.history)],
            },
            "events": None if self.hub is None else self.hub.stats().to_dict(),
        }

    def page(self, state_url: str) -> str:
        """The operator page (one HTML file, nothing external), reading ``state_url``."""
        template = importlib.resources.files("reqscope").joinpath("_page.html").read_text()
        # JSON in a script: "</" would end the script element
        return template.replace("__STATE_URL__", json.dumps(state_url).replace("</", "<\\/"))
