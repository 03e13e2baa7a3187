"""Row-level security on real PostgreSQL, as a role that is not superuser and owns nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from conftest import server_url
from reqscope import (
    IsolatedSessionFactory,
    PoolConfig,
    TenancyConfigurationError,
    TenantPolicy,
    UserExecutionContext,
    build_engine,
)
from reqscope.tenancy import rls_policy_sql
from tenant_models import TABLES, Doc, TenantBase

pytestmark = pytest.mark.anyio

APP, BYPASS, OWNER = "reqscope_app", "reqscope_bypass", "reqscope_owner"
MEMBER, NOINHERIT = "reqscope_owner_member", "reqscope_owner_noinherit"
OWNED = "reqscope_owned_notes"
VIEW = "reqscope_docs_view"


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role).render_as_string(hide_password=False)


async def _ddl(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def _drop_views(admin: AsyncEngine) -> None:
    await _ddl(admin, f"DROP MATERIALIZED VIEW IF EXISTS {VIEW}_m", f"DROP VIEW IF EXISTS {VIEW}")


@pytest.fixture(name="rls")
async def _rls(postgres) -> AsyncIterator[str]:
    """Tables owned by the superuser, RLS forced, DML granted to an unprivileged role."""
    admin = create_async_engine(postgres.url, poolclass=NullPool)
    roles = {
        APP: "NOSUPERUSER NOBYPASSRLS",
        BYPASS: "NOSUPERUSER BYPASSRLS",
        OWNER: "NOSUPERUSER",
        MEMBER: "NOSUPERUSER NOBYPASSRLS INHERIT",
        NOINHERIT: "NOSUPERUSER NOBYPASSRLS NOINHERIT",
    }
    for role, options in roles.items():
        await _ddl(
            admin,
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} LOGIN; END IF; END $$",
            f"ALTER ROLE {role} {options}",
        )
    await _drop_views(admin)
    async with admin.begin() as conn:
        await conn.run_sync(TenantBase.metadata.drop_all)
        await conn.run_sync(TenantBase.metadata.create_all)
    for table in TABLES:
        await _ddl(
            admin,
            *rls_policy_sql(table),
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP}, {BYPASS}",
        )
    await _ddl(
        admin,
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP}, {BYPASS}",
        f"GRANT {OWNER} TO {MEMBER}, {NOINHERIT}",
    )
    yield postgres.url
    await _drop_views(admin)
    async with admin.begin() as conn:
        await conn.run_sync(TenantBase.metadata.drop_all)
    await _ddl(admin, f"DROP TABLE IF EXISTS {OWNED}")
    await admin.dispose()


async def seed(factory: IsolatedSessionFactory, user: str, count: int) -> None:
    async with factory.begin(UserExecutionContext.create(user)) as session:
        session.add_all(Doc(title=f"{user}-{i}") for i in range(count))


async def test_raw_sql_sees_only_own_rows_and_cannot_write_foreign(rls) -> None:
    async with IsolatedSessionFactory(as_role(rls, APP), tenant=TenantPolicy()) as factory:
        report = await factory.check_tenancy()
        assert report.ok
        assert report.role == APP
        await seed(factory, "alice", 2)
        await seed(factory, "bob", 3)
        async with factory.session(UserExecutionContext.create("alice")) as session:
            rows = (await session.execute(text("SELECT user_id FROM reqscope_tenant_docs"))).all()
            assert [r[0] for r in rows] == ["alice", "alice"]
            setting = "SELECT current_setting('reqscope.user_id', true)"
            assert (await session.execute(text(setting))).scalar() == "alice"
        with pytest.raises(sa_exc.DBAPIError, match="row-level security"):
            async with factory.begin(UserExecutionContext.create("alice")) as session:
                await session.execute(
                    text("INSERT INTO reqscope_tenant_docs (user_id, title) VALUES ('bob', 'x')")
                )
        # admin bypass lifts the ORM filter, never RLS: with no tenant set nothing matches
        admin = UserExecutionContext.create("ops", metadata={"reqscope_admin": True})
        async with factory.session(admin, bypass_tenant=True) as session:
            assert (await session.scalars(select(Doc))).all() == []


async def test_a_thousand_requests_never_see_a_foreign_row(rls) -> None:
    pool = PoolConfig(pool_size=10, max_overflow=0, pool_timeout=60)
    engine = build_engine(as_role(rls, APP), pool=pool)
    async with IsolatedSessionFactory(engine, tenant=TenantPolicy()) as factory:
        users = [f"user-{i}" for i in range(100)]
        foreign: list[str] = []

        async def request(n: int) -> None:
            user = users[n % 100]
            ctx = UserExecutionContext.create(user)
            async with factory.begin(ctx) as session:
                await session.execute(
                    text("INSERT INTO reqscope_tenant_docs (user_id, title) VALUES (:u, :t)"),
                    {"u": user, "t": str(n)},
                )
            async with factory.session(ctx) as session:
                owners = await session.scalars(text("SELECT user_id FROM reqscope_tenant_docs"))
                foreign.extend(owner for owner in owners if owner != user)

        async with anyio.create_task_group() as group:
            for n in range(1000):
                group.start_soon(request, n)
        assert foreign == []
        # Every pooled connection now reads an empty setting: nothing survived a request.
        async with anyio.create_task_group() as group:
            settings: list[str | None] = []

            async def probe() -> None:
                async with engine.connect() as conn:
                    value = await conn.scalar(
                        text("SELECT current_setting('reqscope.user_id', true)")
                    )
                    settings.append(value)
                    await anyio.sleep(0.05)

            for _ in range(10):
                group.start_soon(probe)
        assert settings == [""] * 10
    await engine.dispose()


async def test_guc_hygiene_on_one_reused_connection(rls) -> None:
    engine = build_engine(as_role(rls, APP), pool=PoolConfig(pool_size=1, max_overflow=0))
    users = ("alice", "bob")
    async with IsolatedSessionFactory(engine, tenant=TenantPolicy()) as factory:
        pids = set()
        for n in range(1000):
            async with engine.connect() as conn:  # what the next borrower of the slot sees
                before = await conn.scalar(text("SELECT current_setting('reqscope.user_id', true)"))
                pids.add(await conn.scalar(text("SELECT pg_backend_pid()")))
            assert before in ("", None), f"request {n} started with {before!r}"
            user = users[n % 2]
            async with factory.session(UserExecutionContext.create(user)) as session:
                seen = await session.scalar(
                    text("SELECT current_setting('reqscope.user_id', true)")
                )
                assert seen == user
        assert len(pids) == 1  # really one reused connection
    await engine.dispose()


@pytest.mark.parametrize(
    ("role", "problem"),
    [("postgres", "superuser"), (BYPASS, "BYPASSRLS"), (OWNER, "FORCE ROW LEVEL SECURITY")],
)
async def test_check_tenancy_refuses_roles_that_bypass_rls(rls, role, problem) -> None:
    admin = create_async_engine(rls, poolclass=NullPool)
    await _ddl(
        admin,
        f"DROP TABLE IF EXISTS {OWNED}",
        f"CREATE TABLE {OWNED} (id serial primary key, user_id text)",
        f"ALTER TABLE {OWNED} OWNER TO {OWNER}",
        f"ALTER TABLE {OWNED} ENABLE ROW LEVEL SECURITY",  # enabled, not forced
    )
    await admin.dispose()
    url = rls if role == "postgres" else as_role(rls, role)
    factory = IsolatedSessionFactory(url, tenant=TenantPolicy())
    try:
        with pytest.raises(TenancyConfigurationError, match=problem):
            await factory.check_tenancy(tables=(*TABLES, OWNED))
        if role != OWNER:  # and the factory refuses to start at all
            with pytest.raises(TenancyConfigurationError, match=problem):
                await factory.start()
    finally:
        await factory.aclose()


async def _owned_table_with_a_policy(admin: AsyncEngine) -> None:
    """OWNED, owned by OWNER, RLS enabled with a tenant policy but not forced; rows of two users."""
    await _ddl(
        admin,
        f"DROP TABLE IF EXISTS {OWNED}",
        f"CREATE TABLE {OWNED} (id serial primary key, user_id text)",
        f"INSERT INTO {OWNED} (user_id) VALUES ('alice'), ('bob')",
        f"ALTER TABLE {OWNED} OWNER TO {OWNER}",
        f"ALTER TABLE {OWNED} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant ON {OWNED} USING "
        "(user_id = nullif(current_setting('reqscope.user_id', true), ''))",
    )


async def test_a_member_of_the_owning_role_is_refused(rls) -> None:
    """A member inheriting the owner's privileges bypasses RLS on a table without FORCE."""
    admin = create_async_engine(rls, poolclass=NullPool)
    await _owned_table_with_a_policy(admin)
    await admin.dispose()
    factory = IsolatedSessionFactory(as_role(rls, MEMBER), tenant=TenantPolicy())
    try:
        # what the check protects against: alice's raw SQL reads bob's row
        async with factory.session(UserExecutionContext.create("alice")) as session:
            owners = (await session.scalars(text(f"SELECT user_id FROM {OWNED}"))).all()
        assert sorted(owners) == ["alice", "bob"]
        with pytest.raises(TenancyConfigurationError, match=f"member of {OWNER!r}") as info:
            await factory.check_tenancy(tables=(OWNED,))
        assert "FORCE ROW LEVEL SECURITY" in str(info.value)
    finally:
        await factory.aclose()
    # a member that does not inherit the privileges is bound, but could SET ROLE: a warning
    factory = IsolatedSessionFactory(as_role(rls, NOINHERIT), tenant=TenantPolicy())
    try:
        report = await factory.check_tenancy(tables=(OWNED,))
        assert report.ok
        assert any("SET ROLE" in warning for warning in report.warnings)
    finally:
        await factory.aclose()


