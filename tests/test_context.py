from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import os
import threading
import uuid
from decimal import Decimal

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from reqscope import (
    AuditEvent,
    ContextValidationError,
    NoActiveContextError,
    UserExecutionContext,
    current_context,
    current_context_or_none,
    use_context,
)
from reqscope._context import _random_hex, new_id, same_request
from reqscope.testing.strategies import contexts, user_ids
from reqscope.testing.strategies import metadata as strategy_metadata

PLACEHOLDERS = ["None", "null", "undefined", "nil", "placeholder", "default_user"]

ids = user_ids()
metadata = strategy_metadata()


@given(contexts())
def test_dict_round_trip_is_lossless(ctx: UserExecutionContext) -> None:
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx


@given(contexts())
def test_header_round_trip_is_lossless(ctx: UserExecutionContext) -> None:
    headers = ctx.to_headers()
    assert all(value.isascii() for value in headers.values())
    assert UserExecutionContext.from_headers(headers) == ctx
    upper = {key.upper(): value for key, value in headers.items()}
    assert UserExecutionContext.from_headers(list(upper.items())) == ctx


@given(contexts())
def test_to_dict_is_json_safe(ctx: UserExecutionContext) -> None:
    import json

    assert json.loads(json.dumps(ctx.to_dict())) == ctx.to_dict()


@given(metadata)
def test_mutating_input_never_changes_the_context(data: dict) -> None:
    import copy

    snapshot = copy.deepcopy(data)
    ctx = UserExecutionContext.create("alice", metadata=data)
    before = ctx.to_dict()["metadata"]
    data["injected"] = 1
    for value in data.values():
        if isinstance(value, list):
            value.append("x")
        if isinstance(value, dict):
            value["x"] = 1
    assert ctx.to_dict()["metadata"] == before
    assert UserExecutionContext.create("alice", metadata=snapshot).metadata == ctx.metadata


@given(contexts(), ids)
def test_children_keep_ids_and_chain_parents(ctx: UserExecutionContext, operation: str) -> None:
    child = ctx.child(operation)
    grandchild = child.child(operation)
    for descendant, parent in ((child, ctx), (grandchild, child)):
        assert descendant.user_id == ctx.user_id
        assert descendant.thread_id == ctx.thread_id
        assert descendant.run_id == ctx.run_id
        assert descendant.websocket_client_id == ctx.websocket_client_id
        assert descendant.parent_request_id == parent.request_id
        assert descendant.root_request_id == ctx.root_request_id
        assert descendant.request_id != parent.request_id
        assert descendant.operation_depth == parent.operation_depth + 1
        assert descendant.audit_trail[-1].action == "child"
        assert descendant.audit_trail[-1].detail == operation


def test_metadata_is_deep_frozen() -> None:
    ctx = UserExecutionContext.create("alice", metadata={"a": {"b": [1, {"c": 2}]}, "e": (1, 2)})
    assert ctx.metadata["a"]["b"] == (1, {"c": 2})
    assert isinstance(ctx.metadata["a"]["b"], tuple)
    with pytest.raises(TypeError):
        ctx.metadata["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        ctx.metadata["a"]["b"][1]["c"] = 3
    with pytest.raises(AttributeError):
        ctx.user_id = "bob"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ctx.metadata.anything = 1  # type: ignore[attr-defined]
    assert hash(ctx) == hash(UserExecutionContext.from_dict(ctx.to_dict()))


def test_dataclass_is_slotted_and_frozen() -> None:
    ctx = UserExecutionContext.create("alice")
    assert not hasattr(ctx, "__dict__")
    with pytest.raises(AttributeError):
        object.__getattribute__(ctx, "__dict__")


def test_special_metadata_values_round_trip() -> None:
    class Color(enum.Enum):
        RED = "red"

    values = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc),
        "naive": dt.datetime(2026, 1, 2),
        "day": dt.date(2026, 1, 2),
        "id": uuid.UUID(int=7),
        "amount": Decimal("1.10"),
        "raw": b"\x00\xff",
        "color": Color.RED,
        "$dollar": {"$datetime": "not a tag"},
        "nested": [{"x": (1, 2)}],
    }
    ctx = UserExecutionContext.create("alice", metadata=values)
    assert ctx.metadata["color"] == "red"  # enums travel as their value
    again = UserExecutionContext.from_dict(ctx.to_dict())
    assert again == ctx
    assert again.metadata["$dollar"] == {"$datetime": "not a tag"}
    assert again.metadata["amount"] == Decimal("1.10")
    assert str(again.metadata["amount"]) == "1.10"


