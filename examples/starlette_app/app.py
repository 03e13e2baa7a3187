"""reqscope on plain Starlette: the pure ASGI middleware and request_session().

    pip install -e ".[dev]" && python examples/starlette_app/app.py   # http://127.0.0.1:8001
    curl -H "X-User: alice" -X POST 'http://127.0.0.1:8001/notes?body=hi'

The "X-User" header stands in for a trusted gateway (reqscope.starlette.from_header).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reqscope import IsolatedSessionFactory
from reqscope.starlette import (
    ReqscopeMiddleware,
    from_header,
    get_context,
    lifespan,
    request_session,
)


async def add_note(request: Request) -> JSONResponse:
    async with request_session(request) as session:
        ctx = get_context(request)
        await session.execute(
            text("INSERT INTO notes (user_id, body) VALUES (:u, :b)"),
            {"u": ctx.user_id, "b": request.query_params.get("body", "")},
        )
        await session.commit()
    return JSONResponse({"user_id": ctx.user_id, "request_id": ctx.request_id})


async def list_notes(request: Request) -> JSONResponse:
    ctx = get_context(request)
    async with request_session(request) as session:
        rows = await session.execute(
            text("SELECT body FROM notes WHERE user_id = :u ORDER BY rowid"), {"u": ctx.user_id}
        )
        return JSONResponse({"user_id": ctx.user_id, "notes": list(rows.scalars())})


def create_app(database_url: str | None = None) -> Starlette:
    factory = IsolatedSessionFactory(database_url)

    @asynccontextmanager
    async def tables(_app: Starlette) -> AsyncIterator[None]:
        async with factory.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE IF NOT EXISTS notes (user_id TEXT, body TEXT)"))
        yield

    app = Starlette(
        routes=[Route("/notes", add_note, methods=["POST"]), Route("/notes", list_notes)],
        middleware=[
            Middleware(ReqscopeMiddleware, factory=factory, user_resolver=from_header("X-User"))
        ],
        lifespan=lifespan(factory, tables),
    )
    app.state.factory = factory
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(os.environ.get("DATABASE_URL")), host="127.0.0.1", port=8001)