@pytest.mark.parametrize(
    ("owner", "options", "leaks"),
    [
        ("postgres", "", True),  # a superuser's view: every tenant's rows
        (BYPASS, "", True),
        ("postgres", "WITH (security_invoker = true)", False),  # runs as the app role
        (APP, "", False),  # the app role is bound by the (forced) policy: so is its view
    ],
)
async def test_views_over_tenant_tables_that_bypass_rls_are_refused(
    rls, owner, options, leaks, monkeypatch
) -> None:
    admin = create_async_engine(rls, poolclass=NullPool)
    await _ddl(
        admin,
        f"CREATE VIEW {VIEW} {options} AS SELECT d.user_id, d.title FROM reqscope_tenant_docs d",
        f"ALTER VIEW {VIEW} OWNER TO {owner}",
        f"GRANT SELECT ON reqscope_tenant_docs TO {owner}",
        f"GRANT SELECT ON {VIEW} TO {APP}",
    )
    await admin.dispose()
    factory = IsolatedSessionFactory(as_role(rls, APP), tenant=TenantPolicy())
    try:
        if leaks:
            with pytest.raises(TenancyConfigurationError, match=f"view {VIEW!r}") as info:
                await factory.check_tenancy()
            assert "security_invoker" in str(info.value)
            assert "reqscope_tenant_docs" in str(info.value)
            with pytest.raises(TenancyConfigurationError):  # the factory does not start
                await factory.start()
            with pytest.raises(TenancyConfigurationError):  # nor on its first session
                await seed(factory, "alice", 1)
            # What the check prevents, shown for real: skip it, and the view leaks.
            monkeypatch.setattr(factory, "check_tenancy", _no_check)
        await seed(factory, "alice", 1)
        await seed(factory, "bob", 1)
        async with factory.session(UserExecutionContext.create("alice")) as session:
            owners = (await session.scalars(text(f"SELECT user_id FROM {VIEW}"))).all()
        assert sorted(owners) == (["alice", "bob"] if leaks else ["alice"])
        if not leaks:
            assert (await factory.check_tenancy()).ok
    finally:
        await factory.aclose()