def test_create_generates_ids_and_records_creation() -> None:
    ctx = UserExecutionContext.create("alice")
    assert len({ctx.thread_id, ctx.run_id, ctx.request_id}) == 3
    assert ctx.created_at.tzinfo is dt.timezone.utc
    assert ctx.audit_trail[0].action == "created"
    assert ctx.operation_depth == 0
    assert ctx.parent_request_id is None
    assert ctx.root_request_id == ctx.request_id


def test_the_root_request_id_is_kept_by_derived_contexts_and_round_trips() -> None:
    root = UserExecutionContext.create("alice", request_id="client-chosen-id")
    derived = root.child("a").with_metadata(x=1).child("b")
    assert derived.root_request_id == "client-chosen-id"
    assert derived.request_id != "client-chosen-id"
    again = UserExecutionContext.from_dict(derived.to_dict())
    assert again == derived
    assert again.root_request_id == "client-chosen-id"
    assert UserExecutionContext.from_headers(derived.to_headers()) == derived
    # a payload from before root_request_id existed: the request is its own root
    legacy = {k: v for k, v in derived.to_dict().items() if k != "root_request_id"}
    assert UserExecutionContext.from_dict(legacy).root_request_id == derived.request_id
    # the constructor: empty means "this request is the root"; anything else is an id
    assert UserExecutionContext("u", "t", "r", "q").root_request_id == "q"
    assert UserExecutionContext("u", "t", "r", "q", root_request_id="p").root_request_id == "p"
    with pytest.raises(ContextValidationError, match="root_request_id"):
        UserExecutionContext("u", "t", "r", "q", root_request_id=" p")


def test_only_derived_contexts_belong_to_the_same_request() -> None:
    root = UserExecutionContext.create("alice")
    for derived in (root, root.child("a"), root.with_metadata(x=1).child("b").child("c")):
        assert same_request(derived, root)
    for other in (
        UserExecutionContext.create("alice", request_id=root.request_id),
        UserExecutionContext.from_dict(root.to_dict()),
        dataclasses.replace(root, metadata={"x": 1}),
    ):
        assert other.request_id == root.request_id
        assert not same_request(other, root)


def test_generated_ids_are_fresh_random_hex_across_batches() -> None:
    # 3,000 contexts and 3,000 session-style ids cross many 4 KiB refills of the id buffer.
    seen: set[str] = set()
    for _ in range(3000):
        ctx = UserExecutionContext.create("alice")
        seen.update((ctx.thread_id, ctx.run_id, ctx.request_id, new_id()))
    assert len(seen) == 12_000
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in seen)
    # A request larger than a batch still gets fresh digits.
    assert len(_random_hex.take(10_000)) == 10_000


