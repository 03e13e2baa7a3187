"""What reqscope measures, under OpenTelemetry's names: one table for every exporter.

:data:`METRICS` lists each metric once: OpenTelemetry's nine connection-pool metrics
(``db.client.connection.*``) and reqscope's own (``reqscope.*``). :func:`read` gives the
current value of every metric that is a count or a level, from the same snapshots as
``factory.metrics()``; exporters read it when they are collected, so those cost the
request path nothing. The three histograms (connection create, wait and use times) are
recorded as they happen by :class:`PoolTimings`, on the pool's own events.

:mod:`reqscope.otel` turns the table into OpenTelemetry instruments, and
:mod:`reqscope.prometheus` into a Prometheus exposition. User and request ids are never
attributes: their number has no bound. They belong to traces and logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from sqlalchemy import event

from reqscope._breaker import CircuitState
from reqscope._compat import connection_started_at, handoff_queue_of
from reqscope._logging import get_logger
from reqscope._pool import pool_name, pool_stats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._handoff import HandoffQueue
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["METRICS", "POOL_NAME", "SECONDS_BUCKETS", "Metric", "PoolTimings", "Reading", "read"]

logger = get_logger(__name__)

POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"

Kind = Literal["counter", "updowncounter", "gauge", "histogram"]

#: histogram bucket bounds for the connection times, in seconds
SECONDS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric: its name, instrument kind, unit (UCUM) and what it counts."""

    name: str
    kind: Kind
    unit: str
    description: str
    # the attributes its points carry besides the pool name (documentation and tests)
    attributes: tuple[str, ...] = ()


METRICS: Final[tuple[Metric, ...]] = (
    # -- OpenTelemetry's database connection-pool metrics (semantic conventions) ----------
    Metric(
        "db.client.connection.count",
        "updowncounter",
        "{connection}",
        "Connections in the pool, by state: idle (checked in) or used (checked out).",
        (STATE,),
    ),
    Metric(
        "db.client.connection.idle.max",
        "updowncounter",
        "{connection}",
        "The most idle connections the pool keeps (its pool_size).",
    ),
    Metric(
        "db.client.connection.idle.min",
        "updowncounter",
        "{connection}",
        "The fewest idle connections the pool keeps (SQLAlchemy keeps no minimum: 0).",
    ),
    Metric(
        "db.client.connection.max",
        "updowncounter",
        "{connection}",
        "The most connections the pool opens (pool_size + max_overflow).",
    ),
    Metric(
        "db.client.connection.pending_requests",
        "updowncounter",
        "{request}",
        "Checkouts waiting for a connection now.",
    ),
    Metric(
        "db.client.connection.timeouts",
        "counter",
        "{timeout}",
        "Sessions that found no connection within pool_timeout (PoolExhaustedError).",
    ),
    Metric(
        "db.client.connection.create_time",
        "histogram",
        "s",
        "Time it took to open a new connection to the database.",
    ),
    Metric(
        "db.client.connection.wait_time",
        "histogram",
        "s",
        "Time a checkout that found no idle connection waited for one.",
    ),
    Metric(
        "db.client.connection.use_time",
        "histogram",
        "s",
        "Time between a connection's checkout and its return to the pool.",
    ),
    # -- reqscope's own ---------------------------------------------------------------------
    Metric("reqscope.sessions.opened", "counter", "{session}", "Session scopes opened."),
    Metric("reqscope.sessions.active", "updowncounter", "{session}", "Session scopes open now."),
    Metric(
        "reqscope.sessions.failed",
        "counter",
        "{session}",
        "Session scopes that ended with an exception.",
    ),
    Metric(
        "reqscope.leaks.detected",
        "counter",
        "{session}",
        "Sessions found held past their lifetime.",
    ),
    Metric(
        "reqscope.leaks.reclaimed",
        "counter",
        "{session}",
        "Leaked sessions whose connection the detector invalidated.",
    ),
    Metric(
        "reqscope.violations",
        "counter",
        "{violation}",
        "Refused uses of a session: by another user (isolation) or after its scope (scope).",
        ("reqscope.violation.kind",),
    ),
    Metric(
        "reqscope.cleanup.failures",
        "counter",
        "{session}",
        "Session closes that did not complete (their connection was invalidated).",
    ),
    Metric(
        "reqscope.breaker.state",
        "gauge",
        "1",
        "1 for the circuit breaker's current state, 0 for the others.",
        ("reqscope.breaker.state",),
    ),
    Metric(
        "reqscope.breaker.transitions",
        "counter",
        "{transition}",
        "Changes of the circuit breaker's state.",
    ),
    Metric(
        "reqscope.transactions.retries",
        "counter",
        "{attempt}",
        "Transactions run_in_transaction() ran again after a conflict.",
    ),
    Metric(
        "reqscope.agents.scopes",
        "counter",
        "{scope}",
        "Agent scopes opened (with an agent factory).",
    ),
    Metric(
        "reqscope.agents.active_scopes",
        "updowncounter",
        "{scope}",
        "Agent scopes open now (with an agent factory).",
    ),
    Metric(
        "reqscope.agents.created",
        "counter",
        "{agent}",
        "Agents created by agent scopes (with an agent factory).",
    ),
    Metric(
        "reqscope.events.connections",
        "updowncounter",
        "{connection}",
        "Event channels open in this process (with an event hub).",
    ),
    Metric(
        "reqscope.events.delivered",
        "counter",
        "{event}",
        "Events queued on a channel (with an event hub).",
    ),
    Metric(
        "reqscope.events.dropped",
        "counter",
        "{event}",
        "Events dropped: a full channel's oldest, or a publish that never happened.",
    ),
)

