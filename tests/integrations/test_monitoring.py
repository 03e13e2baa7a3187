"""The monitoring endpoints, in FastAPI and Starlette: Prometheus, the operator page's state."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from reqscope import (
    EventHub,
    IsolatedSessionFactory,
    PoolConfig,
    ReqscopeError,
    UserExecutionContext,
)
from reqscope._monitoring import Monitor
from reqscope._telemetry import METRICS
from reqscope.fastapi import RequestScopedDbDep, from_header, monitoring_router, setup
from reqscope.otel import instrument
from reqscope.prometheus import PrometheusMetrics, prometheus_name
from reqscope.starlette import lifespan, monitoring_routes

pytestmark = pytest.mark.anyio

HOLDER = "x-operator"


def require_operator(request: Request) -> None:
    if request.headers.get(HOLDER) != "yes":
        raise HTTPException(status_code=403, detail="operators only")


@pytest.fixture(name="monitored")
async def _monitored(tmp_path: Path) -> AsyncIterator[IsolatedSessionFactory]:
    pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=10)
    url = f"sqlite+aiosqlite:///{tmp_path / 'monitored.sqlite3'}"
    async with IsolatedSessionFactory(url, pool=pool, capture_stacks=True, name="main") as factory:
        yield factory


async def load(factory: IsolatedSessionFactory, users: int = 6) -> None:
    async def one(n: int) -> None:
        async with factory.session(UserExecutionContext.create(f"user-{n}")) as session:
            await session.execute(sa.text("SELECT 1"))
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        for n in range(users):
            group.start_soon(one, n)


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(family: Any, suffix: str = "", **labels: str) -> float:
    (value,) = [
        s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return value


async def test_fastapi_serves_a_prometheus_exposition_of_the_metric_table(
    monitored: IsolatedSessionFactory,
) -> None:
    hub = EventHub()
    app = FastAPI()
    app.include_router(
        monitoring_router(
            monitored,
            hub=hub,
            prometheus=True,
            dependencies=[Depends(require_operator)],
        )
    )
    await load(monitored)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        assert (await client.get("/reqscope/metrics")).status_code == 403
        response = await client.get("/reqscope/metrics", headers={HOLDER: "yes"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    parsed = families(response.text)  # the Prometheus text parser reads it

    # every metric of the table (the agents' only with an agent factory), under its name
    expected = {
        prometheus_name(metric)
        for metric in METRICS
        if not metric.name.startswith("reqscope.agents.")  # without an agent factory
    }
    # (prometheus-client adds a histogram's creation time as a gauge of its own)
    assert {name for name in parsed if not name.endswith("_seconds_created")} == expected
    for metric in METRICS:
        if metric.name.startswith("reqscope.agents."):
            continue
        family = parsed[prometheus_name(metric)]
        assert (
            family.type
            == {
                "counter": "counter",
                "updowncounter": "gauge",
                "gauge": "gauge",
                "histogram": "histogram",
            }[metric.kind]
        )
        for s in family.samples:
            assert s.labels["db_client_connection_pool_name"] == "main"
    metrics = monitored.metrics()
    assert metrics.pool is not None
    assert sample(parsed["reqscope_sessions_opened"], "_total") == metrics.sessions_opened == 6
    count = parsed["db_client_connection_count"]
    assert sample(count, db_client_connection_state="idle") == metrics.pool.checked_in
    assert sample(count, db_client_connection_state="used") == 0
    assert sample(parsed["db_client_connection_max"]) == 2
    breaker = parsed["reqscope_breaker_state"]
    assert sample(breaker, reqscope_breaker_state="closed") == 1
    use = parsed["db_client_connection_use_time_seconds"]
    assert sample(use, "_count") == 6
    assert sample(use, "_bucket", le="+Inf") == 6
    wait = parsed["db_client_connection_wait_time_seconds"]
    assert sample(wait, "_count") == metrics.pool.waits > 0  # 6 users on 2 connections


async def test_the_operator_state_and_page(monitored: IsolatedSessionFactory) -> None:
    app = FastAPI()
    app.include_router(
        monitoring_router(monitored, page=True, dependencies=[Depends(require_operator)])
    )
    alice = UserExecutionContext.create("alice")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers={HOLDER: "yes"}
    ) as client:
        async with monitored.session(alice, max_lifetime=0.01) as session:
            await session.execute(sa.text("SELECT 1"))
            await anyio.sleep(0.03)
            await monitored.leak_detector.ascan()
            state = (await client.get("/reqscope/state")).json()
        page = await client.get("/reqscope/")
        refused = await client.get("/reqscope/state", headers={HOLDER: "no"})
        without = (await client.get("/reqscope/metrics")).status_code
    assert refused.status_code == 403
    assert without == 404  # prometheus=False: no route
    assert state["name"] == "main"
    assert state["metrics"]["leaks_detected"] == 1
    assert state["breaker"]["state"] == "closed"
    (leak,) = state["leaks"]
    assert leak["user_id"] == "alice"
    assert "test_the_operator_state_and_page" in leak["stack"]
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'const STATE_URL = "/reqscope/state";' in html
    # one self-contained file: nothing fetched from elsewhere
    assert "<link" not in html
    assert " src=" not in html
    assert "http://" not in html
    assert "https://" not in html


async def test_starlette_routes_with_a_guard(monitored: IsolatedSessionFactory) -> None:
    async def is_operator(request: Any) -> bool:
        return request.headers.get(HOLDER) == "yes"

    app = Starlette(
        routes=[monitoring_routes(monitored, guard=is_operator, prometheus=True, page=True)],
        lifespan=lifespan(monitored),
    )
    await load(monitored, users=2)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        health = await client.get("/reqscope/health")
        refused = [
            (await client.get(f"/reqscope/{path}")).status_code
            for path in ("pool", "sessions", "metrics", "state", "")
        ]
        operator = {HOLDER: "yes"}
        pool = (await client.get("/reqscope/pool", headers=operator)).json()
        sessions = (await client.get("/reqscope/sessions", headers=operator)).json()
        metrics = await client.get("/reqscope/metrics", headers=operator)
        page = await client.get("/reqscope/", headers=operator)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert refused == [403] * 5
    assert pool["sessions_opened"] == 2
    assert sessions == []
    assert sample(families(metrics.text)["reqscope_sessions_opened"], "_total") == 2
    assert 'const STATE_URL = "/reqscope/state";' in page.text


async def test_a_sync_guard_and_an_open_starlette_monitor(
    monitored: IsolatedSessionFactory,
) -> None:
    closed = Starlette(routes=[monitoring_routes(monitored, guard=lambda _request: False)])
    open_ = Starlette(routes=[monitoring_routes(monitored, prefix="/ops")])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=closed), base_url="http://t"
    ) as c:
        assert (await c.get("/reqscope/pool")).status_code == 403
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=open_), base_url="http://t"
    ) as c:
        assert (await c.get("/ops/pool")).status_code == 200
        assert (await c.get("/ops/metrics")).status_code == 404


async def test_prometheus_without_its_client_says_what_to_install(
    monitored: IsolatedSessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "reqscope.prometheus", None)
    with pytest.raises(ReqscopeError, match=r'pip install "reqscope\[prometheus\]"'):
        Monitor(monitored, prometheus=True)
    with pytest.raises(ReqscopeError, match="make the monitor with prometheus=True"):
        Monitor(monitored).metrics_text()


async def test_one_registry_refuses_a_second_exporter_and_close_frees_it(
    monitored: IsolatedSessionFactory,
) -> None:
    first = PrometheusMetrics(monitored)
    with pytest.raises(ReqscopeError, match="one PrometheusMetrics per registry") as refused:
        PrometheusMetrics(monitored, registry=first.registry)
    assert isinstance(refused.value.__cause__, ValueError)
    assert "Duplicated" in str(refused.value.__cause__)
    first.close()
    first.close()  # twice is fine
    second = PrometheusMetrics(monitored, registry=first.registry)  # the names are free again
    await load(monitored, users=1)
    parsed = families(second.exposition().decode())
    assert sample(parsed["db_client_connection_use_time_seconds"], "_count") == 1
    second.close()


def test_the_docs_list_every_metric_and_the_dashboard_reads_only_them() -> None:
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "observability.md").read_text()
    for metric in METRICS:
        suffix = "_total" if metric.kind == "counter" else ""
        assert f"| `{metric.name}` |" in page, metric.name
        assert f"`{prometheus_name(metric)}{suffix}`" in page, metric.name
    dashboard = json.loads((root / "docs" / "grafana" / "reqscope-dashboard.json").read_text())
    known = {prometheus_name(metric) for metric in METRICS}
    series = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:db_client|reqscope)_[a-z_]+)\b", target["expr"])
    }
    labels = {"db_client_connection_pool_name", "db_client_connection_state"} | {
        "reqscope_violation_kind",
        "reqscope_breaker_state",
    }
    for name in series - labels:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert name in known or base in known, name
    assert len(series) >= 12


async def test_a_request_session_span_is_a_child_of_the_server_span(
    monitored: IsolatedSessionFactory,
) -> None:
    # As OpenTelemetry's ASGI instrumentation does: the outermost middleware makes the
    # server span current for the whole request, dependencies included.
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("asgi")
    app = FastAPI()
    setup(app, monitored, user_resolver=from_header("x-user"))

    @app.middleware("http")
    async def server_span(request: Request, call_next: Any) -> Any:
        with tracer.start_as_current_span(f"{request.method} {request.url.path}"):
            return await call_next(request)

    @app.get("/notes")
    async def notes(session: RequestScopedDbDep) -> dict[str, int]:
        return {"one": (await session.execute(sa.text("SELECT 1"))).scalar_one()}

    with instrument(monitored, tracer_provider=provider, record_user_ids=True):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            response = await client.get("/notes", headers={"x-user": "alice"})
    assert response.json() == {"one": 1}
    server, session = sorted(spans.get_finished_spans(), key=lambda span: span.name)
    assert (server.name, session.name) == ("GET /notes", "reqscope.session")
    assert session.parent is not None
    assert session.parent.span_id == server.context.span_id
    assert session.attributes["user.id"] == "alice"
    assert session.attributes["reqscope.request_id"] == response.headers["x-request-id"]
