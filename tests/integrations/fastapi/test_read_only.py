"""ReadOnlyDbDep: a route's session on a read replica, the primary once the request wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request

from conftest import marked_sqlite
from reqscope import IsolatedSessionFactory, ReqscopeError
from reqscope.fastapi import (
    CommitOnSuccessDbDep,
    ReadOnlyDbDep,
    RequestScopedContextDep,
    commit_on_success_session,
    from_header,
    setup,
)

pytestmark = pytest.mark.anyio

WHERE = sa.text("SELECT name FROM whereami")


@pytest.fixture(name="client")
async def _client(
    tmp_path: Path,
) -> AsyncIterator[tuple[httpx.AsyncClient, IsolatedSessionFactory]]:
    primary = await marked_sqlite(tmp_path / "primary.db", "primary")
    replica = await marked_sqlite(tmp_path / "replica.db", "replica")
    factory = IsolatedSessionFactory(primary, replicas=[replica])
    app = FastAPI()
    setup(app, factory, user_resolver=from_header("x-user"))

    @app.get("/where")
    async def where(db: ReadOnlyDbDep, ctx: RequestScopedContextDep) -> dict:
        return {"where": (await db.execute(WHERE)).scalar_one(), "user": ctx.user_id}

    @app.post("/write-then-read")
    async def write_then_read(db: CommitOnSuccessDbDep, reader: ReadOnlyDbDep) -> dict:
        await db.execute(sa.text("UPDATE whereami SET name = 'written'"))
        # the request's one session, on the primary: the read sees the write
        return {"where": (await reader.execute(WHERE)).scalar_one(), "same": reader is db}

    @app.post("/read-then-write")
    async def read_then_write(reader: ReadOnlyDbDep, request: Request) -> dict:
        try:  # a dependency that may write, after the read-only session opened
            await commit_on_success_session(request)
        except ReqscopeError as error:
            return {"refused": str(error)}
        return {"refused": None}

    async with app.router.lifespan_context(app), factory:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, factory
    assert factory.metrics().active_sessions == 0


async def test_a_read_only_route_reads_the_replica(client) -> None:
    http, factory = client
    response = await http.get("/where", headers={"x-user": "alice"})
    assert response.json() == {"where": "replica", "user": "alice"}
    assert factory.metrics().replica_sessions == 1


async def test_a_route_that_writes_reads_its_writes_on_the_primary(client) -> None:
    http, factory = client
    response = await http.post("/write-then-read", headers={"x-user": "alice"})
    assert response.json() == {"where": "written", "same": True}
    assert factory.metrics().replica_sessions == 0
    # committed on the primary; a later read-only request reads the replica (its own file)
    assert (await http.get("/where", headers={"x-user": "bob"})).json()["where"] == "replica"


async def test_a_writer_after_the_read_only_session_is_refused(client) -> None:
    http, _ = client
    response = await http.post("/read-then-write", headers={"x-user": "alice"})
    assert "opened read-only" in response.json()["refused"]