#: one point of a metric: its value and its attributes (the pool name comes with them)
Reading = tuple[float, dict[str, str]]


def read(
    factory: IsolatedSessionFactory,
    *,
    hub: EventHub | None = None,
    agents: AgentInstanceFactory | None = None,
) -> dict[str, list[Reading]]:
    """The current points of every count and level in :data:`METRICS` (not the histograms).

    Each engine of the factory (the primary, then each read replica) is a pool of its own,
    named by its ``db.client.connection.pool.name``.
    """
    name = {POOL_NAME: factory.name}
    points: dict[str, list[Reading]] = {}

    def put(metric: str, value: float, **attributes: str) -> None:
        points.setdefault(metric, []).append((value, {**name, **attributes}))

    for engine, pool_attribute in _pools(factory):
        stats = pool_stats(engine.pool)
        if stats is None:  # a pool that does not count (NullPool)
            continue
        pool = {POOL_NAME: pool_attribute}
        for metric, value, attributes in (
            ("db.client.connection.count", stats.checked_in, {STATE: "idle"}),
            ("db.client.connection.count", stats.checked_out, {STATE: "used"}),
            ("db.client.connection.idle.max", stats.size, {}),
            ("db.client.connection.idle.min", 0, {}),
            ("db.client.connection.max", stats.capacity, {}),
            ("db.client.connection.pending_requests", stats.waiting, {}),
        ):
            points.setdefault(metric, []).append((value, {**pool, **attributes}))
    metrics = factory.metrics()
    put("db.client.connection.timeouts", metrics.pool_timeouts)
    put("reqscope.sessions.opened", metrics.sessions_opened)
    put("reqscope.sessions.active", metrics.active_sessions)
    put("reqscope.sessions.failed", metrics.sessions_failed)
    put("reqscope.leaks.detected", metrics.leaks_detected)
    put("reqscope.leaks.reclaimed", metrics.leaks_reclaimed)
    put(
        "reqscope.violations",
        metrics.isolation_violations,
        **{"reqscope.violation.kind": "isolation"},
    )
    put("reqscope.violations", metrics.scope_violations, **{"reqscope.violation.kind": "scope"})
    put("reqscope.cleanup.failures", metrics.cleanup_failures)
    for state in CircuitState:
        put(
            "reqscope.breaker.state",
            int(state is metrics.circuit_state),
            **{"reqscope.breaker.state": state.value},
        )
    put("reqscope.breaker.transitions", factory.circuit_breaker.transitions)
    put("reqscope.transactions.retries", metrics.transaction_retries)
    if agents is not None:
        put("reqscope.agents.scopes", agents.scopes_opened)
        put("reqscope.agents.active_scopes", agents.scopes_opened - agents.scopes_closed)
        put("reqscope.agents.created", agents.agents_created)
    if hub is not None:
        events = hub.stats()
        put("reqscope.events.connections", events.connections)
        put("reqscope.events.delivered", events.delivered)
        put("reqscope.events.dropped", events.dropped + events.publish_dropped)
    return points


