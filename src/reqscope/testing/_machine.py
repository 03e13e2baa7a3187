"""IsolationMachine: a RuleBasedStateMachine that checks a service's request handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import anyio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from reqscope._context import UserExecutionContext
from reqscope._sessions import IsolatedSessionFactory
from reqscope.testing._assertions import assert_no_leaks, assert_no_violations

__all__ = ["IsolationMachine"]


class IsolationMachine(RuleBasedStateMachine):
    """Random interleavings of many users' requests; no user may read another's data.

    Subclass it and implement :meth:`create_factory`, :meth:`write` and :meth:`read`::

        class NotesMachine(IsolationMachine):
            users = ("alice", "bob", "carol")

            async def create_factory(self):
                factory = IsolatedSessionFactory()
                ...create tables...
                return factory

            async def write(self, factory, ctx, value):
                async with factory.begin(ctx) as session:
                    session.add(Note(user_id=ctx.user_id, body=value))

            async def read(self, factory, ctx):
                async with factory.session(ctx) as session:
                    return [n.body for n in await session.scalars(select(Note))]

        TestNotes = NotesMachine.TestCase

    Each step writes or reads as a random user, or runs a batch of users' requests
    concurrently; after every step the machine checks that each user reads exactly what it
    wrote (as a multiset), that nothing leaked and that no violation was refused.
    """

    users: ClassVar[tuple[str, ...]] = ("alice", "bob", "carol")

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        # Not started: start() and aclose() must run in one task, and each portal call is a
        # task of its own. The invariant below checks for leaks after every step instead of
        # the background detector.
        self.factory: IsolatedSessionFactory = self.portal.call(self.create_factory)
        self.expected: dict[str, list[str]] = {user: [] for user in self.users}

    async def create_factory(self) -> IsolatedSessionFactory:
        """Return a factory whose database has your tables (called once per run)."""
        raise NotImplementedError

    async def write(
        self, factory: IsolatedSessionFactory, ctx: UserExecutionContext, value: str
    ) -> None:
        """Store ``value`` as ``ctx``'s user through your handler."""
        raise NotImplementedError

    async def read(self, factory: IsolatedSessionFactory, ctx: UserExecutionContext) -> list[str]:
        """Return every value ``ctx``'s user can see through your handler."""
        raise NotImplementedError

    def _ctx(self, user: str) -> UserExecutionContext:
        return UserExecutionContext.create(user)

    def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.portal.call(fn, *args)

    @rule(data=st.data(), value=st.text(min_size=1, max_size=12))
    def write_one(self, data: st.DataObject, value: str) -> None:
        """One user writes."""
        user = data.draw(st.sampled_from(self.users))
        self._run(self.write, self.factory, self._ctx(user), value)
        self.expected[user].append(value)

    @rule(data=st.data())
    def read_one(self, data: st.DataObject) -> None:
        """One user reads and sees exactly its own values."""
        user = data.draw(st.sampled_from(self.users))
        seen = self._run(self.read, self.factory, self._ctx(user))
        if sorted(seen) != sorted(self.expected[user]):
            raise AssertionError(f"user {user!r} read {seen!r}, wrote {self.expected[user]!r}")

    @rule(
        batch=st.lists(
            st.tuples(st.integers(0, 100), st.text(min_size=1, max_size=8)), min_size=2, max_size=8
        )
    )
    def concurrent_batch(self, batch: list[tuple[int, str]]) -> None:
        """Several users' writes and reads interleaved in one event loop."""

        async def run() -> dict[str, list[list[str]]]:
            reads: dict[str, list[list[str]]] = {}

            async def one(index: int, value: str) -> None:
                user = self.users[index % len(self.users)]
                await self.write(self.factory, self._ctx(user), value)
                reads.setdefault(user, []).append(await self.read(self.factory, self._ctx(user)))

            async with anyio.create_task_group() as group:
                for index, value in batch:
                    group.start_soon(one, index, value)
            return reads

        reads = self.portal.call(run)
        for index, value in batch:
            self.expected[self.users[index % len(self.users)]].append(value)
        for user, snapshots in reads.items():
            allowed = set(self.expected[user])
            for snapshot in snapshots:
                if not set(snapshot) <= allowed:
                    raise AssertionError(f"user {user!r} read another user's data: {snapshot!r}")

    @invariant()
    def nothing_leaked(self) -> None:
        """No open session, no checked-out connection, no refused violation."""
        assert_no_leaks(self.factory)
        assert_no_violations(self.factory)

    def teardown(self) -> None:
        """Close the factory and the event loop thread."""
        try:
            self.portal.call(self.factory.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