async def _no_check() -> None:
    return None


async def test_a_materialized_view_over_a_tenant_table_is_refused(rls) -> None:
    admin = create_async_engine(rls, poolclass=NullPool)
    await _ddl(
        admin,
        f"CREATE VIEW {VIEW} WITH (security_invoker = true) AS "
        "SELECT user_id FROM reqscope_tenant_docs",
        f"CREATE MATERIALIZED VIEW {VIEW}_m AS SELECT user_id FROM {VIEW}",  # through a view
        f"GRANT SELECT ON {VIEW}, {VIEW}_m TO {APP}",
    )
    await admin.dispose()
    factory = IsolatedSessionFactory(as_role(rls, APP), tenant=TenantPolicy())
    try:
        with pytest.raises(TenancyConfigurationError, match=f"materialized view {VIEW}_m") as info:
            await factory.check_tenancy()
        assert f"view {VIEW!r}" not in str(info.value)  # the invoker view itself is fine
    finally:
        await factory.aclose()


async def test_check_tenancy_reports_missing_rls_and_force(rls) -> None:
    admin = create_async_engine(rls, poolclass=NullPool)
    await _ddl(
        admin,
        f"DROP TABLE IF EXISTS {OWNED}",
        f"CREATE TABLE {OWNED} (id serial primary key, user_id text)",
    )
    factory = IsolatedSessionFactory(as_role(rls, APP), tenant=TenantPolicy())
    try:
        with pytest.raises(TenancyConfigurationError, match="no row-level security"):
            await factory.check_tenancy(tables=(OWNED,))
        await _ddl(admin, f"ALTER TABLE {OWNED} ENABLE ROW LEVEL SECURITY")
        report = await factory.check_tenancy(tables=(OWNED,))  # not owned by APP: a warning
        assert report.ok
        assert "lacks FORCE" in report.warnings[0]
        with pytest.raises(TenancyConfigurationError, match="does not exist"):
            await factory.check_tenancy(tables=("no_such_table",))
    finally:
        await factory.aclose()
        await admin.dispose()