def _pools(factory: IsolatedSessionFactory) -> Iterator[tuple[AsyncEngine, str]]:
    """Each engine of ``factory`` and its pool's name."""
    primary, *replicas = factory.engines
    yield primary, factory.name
    for replica in replicas:
        yield replica, pool_name(replica.url)


class PoolTimings:
    """Time each connection's creation, each checkout's wait and each connection's use.

    ``record(metric, seconds, pool_name)`` is called on SQLAlchemy's pool events (and the
    fair pool's waits) of each engine of the factory: keep it short, it runs on the request
    path. Its errors are logged, never raised into the checkout. Several may listen to
    one factory (an OpenTelemetry meter and a Prometheus registry).
    """

    def __init__(
        self, factory: IsolatedSessionFactory, record: Callable[[str, float, str], None]
    ) -> None:
        self._factory = factory
        self._record = record
        self._listeners: list[tuple[Any, str, Callable[..., None]]] = []
        self._waits: list[tuple[HandoffQueue[Any], Callable[[float], None]]] = []
        # the key of this instance's checkout time in each connection's info dict
        self._checked_out = ("reqscope.checked_out", id(self))

    def install(self) -> None:
        """Start listening on the factory's engines."""
        for engine, name in _pools(self._factory):
            self._install(engine, name)

    def _install(self, engine: AsyncEngine, name: str) -> None:
        sync = engine.sync_engine
        checked_out = self._checked_out

        def connected(_dbapi: Any, record: Any) -> None:
            started = connection_started_at(record)  # wall clock, just before connecting
            if started is not None:
                self._safely("db.client.connection.create_time", time.time() - started, name)

        def checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
            record.info[checked_out] = time.perf_counter()

        def checkin(_dbapi: Any, record: Any) -> None:
            started = record.info.pop(checked_out, None)
            if started is not None:
                self._safely("db.client.connection.use_time", time.perf_counter() - started, name)

        def waited(seconds: float) -> None:
            self._safely("db.client.connection.wait_time", seconds, name)

        for identifier, listener in (
            ("connect", connected),
            ("checkout", checkout),
            ("checkin", checkin),
        ):
            event.listen(sync, identifier, listener)
            self._listeners.append((sync, identifier, listener))
        queue = handoff_queue_of(engine.pool)
        if queue is not None:
            queue.wait_observers.append(waited)
            self._waits.append((queue, waited))

    def _safely(self, metric: str, seconds: float, name: str) -> None:
        try:
            self._record(metric, seconds, name)
        except Exception:  # a broken exporter must not fail a checkout
            logger.exception("reqscope: recording %s failed", metric)

    def remove(self) -> None:
        """Stop listening."""
        for target, identifier, listener in self._listeners:
            if event.contains(target, identifier, listener):
                event.remove(target, identifier, listener)
        self._listeners.clear()
        for queue, waited in self._waits:
            queue.wait_observers.remove(waited)
        self._waits.clear()
