from __future__ import annotations

import traceback
import unicodedata

import pytest
from hypothesis import Phase, find, given, settings
from sqlalchemy import select, text

from reqscope import (
    ContextValidationError,
    IsolatedSessionFactory,
    IsolationViolation,
    UserExecutionContext,
    use_context,
)
from reqscope._context import MAX_ID_LENGTH
from reqscope.testing import IsolationMachine, assert_no_leaks, assert_no_violations
from reqscope.testing.strategies import contexts, invalid_user_ids, metadata, user_ids
from tenant_models import Doc, TenantBase

pytestmark = pytest.mark.anyio


@given(user_ids())
def test_user_ids_are_valid(user_id) -> None:
    assert UserExecutionContext.create(user_id).user_id == user_id


# find() without shrinking: only that such an example exists matters, and shrinking an id
# of hundreds of characters costs minutes on older Hypothesis releases.
FIND = settings(max_examples=5000, phases=[Phase.generate], database=None)


def test_user_ids_go_past_64_characters_towards_the_256_limit() -> None:
    long = find(user_ids(), lambda value: len(value) > 64, settings=FIND)
    assert UserExecutionContext.create(long).user_id == long


@given(user_ids())
def test_user_ids_stay_within_the_limit(user_id) -> None:
    assert 1 <= len(user_id) <= MAX_ID_LENGTH


@pytest.mark.parametrize("category", ["Cc", "Cf", "Cs", "Cn", "Zl", "Zp"])
def test_invalid_user_ids_cover_every_refused_category(category) -> None:
    def holds(value: object) -> bool:
        return isinstance(value, str) and any(unicodedata.category(c) == category for c in value)

    assert holds(find(invalid_user_ids(), holds, settings=FIND))


def test_an_undisplayable_code_point_survives_in_a_256_character_id() -> None:
    # found by Hypothesis: inserting past the end of a 256-character id and then cutting it
    # to 256 dropped the refused character, leaving a valid id
    longest = find(
        invalid_user_ids(),
        lambda value: isinstance(value, str) and len(value) == MAX_ID_LENGTH,
        settings=FIND,
    )
    with pytest.raises(ContextValidationError):
        UserExecutionContext.create(longest)


@given(invalid_user_ids())
def test_invalid_user_ids_are_rejected(value) -> None:
    with pytest.raises(ContextValidationError):
        UserExecutionContext.create(value)


@given(contexts())
def test_contexts_round_trip(ctx) -> None:
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx


@given(metadata())
def test_metadata_is_accepted(data) -> None:
    UserExecutionContext.create("alice", metadata=data)


async def test_assertions_report_what_is_open(factory) -> None:
    assert_no_leaks(factory)
    assert_no_violations(factory)
    async with factory.session(UserExecutionContext.create("alice")) as session:
        await session.execute(text("SELECT 1"))  # a session checks out on first use
        with pytest.raises(AssertionError, match=r"session \w+ of user 'alice'") as info:
            assert_no_leaks(factory)
        assert "checked out" in str(info.value)
        with use_context(UserExecutionContext.create("bob")), pytest.raises(IsolationViolation):
            await session.execute(text("SELECT 1"))  # refused, and counted
    with pytest.raises(AssertionError, match="1 isolation violation"):
        assert_no_violations(factory)


class NotesMachine(IsolationMachine):
    """The library's own handler under random interleavings (ORM, no tenant filter)."""

    users = ("alice", "bob", "carol")

    async def create_factory(self) -> IsolatedSessionFactory:
        factory = IsolatedSessionFactory()
        async with factory.engine.begin() as conn:
            await conn.run_sync(TenantBase.metadata.create_all)
        return factory

    async def write(self, factory, ctx, value) -> None:
        async with factory.begin(ctx) as session:
            session.add(Doc(user_id=ctx.user_id, title=value))

    async def read(self, factory, ctx) -> list[str]:
        async with factory.session(ctx) as session:
            rows = await session.scalars(select(Doc.title).where(Doc.user_id == ctx.user_id))
            return list(rows)


