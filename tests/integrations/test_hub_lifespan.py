"""The adapters start the event hub with the app's lifespan and stop it after."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from typing_extensions import Self

from reqscope import EventHub, IsolatedSessionFactory
from reqscope.fastapi import setup
from reqscope.starlette import lifespan


class RecordingHub(EventHub):
    """An in-memory hub that notes when the app starts and stops it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def __aenter__(self) -> Self:
        self.calls.append("start")
        return self

    async def aclose(self) -> None:
        self.calls.append("stop")


def test_fastapi_setup_runs_the_hub_with_the_lifespan() -> None:
    hub = RecordingHub()
    app = FastAPI()
    setup(app, IsolatedSessionFactory(), hub=hub)
    with TestClient(app):
        assert hub.calls == ["start"]
    assert hub.calls == ["start", "stop"]


def test_starlette_lifespan_runs_the_hub_with_the_app() -> None:
    hub = RecordingHub()
    app = Starlette(lifespan=lifespan(IsolatedSessionFactory(), hub=hub))
    with TestClient(app):
        assert hub.calls == ["start"]
    assert hub.calls == ["start", "stop"]
