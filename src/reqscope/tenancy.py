"""Tenant isolation inside the database: ORM tenant filters and PostgreSQL row-level security.

Two layers, each with its own limits:

- **ORM filters** (every database): ORM ``SELECT``/``UPDATE``/``DELETE`` on models with the
  :class:`TenantScoped` mixin are restricted to the context's user (``with_loader_criteria``,
  relationship and joined loads included); flushes stamp or refuse the tenant column. Raw SQL
  (``text()``, Core on tables) is *not* filtered.
- **Row-level security** (PostgreSQL): every transaction starts with
  ``SELECT set_config(:guc, :uid, true)``, transaction-local, with bind parameters; policies
  from :func:`rls_policy_sql` then filter *every* query, raw SQL included, unless the role is a
  superuser, has ``BYPASSRLS``, or owns a table without ``FORCE ROW LEVEL SECURITY`` — which
  :meth:`reqscope.IsolatedSessionFactory.check_tenancy` refuses.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from sqlalchemy import String, bindparam, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, Session, mapped_column, with_loader_criteria

from reqscope._logging import get_logger
from reqscope.exceptions import IsolationViolation, TenancyConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import Connection, Result
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.orm import ORMExecuteState
    from sqlalchemy.sql import Update


__all__ = [
    "TableStatus",
    "TenancyReport",
    "TenantPolicy",
    "TenantScoped",
    "rls_policy_sql",
]

logger = get_logger(__name__)

_GUC: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
_TYPE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*$")


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """How a factory confines sessions to the context's user.

    Args:
        column: the tenant column on tenant-scoped models and tables.
        guc: the PostgreSQL setting RLS policies read (must contain a dot).
        stamp_inserts: fill an unset tenant column on insert from the context.
        admin_marker: the metadata key the application sets to ``True`` on contexts allowed
            to use ``factory.session(ctx, bypass_tenant=True)``. Set it only from your own
            authorization code, never from client input or propagated headers.
        rls: on PostgreSQL, set ``guc`` in every transaction and check the role at start
            (``False``: ORM filters only).
    """

    column: str = "user_id"
    guc: str = "reqscope.user_id"
    stamp_inserts: bool = True
    admin_marker: str = "reqscope_admin"
    rls: bool = True

    def __post_init__(self) -> None:
        if not _GUC.match(self.guc):
            raise ValueError(
                f"guc must look like 'prefix.name' (letters, digits, underscores), got {self.guc!r}"
            )
        if not self.column.isidentifier():
            raise ValueError(f"column must be an identifier, got {self.column!r}")


class TenantScoped:
    """Declarative mixin: a ``user_id`` tenant column, and ORM tenant filtering on the model."""

    user_id: Mapped[str] = mapped_column(String(256), index=True)


def _scoped(entity: Any) -> bool:
    return isinstance(entity, type) and issubclass(entity, TenantScoped)


TENANT_PARAMETER: Final = "reqscope_tenant_user_id"


@functools.lru_cache(maxsize=32)
def _tenant_criteria(column: str) -> Any:
    """The loader-criteria option for ``column``: made once, the user a bound parameter.

    The criteria compare the column with a *required* bound parameter instead of capturing
    the user in a closure: one constant option per column, so SQLAlchemy neither analyses a
    new lambda nor builds a new cache key per statement, and a statement that somehow runs
    without the parameter fails instead of returning rows. ``add_tenant_criteria`` supplies
    the value to every ORM execution of a tenant session, relationship and column loads
    included (the option propagates to them).
    """
    namespace: dict[str, Any] = {"bindparam": bindparam}
    # The column and parameter names are written into the lambda's code (the column is a
    # validated identifier, see TenantPolicy): SQLAlchemy caches a criteria lambda by its
    # code, and would turn a name it reads from a variable into a tracked parameter.
    source = (
        f"criteria = lambda cls: cls.{column} == bindparam({TENANT_PARAMETER!r}, required=True)\n"
    )
    exec(compile(source, f"<reqscope tenant criteria {column}>", "exec"), namespace)  # noqa: S102
    return with_loader_criteria(TenantScoped, namespace["criteria"], include_aliases=True)


def add_tenant_criteria(
    state: ORMExecuteState, policy: TenantPolicy, user_id: str
) -> Result[Any] | None:
    """``do_orm_execute``: restrict ORM statements on tenant-scoped models to ``user_id``.

    Returns the result of the statement run with the tenant filter and parameter, or None
    when the statement needs neither. The statement is run again through
    ``state.invoke_statement()``: SQLAlchemy 2.0 ignores parameters a hook assigns to
    ``state.parameters`` (2.1 honours them), while ``invoke_statement()`` runs what the hook
    made on every 2.x release.
    """
    if state.is_insert:
        return _guard_bulk_insert(state, policy, user_id)
    if not (state.is_select or state.is_update or state.is_delete):
        return None
    if not (state.is_column_load or state.is_relationship_load):
        # Loads started by a statement carry its criteria already.
        statement = state.statement.options(_tenant_criteria(policy.column))
        if isinstance(state.parameters, list) and state.is_update and _targets_tenant(state):
            # ORM bulk UPDATE by primary key ignores loader criteria: add the tenant to its
            # WHERE clause. SQLAlchemy cannot synchronize the identity map for such an
            # update, so objects already loaded keep their old values until refreshed.
            column = getattr(state.bind_mapper.class_, policy.column)  # type: ignore[union-attr]
            update = cast("Update", statement)
            statement = update.where(
                column == bindparam(TENANT_PARAMETER, required=True)
            ).execution_options(synchronize_session=None)
        state.statement = statement
    state.parameters = _with_tenant(state.parameters, user_id)
    return state.invoke_statement()


def _targets_tenant(state: ORMExecuteState) -> bool:
    mapper = state.bind_mapper
    return mapper is not None and _scoped(mapper.class_)


def _guard_bulk_insert(
    state: ORMExecuteState, policy: TenantPolicy, user_id: str
) -> Result[Any] | None:
    """ORM bulk INSERT (``session.execute(insert(Model), rows)``): stamp or refuse rows."""
    parameters = state.parameters
    if not _targets_tenant(state) or not parameters:
        return None
    column = policy.column
    what = f"insert: a {state.bind_mapper.class_.__name__} row"  # type: ignore[union-attr]

    def stamped(row: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**row, column: _new_row_tenant(row.get(column), policy, user_id, what)}

    if isinstance(parameters, list):
        state.parameters = [stamped(row) for row in parameters]
    else:
        state.parameters = stamped(parameters)  # type: ignore[arg-type]
    return state.invoke_statement()  # with the stamped rows (add_tenant_criteria says why)


def _new_row_tenant(value: object, policy: TenantPolicy, user_id: str, what: str) -> object:
    """The tenant a new row gets (stamped when unset), or raise if it is another user's."""
    if value is None and policy.stamp_inserts:
        return user_id
    if value != user_id:
        unset = " or leave it unset" if policy.stamp_inserts else ""
        raise IsolationViolation(
            f"{what} has {policy.column}={value!r} but the session belongs to user "
            f"{user_id!r}; a request can only create its own user's rows: set {policy.column} "
            f"to {user_id!r}{unset}, or open the session for the row's user"
        )
    return value


