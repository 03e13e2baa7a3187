from __future__ import annotations

import logging
from typing import ClassVar

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from reqscope import (
    AgentCreationError,
    AgentInstanceFactory,
    AgentNotRegisteredError,
    AgentRegistry,
    IsolationViolation,
    ReqscopeError,
    SessionScopeError,
    SharedStateWarning,
    UserExecutionContext,
    run_isolated,
    session_tags,
    use_context,
)
from reqscope.testing import assert_no_violations


class Memory:
    def __init__(self, context: UserExecutionContext) -> None:
        self.context = context
        self.notes: list[str] = []


class Llm:
    def __init__(self) -> None:
        self.calls = 0


class Triage:
    def __init__(self, context: UserExecutionContext, llm: Llm, sessions=None) -> None:
        self.context = context
        self.llm = llm
        self.sessions = sessions
        self.state: dict[str, str] = {}


def make(cleanup_timeout: float = 5.0, **infrastructure):
    registry = AgentRegistry()
    registry.register("memory", Memory)
    registry.register("triage", Triage)
    return AgentInstanceFactory(
        registry,
        infrastructure={"llm": Llm(), **infrastructure},
        cleanup_timeout=cleanup_timeout,
    )


pytestmark = pytest.mark.anyio


async def test_create_returns_a_new_object_every_time() -> None:
    agents = make()
    alice = UserExecutionContext.create("alice")
    async with agents.scope(alice) as scope:
        first, second = scope.create("memory"), scope.create("memory")
        typed = scope.create(Memory)
        assert first is not second
        assert isinstance(typed, Memory)
        assert first.context is alice
        assert scope.agents == (first, second, typed)
        scope.check(first)  # its own
    async with agents.scope(alice) as other:
        assert other.create("memory") is not first
    assert agents.agents_created == 4


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alice", "bob", "carol"]), st.text(max_size=5)), max_size=12
    )
)
def test_state_never_crosses_requests(requests) -> None:
    agents = make()

    async def run() -> None:
        seen: dict[str, list[str]] = {}

        async def request(user: str, note: str) -> None:
            async with agents.scope(UserExecutionContext.create(user)) as scope:
                memory = scope.create("memory")
                assert memory.notes == []  # nothing from any earlier request
                memory.notes.append(f"{user}:{note}")
                await anyio.lowlevel.checkpoint()
                seen.setdefault(user, []).extend(memory.notes)

        async with anyio.create_task_group() as group:
            for user, note in requests:
                group.start_soon(request, user, note)
        for user, notes in seen.items():
            assert all(n.startswith(f"{user}:") for n in notes)

    anyio.run(run)


async def test_injection_and_overrides() -> None:
    agents = make()
    ctx = UserExecutionContext.create("alice")
    async with agents.scope(ctx) as scope:
        triage = scope.create("triage")
        assert triage.llm is agents.infrastructure["llm"]
        assert triage.sessions is None  # optional: the factory has no sessions
        own = Llm()
        assert scope.create("triage", llm=own).llm is own
        with pytest.raises(AgentCreationError, match="no parameter"):
            scope.create("memory", unknown=1)


async def test_creation_errors_name_what_is_missing() -> None:
    registry = AgentRegistry()

    class NeedsVectorStore:
        def __init__(self, context, vector_store) -> None:
            pass

    class Explodes:
        def __init__(self) -> None:
            raise RuntimeError("bad config")

    registry.register("needs", NeedsVectorStore)
    registry.register("explodes", Explodes)
    agents = AgentInstanceFactory(registry)
    async with agents.scope(UserExecutionContext.create("alice")) as scope:
        with pytest.raises(AgentCreationError, match=r"'vector_store'") as info:
            scope.create("needs")
        assert "infrastructure" in str(info.value)
        with pytest.raises(AgentCreationError, match="bad config"):
            scope.create("explodes")
        with pytest.raises(AgentNotRegisteredError, match="'nope'") as missing:
            scope.create("nope")
        assert isinstance(missing.value, KeyError)
        assert "needs" in str(missing.value)
        with pytest.raises(AgentNotRegisteredError):
            scope.create(Llm)


def test_registry_refuses_instances_and_flags_shared_state() -> None:
    registry = AgentRegistry()
    with pytest.raises(TypeError, match="instance"):
        registry.register("memory", Memory(UserExecutionContext.create("a")))  # type: ignore[arg-type]

    class Leaky:
        history: ClassVar[list[str]] = []

    with pytest.warns(SharedStateWarning, match=r"Leaky\.history"):
        registry.register("leaky", Leaky)
    with pytest.raises(TypeError, match=r"Leaky\.history"):
        AgentRegistry(strict=True).register("leaky", Leaky)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("leaky", Memory)
    registry.register("leaky", Memory, replace=True)

    def memory_factory(context: UserExecutionContext) -> Memory:
        return Memory(context)

    registry.register("factory_fn", memory_factory)
    assert registry.names() == ("factory_fn", "leaky")
    assert "leaky" in registry
    with pytest.raises(ValueError, match="non-empty"):
        registry.register("", Memory)


class Closer:
    order: ClassVar[tuple[()]] = ()  # immutable class attributes are fine

    def __init__(self, name: str, log: list, fail: bool = False, hang: bool = False) -> None:
        self.name, self.log, self.fail, self.hang = name, log, fail, hang

    async def aclose(self) -> None:
        if self.hang:
            await anyio.sleep(60)
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} cleanup failed")


