"""The tutorial-style example: OAuth2 + JWT, get_current_user on the request's session.

Written the way a FastAPI suite is: one app, a ``with TestClient(app)`` per test (so the
app's lifespan, and the factory with it, starts and stops once per test).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import settings

from example_loader import load_example
from reqscope import IsolatedSessionFactory, UserExecutionContext
from reqscope.testing import IsolationMachine

tutorial = load_example("fastapi_tutorial/app.py", "example_fastapi_tutorial")


@pytest.fixture(scope="module", name="app")
def _app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    path = Path(tmp_path_factory.mktemp("tutorial")) / "app.sqlite3"
    app: FastAPI = tutorial.create_app(f"sqlite+aiosqlite:///{path}", secret_key="k" * 32)
    return app


@pytest.fixture(name="client")
def _client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:  # the lifespan, once per test
        yield client


def sign_up_and_log_in(client: TestClient, username: str) -> dict[str, str]:
    created = client.post("/users", json={"username": username, "password": "pw-" + username})
    assert created.status_code in {201, 409}
    token = client.post("/token", data={"username": username, "password": "pw-" + username})
    assert token.status_code == 200, token.text
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def test_the_user_comes_from_get_current_user(client: TestClient) -> None:
    alice = sign_up_and_log_in(client, "alice")
    me = client.get("/users/me", headers=alice)
    assert me.status_code == 200
    # the context (and the session get_current_user used) is alice's, not an anonymous one
    assert me.json() == {"username": "alice", "request_user": "alice"}


def test_public_reads_and_authenticated_writes_on_one_path(client: TestClient) -> None:
    bob = sign_up_and_log_in(client, "bob")
    written = client.post("/articles", json={"title": "hello"}, headers=bob)
    assert written.status_code == 201
    # GET /articles is public, POST /articles is not: the app's own 401, with its header
    assert any(a["title"] == "hello" for a in client.get("/articles").json())
    anonymous = client.post("/articles", json={"title": "spam"})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    forged = client.post("/articles", json={"title": "x"}, headers={"Authorization": "Bearer x"})
    assert forged.status_code == 401


def test_writes_persist_and_notes_stay_private(client: TestClient) -> None:
    carol = sign_up_and_log_in(client, "carol")
    dave = sign_up_and_log_in(client, "dave")
    assert client.post("/notes", json={"body": "carol's secret"}, headers=carol).status_code == 201
    assert client.get("/notes", headers=carol).json() == ["carol's secret"]
    assert client.get("/notes", headers=dave).json() == []


def test_only_operators_see_live_sessions(client: TestClient) -> None:
    erin = sign_up_and_log_in(client, "erin")
    assert client.get("/reqscope/sessions", headers=erin).status_code == 403
    assert client.get("/reqscope/sessions").status_code == 401
    assert client.get("/reqscope/health").json()["status"] == "ok"


def test_the_lifespan_runs_again_in_the_next_test(client: TestClient) -> None:
    # Every test above entered and left the lifespan; the factory still serves this one.
    frank = sign_up_and_log_in(client, "frank")
    assert client.get("/users/me", headers=frank).status_code == 200


class TutorialMachine(IsolationMachine):
    """Random interleavings of users writing and reading their private notes over HTTP."""

    users = ("alice", "bob", "carol")

    async def create_factory(self) -> IsolatedSessionFactory:
        self.app = tutorial.create_app(secret_key="m" * 32)
        factory: IsolatedSessionFactory = self.app.state.factory
        await tutorial.create_tables(factory.engine)
        self.tokens: dict[str, dict[str, str]] = {}
        async with self._client() as client:
            for user in self.users:
                await client.post("/users", json={"username": user, "password": "pw"})
                token = await client.post("/token", data={"username": user, "password": "pw"})
                self.tokens[user] = {"Authorization": f"Bearer {token.json()['access_token']}"}
        return factory

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")

    async def write(self, factory, ctx: UserExecutionContext, value: str) -> None:
        async with self._client() as client:
            response = await client.post(
                "/notes", json={"body": value}, headers=self.tokens[ctx.user_id]
            )
            response.raise_for_status()

    async def read(self, factory, ctx: UserExecutionContext) -> list[str]:
        async with self._client() as client:
            response = await client.get("/notes", headers=self.tokens[ctx.user_id])
            response.raise_for_status()
            return list(response.json())


TestTutorialMachine = TutorialMachine.TestCase
TestTutorialMachine.settings = settings(max_examples=6, stateful_step_count=8, deadline=None)