def _with_tenant(parameters: Any, user_id: str) -> Any:
    if not parameters:
        return {TENANT_PARAMETER: user_id}
    if isinstance(parameters, dict):
        return {**parameters, TENANT_PARAMETER: user_id}
    return [{**each, TENANT_PARAMETER: user_id} for each in parameters]  # executemany


def guard_flush(session: Session, policy: TenantPolicy, user_id: str) -> None:
    """``before_flush``: stamp new rows' tenant, refuse rows of (or moved to) another user."""
    column = policy.column
    for obj in session.new:
        if not _scoped(type(obj)):
            continue
        value = getattr(obj, column, None)
        tenant = _new_row_tenant(value, policy, user_id, f"flush: a new {type(obj).__name__}")
        if value is None:
            setattr(obj, column, tenant)
    for obj in session.dirty:
        if not _scoped(type(obj)):
            continue
        history = inspect(obj).attrs[column].history
        if history.has_changes() and getattr(obj, column) != user_id:
            raise IsolationViolation(
                f"flush: {type(obj).__name__} would move to {column}="
                f"{getattr(obj, column)!r}, another user's tenant; the session belongs to "
                f"user {user_id!r}"
            )


def set_tenant_setting(connection: Connection, policy: TenantPolicy, user_id: str) -> None:
    """``after_begin``: make ``user_id`` the transaction-local RLS setting.

    ``set_config(..., true)`` with bind parameters: never an f-string ``SET`` (injection),
    never plain ``SET`` (it would survive into the next borrower of the pooled connection),
    and transaction-local, so it also works behind PgBouncer in transaction mode.
    """
    connection.execute(
        text("SELECT set_config(:guc, :uid, true)"), {"guc": policy.guc, "uid": user_id}
    )


