"""reqscope in 30 lines: two users, their own sessions, and what happens on a mistake.

Run it with: python examples/quickstart.py
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from reqscope import IsolatedSessionFactory, IsolationViolation, UserExecutionContext, use_context


async def main() -> None:
    async with IsolatedSessionFactory() as factory:  # embedded SQLite in a temporary directory
        async with factory.begin(UserExecutionContext.create("setup")) as session:
            await session.execute(text("CREATE TABLE notes (user_id TEXT, body TEXT)"))

        async def handle(user: str, body: str) -> list[str]:
            ctx = UserExecutionContext.create(user)
            async with factory.begin(ctx) as session:  # commits on success
                await session.execute(
                    text("INSERT INTO notes VALUES (:u, :b)"), {"u": user, "b": body}
                )
            async with factory.session(ctx) as session:  # read-only, rolled back
                rows = await session.execute(
                    text("SELECT body FROM notes WHERE user_id = :u"), {"u": user}
                )
                return list(rows.scalars())

        print(await asyncio.gather(handle("alice", "hi"), handle("bob", "hello")))

        async with factory.session(UserExecutionContext.create("alice")) as alices:
            with use_context(UserExecutionContext.create("bob")):
                try:
                    await alices.execute(text("SELECT * FROM notes"))
                except IsolationViolation as error:
                    print("refused:", str(error).split(";")[0])
        print(factory.metrics())


if __name__ == "__main__":
    asyncio.run(main())