TestNotesMachine = NotesMachine.TestCase
TestNotesMachine.settings = settings(max_examples=10, stateful_step_count=8, deadline=None)


def test_the_machine_catches_a_leaky_handler() -> None:
    class LeakyMachine(NotesMachine):
        async def read(self, factory, ctx) -> list[str]:  # forgot the user filter
            async with factory.session(ctx) as session:
                return list(await session.scalars(select(Doc.title)))

    case = LeakyMachine.TestCase
    case.settings = settings(
        max_examples=30, stateful_step_count=10, deadline=None, phases=[Phase.generate]
    )
    # hypothesis raises the AssertionError, or a group of them when it finds several
    with pytest.raises(Exception) as info:
        case("runTest").runTest()
    assert "AssertionError" in "".join(traceback.format_exception(info.value))


PLUGIN_TEST = """
import pytest
from sqlalchemy import text

pytestmark = pytest.mark.anyio

@pytest.fixture
def anyio_backend():
    return "asyncio"

async def test_factory_and_context(reqscope_factory, reqscope_context):
    async with reqscope_factory.session(reqscope_context) as session:
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    assert reqscope_context.user_id == "test-user"

async def test_leak_is_reported(reqscope_factory, reqscope_context):
    scope = reqscope_factory.session(reqscope_context)
    await scope.__aenter__()
"""


def test_pytest_plugin(pytester) -> None:
    pytester.makepyfile(PLUGIN_TEST)
    result = pytester.runpytest_subprocess(
        "-p", "anyio", "-W", "ignore::pytest.PytestUnraisableExceptionWarning"
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*reqscope found leaks*"])


ASYNCIO_PLUGIN_TEST = """
import pytest
from sqlalchemy import text

pytestmark = pytest.mark.asyncio


async def test_factory_and_context(reqscope_factory, reqscope_context):
    async with reqscope_factory.session(reqscope_context) as session:
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def test_transaction(reqscope_factory, reqscope_transaction, reqscope_context):
    assert reqscope_transaction.in_transaction()
    async with reqscope_factory.begin(reqscope_context) as session:
        await session.execute(text("CREATE TABLE notes (body text)"))
        await session.execute(text("INSERT INTO notes VALUES ('x')"))
    async with reqscope_factory.session(reqscope_context) as session:
        assert (await session.execute(text("SELECT count(*) FROM notes"))).scalar_one() == 1


async def test_leak_is_reported(reqscope_factory, reqscope_context):
    scope = reqscope_factory.session(reqscope_context)
    await scope.__aenter__()
"""


@pytest.mark.parametrize(
    ("mode", "plugin_line"), [("strict", True), ("auto", False), ("auto", True)]
)
def test_the_fixtures_work_under_pytest_asyncio(pytester, mode: str, plugin_line: bool) -> None:
    pytest.importorskip("pytest_asyncio")
    if plugin_line:
        pytester.makeconftest('pytest_plugins = ["reqscope.testing.asyncio_plugin"]')
    pytester.makepyfile(ASYNCIO_PLUGIN_TEST)
    result = pytester.runpytest_subprocess(
        "-o",
        f"asyncio_mode={mode}",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "-p",
        "no:randomly",
        "-W",
        "ignore::pytest.PytestUnraisableExceptionWarning",
    )
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*reqscope found leaks*"])


def test_strict_mode_without_the_plugin_line_does_not_run_the_fixtures(pytester) -> None:
    """What the documented line is for: strict mode leaves undeclared async fixtures alone."""
    pytest.importorskip("pytest_asyncio")
    pytester.makepyfile(ASYNCIO_PLUGIN_TEST)
    result = pytester.runpytest_subprocess(
        "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"
    )
    # pytest >= 8.4 reports an unhandled async fixture as an error; earlier versions hand the
    # test a coroutine instead of the fixture's value, and the test fails.
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0
    assert outcomes.get("errors", 0) + outcomes.get("failed", 0) == 3
