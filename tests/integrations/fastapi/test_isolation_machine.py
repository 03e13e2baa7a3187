"""IsolationMachine over the example chat app's HTTP handlers."""

from __future__ import annotations

import httpx
from hypothesis import settings

from example_loader import load_example
from reqscope import IsolatedSessionFactory, UserExecutionContext
from reqscope.testing import IsolationMachine

chat = load_example("fastapi_chat/app.py", "example_fastapi_chat")


class ChatAppMachine(IsolationMachine):
    users = ("alice", "bob", "carol")

    async def create_factory(self) -> IsolatedSessionFactory:
        self.app = chat.create_app()
        factory: IsolatedSessionFactory = self.app.state.factory
        await chat.create_tables(factory.engine)
        return factory

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")

    async def write(self, factory, ctx: UserExecutionContext, value: str) -> None:
        async with self._client() as client:
            response = await client.post(
                "/messages",
                json={"body": value},
                headers={"authorization": f"Bearer {ctx.user_id}"},
            )
            response.raise_for_status()

    async def read(self, factory, ctx: UserExecutionContext) -> list[str]:
        async with self._client() as client:
            response = await client.get(
                "/messages", headers={"authorization": f"Bearer {ctx.user_id}"}
            )
            return [message["body"] for message in response.json()]


TestChatAppMachine = ChatAppMachine.TestCase
TestChatAppMachine.settings = settings(max_examples=8, stateful_step_count=8, deadline=None)
