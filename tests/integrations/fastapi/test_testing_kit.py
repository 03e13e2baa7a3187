"""A FastAPI app's suite as its users write it: per-test rollback, overrides, identities.

The schema is created once per database; every test posts a note and then expects to see
exactly one note in the whole table. If any write survived a test, the next test on the
same database (whichever runs second, in any order) would see two and fail.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' real annotations.
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio
import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from conftest import server_url
from reqscope import IsolatedSessionFactory, UserExecutionContext
from reqscope.fastapi import (
    CommitOnSuccessDbDep,
    RequestScopedDbDep,
    authenticated,
    commit_on_success_session,
    request_context,
    request_session,
    session_lifetime,
    setup,
)
from reqscope.testing import acting_as, record_sessions

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "reqscope_kit_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))


def get_current_user(authorization: Annotated[str | None, Header()] = None) -> str:
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return authorization.removeprefix("Bearer ")


CurrentUser = Annotated[str, authenticated(get_current_user)]


async def get_current_user_from_db(
    db: RequestScopedDbDep, authorization: Annotated[str | None, Header()] = None
) -> str:
    """As the tutorial's: the user is looked up with the request's session."""
    await db.scalar(select(func.count()).select_from(Item))
    return get_current_user(authorization)


DbUser = Annotated[str, authenticated(get_current_user_from_db)]


def make_app(factory: IsolatedSessionFactory) -> FastAPI:
    app = FastAPI()
    setup(app, factory)

    @app.post("/items")
    async def add(user: CurrentUser, db: CommitOnSuccessDbDep, name: str) -> dict[str, str]:
        db.add(Item(user_id=user, name=name))
        return {"user": user}

    @app.get("/items/count")
    async def count(user: CurrentUser, db: RequestScopedDbDep) -> dict[str, int]:
        # Every user's items: the test checks that nothing of an earlier test is left.
        return {"count": int(await db.scalar(select(func.count()).select_from(Item)) or 0)}

    @app.get("/whoami")
    async def whoami(user: DbUser, db: RequestScopedDbDep) -> dict[str, str]:
        return {"user": user}

    @app.get("/slow", dependencies=[session_lifetime(0.05)])
    async def slow(user: CurrentUser, db: RequestScopedDbDep) -> dict[str, bool]:
        await db.scalar(select(func.count()).select_from(Item))
        await anyio.sleep(0.5)  # held past its lifetime: the leak detector must see it
        return {"ok": True}

    return app


async def create_schema(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
    finally:
        await engine.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", "postgres-asyncpg", "postgres-psycopg", "mysql-asyncmy"]
)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One database per module and parameter, its schema created once."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('kit') / 'app.sqlite3'}"
    else:
        url = server_url(request.param)
    anyio.run(create_schema, url)
    return url


# -- with httpx.AsyncClient over ASGITransport (no lifespan), through the plugin's fixtures --


@pytest.fixture
async def reqscope_factory(database_url: str) -> AsyncIterator[IsolatedSessionFactory]:
    """The app's factory, handed to the reqscope plugin (which rolls back its transaction)."""
    async with IsolatedSessionFactory(database_url) as factory:
        yield factory


@pytest.fixture
async def client(
    reqscope_factory: IsolatedSessionFactory, reqscope_transaction: object
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(reqscope_factory))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def post_and_count(client: httpx.AsyncClient, user: str) -> int:
    headers = {"Authorization": f"Bearer {user}"}
    response = await client.post("/items", params={"name": "x"}, headers=headers)
    assert response.status_code == 200, response.text
    counted = await client.get("/items/count", headers=headers)
    assert counted.status_code == 200, counted.text
    return int(counted.json()["count"])


@pytest.mark.parametrize("user", ["alice", "bob"])
async def test_each_test_starts_from_an_empty_table(client: httpx.AsyncClient, user: str) -> None:
    assert await post_and_count(client, user) == 1