def rls_policy_sql(
    table: str,
    *,
    column: str = "user_id",
    guc: str = "reqscope.user_id",
    column_type: str = "text",
    policy_name: str | None = None,
) -> list[str]:
    """Return the PostgreSQL DDL that confines ``table`` to the current tenant.

    ``ENABLE`` and ``FORCE ROW LEVEL SECURITY`` (so the owner is bound too) and one policy
    with ``USING`` and ``WITH CHECK`` on
    ``column = nullif(current_setting(guc, true), '')::column_type``: an unset setting (NULL
    on a fresh connection, ``''`` after a transaction on a reused one) matches no row.

    Args:
        table: the table, optionally schema-qualified (``"app.notes"``).
        column: the tenant column.
        guc: the setting reqscope sets per transaction.
        column_type: the column's SQL type, for the comparison (``text``, ``uuid``, ``bigint``).
        policy_name: defaults to ``reqscope_tenant_<table>``.

    Returns:
        Statements to run in order (as a migration).
    """
    if not _GUC.match(guc):
        raise ValueError(f"guc must look like 'prefix.name', got {guc!r}")
    if not _TYPE.match(column_type):
        raise ValueError(f"column_type must be a plain SQL type name, got {column_type!r}")
    preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
    parts = table.split(".")
    if len(parts) not in {1, 2} or not all(parts):
        raise ValueError(f"table must be 'name' or 'schema.name', got {table!r}")
    qualified = ".".join(preparer.quote(part) for part in parts)
    name = preparer.quote(policy_name or f"reqscope_tenant_{parts[-1]}")
    condition = (
        f"{preparer.quote(column)} = nullif(current_setting('{guc}', true), '')::{column_type}"
    )
    return [
        f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS {name} ON {qualified}",
        f"CREATE POLICY {name} ON {qualified} USING ({condition}) WITH CHECK ({condition})",
    ]


@dataclass(frozen=True, slots=True)
class TableStatus:
    """Row-level security on one tenant table."""

    table: str
    owner: str
    row_security: bool
    forced: bool