def test_threads_never_get_the_same_id() -> None:
    results: list[list[str]] = [[] for _ in range(8)]

    def draw(out: list[str]) -> None:
        out.extend(new_id() for _ in range(2000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drawn = [value for out in results for value in out]
    assert len(set(drawn)) == len(drawn) == 16_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_repeats_the_parents_ids() -> None:
    new_id()  # the parent has a partly used batch, which the child would otherwise reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        os.write(write, " ".join(new_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(5)}
    assert len(child) == 5
    assert not child & parent


def test_with_metadata_keeps_ids() -> None:
    ctx = UserExecutionContext.create("alice", metadata={"a": 1})
    other = ctx.with_metadata(b=2)
    assert other.request_id == ctx.request_id
    assert dict(other.metadata) == {"a": 1, "b": 2}
    assert dict(ctx.metadata) == {"a": 1}
    assert other.audit_trail[-1].action == "with_metadata"


def test_created_at_is_normalised_to_utc() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    ctx = UserExecutionContext(
        "a", "b", "c", "d", created_at=dt.datetime(2026, 1, 1, 12, tzinfo=tz)
    )
    assert ctx.created_at == dt.datetime(2026, 1, 1, 10, tzinfo=dt.timezone.utc)
    assert ctx.created_at.tzinfo is dt.timezone.utc
    with pytest.raises(ContextValidationError, match="created_at"):
        UserExecutionContext("a", "b", "c", "d", created_at=dt.datetime(2026, 1, 1))


# -- invalid input ------------------------------------------------------------------------

BAD_IDS = [
    ("", "empty"),
    (" alice", "whitespace"),
    ("alice ", "whitespace"),
    ("\talice", "control"),
    ("al\nice", "control"),
    ("al\x00ice", "control"),
    ("al\x7fice", "control"),
    ("al\x85ice", "control"),  # NEL, a C1 control
    ("al\ud800ice", "lone surrogate"),  # it used to fail only at its first statement
    ("alice\u200b", "format character"),  # zero-width space
    ("\u202ealice", "format character"),  # right-to-left override
    ("al\u00adice", "format character"),  # soft hyphen: invisible
    ("alice\u2028x", "line separator"),
    ("alice\u2029x", "paragraph separator"),
    ("alice\U000e0001", "format character"),  # language tag
    ("al\u0378ice", "unassigned"),  # unassigned in every Unicode version so far
    ("x" * 257, "257"),
    (42, "must be a str"),
    (None, "must be a str"),
    (b"alice", "must be a str"),
] + [(variant, "placeholder") for p in PLACEHOLDERS for variant in (p, p.upper(), p.title())]


@pytest.mark.parametrize(("value", "problem"), BAD_IDS)
@pytest.mark.parametrize("field", ["user_id", "thread_id", "run_id", "request_id"])
def test_invalid_ids_are_rejected_naming_the_field(value, problem, field) -> None:
    kwargs = {"user_id": "u", "thread_id": "t", "run_id": "r", "request_id": "q", field: value}
    with pytest.raises(ContextValidationError, match=problem) as info:
        UserExecutionContext(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(("value", "problem"), BAD_IDS)
def test_create_rejects_invalid_user_ids(value, problem) -> None:
    with pytest.raises(ContextValidationError, match=problem):
        UserExecutionContext.create(value)


def test_an_undisplayable_id_error_names_the_code_point_and_where_it_is() -> None:
    with pytest.raises(ContextValidationError) as info:
        UserExecutionContext.create("alice\u200b")
    message = str(info.value)
    assert "U+200B ZERO WIDTH SPACE (category Cf), at index 5" in message
    assert "displayable" in message


@pytest.mark.parametrize(
    "value",
    [
        "Zoë",
        "用户-42",
        "مستخدم",  # right-to-left text itself is fine, only the override characters are not
        "a\u00a0b",  # a no-break space inside an id (Zs) is displayable
        "\ue000private",  # private use (Co) is the application's own business
        "\U0001f469",  # an emoji; a joined sequence is refused for its joiner (below)
    ],
)
def test_displayable_unicode_ids_are_accepted(value) -> None:
    assert UserExecutionContext.create(value).user_id == value


def test_an_emoji_zwj_sequence_is_refused_for_its_joiner() -> None:
    with pytest.raises(ContextValidationError, match="U\\+200D ZERO WIDTH JOINER"):
        UserExecutionContext.create("\U0001f469\u200d\U0001f4bb")


@pytest.mark.parametrize("field", ["websocket_client_id", "parent_request_id"])
def test_optional_ids_are_validated_when_given(field) -> None:
    with pytest.raises(ContextValidationError, match=field):
        UserExecutionContext("u", "t", "r", "q", **{field: "null"})


def test_a_256_character_id_is_fine() -> None:
    assert UserExecutionContext.create("x" * 256).user_id == "x" * 256


@pytest.mark.parametrize(
    "resource",
    [
        lambda: create_engine("sqlite://"),
        lambda: create_engine("sqlite://").connect(),
        Session,
        AsyncSession,
        lambda: create_async_engine("sqlite+aiosqlite://"),
    ],
    ids=["Engine", "Connection", "Session", "AsyncSession", "AsyncEngine"],
)
def test_database_resources_are_refused_at_depth_three(resource) -> None:
    obj = resource()
    try:
        with pytest.raises(ContextValidationError, match="database") as info:
            UserExecutionContext.create("alice", metadata={"a": [0, 1, {"db": obj}]})
        assert info.value.field == "metadata['a'][2]['db']"
        assert "factory.session(ctx)" in str(info.value)
    finally:
        # Close what was opened, down to the pool's sqlite3 connection: one left to the
        # garbage collector is a ResourceWarning on Python 3.13, raised in whichever test
        # happens to run the collection (it failed a test of contextvars that way).
        if isinstance(obj, Connection):
            obj.close()
            obj.engine.dispose()
        elif isinstance(obj, Engine):
            obj.dispose()


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [
        ({"s": {1, 2}}, "metadata['s']", "set"),
        ({"o": object()}, "metadata['o']", "cannot be stored"),
        ({"f": float("nan")}, "metadata['f']", "JSON-safe"),
        ({"f": float("inf")}, "metadata['f']", "JSON-safe"),
        ({"b": bytearray(b"x")}, "metadata['b']", "mutable"),
        ({"d": {1: "x"}}, "metadata['d'][1]", "keys must be str"),
        ({"fn": print}, "metadata['fn']", "cannot be stored"),
    ],
)
def test_invalid_metadata_names_the_key_path(value, path, problem) -> None:
    with pytest.raises(ContextValidationError, match=problem) as info:
        UserExecutionContext.create("alice", metadata=value)
    assert info.value.field == path


def nested(depth: int) -> dict:
    data: dict = {"leaf": 1}
    for _ in range(depth - 1):
        data = {"n": data}
    return data


def test_depth_limit() -> None:
    UserExecutionContext.create("alice", metadata=nested(16))
    with pytest.raises(ContextValidationError, match="deeper than 16"):
        UserExecutionContext.create("alice", metadata=nested(17))


def test_node_limit() -> None:
    UserExecutionContext.create("alice", metadata={f"k{i}": i for i in range(10_000)})
    with pytest.raises(ContextValidationError, match="10000"):
        UserExecutionContext.create("alice", metadata={f"k{i}": i for i in range(10_001)})
    with pytest.raises(ContextValidationError, match="10000"):
        UserExecutionContext.create("alice", metadata={"list": list(range(10_000))})


def test_child_depth_limit() -> None:
    ctx = UserExecutionContext.create("alice")
    for _ in range(32):
        ctx = ctx.child("step")
    assert ctx.operation_depth == 32
    with pytest.raises(ContextValidationError, match="operation_depth"):
        ctx.child("step")
    with pytest.raises(ContextValidationError, match="operation_depth"):
        UserExecutionContext("u", "t", "r", "q", operation_depth=33)


def test_child_validates_operation_and_metadata() -> None:
    ctx = UserExecutionContext.create("alice")
    with pytest.raises(ContextValidationError, match="operation"):
        ctx.child("")
    with pytest.raises(ContextValidationError, match=r"metadata\['db'\]"):
        ctx.child("op", db=Session())


def test_from_dict_rejects_bad_input() -> None:
    good = UserExecutionContext.create("alice").to_dict()
    with pytest.raises(ContextValidationError, match="unknown field"):
        UserExecutionContext.from_dict({**good, "extra": 1})
    with pytest.raises(ContextValidationError, match="user_id: is required"):
        UserExecutionContext.from_dict({k: v for k, v in good.items() if k != "user_id"})
    with pytest.raises(ContextValidationError, match="placeholder"):
        UserExecutionContext.from_dict({**good, "user_id": "undefined"})
    with pytest.raises(ContextValidationError, match="created_at"):
        UserExecutionContext.from_dict({**good, "created_at": "yesterday"})
    with pytest.raises(ContextValidationError, match="uuid"):
        UserExecutionContext.from_dict({**good, "metadata": {"x": {"$uuid": "nope"}}})
    with pytest.raises(ContextValidationError, match="unknown tag"):
        UserExecutionContext.from_dict({**good, "metadata": {"$x": 1, "y": 2}})
    with pytest.raises(ContextValidationError, match="must be a mapping"):
        UserExecutionContext.from_dict([])  # type: ignore[arg-type]


def test_from_headers_rejects_missing_malformed_and_altered() -> None:
    headers = UserExecutionContext.create("alice").to_headers()
    with pytest.raises(ContextValidationError, match="missing"):
        UserExecutionContext.from_headers({})
    with pytest.raises(ContextValidationError, match="not valid"):
        UserExecutionContext.from_headers({"x-reqscope-context": "!!!"})
    with pytest.raises(ContextValidationError, match="altered"):
        UserExecutionContext.from_headers({**headers, "x-reqscope-user-id": "mallory"})


def test_audit_events_validate() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    with pytest.raises(ContextValidationError, match="action"):
        AuditEvent(now, "")
    with pytest.raises(ContextValidationError, match="timezone-aware"):
        AuditEvent(dt.datetime(2026, 1, 1), "x")
    with pytest.raises(ContextValidationError, match="audit_trail"):
        UserExecutionContext("u", "t", "r", "q", audit_trail=("not an event",))  # type: ignore[arg-type]
    assert AuditEvent.from_dict(AuditEvent(now, "x", "y").to_dict()) == AuditEvent(now, "x", "y")


def test_audit_trail_is_bounded() -> None:
    ctx = UserExecutionContext.create("alice")
    for i in range(300):
        ctx = ctx.with_metadata(i=i)
    assert len(ctx.audit_trail) == 128


# -- the current context -----------------------------------------------------------------


def test_no_current_context() -> None:
    assert current_context_or_none() is None
    with pytest.raises(NoActiveContextError, match="use_context"):
        current_context()


def test_use_context_restores_on_exit_and_error() -> None:
    outer = UserExecutionContext.create("outer")
    inner = UserExecutionContext.create("inner")
    with use_context(outer):
        with pytest.raises(RuntimeError), use_context(inner):
            assert current_context() is inner
            raise RuntimeError
        assert current_context() is outer
    assert current_context_or_none() is None


def test_use_context_refuses_non_contexts_and_reentry() -> None:
    with pytest.raises(TypeError, match="UserExecutionContext"):
        use_context({"user_id": "x"})  # type: ignore[arg-type]
    manager = use_context(UserExecutionContext.create("a"))
    with manager, pytest.raises(RuntimeError, match="already entered"), manager:
        pass


@pytest.mark.anyio
async def test_context_survives_await_and_is_inherited_by_tasks() -> None:
    ctx = UserExecutionContext.create("alice")
    seen: list[str] = []

    async def child() -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(current_context().user_id)

    with use_context(ctx):
        await anyio.lowlevel.checkpoint()
        assert current_context() is ctx
        await asyncio.create_task(child())
        async with anyio.create_task_group() as group:
            group.start_soon(child)
    assert seen == ["alice", "alice"]
    assert current_context_or_none() is None


@pytest.mark.anyio
async def test_a_thousand_concurrent_tasks_never_see_each_other() -> None:
    errors: list[str] = []

    async def request(i: int) -> None:
        ctx = UserExecutionContext.create(f"user-{i}")
        with use_context(ctx):
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
                if current_context() is not ctx:
                    errors.append(f"task {i} saw {current_context().user_id}")
        if current_context_or_none() is not None:
            errors.append(f"task {i} kept a context")

    async with anyio.create_task_group() as group:
        for i in range(1000):
            group.start_soon(request, i)
    assert errors == []


# -- frozen metadata: the mapping a context carries ----------------------------------------


def test_frozen_metadata_is_a_read_only_mapping() -> None:
    import pickle

    ctx = UserExecutionContext.create("alice", metadata={"plan": "pro", "seats": 3})
    metadata = ctx.metadata
    assert len(metadata) == 2
    assert "plan" in metadata
    assert "nope" not in metadata
    assert metadata == {"plan": "pro", "seats": 3}
    assert metadata == UserExecutionContext.create("bob", metadata=dict(metadata)).metadata
    assert metadata != ["plan", "seats"]
    assert hash(metadata) == hash(metadata)  # computed once, then kept
    assert repr(metadata) == "FrozenDict({'plan': 'pro', 'seats': 3})"
    assert pickle.loads(pickle.dumps(metadata)) == metadata  # noqa: S301 - our own bytes
    with pytest.raises(AttributeError, match="with_metadata"):
        metadata.plan = "free"  # type: ignore[attr-defined]


def test_metadata_must_be_a_mapping_and_not_too_deep() -> None:
    with pytest.raises(ContextValidationError, match="must be a mapping, got list"):
        UserExecutionContext.create("alice", metadata=[("a", 1)])  # type: ignore[arg-type]
    nested: object = 1
    for _ in range(20):
        nested = [nested]
    with pytest.raises(ContextValidationError, match="nested deeper than 16 levels"):
        UserExecutionContext.create("alice", metadata={"deep": nested})


def test_subclasses_of_plain_values_freeze_to_the_plain_value() -> None:
    class Name(str):
        __slots__ = ()

    class Count(int):
        pass

    ctx = UserExecutionContext.create("alice", metadata={"name": Name("x"), "n": Count(2)})
    assert type(ctx.metadata["name"]) is str
    assert type(ctx.metadata["n"]) is int


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        ({"$uuid": 5}, r"\$uuid must hold a string"),
        ({"$date": "not a date"}, r"invalid \$date value"),
        ({"$oops": "x", "other": 1}, "unknown tag"),
    ],
)
def test_bad_tags_in_serialized_metadata_are_refused(encoded, message) -> None:
    data = UserExecutionContext.create("alice").to_dict()
    data["metadata"] = {"key": encoded}
    with pytest.raises(ContextValidationError, match=message):
        UserExecutionContext.from_dict(data)


def test_tagged_values_survive_serialization() -> None:
    import uuid as uuid_module
    from decimal import Decimal as Dec

    value = {
        "when": dt.date(2026, 12, 6),
        "id": uuid_module.UUID(int=5),
        "price": Dec("1.50"),
        "blob": b"\x00\x01",
        "$dollar": "kept",
    }
    ctx = UserExecutionContext.create("alice", metadata=value)
    assert UserExecutionContext.from_dict(ctx.to_dict()).metadata == value
