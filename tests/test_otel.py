"""reqscope.otel: the pool and reqscope metrics, and a span per session scope."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import reqscope._telemetry
import reqscope.otel
from conftest import Database, marked_sqlite
from reqscope import (
    AgentInstanceFactory,
    AgentRegistry,
    EventHub,
    IsolatedSessionFactory,
    IsolationViolation,
    PoolConfig,
    UserExecutionContext,
    use_context,
)
from reqscope._telemetry import METRICS, POOL_NAME
from reqscope.otel import instrument

pytestmark = pytest.mark.anyio

USE_TIME = "db.client.connection.use_time"

SEMCONV_POOL_METRICS = {
    "db.client.connection.count": ("{connection}", Sum, False),
    "db.client.connection.idle.max": ("{connection}", Sum, False),
    "db.client.connection.idle.min": ("{connection}", Sum, False),
    "db.client.connection.max": ("{connection}", Sum, False),
    "db.client.connection.pending_requests": ("{request}", Sum, False),
    "db.client.connection.timeouts": ("{timeout}", Sum, True),
    "db.client.connection.create_time": ("s", Histogram, None),
    "db.client.connection.wait_time": ("s", Histogram, None),
    "db.client.connection.use_time": ("s", Histogram, None),
}


@pytest.fixture(name="reader")
def _reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture(name="spans")
def _spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(name="tracer_provider")
def _tracer_provider(spans: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield provider
    provider.shutdown()


@pytest.fixture(name="otel_factory")
async def _otel_factory(database: Database) -> AsyncIterator[IsolatedSessionFactory]:
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=10)
    async with IsolatedSessionFactory(database.url, pool=pool, capture_stacks=True) as factory:
        yield factory


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Each metric collected now, by name."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def points(metric: Any) -> list[Any]:
    return list(metric.data.data_points)


def value(metric: Any, **attributes: str) -> float:
    """The value of the one point of ``metric`` whose attributes include ``attributes``."""
    (point,) = [
        p for p in points(metric) if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    return point.value


async def load(factory: IsolatedSessionFactory, users: int, rounds: int) -> list[str]:
    """Sessions of ``users`` users at once, ``rounds`` each; returns every id they had."""
    ids: list[str] = []

    async def user(n: int) -> None:
        for _ in range(rounds):
            ctx = UserExecutionContext.create(f"user-{n}")
            ids.extend([ctx.user_id, ctx.request_id])
            async with factory.session(ctx) as session:
                await session.execute(sa.text("SELECT 1"))
                await anyio.sleep(0.001)

    async with anyio.create_task_group() as group:
        for n in range(users):
            group.start_soon(user, n)
    return ids


async def test_metrics_follow_the_conventions_and_match_factory_metrics(
    otel_factory: IsolatedSessionFactory, reader: InMemoryMetricReader
) -> None:
    factory = otel_factory
    hub = EventHub()
    with instrument(factory, hub=hub, meter_provider=MeterProvider(metric_readers=[reader])):
        ids = await load(factory, users=8, rounds=5)  # 8 users on a pool of 2: waits
        collected = collect(reader)

    # every metric of the table, with its unit and instrument
    assert set(collected) == {
        metric.name for metric in METRICS if not metric.name.startswith("reqscope.agents.")
    }
    for name, (unit, data_type, monotonic) in SEMCONV_POOL_METRICS.items():
        assert collected[name].unit == unit, name
        assert isinstance(collected[name].data, data_type), name
        if monotonic is not None:
            assert collected[name].data.is_monotonic is monotonic, name
    for metric in METRICS:
        if metric.name not in collected:
            continue  # reqscope.agents.*: without an agent factory
        data = collected[metric.name].data
        expected = {
            "counter": Sum,
            "updowncounter": Sum,
            "gauge": Gauge,
            "histogram": Histogram,
        }[metric.kind]
        assert isinstance(data, expected), metric.name
        assert collected[metric.name].unit == metric.unit
        # every point names the pool, and carries only the attributes the table says
        for point in points(collected[metric.name]):
            assert point.attributes[POOL_NAME] == factory.name
            assert set(point.attributes) == {POOL_NAME, *metric.attributes}, metric.name
            # never a user or a request id (unbounded cardinality)
            assert not set(point.attributes.values()) & set(ids)

    # the values are the factory's
    metrics = factory.metrics()
    assert metrics.pool is not None
    assert value(collected["reqscope.sessions.opened"]) == metrics.sessions_opened == 40
    assert value(collected["reqscope.sessions.active"]) == 0
    assert value(collected["db.client.connection.max"]) == metrics.pool.capacity == 2
    assert value(collected["db.client.connection.idle.max"]) == 2
    assert value(collected["db.client.connection.idle.min"]) == 0
    count = collected["db.client.connection.count"]
    assert value(count, **{"db.client.connection.state": "used"}) == 0
    assert value(count, **{"db.client.connection.state": "idle"}) == metrics.pool.checked_in
    assert value(collected["db.client.connection.pending_requests"]) == 0
    assert value(collected["db.client.connection.timeouts"]) == 0
    breaker = collected["reqscope.breaker.state"]
    assert value(breaker, **{"reqscope.breaker.state": "closed"}) == 1
    assert value(breaker, **{"reqscope.breaker.state": "open"}) == 0
    assert value(collected["reqscope.events.connections"]) == 0
    # each session used a connection once; the pool made 2; the waits are the pool's own
    (use,) = points(collected["db.client.connection.use_time"])
    assert use.count == 40
    (create,) = points(collected["db.client.connection.create_time"])
    assert create.count == 2
    assert 0 < create.sum < 10
    (wait,) = points(collected["db.client.connection.wait_time"])
    assert wait.count == metrics.pool.waits > 0
    assert wait.sum == pytest.approx(metrics.pool.wait_seconds, abs=0.01)
    assert list(wait.explicit_bounds)[:3] == [0.001, 0.0025, 0.005]  # seconds


async def test_levels_are_read_while_sessions_are_open(
    otel_factory: IsolatedSessionFactory, reader: InMemoryMetricReader
) -> None:
    factory = otel_factory
    alice = UserExecutionContext.create("alice")
    with instrument(factory, meter_provider=MeterProvider(metric_readers=[reader])):
        async with factory.session(alice) as session:
            await session.execute(sa.text("SELECT 1"))
            collected = collect(reader)
            assert value(collected["reqscope.sessions.active"]) == 1
            used = value(
                collected["db.client.connection.count"], **{"db.client.connection.state": "used"}
            )
            assert used == 1
        # a refused use counts as an isolation violation
        bob = UserExecutionContext.create("bob")
        async with factory.session(alice) as session:
            with pytest.raises(IsolationViolation), use_context(bob):
                await session.execute(sa.text("SELECT 1"))
        violations = collect(reader)["reqscope.violations"]
        assert value(violations, **{"reqscope.violation.kind": "isolation"}) == 1
        assert value(violations, **{"reqscope.violation.kind": "scope"}) == 0


async def test_a_closed_instrumentation_reports_and_times_nothing(
    otel_factory: IsolatedSessionFactory,
    reader: InMemoryMetricReader,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    factory = otel_factory
    instrumentation = instrument(
        factory,
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
    )
    instrumentation.close()
    instrumentation.close()  # twice is fine
    await load(factory, users=2, rounds=2)
    collected = collect(reader) if reader.get_metrics_data() else {}
    assert all(not points(metric) for metric in collected.values())
    assert spans.get_finished_spans() == ()


async def test_a_failing_exporter_never_fails_a_checkout(
    otel_factory: IsolatedSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    instrumentation = instrument(otel_factory, traces=False)

    def broken(*_args: object) -> None:
        raise RuntimeError("exporter down")

    instrumentation._record = broken  # type: ignore[method-assign]
    instrumentation._timings._record = broken
    with caplog.at_level(logging.ERROR, logger="reqscope"), instrumentation:
        await load(otel_factory, users=1, rounds=2)
    assert "recording db.client.connection.use_time failed" in caplog.text


# -- traces -------------------------------------------------------------------------------


async def test_a_span_per_session_scope_child_of_the_current_span(
    otel_factory: IsolatedSessionFactory,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    factory = otel_factory
    alice = UserExecutionContext.create("alice")
    tracer = tracer_provider.get_tracer("app")
    with instrument(factory, tracer_provider=tracer_provider):
        with tracer.start_as_current_span("GET /notes"):
            async with factory.begin(alice) as session:
                await session.execute(sa.text("SELECT 1"))
        with pytest.raises(ZeroDivisionError):
            async with factory.session(alice) as session:
                await session.execute(sa.text("SELECT 1"))
                1 / 0  # noqa: B018
    server, committed, failed = sorted(spans.get_finished_spans(), key=lambda s: s.start_time)
    assert committed.name == "reqscope.session"
    assert committed.parent is not None
    assert committed.parent.span_id == server.context.span_id
    assert committed.attributes["reqscope.request_id"] == alice.request_id
    assert "user.id" not in committed.attributes  # personal data: off by default
    assert [e.name for e in committed.events] == ["reqscope.first_statement", "reqscope.commit"]
    assert committed.status.status_code is StatusCode.UNSET
    assert failed.parent is None
    assert [e.name for e in failed.events] == [
        "reqscope.first_statement",
        "reqscope.rollback",
        "exception",
    ]
    assert failed.status.status_code is StatusCode.ERROR


async def test_user_ids_on_spans_when_asked(
    otel_factory: IsolatedSessionFactory,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    with instrument(otel_factory, tracer_provider=tracer_provider, record_user_ids=True):
        async with otel_factory.session(alice):
            pass
        async with otel_factory.session(alice) as session:
            with pytest.raises(IsolationViolation), use_context(bob):
                await session.execute(sa.text("SELECT 1"))
    unused, refused = sorted(spans.get_finished_spans(), key=lambda s: s.start_time)
    assert unused.attributes["user.id"] == "alice"
    assert [e.name for e in unused.events] == ["reqscope.rollback"]  # it ran no statement
    (violation,) = [e for e in refused.events if e.name == "reqscope.violation"]
    assert "'bob'" in violation.attributes["exception.message"]  # it names the users


async def test_leaks_and_violations_are_span_events_with_stacks(
    otel_factory: IsolatedSessionFactory,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    factory = otel_factory
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    with instrument(factory, tracer_provider=tracer_provider):
        async with factory.session(alice, max_lifetime=0.01) as session:
            await session.execute(sa.text("SELECT 1"))
            with pytest.raises(IsolationViolation), use_context(bob):
                await session.execute(sa.text("SELECT 1"))
            await anyio.sleep(0.05)
            (report,) = await factory.leak_detector.ascan()
    (span,) = spans.get_finished_spans()
    events = {event.name: event for event in span.events}
    violation = events["reqscope.violation"]
    assert violation.attributes["exception.type"] == "IsolationViolation"
    assert "exception.message" not in violation.attributes  # it names the users
    assert (
        "test_leaks_and_violations_are_span_events"
        in violation.attributes["reqscope.violation.stack"]
    )
    leak = events["reqscope.leak"]
    assert leak.attributes["reqscope.leak.reclaimed"] is report.reclaimed
    assert "test_leaks_and_violations_are_span_events" in leak.attributes["reqscope.session.stack"]


async def test_agents_and_event_drops_are_counted(
    otel_factory: IsolatedSessionFactory, reader: InMemoryMetricReader
) -> None:
    class Agent:
        def __init__(self, context: UserExecutionContext) -> None:
            self.context = context

    registry = AgentRegistry()
    registry.register("agent", Agent)
    agents = AgentInstanceFactory(registry)
    hub = EventHub(max_queue=1)
    alice = UserExecutionContext.create("alice")
    provider = MeterProvider(metric_readers=[reader])
    with instrument(otel_factory, hub=hub, agents=agents, meter_provider=provider):
        async with agents.scope(alice) as scope:
            scope.create("agent")
            scope.create("agent")
            assert value(collect(reader)["reqscope.agents.active_scopes"]) == 1
        async with hub.connect(alice):
            emitter = hub.emitter(alice)
            for n in range(3):  # a queue of 1: two dropped
                await emitter.emit("tick", {"n": n})
            collected = collect(reader)
    assert value(collected["reqscope.agents.created"]) == 2
    assert value(collected["reqscope.agents.scopes"]) == 1
    assert value(collected["reqscope.agents.active_scopes"]) == 0
    assert value(collected["reqscope.events.connections"]) == 1
    assert value(collected["reqscope.events.delivered"]) == 3
    assert value(collected["reqscope.events.dropped"]) == 2


async def test_connection_times_are_recorded_when_collected_or_when_many_are_pending(
    otel_factory: IsolatedSessionFactory,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instrumentation = instrument(
        otel_factory, meter_provider=MeterProvider(metric_readers=[reader]), traces=False
    )
    with instrumentation:
        await load(otel_factory, users=1, rounds=3)
        # kept off the request path: 3 uses of the one connection, and its creation
        assert [metric for metric, _, _ in instrumentation._pending].count(USE_TIME) == 3
        assert len(instrumentation._pending) == 4
        (use,) = points(collect(reader)["db.client.connection.use_time"])
        assert use.count == 3
        assert not instrumentation._pending
        monkeypatch.setattr(reqscope.otel, "FLUSH_AT", 2)
        await load(otel_factory, users=1, rounds=3)
        assert len(instrumentation._pending) == 1  # two were recorded at the second
    (use,) = points(collect(reader)["db.client.connection.use_time"])
    assert use.count == 6  # close() recorded the last one


async def test_without_the_pools_connect_stamp_no_create_time_is_recorded(
    otel_factory: IsolatedSessionFactory,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # _compat's fallback (REQSCOPE_COMPAT_FALLBACKS=1, or a SQLAlchemy without the stamp)
    monkeypatch.setattr(reqscope._telemetry, "connection_started_at", lambda _record: None)
    with instrument(otel_factory, meter_provider=MeterProvider(metric_readers=[reader])):
        await load(otel_factory, users=1, rounds=2)
        collected = collect(reader)
    assert "db.client.connection.create_time" not in collected  # no sample, no metric
    (use,) = points(collected[USE_TIME])
    assert use.count == 2


async def test_each_replica_is_a_pool_of_its_own(
    tmp_path: Path, reader: InMemoryMetricReader
) -> None:
    primary = await marked_sqlite(tmp_path / "primary.db", "primary")
    replica = await marked_sqlite(tmp_path / "replica.db", "replica")
    alice = UserExecutionContext.create("alice")
    async with IsolatedSessionFactory(primary, replicas=[replica], name="orders") as factory:
        with instrument(factory, meter_provider=MeterProvider(metric_readers=[reader])):
            async with factory.session(alice, read_only=True) as session:
                await session.execute(sa.text("SELECT 1"))
            collected = collect(reader)
    replica_name = str(tmp_path / "replica.db")
    pools = {p.attributes[POOL_NAME] for p in points(collected["db.client.connection.max"])}
    assert pools == {"orders", replica_name}
    (use,) = points(collected[USE_TIME])
    assert use.attributes[POOL_NAME] == replica_name
    assert value(collected["reqscope.sessions.opened"]) == 1  # counted once, for the factory