@dataclass(frozen=True, slots=True)
class TenancyReport:
    """What :meth:`IsolatedSessionFactory.check_tenancy` found."""

    role: str
    superuser: bool
    bypass_rls: bool
    tables: tuple[TableStatus, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing would bypass row-level security for this role."""
        return not self.problems


def tenant_tables() -> tuple[str, ...]:
    """Tables of every mapped :class:`TenantScoped` model (schema-qualified when set)."""
    tables: set[str] = set()
    pending = list(TenantScoped.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        table = getattr(cls, "__table__", None)
        # a class whose registry was disposed of is no longer mapped: not a tenant table
        if table is not None and inspect(cls, raiseerr=False) is not None:
            tables.add(f"{table.schema}.{table.name}" if table.schema else table.name)
    return tuple(sorted(tables))


# Views and materialized views this role may read that read a tenant table, directly or
# through other views, with what decides whether row-level security still applies there.
_VIEWS_OVER_TENANT_TABLES: Final = """
WITH RECURSIVE tenant AS (
    SELECT to_regclass(name) AS oid FROM unnest(CAST(:tables AS text[])) AS name
), reads(view_oid, table_oid) AS (
    SELECT DISTINCT rule.ev_class, dep.refobjid
    FROM pg_depend dep JOIN pg_rewrite rule ON rule.oid = dep.objid
    WHERE dep.classid = 'pg_rewrite'::regclass AND dep.refclassid = 'pg_class'::regclass
      AND dep.refobjid IN (SELECT oid FROM tenant) AND rule.ev_class <> dep.refobjid
  UNION
    SELECT rule.ev_class, reads.table_oid
    FROM reads
    JOIN pg_depend dep ON dep.refclassid = 'pg_class'::regclass AND dep.refobjid = reads.view_oid
      AND dep.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite rule ON rule.oid = dep.objid
    WHERE rule.ev_class <> reads.view_oid
)
SELECT view.oid::regclass::text, view.relkind::text, owner.rolname,
       owner.rolsuper OR owner.rolbypassrls,
       EXISTS (SELECT FROM unnest(coalesce(view.reloptions, '{}')) AS option
               WHERE lower(option) IN ('security_invoker=true', 'security_invoker=on',
                                       'security_invoker=yes', 'security_invoker=1')),
       tab.oid::regclass::text,
       NOT tab.relforcerowsecurity AND pg_has_role(view.relowner, tab.relowner, 'USAGE')
FROM reads
JOIN pg_class view ON view.oid = reads.view_oid
JOIN pg_class tab ON tab.oid = reads.table_oid
JOIN pg_roles owner ON owner.oid = view.relowner
WHERE has_table_privilege(view.oid, 'SELECT')
ORDER BY 1, 6
"""


async def _views_that_bypass(conn: AsyncConnection, tables: tuple[str, ...]) -> list[str]:
    """The problems of the views this role can read that return every tenant's rows.

    A view runs with its owner's rights unless it is ``security_invoker`` (PostgreSQL 15+),
    so row-level security is checked against the view's owner: a superuser or ``BYPASSRLS``
    owner, or one with the privileges of the owner of a table without ``FORCE``, reads every
    tenant's rows through it. A materialized view holds rows no policy filters.
    """
    if not tables:
        return []
    rows = (await conn.execute(text(_VIEWS_OVER_TENANT_TABLES), {"tables": list(tables)})).all()
    leaking: dict[tuple[str, str, str], list[str]] = {}
    for view, kind, owner, privileged, invoker, table, owner_bypasses in rows:
        if kind == "m" or (not invoker and (privileged or owner_bypasses)):
            leaking.setdefault((view, kind, owner), []).append(table)
    problems = []
    for (view, kind, owner), read in leaking.items():
        names = ", ".join(repr(table) for table in read)
        if kind == "m":
            problems.append(
                f"materialized view {view} reads tenant table(s) {names}; row-level security "
                "never filters a materialized view's rows: drop it, or revoke this role's "
                "SELECT on it"
            )
        else:
            problems.append(
                f"view {view!r} reads tenant table(s) {names} with the rights of its owner "
                f"{owner!r}, which row-level security does not bind, so it returns every "
                f"tenant's rows; run ALTER VIEW {view} SET (security_invoker = true) "
                "(PostgreSQL 15+), or make its owner a role the policies bind"
            )
    return problems


async def inspect_tenancy(engine: AsyncEngine, tables: tuple[str, ...]) -> TenancyReport:
    """Read the role's RLS privileges and each table's RLS state; list what would bypass it.

    Problems: the role is a superuser or has ``BYPASSRLS``; it has the privileges of the
    owner of a table without ``FORCE ROW LEVEL SECURITY`` (it owns it, or is a member of the
    owning role that inherits its privileges); a table lacks RLS; a view it can read returns
    every tenant's rows (:func:`_views_that_bypass`). Warnings: a table without ``FORCE``
    that the role does not own (or can only ``SET ROLE`` to its owner for).

    Raises:
        TenancyConfigurationError: not PostgreSQL (row-level security needs it).
    """
    if engine.dialect.name != "postgresql":
        raise TenancyConfigurationError(
            f"row-level security needs PostgreSQL, not {engine.dialect.name}; ORM tenant "
            "filters still apply, raw SQL is not filtered"
        )
    async with engine.connect() as conn:
        role, superuser, bypass = (
            await conn.execute(
                text(
                    "SELECT current_user, rolsuper, rolbypassrls FROM pg_roles "
                    "WHERE rolname = current_user"
                )
            )
        ).one()
        statuses = []
        problems: list[str] = []
        warnings: list[str] = []
        if superuser:
            problems.append(
                f"role {role!r} is a superuser, which bypasses row-level security; connect "
                "as an unprivileged application role"
            )
        if bypass:
            problems.append(
                f"role {role!r} has BYPASSRLS; connect as a role without it "
                f"(ALTER ROLE {role} NOBYPASSRLS)"
            )
        for table in tables:
            row = (
                await conn.execute(
                    text(
                        "SELECT pg_get_userbyid(relowner), relrowsecurity, relforcerowsecurity, "
                        "pg_has_role(current_user, relowner, 'USAGE'), "
                        "pg_has_role(current_user, relowner, 'MEMBER') "
                        "FROM pg_class WHERE oid = to_regclass(:t)"
                    ),
                    {"t": table},
                )
            ).one_or_none()
            if row is None:
                problems.append(f"tenant table {table!r} does not exist")
                continue
            owner, enabled, forced, owner_privileges, member = row
            statuses.append(TableStatus(table, owner, bool(enabled), bool(forced)))
            if not enabled:
                problems.append(
                    f"table {table!r} has no row-level security; apply "
                    "reqscope.tenancy.rls_policy_sql(...)"
                )
            elif not forced:
                message = f"table {table!r} lacks FORCE ROW LEVEL SECURITY"
                fix = f"; run ALTER TABLE {table} FORCE ROW LEVEL SECURITY"
                if owner_privileges:  # the owner, and its members, bypass without FORCE
                    who = "owns it" if owner == role else f"is a member of {owner!r}, which owns it"
                    problems.append(
                        f"{message} and role {role!r} {who}, so its policies do not apply "
                        f"to this role{fix}"
                    )
                elif member:
                    warnings.append(
                        f"{message}, and role {role!r} may SET ROLE {owner} (its owner), "
                        f"which bypasses them{fix}"
                    )
                else:
                    warnings.append(f"{message} (its owner {owner!r} bypasses them){fix}")
        problems.extend(await _views_that_bypass(conn, tables))
    return TenancyReport(
        role, bool(superuser), bool(bypass), tuple(statuses), tuple(problems), tuple(warnings)
    )
