"""ORM tenant filters, on every database of the fixture (row-level security: tests/databases)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import joinedload, selectinload

from reqscope import (
    IsolatedSessionFactory,
    IsolationViolation,
    ReqscopeError,
    TenantPolicy,
    UserExecutionContext,
)
from reqscope.tenancy import rls_policy_sql
from tenant_models import Comment, Doc, drop, recreate

pytestmark = pytest.mark.anyio

ORM_ONLY = TenantPolicy(rls=False)


@pytest.fixture(name="tenant_factory")
async def _tenant_factory(database) -> AsyncIterator[IsolatedSessionFactory]:
    async with IsolatedSessionFactory(database.url, tenant=ORM_ONLY) as factory:
        await recreate(factory.engine)
        yield factory
        await drop(factory.engine)


async def seed(factory: IsolatedSessionFactory, user: str, titles: list[str]) -> list[int]:
    async with factory.begin(UserExecutionContext.create(user)) as session:
        docs = [Doc(title=title) for title in titles]  # user_id is stamped from the context
        session.add_all(docs)
        await session.flush()
        return [doc.id for doc in docs]


async def test_select_get_and_relationships_see_only_own_rows(tenant_factory) -> None:
    factory = tenant_factory
    (alice_doc,) = await seed(factory, "alice", ["a"])
    (bob_doc,) = await seed(factory, "bob", ["b"])
    bob = UserExecutionContext.create("bob")
    async with factory.begin(bob) as session:  # bob comments on alice's document
        session.add(Comment(doc_id=alice_doc, body="bob was here"))
    alice = UserExecutionContext.create("alice")
    async with factory.begin(alice) as session:
        session.add(Comment(doc_id=alice_doc, body="mine"))
    async with factory.session(alice) as session:
        docs = (await session.scalars(select(Doc))).all()
        assert [(d.title, d.user_id) for d in docs] == [("a", "alice")]
        assert await session.get(Doc, bob_doc) is None
        assert (await session.get(Doc, alice_doc)).title == "a"
        loaded = (await session.scalars(select(Doc).options(selectinload(Doc.comments)))).one()
        assert [c.body for c in loaded.comments] == ["mine"]
        session.expunge_all()
        joined = (
            (await session.scalars(select(Doc).options(joinedload(Doc.comments)))).unique().one()
        )
        assert [c.body for c in joined.comments] == ["mine"]
        count = (await session.execute(select(func.count()).select_from(Comment))).scalar_one()
        assert count == 1
        # Raw SQL is not filtered by the ORM layer (row-level security is what covers it).
        raw = (await session.execute(text("SELECT count(*) FROM reqscope_tenant_docs"))).scalar()
        assert raw == 2


async def test_bulk_update_and_delete_touch_only_own_rows(tenant_factory) -> None:
    factory = tenant_factory
    await seed(factory, "alice", ["a1", "a2"])
    await seed(factory, "bob", ["b1"])
    alice = UserExecutionContext.create("alice")
    async with factory.begin(alice) as session:
        await session.execute(update(Doc).values(title="renamed"))
        await session.execute(delete(Doc).where(Doc.title == "renamed"))
    bob = UserExecutionContext.create("bob")
    async with factory.session(bob) as session:
        assert [d.title for d in (await session.scalars(select(Doc))).all()] == ["b1"]
    async with factory.session(alice) as session:
        assert (await session.scalars(select(Doc))).all() == []


async def test_flush_refuses_foreign_rows_and_stamps_own(tenant_factory) -> None:
    factory = tenant_factory
    alice = UserExecutionContext.create("alice")
    with pytest.raises(IsolationViolation, match=r"own user's rows"):
        async with factory.begin(alice) as session:
            session.add(Doc(title="forged", user_id="bob"))
    (doc_id,) = await seed(factory, "alice", ["mine"])
    with pytest.raises(IsolationViolation, match=r"another user's tenant"):
        async with factory.begin(alice) as session:
            doc = await session.get(Doc, doc_id)
            doc.user_id = "bob"
    async with factory.begin(alice) as session:
        doc = await session.get(Doc, doc_id)
        doc.title = "edited"  # a change that keeps the tenant is fine
    async with factory.session(alice) as session:
        assert (await session.get(Doc, doc_id)).title == "edited"


async def test_no_stamping_when_disabled(database) -> None:
    policy = TenantPolicy(rls=False, stamp_inserts=False)
    async with IsolatedSessionFactory(database.url, tenant=policy) as factory:
        await recreate(factory.engine)
        try:
            with pytest.raises(IsolationViolation):
                async with factory.begin(UserExecutionContext.create("alice")) as session:
                    session.add(Doc(title="no tenant"))
        finally:
            await drop(factory.engine)


async def test_admin_bypass_is_explicit_and_logged(tenant_factory, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="reqscope")
    factory = tenant_factory
    await seed(factory, "alice", ["a"])
    await seed(factory, "bob", ["b"])
    admin = UserExecutionContext.create("ops", metadata={"reqscope_admin": True})
    async with factory.session(admin, bypass_tenant=True) as session:
        assert len((await session.scalars(select(Doc))).all()) == 2
    assert any("bypassed by admin" in r.getMessage() for r in caplog.records)
    for ctx in (
        UserExecutionContext.create("mallory"),
        UserExecutionContext.create("mallory", metadata={"reqscope_admin": "true"}),
    ):
        with pytest.raises(IsolationViolation, match="not marked"):
            async with factory.session(ctx, bypass_tenant=True):
                pass
    assert any("refused a tenant bypass" in r.getMessage() for r in caplog.records)
    async with factory.session(admin) as session:  # no bypass asked: filtered as usual
        assert (await session.scalars(select(Doc))).all() == []


async def test_a_refused_bypass_does_not_take_the_half_open_probe(database) -> None:
    # The refusal comes before the breaker admits the call: a half-open circuit's one probe
    # stays free for a request that can use it, and that request closes the circuit.
    from reqscope import CircuitBreaker, CircuitState

    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=1.0, clock=lambda: now[0])
    async with IsolatedSessionFactory(
        database.url, tenant=ORM_ONLY, circuit_breaker=breaker
    ) as factory:
        breaker.record_failure()
        now[0] = 2.0
        assert breaker.state is CircuitState.HALF_OPEN
        with pytest.raises(IsolationViolation, match="not marked"):
            async with factory.session(UserExecutionContext.create("mallory"), bypass_tenant=True):
                pass
        async with factory.session(UserExecutionContext.create("alice")) as session:
            await session.execute(text("SELECT 1"))
        assert breaker.state is CircuitState.CLOSED


async def test_bypass_needs_a_policy(factory) -> None:
    ctx = UserExecutionContext.create("ops", metadata={"reqscope_admin": True})
    with pytest.raises(ReqscopeError, match="tenant policy"):
        async with factory.session(ctx, bypass_tenant=True):
            pass


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "update", "delete", "get"]),
            st.sampled_from(["alice", "bob", "carol"]),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=15,
    )
)
def test_random_operations_never_cross_tenants(tmp_path_factory, operations) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('tenancy') / 'db.sqlite3'}"

    async def run() -> None:
        model: dict[int, tuple[str, str]] = {}  # id -> (owner, title)
        async with IsolatedSessionFactory(url, tenant=ORM_ONLY) as factory:
            await recreate(factory.engine)
            for op, user, n in operations:
                ctx = UserExecutionContext.create(user)
                async with factory.begin(ctx) as session:
                    if op == "insert":
                        doc = Doc(title=f"{user}-{n}")
                        session.add(doc)
                        await session.flush()
                        model[doc.id] = (user, doc.title)
                    elif op == "update":
                        await session.execute(update(Doc).values(title=f"u{n}"))
                        for key, (owner, _) in model.items():
                            if owner == user:
                                model[key] = (owner, f"u{n}")
                    elif op == "delete":
                        await session.execute(delete(Doc).where(Doc.title == f"u{n}"))
                        model = {
                            k: v for k, v in model.items() if not (v[0] == user and v[1] == f"u{n}")
                        }
                    else:
                        for key, (owner, _) in model.items():
                            found = await session.get(Doc, key)
                            assert (found is not None) == (owner == user)
                for viewer in ("alice", "bob", "carol"):
                    async with factory.session(UserExecutionContext.create(viewer)) as s:
                        rows = {(d.id, d.user_id, d.title) for d in (await s.scalars(select(Doc)))}
                    assert rows == {(k, o, t) for k, (o, t) in model.items() if o == viewer}

    anyio.run(run)


def test_rls_policy_sql() -> None:
    statements = rls_policy_sql("app.notes", column="owner", guc="app.tenant", column_type="uuid")
    assert statements[0] == "ALTER TABLE app.notes ENABLE ROW LEVEL SECURITY"
    assert statements[1] == "ALTER TABLE app.notes FORCE ROW LEVEL SECURITY"
    create = statements[-1]
    assert "USING (owner = nullif(current_setting('app.tenant', true), '')::uuid)" in create
    assert "WITH CHECK (owner = nullif(current_setting('app.tenant', true), '')::uuid)" in create
    assert '"user"' in rls_policy_sql("user")[0]  # reserved words are quoted
    for bad in ({"guc": "nodot"}, {"guc": "a.b'; DROP TABLE x; --"}, {"column_type": "text; --"}):
        with pytest.raises(ValueError):
            rls_policy_sql("notes", **bad)
    with pytest.raises(ValueError, match=r"schema\.name"):
        rls_policy_sql("a.b.c")


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match=r"prefix\.name"):
        TenantPolicy(guc="user_id")
    with pytest.raises(ValueError, match="identifier"):
        TenantPolicy(column="user id")


async def test_every_kind_of_orm_load_sees_only_own_rows(tenant_factory) -> None:
    # The criteria reach lazy, deferred-column, refresh and aliased loads too, each with
    # the user's value (the criteria take it as a bound parameter).
    from sqlalchemy.orm import aliased, defer

    factory = tenant_factory
    (alice_doc,) = await seed(factory, "alice", ["a"])
    (bob_doc,) = await seed(factory, "bob", ["b"])
    async with factory.begin(UserExecutionContext.create("bob")) as session:
        session.add(Comment(doc_id=alice_doc, body="bob was here"))
    alice = UserExecutionContext.create("alice")
    async with factory.begin(alice) as session:
        session.add(Comment(doc_id=alice_doc, body="mine"))
    async with factory.session(alice) as session:
        doc = (await session.scalars(select(Doc).options(defer(Doc.title)))).one()
        assert await session.run_sync(lambda _: doc.title) == "a"  # a deferred column load
        comments = await session.run_sync(lambda _: doc.comments)  # a lazy load
        assert [c.body for c in comments] == ["mine"]
        await session.refresh(doc, ["title", "comments"])
        assert (doc.title, len(doc.comments)) == ("a", 1)
        other = aliased(Doc)
        rows = (await session.execute(select(Doc.id, other.id).join(other, other.id > 0))).all()
        assert rows == [(alice_doc, alice_doc)]
        # ORM bulk UPDATE by primary key (executemany): bob's row is not touched.
        await session.execute(
            update(Doc),
            [{"id": alice_doc, "title": "a2"}, {"id": bob_doc, "title": "stolen"}],
        )
        await session.commit()
    async with factory.session(UserExecutionContext.create("bob")) as session:
        assert (await session.get(Doc, bob_doc)).title == "b"
    async with factory.session(alice) as session:
        assert (await session.get(Doc, alice_doc)).title == "a2"


async def test_orm_bulk_insert_stamps_own_rows_and_refuses_foreign_ones(tenant_factory) -> None:
    from sqlalchemy import insert

    factory = tenant_factory
    alice = UserExecutionContext.create("alice")
    async with factory.begin(alice) as session:
        await session.execute(insert(Doc), [{"title": "one"}, {"title": "two"}])
    with pytest.raises(IsolationViolation, match=r"own user's rows"):
        async with factory.begin(alice) as session:
            await session.execute(insert(Doc), [{"title": "x"}, {"title": "y", "user_id": "bob"}])
    async with factory.session(UserExecutionContext.create("auditor")) as session:
        raw = await session.execute(text("SELECT title, user_id FROM reqscope_tenant_docs"))
        assert sorted(raw.all()) == [("one", "alice"), ("two", "alice")]