async def test_check_tenancy_needs_postgres(tmp_path) -> None:
    async with IsolatedSessionFactory(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tenant=TenantPolicy()
    ) as factory:
        with pytest.raises(TenancyConfigurationError, match="needs PostgreSQL"):
            await factory.check_tenancy()


async def test_a_session_opened_before_the_user_is_known_becomes_theirs(rls) -> None:
    # The tutorial's get_current_user runs a query on the request's session before the
    # request knows its user: inside that same transaction, row-level security, the ORM
    # filter and the tags must all switch to the user once the request is identified.
    from reqscope._requests import RequestResources

    async with IsolatedSessionFactory(as_role(rls, APP), tenant=TenantPolicy()) as factory:
        await seed(factory, "alice", 2)
        await seed(factory, "bob", 1)
        resources = RequestResources(
            UserExecutionContext.create("anonymous:r1"), factory, identified=False
        )
        try:
            session = await resources.session()
            raw = text("SELECT count(*) FROM reqscope_tenant_docs")
            assert await session.scalar(raw) == 0  # the anonymous user owns no rows
            assert session.in_transaction()
            await resources.identify("alice")
            assert await session.scalar(raw) == 2  # same transaction, now alice's rows
            assert len((await session.scalars(select(Doc))).all()) == 2
            setting = text("SELECT current_setting('reqscope.user_id', true)")
            assert await session.scalar(setting) == "alice"
            assert session.info["user_id"] == "alice"
        finally:
            await resources.aclose()


async def test_row_level_security_confines_reads_on_a_streaming_replica(rls) -> None:
    replica = as_role(server_url("postgres-replica"), APP)
    async with IsolatedSessionFactory(
        as_role(rls, APP), tenant=TenantPolicy(), replicas=[replica], replica_check_interval=0.05
    ) as factory:
        await seed(factory, "alice", 2)
        await seed(factory, "bob", 3)
        everyone = text("SELECT user_id FROM reqscope_tenant_docs ORDER BY user_id")
        with anyio.fail_after(20):  # until the standby has replayed the seed
            while True:
                async with factory.session(
                    UserExecutionContext.create("bob"), read_only=True
                ) as session:
                    on_standby = "SELECT pg_is_in_recovery()"
                    assert (await session.execute(text(on_standby))).scalar_one()
                    if len((await session.execute(everyone)).all()) == 3:
                        break
                await anyio.sleep(0.05)
        async with factory.session(UserExecutionContext.create("alice"), read_only=True) as session:
            assert (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
            assert [row[0] for row in (await session.execute(everyone)).all()] == ["alice", "alice"]
        assert factory.metrics().replica_sessions >= 2
