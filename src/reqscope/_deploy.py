"""``reqscope check --deploy``: the traps of a production PostgreSQL, checked before they bite.

Each check reads what the server says about the URL's role and connection (nothing is
written) and reports ``pass``, ``warn``, ``fail`` or ``skip``, with what to do for what
does not pass. The command exits non-zero when any check fails.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from reqscope._pool import POOLER_VARIABLE, PoolConfig, connect_args, resolve_pooler
from reqscope.exceptions import ReqscopeError
from reqscope.tenancy import inspect_tenancy

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["DeployFinding", "DeployReport", "run_deploy_check"]

Status = Literal["pass", "warn", "fail", "skip"]

_BACKEND_PID: Final = text("SELECT pg_backend_pid()")
# tables with row-level security this role can see (outside the system schemas)
_RLS_TABLES: Final = text(
    "SELECT c.oid::regclass::text FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
)
HOLDERS: Final = 2  # connections that hold a transaction while the probe looks again


@dataclass(frozen=True, slots=True)
class DeployFinding:
    """One check's verdict: what it found and, unless it passed, what to do."""

    check: str
    status: Status
    summary: str
    advice: str | None = None


@dataclass(frozen=True, slots=True)
class DeployReport:
    """Every check's finding for one database URL."""

    database: str
    role: str
    findings: tuple[DeployFinding, ...]

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return all(finding.status != "fail" for finding in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, with ``ok``."""
        return {
            "database": self.database,
            "role": self.role,
            "ok": self.ok,
            "findings": [asdict(finding) for finding in self.findings],
        }


async def run_deploy_check(
    url: str,
    *,
    workers: int = 1,
    pool: PoolConfig | None = None,
    pooler: str | None = None,
    tables: tuple[str, ...] = (),
    timeout: float = 5.0,
) -> DeployReport:
    """Check the production database at ``url`` for the traps of a multi-instance service.

    Args:
        url: the URL the application uses (same role, same route: through the pooler if
            it goes through one).
        workers: processes (workers times instances) that each open a pool to it.
        pool: the pool settings of each process (:meth:`PoolConfig.standard` by default).
        pooler: the pooler the application declares (``"pgbouncer"``); also read from
            ``REQSCOPE_POOLER`` and ``pool.pooler``.
        tables: the tenant tables; by default every table with row-level security.
        timeout: seconds to connect and for each query.

    Raises:
        ReqscopeError: not a PostgreSQL URL, or bad arguments.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ReqscopeError(
            f"the deploy checks are for PostgreSQL; {parsed.drivername!r} is not (the isolation "
            "check, `reqscope check` without --deploy, runs on any database)"
        )
    if workers < 1:
        raise ReqscopeError(f"--workers must be at least 1, got {workers}")
    pool = pool or PoolConfig.standard()
    declared = pooler or resolve_pooler(parsed, pool.pooler)
    # The probe itself must work behind a pooler: never a prepared statement of its own.
    engine = create_async_engine(
        parsed, poolclass=NullPool, connect_args=connect_args(parsed, timeout, "pgbouncer")
    )
    try:
        async with engine.connect() as conn:
            role = str(await conn.scalar(text("SELECT current_user")))
            behind = await _transaction_pooling(engine, conn)
            findings = [
                _pooler_finding(behind, declared),
                *await _rls_findings(engine, conn, tables),
                await _tls_finding(conn, parsed),
                await _capacity_finding(conn, workers, pool, behind or declared is not None),
                *await _timeout_findings(conn, role),
            ]
    finally:
        await engine.dispose()
    return DeployReport(parsed.render_as_string(hide_password=True), role, tuple(findings))


async def _transaction_pooling(engine: AsyncEngine, conn: AsyncConnection) -> bool:
    """Whether a pooler in transaction mode stands in front: the backend changes in between.

    Directly, a connection keeps its backend for life. Behind a transaction-mode pooler,
    the backend ``conn`` used goes back to the pooler when its transaction ends; other
    connections then hold transactions open (a pooler hands out the backend freed last
    first), and ``conn``'s next transaction runs on another one.
    """
    first = await conn.scalar(_BACKEND_PID)
    await conn.commit()
    holders = [await engine.connect() for _ in range(HOLDERS)]
    try:
        for holder in holders:
            await holder.scalar(_BACKEND_PID)  # inside a transaction, which it keeps
        second = await conn.scalar(_BACKEND_PID)
        await conn.commit()
    finally:
        for holder in holders:
            await holder.close()
    return bool(first != second)


def _pooler_finding(behind: bool, declared: str | None) -> DeployFinding:
    if behind and declared is None:
        return DeployFinding(
            "pooler",
            "fail",
            "a pooler in transaction mode stands in front of the server (one connection's "
            "transactions ran on different backends), and prepared statements are on: asyncpg "
            "fails with 'prepared statement ... does not exist', psycopg after five runs of a "
            "statement",
            f"declare it: PoolConfig(pooler='pgbouncer'), or {POOLER_VARIABLE}=pgbouncer in "
            "the environment of every process (--pooler pgbouncer here)",
        )
    if behind:
        return DeployFinding(
            "pooler",
            "pass",
            f"a pooler in transaction mode stands in front, declared ({declared}): prepared "
            "statements are off",
        )
    if declared is not None:
        return DeployFinding(
            "pooler",
            "warn",
            f"{declared} is declared, but one connection kept its backend between "
            "transactions: direct, or the pooler is in session mode",
            "nothing breaks; undeclare it for a direct connection, to keep prepared "
            "statements (they save a round trip per statement)",
        )
    return DeployFinding("pooler", "pass", "no pooler in transaction mode in front")


async def _rls_findings(
    engine: AsyncEngine, conn: AsyncConnection, tables: tuple[str, ...]
) -> list[DeployFinding]:
    if not tables:
        tables = tuple((await conn.scalars(_RLS_TABLES)).all())
        await conn.commit()
    report = await inspect_tenancy(engine, tables)
    scope = f"{len(tables)} tenant table(s)" if tables else "no table with row-level security"
    if report.problems:
        return [
            DeployFinding(
                "row-level security",
                "fail",
                f"{scope}: " + "; ".join(report.problems),
                "connect as an unprivileged application role that owns no tenant table, "
                "FORCE row-level security on every tenant table, make views security_invoker",
            )
        ]
    if not tables:
        return [
            DeployFinding(
                "row-level security",
                "skip",
                f"role {report.role!r} bypasses nothing, but no table has row-level "
                "security: only the ORM tenant filters confine what a request reads",
                "apply reqscope.tenancy.rls_policy_sql() to the tenant tables "
                "(docs/tenancy.md), or name them with --tables",
            )
        ]
    return [
        DeployFinding(
            "row-level security",
            "warn" if report.warnings else "pass",
            f"role {report.role!r} is bound by the policies of {scope}"
            + ("; " + "; ".join(report.warnings) if report.warnings else ""),
        )
    ]


async def _tls_finding(conn: AsyncConnection, url: URL) -> DeployFinding:
    server_tls = str(await conn.scalar(text("SELECT current_setting('ssl')"))) == "on"
    in_use = bool(
        await conn.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
    )
    await conn.commit()
    mode = url.query.get("ssl") or url.query.get("sslmode")
    driver = url.get_driver_name()
    summary = (
        f"the URL's TLS mode is {mode or 'the default'!s}, the server "
        f"{'offers' if server_tls else 'does not offer'} TLS, this connection "
        f"{'uses' if in_use else 'does not use'} it"
    )
    if driver == "asyncpg" and mode is None and not server_tls:
        return DeployFinding(
            "tls",
            "fail",
            summary + ": asyncpg's default ('prefer') tries TLS first, and every cancelled "
            "query then logs 'Future exception was never retrieved ... connection_lost()'",
            "add ?ssl=disable to the URL, or enable TLS on the server",
        )
    if not in_use and not _loopback(url.host):
        return DeployFinding(
            "tls",
            "warn",
            summary + f": queries and results cross the network to {url.host} in clear",
            "enable TLS on the server and require it in the URL (?ssl=require for asyncpg, "
            "?sslmode=require for psycopg)",
        )
    return DeployFinding("tls", "pass", summary)


def _loopback(host: str | None) -> bool:
    if not host or host == "localhost" or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _capacity_finding(
    conn: AsyncConnection, workers: int, pool: PoolConfig, pooled: bool
) -> DeployFinding:
    row = (
        await conn.execute(
            text(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int, "
                "coalesce(current_setting('reserved_connections', true), '0')::int, "
                "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
        )
    ).one()
    await conn.commit()
    max_connections, superuser_reserved, reserved, in_use = (int(value) for value in row)
    available = max_connections - superuser_reserved - reserved
    # each process: its pool, plus one connection for a health probe or a server-side cancel
    needed = workers * (pool.capacity + 1)
    summary = (
        f"{workers} worker(s) x (pool_size {pool.pool_size} + max_overflow "
        f"{pool.max_overflow} + 1) = {needed} connections; the server allows {available} "
        f"(max_connections {max_connections} - {superuser_reserved + reserved} reserved), "
        f"{in_use} in use now"
    )
    if pooled:
        return DeployFinding(
            "capacity",
            "skip",
            summary + "; behind a pooler the processes connect to it, not to the server",
            "size the pooler instead: max_client_conn >= the processes' connections, and "
            "default_pool_size x databases x users within the server's limit",
        )
    if needed > available:
        return DeployFinding(
            "capacity",
            "fail",
            summary + ": under load, connects fail with 'too many clients already'",
            f"lower pool_size/max_overflow to at most {max(0, available // workers - 1)} "
            "connections per process in all, run fewer workers, raise max_connections, or "
            "put PgBouncer in front",
        )
    return DeployFinding("capacity", "pass", summary)


async def _timeout_findings(conn: AsyncConnection, role: str) -> list[DeployFinding]:
    advice = {
        "statement_timeout": (
            "a runaway statement holds its connection and its locks until it ends",
            (
                f"ALTER ROLE {role} SET statement_timeout = '30s' (and/or the factory's "
                "statement_timeout=)"
            ),
        ),
        "idle_in_transaction_session_timeout": (
            "a request stuck inside a transaction holds its locks and a connection forever",
            f"ALTER ROLE {role} SET idle_in_transaction_session_timeout = '60s'",
        ),
    }
    findings = []
    for setting, (risk, fix) in advice.items():
        value = str(await conn.scalar(text(f"SELECT current_setting('{setting}')")))
        if value in {"0", "0ms"}:
            findings.append(DeployFinding(setting, "fail", f"{setting} is unset: {risk}", fix))
        else:
            findings.append(DeployFinding(setting, "pass", f"{setting} is {value}"))
    await conn.commit()
    return findings