class SyncCloser:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(self.name)


def closing_factory() -> AgentInstanceFactory:
    registry = AgentRegistry()
    registry.register("async", Closer)
    registry.register("sync", SyncCloser)
    return AgentInstanceFactory(registry, cleanup_timeout=0.1)


@pytest.mark.parametrize("outcome", ["success", "error", "cancel"])
async def test_cleanup_in_reverse_order_whatever_happens(outcome, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="reqscope")
    agents = closing_factory()
    log: list[str] = []

    async def request() -> None:
        async with agents.scope(UserExecutionContext.create("alice")) as scope:
            scope.create("async", name="a", log=log)
            scope.create("async", name="broken", log=log, fail=True)
            scope.create("async", name="hung", log=log, hang=True)
            scope.create("sync", name="b", log=log)
            if outcome == "error":
                raise ValueError("the request's own error")
            if outcome == "cancel":
                await anyio.sleep(60)

    if outcome == "success":
        await request()
    elif outcome == "error":
        with pytest.raises(ValueError, match="own error"):  # not masked by the cleanup error
            await request()
    else:
        with anyio.move_on_after(0.05) as scope:
            await request()
        assert scope.cancelled_caught
    assert log == ["b", "broken", "a"]  # reverse order; the hung one timed out
    assert agents.cleanup_failures == 2
    assert agents.agents_cleaned == 2
    assert any("took over" in r.getMessage() for r in caplog.records)


async def test_agents_open_sessions_for_their_own_request(factory) -> None:
    registry = AgentRegistry()
    registry.register("triage", Triage)
    agents = AgentInstanceFactory(registry, sessions=factory, infrastructure={"llm": Llm()})
    alice = UserExecutionContext.create("alice")
    bob = UserExecutionContext.create("bob")
    async with agents.scope(alice) as scope:
        triage = scope.create("triage")
        async with triage.sessions() as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
            tags = session_tags(session)
            assert (tags.user_id, tags.request_id) == ("alice", alice.request_id)
        async with triage.sessions.begin() as session:
            assert session_tags(session).run_id == alice.run_id
        with use_context(bob), pytest.raises(IsolationViolation, match="alice"):
            triage.sessions()
    with pytest.raises(SessionScopeError, match="outlive"):
        triage.sessions()
    with pytest.raises(ReqscopeError, match="ended"):
        scope.create("triage")
    assert agents.isolation_violations == 1


async def test_an_agent_is_refused_in_another_users_request() -> None:
    agents = make()

    class Worker:
        def __init__(self, context) -> None:
            self.context = context

        async def run(self) -> str:
            return self.context.user_id

    agents.registry.register("worker", Worker)
    alice, bob = UserExecutionContext.create("alice"), UserExecutionContext.create("bob")
    async with agents.scope(alice) as alice_scope, agents.scope(bob) as bob_scope:
        worker = alice_scope.create("worker")
        assert (await run_isolated(alice, worker.run)).unwrap() == "alice"
        with pytest.raises(IsolationViolation, match="alice"):
            await run_isolated(bob, worker.run)
        with pytest.raises(IsolationViolation):
            await run_isolated(bob, lambda w: w, worker)
        with pytest.raises(IsolationViolation, match="create a new agent"):
            bob_scope.check(worker)
        alice_scope.check(worker)
    with pytest.raises(AssertionError, match=r"3 agent isolation violation\(s\)"):
        assert_no_violations(agents)


async def test_agents_without_session_factory() -> None:
    agents = make()
    async with agents.scope(UserExecutionContext.create("a")) as scope:
        with pytest.raises(ReqscopeError, match="sessions=factory"):
            _ = scope.sessions


def test_reserved_infrastructure_names() -> None:
    with pytest.raises(ValueError, match="reserved"):
        AgentInstanceFactory(AgentRegistry(), infrastructure={"context": 1})


async def test_the_signature_kinds_an_agent_factory_may_have() -> None:
    """Keyword catch-alls get every override; *args and defaulted positional-only are left."""
    registry = AgentRegistry()

    class Flexible:
        def __init__(self, context, *args, **options) -> None:
            self.context = context
            self.args = args
            self.options = options

    def positional_only(llm: Llm, /, context=None) -> tuple[Llm, object]:
        return llm, context

    def defaulted_positional_only(limit: int = 3, /, *, context) -> tuple[int, object]:
        return limit, context

    class Slots:
        __slots__ = ("context",)

        def __init__(self, context) -> None:
            self.context = context

    registry.register("flexible", Flexible)
    registry.register("positional", positional_only)
    registry.register("defaulted", defaulted_positional_only)
    registry.register("slots", Slots)
    agents = AgentInstanceFactory(registry, infrastructure={"llm": Llm()})
    ctx = UserExecutionContext.create("alice")
    async with agents.scope(ctx) as scope:
        flexible = scope.create("flexible", temperature=0.2)
        assert flexible.args == ()
        assert flexible.options == {"temperature": 0.2}
        with pytest.raises(AgentCreationError, match="positional-only parameter 'llm'"):
            scope.create("positional")
        assert scope.create("defaulted") == (3, scope.context)
        assert scope.create("slots").context is ctx  # not weak-referenceable: still cleaned up
        with pytest.raises(ReqscopeError, match="has no session factory"):
            _ = scope.sessions
