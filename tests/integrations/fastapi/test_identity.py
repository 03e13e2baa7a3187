"""FastAPI as its tutorial writes it: the user from an auth dependency, commits, routes, errors.

Every test runs on each database of the ``database`` fixture (SQLite, and the servers when
configured) unless it is about something no database changes.
"""

# No `from __future__ import annotations`: like most FastAPI apps, the endpoints here use
# local Annotated aliases, which FastAPI resolves only from real annotations.
import logging
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import ForeignKey, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models import Note
from reqscope import (
    CircuitBreaker,
    CircuitOpenError,
    IsolatedSessionFactory,
    NotAuthenticated,
    current_context,
    session_tags,
)
from reqscope.fastapi import (
    CommitOnSuccessDbDep,
    RequestScopedContextDep,
    RequestScopedDbDep,
    authenticated,
    session_lifetime,
    setup,
)

pytestmark = pytest.mark.anyio


def client_for(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def count_notes(factory: IsolatedSessionFactory, body: str) -> int:
    """Rows with ``body``, read through a fresh session of another request."""
    from reqscope import UserExecutionContext

    async with factory.session(UserExecutionContext.create("auditor")) as session:
        query = select(func.count()).select_from(Note).where(Note.body == body)
        return int(await session.scalar(query) or 0)


# -- 1. the user from the app's authentication dependency ---------------------------------


async def token_user_async(
    db: RequestScopedDbDep, authorization: Annotated[str | None, Header()] = None
) -> str:
    # As the tutorial's get_current_user does, the user is looked up with the request's
    # session, before the request knows its user.
    tags = session_tags(db)
    assert tags.user_id.startswith("anonymous:")
    await db.execute(text("SELECT 1"))
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return authorization.removeprefix("Bearer ")


def token_user_sync(authorization: Annotated[str | None, Header()] = None) -> str:
    if authorization is None:
        raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return authorization.removeprefix("Bearer ")


@pytest.mark.parametrize("dependency", [token_user_async, token_user_sync])
async def test_the_auth_dependency_is_the_requests_user(
    factory: IsolatedSessionFactory, dependency: Callable[..., Any]
) -> None:
    UserId = Annotated[str, authenticated(dependency)]  # noqa: N806
    seen: dict[str, Any] = {}
    app = FastAPI()
    setup(app, factory)

    @app.get("/me")
    async def me(
        user: UserId, db: RequestScopedDbDep, ctx: RequestScopedContextDep, tasks: BackgroundTasks
    ) -> StreamingResponse:
        await db.execute(text("SELECT 1"))
        seen["tags"] = session_tags(db).user_id
        seen["endpoint"] = current_context().user_id
        seen["ctx"] = ctx.user_id
        tasks.add_task(lambda: seen.setdefault("background", current_context().user_id))

        async def body() -> AsyncIterator[bytes]:
            seen["stream"] = current_context().user_id
            await db.execute(text("SELECT 1"))  # the stream keeps the user's session
            yield user.encode()

        return StreamingResponse(body())

    async with client_for(app) as client:
        response = await client.get("/me", headers={"Authorization": "Bearer alice"})
        refused = await client.get("/me")
    assert response.status_code == 200
    assert response.text == "alice"
    assert seen == {
        "tags": "alice",
        "endpoint": "alice",
        "ctx": "alice",
        "stream": "alice",
        "background": "alice",
    }
    # The app's own 401 goes through the app's own handling, header and all.
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"


async def test_overriding_the_auth_dependency_in_tests_still_identifies(factory) -> None:
    app = FastAPI()
    setup(app, factory)

    @app.get("/me")
    async def me(user: Annotated[str, authenticated(token_user_sync)], db: RequestScopedDbDep):
        return {"user": user, "owner": session_tags(db).user_id}

    app.dependency_overrides[token_user_sync] = lambda: "bob"
    async with client_for(app) as client:
        assert (await client.get("/me")).json() == {"user": "bob", "owner": "bob"}


async def test_a_request_never_changes_user(factory, caplog) -> None:
    def other() -> str:
        return "mallory"

    app = FastAPI()
    setup(app, factory)

    @app.get("/")
    async def both(
        first: Annotated[str, authenticated(token_user_sync)],
        second: Annotated[str, authenticated(other)],
    ) -> str:
        return "unreachable"

    async with client_for(app) as client:
        response = await client.get("/", headers={"Authorization": "Bearer alice"})
    assert response.status_code == 500
    assert "cannot become user 'mallory'" in caplog.text


async def test_a_user_dependency_returning_no_user_id_is_a_500(factory, caplog) -> None:
    def broken() -> int:
        return 42

    app = FastAPI()
    setup(app, factory)

    @app.get("/")
    async def index(user: Annotated[int, authenticated(broken)]) -> int:
        return user

    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 500
    assert "broken returned int, not a user id" in caplog.text


class StateAuth:
    """A pure-ASGI authentication middleware: ``request.state.user_id`` from a header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-user":
                    scope.setdefault("state", {})["user_id"] = value.decode()
        await self.app(scope, receive, send)


@pytest.mark.parametrize("auth_added", ["before setup()", "after setup()"])
async def test_middleware_order_does_not_matter(factory, auth_added: str) -> None:
    app = FastAPI()
    if auth_added == "before setup()":  # runs inside reqscope's middleware
        app.add_middleware(StateAuth)
        setup(app, factory)
    else:  # runs first
        setup(app, factory)
        app.add_middleware(StateAuth)

    @app.get("/")
    async def index(ctx: RequestScopedContextDep, db: RequestScopedDbDep) -> list[str]:
        return [ctx.user_id, session_tags(db).user_id]

    async with client_for(app) as client:
        assert (await client.get("/", headers={"x-user": "alice"})).json() == ["alice", "alice"]
        assert (await client.get("/")).status_code == 401


# -- 2. commits that cannot be lost --------------------------------------------------------


async def test_commit_on_success_and_you_commit(factory, tables) -> None:
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)

    @app.post("/commit-on-success")
    async def on_success(body: str, db: CommitOnSuccessDbDep) -> str:
        db.add(Note(user_id="alice", body=body))
        return body

    @app.post("/commit-on-success/fails")
    async def on_success_then_fails(body: str, db: CommitOnSuccessDbDep) -> str:
        db.add(Note(user_id="alice", body=body))
        raise HTTPException(409, "no")

    @app.post("/you-commit")
    async def you_commit(body: str, db: RequestScopedDbDep, commit: bool = False) -> str:
        db.add(Note(user_id="alice", body=body))
        await db.flush()
        if commit:
            await db.commit()
        return body

    async with client_for(app) as client:
        assert (await client.post("/commit-on-success?body=a")).status_code == 200
        assert (await client.post("/commit-on-success/fails?body=b")).status_code == 409
        assert (await client.post("/you-commit?body=c")).status_code == 200
        assert (await client.post("/you-commit?body=d&commit=true")).status_code == 200
    assert [await count_notes(factory, body) for body in "abcd"] == [1, 0, 0, 1]


class DeferredBase(DeclarativeBase):
    pass


class Parent(DeferredBase):
    __tablename__ = "reqscope_test_deferred_parents"
    id: Mapped[int] = mapped_column(primary_key=True)


class Child(DeferredBase):
    __tablename__ = "reqscope_test_deferred_children"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Checked at COMMIT, not at INSERT: the commit itself fails.
    parent_id: Mapped[int] = mapped_column(
        ForeignKey(Parent.id, deferrable=True, initially="DEFERRED")
    )


async def test_a_commit_that_fails_is_the_clients_error(database, factory) -> None:
    if database.backend == "mysql":
        pytest.skip("MariaDB has no deferred constraints")
    if database.backend == "sqlite":

        @sqlalchemy_event_connect(factory)
        def _foreign_keys(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        await factory.engine.dispose()  # no connection made before the pragma

    async with factory.engine.begin() as conn:
        await conn.run_sync(DeferredBase.metadata.drop_all)
        await conn.run_sync(DeferredBase.metadata.create_all)
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)

    @app.post("/children")
    async def add_orphan(db: CommitOnSuccessDbDep) -> dict[str, str]:
        db.add(Child(id=1, parent_id=999))  # no such parent: the commit will fail
        await db.flush()
        return {"stored": "so it says"}

    try:
        async with client_for(app) as client:
            response = await client.post("/children")
        assert response.status_code == 500  # not a 200 for a write that was lost
        async with factory.engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(Child)) == 0
    finally:
        async with factory.engine.begin() as conn:
            await conn.run_sync(DeferredBase.metadata.drop_all)


def sqlalchemy_event_connect(factory: IsolatedSessionFactory) -> Callable[..., Any]:
    from sqlalchemy import event

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        event.listen(factory.engine.sync_engine, "connect", fn)
        return fn

    return register


async def test_what_a_stream_writes_is_committed_before_its_last_chunk(factory, tables) -> None:
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)

    @app.get("/stream")
    async def stream(db: CommitOnSuccessDbDep) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"working "
            db.add(Note(user_id="alice", body="streamed"))
            await db.flush()
            yield b"done"

        return StreamingResponse(body())

    async with client_for(app) as client:
        assert (await client.get("/stream")).text == "working done"
    assert await count_notes(factory, "streamed") == 1


# -- 3. public routes, anonymous users, ids and errors -------------------------------------


async def test_public_routes_per_method_and_an_anonymous_user_per_request(factory, tables) -> None:
    users: list[str] = []
    app = FastAPI()
    setup(app, factory, public_paths=["GET /notes"])

    @app.get("/notes")
    async def read(db: RequestScopedDbDep) -> int:
        users.append(session_tags(db).user_id)
        return int(await db.scalar(select(func.count()).select_from(Note)) or 0)

    @app.post("/notes")
    async def write(db: CommitOnSuccessDbDep) -> str:
        db.add(Note(user_id="nobody", body="anonymous write"))
        return "stored?"

    @app.get("/notes-admin")
    async def admin(db: RequestScopedDbDep) -> str:
        await db.execute(text("SELECT 1"))
        return "admin"

    async with client_for(app) as client:
        assert (await client.get("/notes")).status_code == 200
        assert (await client.get("/notes/")).status_code in {200, 307}
        assert (await client.get("/notes")).status_code == 200
        refused = await client.post("/notes")
        assert (await client.get("/notes-admin")).status_code == 401  # not under /notes
    assert refused.status_code == 401
    assert "public_paths" in refused.json()["detail"]
    assert await count_notes(factory, "anonymous write") == 0
    assert len(users) >= 2
    assert all(user.startswith("anonymous:") for user in users)
    assert len(set(users)) == len(users)  # each anonymous request is a user of its own


def test_public_path_entries_are_checked() -> None:
    from reqscope._asgi import PublicRoutes

    public = PublicRoutes.parse(["GET /articles", "/health", "post /users/"])
    assert public("GET", "/articles/7")
    assert not public("POST", "/articles")
    assert not public("GET", "/articles-admin")
    assert public("DELETE", "/health")
    assert public("POST", "/users")
    with pytest.raises(ValueError, match="GET /articles"):
        PublicRoutes.parse(["articles"])


@pytest.mark.parametrize(
    ("resolver", "status", "logged"),
    [
        (lambda _c: 1 / 0, 500, "raised ZeroDivisionError"),
        (lambda _c: 42, 500, "returned int, not a user id"),
        (lambda _c: "", 500, "returned an invalid user id"),
    ],
    ids=["raises", "not-a-str", "invalid-id"],
)
async def test_a_broken_resolver_is_a_logged_500(factory, caplog, resolver, status, logged):
    app = FastAPI()
    setup(app, factory, user_resolver=resolver)

    @app.get("/")
    async def index(ctx: RequestScopedContextDep) -> str:
        return ctx.user_id

    with caplog.at_level(logging.ERROR, logger="reqscope"):
        async with client_for(app) as client:
            response = await client.get("/")
    assert response.status_code == status
    assert logged in caplog.text
    assert "Internal Server Error" in response.text  # nothing about the bug for the client


async def test_a_resolver_may_refuse_with_not_authenticated(factory) -> None:
    def resolver(_connection: Any) -> str:
        raise NotAuthenticated("token expired")

    app = FastAPI()
    setup(app, factory, user_resolver=resolver)
    app.get("/")(lambda: "x")
    async with client_for(app) as client:
        response = await client.get("/")
    assert response.status_code == 401
    assert response.json() == {"detail": "token expired"}


async def test_a_database_that_is_down_is_a_503_with_retry_after() -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=30)
    factory = IsolatedSessionFactory(
        "postgresql+asyncpg://postgres@127.0.0.1:1/none", circuit_breaker=breaker
    )
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)

    @app.get("/")
    async def index(db: RequestScopedDbDep) -> str:
        await db.execute(text("SELECT 1"))
        return "up"

    async with app.router.lifespan_context(app), client_for(app) as client:
        down = await client.get("/")  # the connection fails: the circuit opens
        open_ = await client.get("/")  # refused by the open circuit
        app.add_exception_handler(  # an app's own handler wins
            CircuitOpenError, lambda _r, _e: JSONResponse({"mine": True}, status_code=503)
        )
        app.middleware_stack = None  # rebuilt with the new handler on the next request
        overridden = await client.get("/")
    assert down.status_code == 503
    assert 25 <= int(down.headers["retry-after"]) <= 30
    assert open_.status_code == 503
    assert 25 <= int(open_.headers["retry-after"]) <= 30
    assert overridden.json() == {"mine": True}


async def test_the_client_request_id_is_on_every_tag_and_log_line(factory, caplog) -> None:
    app = FastAPI()
    setup(app, factory)
    seen: dict[str, str] = {}

    @app.get("/")
    async def index(
        user: Annotated[str, authenticated(token_user_sync)],
        db: RequestScopedDbDep,
        ctx: RequestScopedContextDep,
    ) -> str:
        seen["request"] = session_tags(db).request_id
        async with factory.session(ctx.child("audit")) as child:
            tags = session_tags(child)
            seen["child_root"] = tags.root_request_id
        return user

    with caplog.at_level(logging.DEBUG, logger="reqscope"):
        async with client_for(app) as client:
            response = await client.get(
                "/", headers={"Authorization": "Bearer alice", "X-Request-ID": "trace-7"}
            )
    assert response.headers["x-request-id"] == "trace-7"
    assert seen == {"request": "trace-7", "child_root": "trace-7"}
    records = [r for r in caplog.records if hasattr(r, "root_request_id")]
    assert records  # the identification, at least
    assert {r.root_request_id for r in records} == {"trace-7"}  # type: ignore[attr-defined]


# -- 4. lifetimes ------------------------------------------------------------------------


@pytest.mark.parametrize("lifetime", [None, 30.0])
async def test_a_long_stream_keeps_its_session_with_a_route_lifetime(database, lifetime) -> None:
    factory = IsolatedSessionFactory(
        database.url, max_session_lifetime=0.05, leak_check_interval=0.01
    )
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)
    route_dependencies = [] if lifetime is None else [session_lifetime(lifetime)]
    outcome: dict[str, str] = {}

    @app.get("/stream", dependencies=route_dependencies)
    async def stream(db: RequestScopedDbDep) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"start "
            await anyio.sleep(0.3)  # an LLM answering, longer than max_session_lifetime
            try:
                await db.execute(text("SELECT 1"))
                outcome["session"] = "kept"
            except Exception as exc:
                outcome["session"] = type(exc).__name__
            yield b"end"

        return StreamingResponse(body())

    async with app.router.lifespan_context(app), client_for(app) as client:
        await client.get("/stream")
    expected = "SessionReclaimedError" if lifetime is None else "kept"
    assert outcome == {"session": expected}


async def test_a_lifetime_set_after_the_session_opened_is_refused(factory) -> None:
    app = FastAPI()
    setup(app, factory, allow_anonymous=True)

    @app.get("/")
    async def index(db: RequestScopedDbDep, request: Request) -> str:
        from reqscope.starlette import get_resources

        with pytest.raises(Exception, match="already open"):
            get_resources(request).set_lifetime(10)
        return "ok"

    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200


# -- 5. the examples' server -------------------------------------------------------------


def test_the_dev_install_serves_websockets() -> None:
    # The chat example's WebSocket answered 404 after `pip install -e ".[dev]"`: uvicorn
    # had no WebSocket implementation ("No supported WebSocket library detected").
    uvicorn = pytest.importorskip("uvicorn")
    config = uvicorn.Config(app=FastAPI(), ws="auto")
    with warnings.catch_warnings():  # an older uvicorn imports websockets' legacy API
        warnings.simplefilter("ignore", DeprecationWarning)
        config.load()
    assert config.ws_protocol_class is not None
