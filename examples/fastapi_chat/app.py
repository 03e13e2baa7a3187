"""A small agent chat service on FastAPI, built with reqscope.

    pip install -e ".[dev]" && python examples/fastapi_chat/app.py   # http://127.0.0.1:8000

SQLite by default; set DATABASE_URL (e.g. postgresql+asyncpg://...) for another database,
and REDIS_URL (redis://...) to run several instances: a user's events then reach their
WebSockets on every instance (reqscope.redis_hub.RedisEventHub).
Authentication is a demo: "Authorization: Bearer <user>" names the user. Behind a real
gateway use reqscope.fastapi.from_state() with your own authentication middleware.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import (
    BackgroundTasks,
    Depends,
    FastAPI,
    HTTPException,
    WebSocket,
    status,
)
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reqscope import (
    AgentInstanceFactory,
    AgentRegistry,
    EventHub,
    IsolatedSessionFactory,
    PoolConfig,
    SessionProvider,
    UserExecutionContext,
    current_context,
)
from reqscope.fastapi import (
    RequestScopedContextDep,
    RequestScopedDbDep,
    agent,
    monitoring_router,
    setup,
)
from reqscope.redis_hub import RedisEventHub
from reqscope.starlette import serve_websocket


class Base(DeclarativeBase):
    pass


class ChatMessage(Base):
    __tablename__ = "chat_messages"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(256), index=True)
    thread_id: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(String(4000))


class FakeLlm:
    """Stands in for an LLM client: shared infrastructure, no per-user state."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        for word in f"you said: {prompt}".split():
            await anyio.sleep(self.delay)  # waiting on the model: no connection is held
            yield word + " "


class ChatAgent:
    """A per-request agent: created for one request, cleaned up with it."""

    def __init__(self, context: UserExecutionContext, sessions: SessionProvider, llm: FakeLlm):
        self.context = context
        self.sessions = sessions
        self.llm = llm
        self.tokens: list[str] = []

    async def reply(self, prompt: str, emit: Any) -> str:
        async for token in self.llm.stream(prompt):
            self.tokens.append(token)
            await emit("token", {"text": token})
        answer = "".join(self.tokens).strip()
        async with self.sessions.begin() as session:  # a short session per write
            session.add(
                ChatMessage(
                    user_id=self.context.user_id,
                    thread_id=self.context.thread_id,
                    role="assistant",
                    body=answer,
                )
            )
        await emit("done", {"text": answer})
        return answer

    async def aclose(self) -> None:
        self.tokens.clear()


class NewMessage(BaseModel):
    body: str


def bearer_user(connection: Any) -> str | None:
    header: str = connection.headers.get("authorization", "")
    return header.removeprefix("Bearer ").strip() or None


# Who may see the pool and the live sessions (user ids, request ids): operators only.
OPERATORS = frozenset(os.environ.get("OPERATORS", "ops").split(","))


def require_operator(ctx: RequestScopedContextDep) -> None:
    if ctx.user_id not in OPERATORS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "operators only")


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


def create_app(
    database_url: str | None = None,
    *,
    pool: PoolConfig | None = None,
    llm_delay: float = 0.01,
    redis_url: str | None = None,
) -> FastAPI:
    factory = IsolatedSessionFactory(database_url, pool=pool)
    registry = AgentRegistry(strict=True)
    registry.register("chat", ChatAgent)
    agents = AgentInstanceFactory(
        registry, sessions=factory, infrastructure={"llm": FakeLlm(llm_delay)}
    )
    hub = EventHub(max_queue=512) if redis_url is None else RedisEventHub(redis_url, max_queue=512)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await create_tables(factory.engine)
        yield

    app = FastAPI(title="reqscope chat", lifespan=lifespan)
    setup(
        app,
        factory,
        agents=agents,
        hub=hub,
        user_resolver=bearer_user,
        public_paths=("/reqscope/health",),
    )
    app.include_router(
        monitoring_router(factory, dependencies=[Depends(require_operator)], hub=hub)
    )
    app.state.factory, app.state.hub = factory, hub

    @app.post("/messages")
    async def post_message(new: NewMessage, db: RequestScopedDbDep, ctx: RequestScopedContextDep):
        message = ChatMessage(
            user_id=ctx.user_id, thread_id=ctx.thread_id, role="user", body=new.body
        )
        db.add(message)
        await db.commit()
        return {"id": message.id, "user_id": ctx.user_id}

    @app.get("/messages")
    async def list_messages(db: RequestScopedDbDep, ctx: RequestScopedContextDep):
        rows = await db.scalars(
            select(ChatMessage).where(ChatMessage.user_id == ctx.user_id).order_by(ChatMessage.id)
        )
        return [{"id": m.id, "user_id": m.user_id, "body": m.body} for m in rows]

    @app.get("/messages/stream")
    async def stream_messages(
        db: RequestScopedDbDep, ctx: RequestScopedContextDep, delay: float = 0.0
    ):
        async def body() -> AsyncIterator[str]:
            result = await db.stream_scalars(
                select(ChatMessage)
                .where(ChatMessage.user_id == ctx.user_id)
                .order_by(ChatMessage.id)
            )
            async for message in result:  # the request's session is live until the last chunk
                await anyio.sleep(delay)
                yield json.dumps({"id": message.id, "user_id": message.user_id}) + "\n"

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/chat")
    async def chat(
        new: NewMessage,
        chat_agent: Annotated[ChatAgent, agent("chat")],
        ctx: RequestScopedContextDep,
    ):
        emitter = hub.emitter(ctx)
        answer = await chat_agent.reply(new.body, emitter.emit)
        return {"answer": answer}

    @app.post("/chat/stream")
    async def chat_stream(new: NewMessage, chat_agent: Annotated[ChatAgent, agent("chat")]):
        async def body() -> AsyncIterator[str]:
            async def emit(kind: str, payload: dict[str, str]) -> None:
                chunks.append(json.dumps({"type": kind, **payload}) + "\n")

            chunks: list[str] = []
            answer = await chat_agent.reply(new.body, emit)
            for chunk in chunks:
                yield chunk
            yield json.dumps({"answer": answer}) + "\n"

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/audit")
    async def audit(background: BackgroundTasks, ctx: RequestScopedContextDep):
        async def write_audit() -> None:
            # runs after the response: same context, but a session of its own
            async with factory.begin(current_context()) as session:
                session.add(
                    ChatMessage(
                        user_id=ctx.user_id, thread_id=ctx.thread_id, role="audit", body="seen"
                    )
                )

        background.add_task(write_audit)
        return {"queued": True}

    @app.websocket("/ws")
    async def websocket_chat(websocket: WebSocket) -> None:
        # Each message is its own request: a child context, a session committed when the
        # handler returns, and an error reply (not a closed connection) when it fails.
        # The connection's events are forwarded from its own channel.
        async def on_message(text: str, session: AsyncSession) -> None:
            ctx = current_context()
            session.add(
                ChatMessage(user_id=ctx.user_id, thread_id=ctx.thread_id, role="user", body=text)
            )
            await session.commit()  # stored before the client hears of it
            await hub.emitter(ctx).emit("stored", {"text": text})

        await serve_websocket(websocket, on_message, json_messages=False)

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(os.environ.get("DATABASE_URL"), redis_url=os.environ.get("REDIS_URL")),
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8000")),
    )