async def test_two_requests_in_one_test_see_each_other(client: httpx.AsyncClient) -> None:
    assert await post_and_count(client, "alice") == 1
    assert await post_and_count(client, "bob") == 2


async def test_after_the_test_nothing_is_left(database_url: str) -> None:
    async with IsolatedSessionFactory(database_url) as factory:
        async with factory.outer_transaction():
            app = make_app(factory)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert await post_and_count(client, "carol") == 1
        async with factory.session(UserExecutionContext.create("auditor")) as session:
            assert await session.scalar(select(func.count()).select_from(Item)) == 0


# -- with TestClient (its own event loop in a thread: the transaction is opened there) -----


@pytest.fixture
def test_client(database_url: str) -> Iterator[object]:
    factory = IsolatedSessionFactory(database_url)
    with (
        TestClient(make_app(factory)) as client,
        client.portal.wrap_async_context_manager(factory.outer_transaction()),
    ):
        yield client


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_test_client_starts_from_an_empty_table(test_client, user: str) -> None:
    headers = {"Authorization": f"Bearer {user}"}
    assert test_client.post("/items", params={"name": "x"}, headers=headers).status_code == 200
    assert test_client.get("/items/count", headers=headers).json() == {"count": 1}


# -- overrides and identities ----------------------------------------------------------


async def test_acting_as_a_user_and_asserting_who_ran(database_url: str) -> None:
    async with IsolatedSessionFactory(database_url) as factory, factory.outer_transaction():
        app = make_app(factory)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with acting_as(app, get_current_user, "dave"), record_sessions(factory) as log:
                response = await client.post("/items", params={"name": "x"})  # no header
            assert response.json() == {"user": "dave"}
            log.assert_ran_as("dave")
            assert get_current_user not in app.dependency_overrides  # restored
            with pytest.raises(AssertionError, match=r"run as 'erin', not session .* as 'dave'"):
                log.assert_ran_as("erin")
            assert (await client.post("/items", params={"name": "x"})).status_code == 401


async def test_a_session_opened_before_authentication_counts_as_the_identified_user(
    database_url: str,
) -> None:
    async with IsolatedSessionFactory(database_url) as factory:
        transport = httpx.ASGITransport(app=make_app(factory))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with record_sessions(factory) as log:
                response = await client.get("/whoami", headers={"Authorization": "Bearer amy"})
        assert response.json() == {"user": "amy"}
        assert log.user_ids == ["amy"]
        log.assert_ran_as("amy")


async def test_every_dependency_has_a_public_override_key(database_url: str) -> None:
    seen: list[object] = []

    async with IsolatedSessionFactory(database_url) as factory:
        app = make_app(factory)

        async def fake_session() -> AsyncSession:
            session = AsyncSession()
            seen.append(session)
            return session

        for key in (commit_on_success_session, request_session):
            app.dependency_overrides[key] = fake_session
        app.dependency_overrides[request_context] = lambda: UserExecutionContext.create("x")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Authorization": "Bearer alice"}
            response = await client.post("/items", params={"name": "x"}, headers=headers)
        assert response.status_code == 200
        assert len(seen) == 1  # the override's session, not the factory's
        assert factory.metrics().sessions_opened == 0


async def test_a_suite_that_never_runs_the_lifespan_still_has_a_leak_detector(
    database_url: str,
) -> None:
    # Nobody starts it: no lifespan here. A pass of the leak detector every 10 ms.
    factory = IsolatedSessionFactory(database_url, leak_check_interval=0.01)
    transport = httpx.ASGITransport(app=make_app(factory))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/slow", headers={"Authorization": "Bearer alice"})
    assert response.status_code == 200
    assert factory.metrics().leaks_detected >= 1
    await factory.aclose()


def test_record_sessions_needs_a_session() -> None:
    from reqscope.testing import SessionLog

    with pytest.raises(AssertionError, match="no reqscope session"):
        SessionLog().assert_ran_as("alice")
