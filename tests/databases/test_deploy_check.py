"""``reqscope check --deploy`` on real PostgreSQL (and PgBouncer): each check fails on purpose.

A well-configured deployment passes every check; each test then breaks one thing (a
privileged role, a table without FORCE, a view, the TLS mode, too many workers, a missing
timeout, an undeclared pooler) and the check that guards it fails, saying why.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from conftest import server_behind, server_url
from reqscope import PoolConfig
from reqscope._deploy import DeployReport, run_deploy_check

pytestmark = pytest.mark.anyio

_made = itertools.count()


@dataclass
class Deployment:
    role: str  # the application's role: a new one each test (a pooler keeps server
    table: str  # connections logged in as a role, even a dropped one of the same name)
    url: str  # as the application role, the way the suite reaches the server
    direct: str  # as the application role, straight to the server
    admin: AsyncEngine  # the superuser, directly on the server

    async def sql(self, *statements: str) -> None:
        async with self.admin.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement.format(role=self.role, table=self.table)))


def _as_role(url: str, role: str) -> str:
    parsed = make_url(url).set(username=role)
    if parsed.get_driver_name() == "asyncpg":
        parsed = parsed.update_query_dict({"ssl": "disable"})
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(name="deployment")
async def _deployment(postgres) -> AsyncIterator[Deployment]:
    suffix = f"{os.getpid()}_{next(_made)}"
    role, table = f"reqscope_deploy_{suffix}", f"reqscope_deploy_docs_{suffix}"
    direct = server_behind(postgres.url)
    admin = create_async_engine(direct, poolclass=NullPool)
    deployment = Deployment(
        role, table, _as_role(postgres.url, role), _as_role(direct, role), admin
    )
    await deployment.sql(
        "CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS",
        "ALTER ROLE {role} SET statement_timeout = '30s'",
        "ALTER ROLE {role} SET idle_in_transaction_session_timeout = '60s'",
        "CREATE TABLE {table} (id serial PRIMARY KEY, user_id text NOT NULL)",
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        "CREATE POLICY tenant ON {table} USING "
        "(user_id = current_setting('app.current_user_id', true))",
        "GRANT SELECT ON {table} TO {role}",
    )
    try:
        yield deployment
    finally:
        await deployment.sql(
            "DROP VIEW IF EXISTS {table}_view",
            "DROP TABLE IF EXISTS {table}",
            "DROP OWNED BY {role}",
            "DROP ROLE IF EXISTS {role}",
        )
        await admin.dispose()


async def _check(deployment: Deployment, url: str | None = None, **options: object) -> DeployReport:
    options.setdefault("tables", (deployment.table,))
    return await run_deploy_check(url or deployment.url, **options)  # type: ignore[arg-type]


def _finding(report: DeployReport, check: str) -> tuple[str, str]:
    (found,) = [f for f in report.findings if f.check == check]
    return found.status, found.summary


async def test_a_well_configured_deployment_passes_every_check(deployment, monkeypatch) -> None:
    assert (await _check(deployment)).ok  # the way the suite reaches it (maybe a pooler)
    monkeypatch.delenv("REQSCOPE_POOLER", raising=False)
    report = await _check(deployment, deployment.direct)
    assert report.ok, report.to_dict()
    assert report.role == deployment.role
    assert {finding.check: finding.status for finding in report.findings} == {
        "pooler": "pass",
        "row-level security": "pass",
        "tls": "pass",
        "capacity": "pass",
        "statement_timeout": "pass",
        "idle_in_transaction_session_timeout": "pass",
    }
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("ALTER ROLE {role} SUPERUSER", "is a superuser"),
        ("ALTER ROLE {role} BYPASSRLS", "has BYPASSRLS"),
        (
            "ALTER TABLE {table} OWNER TO {role}; ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY",
            "lacks FORCE",
        ),
        (
            "CREATE VIEW {table}_view AS SELECT * FROM {table}; GRANT SELECT ON {table}_view TO {role}",
            "returns every tenant's rows",
        ),
    ],
    ids=["superuser", "bypassrls", "owner-without-force", "view"],
)
async def test_a_role_that_bypasses_row_level_security_fails(
    deployment, breakage, expected
) -> None:
    await deployment.sql(*breakage.split("; "))
    report = await _check(deployment)
    status, summary = _finding(report, "row-level security")
    assert (status, report.ok) == ("fail", False)
    assert expected in summary


async def test_a_database_without_row_level_security_is_said_so(deployment) -> None:
    await deployment.sql("ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    status, summary = _finding(await _check(deployment, tables=()), "row-level security")
    assert status in {"skip", "pass"}  # other suites' tables may have policies
    named = await _check(deployment)
    status, summary = _finding(named, "row-level security")
    assert status == "fail"
    assert "has no row-level security" in summary


async def test_asyncpg_in_its_default_tls_mode_against_a_server_without_tls_fails(
    deployment, postgres
) -> None:
    if postgres.name != "postgres-asyncpg":
        pytest.skip("asyncpg's default TLS mode")
    async with deployment.admin.connect() as conn:
        if await conn.scalar(text("SELECT current_setting('ssl')")) == "on":
            pytest.skip("this server offers TLS")
    url = make_url(deployment.url).set(query={})
    report = await _check(deployment, url.render_as_string(hide_password=False))
    status, summary = _finding(report, "tls")
    assert status == "fail"
    assert "Future exception was never retrieved" in summary


async def test_more_workers_than_the_server_takes_fail(deployment, monkeypatch) -> None:
    monkeypatch.delenv("REQSCOPE_POOLER", raising=False)
    async with deployment.admin.connect() as conn:
        limit = int(await conn.scalar(text("SELECT current_setting('max_connections')::int")))
    pool = PoolConfig(pool_size=5, max_overflow=5)
    direct = deployment.direct
    assert _finding(await _check(deployment, direct, workers=2, pool=pool), "capacity")[0] == "pass"
    report = await _check(deployment, direct, workers=limit, pool=pool)
    status, summary = _finding(report, "capacity")
    assert status == "fail"
    assert f"{limit} worker(s)" in summary


@pytest.mark.parametrize("setting", ["statement_timeout", "idle_in_transaction_session_timeout"])
async def test_an_unset_timeout_fails(deployment, setting) -> None:
    await deployment.sql(f"ALTER ROLE {{role}} RESET {setting}")
    # directly: a pooler's server connections keep the settings they logged in with
    report = await _check(deployment, deployment.direct)
    status, summary = _finding(report, setting)
    assert (status, report.ok) == ("fail", False)
    assert "is unset" in summary


async def test_an_undeclared_transaction_pooler_fails(deployment, postgres, monkeypatch) -> None:
    monkeypatch.delenv("REQSCOPE_POOLER", raising=False)
    bouncer = make_url(server_url("pgbouncer")).set(
        drivername=make_url(postgres.url).drivername,
        database=make_url(postgres.url).database,
        query={},
    )
    through = _as_role(bouncer.render_as_string(hide_password=False), deployment.role)
    status, summary = _finding(await _check(deployment, through), "pooler")
    assert status == "fail"
    assert "transaction mode" in summary
    report = await _check(deployment, through, pooler="pgbouncer")
    assert _finding(report, "pooler")[0] == "pass"
    assert _finding(report, "capacity")[0] == "skip"  # the pooler is sized instead
    # declared, but direct: nothing breaks, said so
    direct = await _check(deployment, deployment.direct, pooler="pgbouncer")
    assert _finding(direct, "pooler")[0] == "warn"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - this interpreter, the project's own command
        [sys.executable, "-m", "reqscope", "check", "--deploy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_command_exits_by_its_verdict(deployment) -> None:
    good = _cli("--database-url", deployment.url, "--tables", deployment.table, "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["ok"] is True
    await deployment.sql("ALTER ROLE {role} RESET statement_timeout")
    bad = _cli("--database-url", deployment.direct, "--tables", deployment.table)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL  statement_timeout: statement_timeout is unset" in bad.stdout
    assert "do: ALTER ROLE" in bad.stdout
    assert "FAILED" in bad.stdout


def test_the_command_refuses_what_it_cannot_check(tmp_path) -> None:
    missing = _cli()
    assert missing.returncode == 2
    assert "give --database-url" in missing.stderr
    sqlite = _cli("--database-url", f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    assert sqlite.returncode == 2
    assert "the deploy checks are for PostgreSQL" in sqlite.stderr
