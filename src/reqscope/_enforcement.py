"""Enforcement: reqscope's Session subclass, its checks, and session validation.

Enforcement never wraps the session in a proxy: the session a user gets is a real
``AsyncSession``, whose sync ``Session`` is a :class:`ReqscopeSession`. Every statement a
session sends (``execute``, ``scalars``, ``scalar``, ``get``, ``stream``, lazy loads,
refreshes) goes through ``Session._execute_internal``, which ReqscopeSession checks before
SQLAlchemy does anything else; ``before_flush`` refuses a flush before it writes; and a
connection handed out by ``session.connection()`` gets a ``before_execute`` listener of its
own, so Core use through it is checked too.

Engine-wide listeners are deliberately avoided on the statement path: a ``before_execute``
listener on the engine makes SQLAlchemy build per-connection event dispatchers for every
checkout, which costs a plain session on the same engine about a tenth of its CPU
(``benchmarks/sessions.py``). Likewise ``do_orm_execute`` makes SQLAlchemy build an
``ORMExecuteState`` for every statement, so only sessions of a factory with a tenant policy
listen to it (:func:`tenant_session_class`), to add the tenant filter.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from reqscope._compat import add_statement_check
from reqscope._context import _current, same_request
from reqscope._logging import get_logger
from reqscope._registry import Entry, EntryState, SessionTags
from reqscope.exceptions import (
    IsolationViolation,
    SessionReclaimedError,
    SessionScopeError,
)
from reqscope.tenancy import add_tenant_criteria, guard_flush, set_tenant_setting

if TYPE_CHECKING:
    from sqlalchemy.engine import Result

    from reqscope._context import UserExecutionContext

__all__ = [
    "ReqscopeSession",
    "attach_record",
    "hand_over",
    "mark_session_as_global",
    "reclaimed_error",
    "session_tags",
    "validate_session_is_request_scoped",
]

logger = get_logger(__name__)

_TAG_KEYS: Final = (
    "user_id",
    "request_id",
    "thread_id",
    "run_id",
    "session_id",
    "created_at",
    "is_request_scoped",
    "factory_managed",
    "root_request_id",
)

_ACTIVE: Final = EntryState.ACTIVE


class ReqscopeSession(Session):
    """The sync ``Session`` class behind every factory-made ``AsyncSession``.

    It exists so that reqscope's checks apply to reqscope's sessions only: every statement
    is checked before SQLAlchemy runs it (:func:`~reqscope._compat.add_statement_check`),
    and a connection handed out by ``connection()`` is checked on each of its own
    executions.
    """

    _reqscope_entry: Entry | None = None
    _reqscope_info: dict[Any, Any]  # the info dict, once made

    @property
    def info(self) -> dict[Any, Any]:
        """``Session.info``; for a factory-made session it starts with the owner tags.

        Made on first use: building the tags for every request would cost a request more
        than a Python call, for a dict most requests never read.
        """
        try:
            return self._reqscope_info
        except AttributeError:
            entry = self._reqscope_entry
            info = self._reqscope_info = {} if entry is None else entry.tags()
            return info

    def connection(self, *args: Any, **kwargs: Any) -> Connection:
        entry = self._reqscope_entry
        if entry is None:
            return super().connection(*args, **kwargs)
        _check(entry, "connection")
        conn = super().connection(*args, **kwargs)
        guard = entry.connection_guard
        if guard is None:
            guard = entry.connection_guard = functools.partial(_guard_connection, entry)
        if not event.contains(conn, "before_execute", guard):
            event.listen(conn, "before_execute", guard)
        return conn


def _check_statement(session: Session) -> None:
    """Before every statement of a :class:`ReqscopeSession`: refuse it unless legal here."""
    entry: Entry | None = session._reqscope_entry  # type: ignore[attr-defined]  # noqa: SLF001 - our subclass
    if entry is not None:
        _check(entry, "execute")


add_statement_check(ReqscopeSession, _check_statement)


def attach_record(session: AsyncSession, entry: Entry) -> None:
    """Point a new factory-made ``session`` at its record ``entry``, for its checks and tags."""
    sync_session = session.sync_session
    sync_session._reqscope_entry = entry  # type: ignore[attr-defined]  # noqa: SLF001 - our subclass
    if hasattr(sync_session, "_reqscope_info"):  # made already (info= given): tag it now
        sync_session.info.update(entry.tags())


def _guard_connection(entry: Entry, _conn: Connection, *_args: object) -> None:
    """``before_execute`` of a connection handed out by ``session.connection()``."""
    _check(entry, "execute")


def _check(entry: Entry, operation: str) -> None:
    """Pass when a live session is used by the context that opened it; else :func:`_enforce`."""
    if entry.state is not _ACTIVE or _current.get() is not entry.ctx:
        _enforce(entry, operation)


def _enforce(entry: Entry, operation: str) -> None:
    """Refuse ``operation`` on ``entry``'s session unless it is legal here and now.

    A live session is usable by its request's lineage (the opening context and the contexts
    derived from it: ``same_request``), and by anyone when the factory does not enforce
    owners; any other current context, or none, is an :class:`IsolationViolation`.
    """
    keeper = entry.keeper
    if entry.state is EntryState.ACTIVE:
        current = _current.get()
        if not keeper.enforce_owner or (current is not None and same_request(current, entry.ctx)):
            return
        keeper.registry.isolation_violations += 1
        violation = _isolation_violation(entry, operation, current)
        keeper.refused(entry, violation)
        raise violation
    keeper.registry.scope_violations += 1
    ctx = entry.ctx
    error: SessionScopeError
    if entry.state is EntryState.RECLAIMED:
        error = reclaimed_error(entry, operation)
    elif entry.state is EntryState.GLOBAL:
        error = SessionScopeError(
            f"{operation}: session {entry.session_id} is marked global; request code must "
            "use its own session from factory.session(ctx)"
        )
    else:
        error = SessionScopeError(
            f"{operation}: session {entry.session_id} of user {ctx.user_id!r} (request "
            f"{ctx.request_id}) is used after its `async with factory.session()` block "
            "ended; do not keep sessions on objects, globals or caches: open a new one in "
            "each request"
        )
    logger.error("reqscope: %s", error, extra=entry.log_fields())
    keeper.refused(entry, error)
    raise error


def _isolation_violation(
    entry: Entry, operation: str, current: UserExecutionContext | None
) -> IsolationViolation:
    """Log the refused use of ``entry``'s session by ``current``, and return its error."""
    owner = entry.ctx
    fields = entry.log_fields()
    where = f"session {entry.session_id} of user {owner.user_id!r} (request {owner.request_id})"
    if current is None:
        logger.error(
            "reqscope: isolation violation: %s on %s from code with no current context",
            operation,
            where,
            extra={**fields, "current_user_id": None, "current_request_id": None},
        )
        return IsolationViolation(
            f"{operation}: {where} is used by code with no current context (a task or "
            "worker started outside the request?); a session belongs to the request that "
            "opened it: open one for this work with factory.session(ctx)"
        )
    logger.error(
        "reqscope: isolation violation: %s on %s while user %r (request %s) is current",
        operation,
        where,
        current.user_id,
        current.request_id,
        extra={
            **fields,
            "current_user_id": current.user_id,
            "current_request_id": current.request_id,
            "current_root_request_id": current.root_request_id,
        },
    )
    if current.user_id != owner.user_id:
        return IsolationViolation(
            f"{operation}: session {entry.session_id} belongs to user {owner.user_id!r} "
            f"(request {owner.request_id}) but user {current.user_id!r} (request "
            f"{current.request_id}) is current; open a session for this user with "
            "factory.session(ctx) instead of passing sessions between requests"
        )
    return IsolationViolation(
        f"{operation}: {where} is used by another request of the same user (request "
        f"{current.request_id}); a session belongs to the request that opened it and what "
        "that request spawns (child contexts, its tasks): open a new session in each "
        "request with factory.session(ctx) instead of keeping one across requests"
    )


def reclaimed_error(entry: Entry, operation: str) -> SessionReclaimedError:
    """The error for using ``entry``'s session after the leak detector reclaimed it."""
    ctx = entry.ctx
    return SessionReclaimedError(
        f"{operation}: session {entry.session_id} of user {ctx.user_id!r} (request "
        f"{ctx.request_id}) was reclaimed by the leak detector after being held past its "
        f"{entry.lifetime:.1f} s lifetime; open a new session, and pass max_lifetime= to "
        "factory.session() for work that is meant to take longer"
    )


@event.listens_for(ReqscopeSession, "before_flush")
def _on_flush(session: Session, _flush_context: object, _instances: object) -> None:
    entry: Entry | None = session._reqscope_entry  # type: ignore[attr-defined]  # noqa: SLF001
    if entry is not None:
        _check(entry, "flush")
        if entry.tenant is not None:
            guard_flush(session, *entry.tenant)


@event.listens_for(ReqscopeSession, "after_begin")
def _on_begin(session: Session, _transaction: SessionTransaction, connection: Connection) -> None:
    # The session got a connection from the pool: the database answers. Remember the
    # connection (the leak detector invalidates it on reclaim) and, for a tenant policy with
    # row-level security, make the tenant setting the transaction's first statement.
    entry: Entry | None = session._reqscope_entry  # type: ignore[attr-defined]  # noqa: SLF001
    if entry is None:
        return
    if entry.connection is None:  # its first connection (kept until the scope ends)
        entry.keeper.breaker.record_success()
        if entry.keeper.observers:
            entry.keeper.scope_began(entry)
    entry.connection = connection
    if entry.statement_timeout is not None:  # PostgreSQL only (checked by the factory)
        milliseconds = max(1, round(entry.statement_timeout * 1000))
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")
    tenant = entry.tenant
    if tenant is not None and tenant[0].rls and connection.dialect.name == "postgresql":
        set_tenant_setting(connection, *tenant)


class _TenantSession(ReqscopeSession):
    """Adds the tenant filter to every ORM statement (``do_orm_execute``)."""


@event.listens_for(_TenantSession, "do_orm_execute")
def _on_orm_execute(state: ORMExecuteState) -> Result[Any] | None:
    entry: Entry | None = state.session._reqscope_entry  # type: ignore[attr-defined]  # noqa: SLF001
    if entry is not None and entry.tenant is not None:
        return add_tenant_criteria(state, *entry.tenant)
    return None


_tenant_classes: dict[type[ReqscopeSession], type[ReqscopeSession]] = {
    ReqscopeSession: _TenantSession
}


def tenant_session_class(base: type[ReqscopeSession]) -> type[ReqscopeSession]:
    """``base`` with the tenant hooks added (one class per base, made once)."""
    cls = _tenant_classes.get(base)
    if cls is None:
        cls = _tenant_classes[base] = type(f"Tenant{base.__name__}", (_TenantSession, base), {})
    return cls


def _entry_of(session: AsyncSession | Session) -> Entry | None:
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    return getattr(sync, "_reqscope_entry", None)


def session_tags(session: AsyncSession | Session) -> SessionTags:
    """Return who owns a factory-managed session.

    Raises:
        SessionScopeError: the session was not made by an ``IsolatedSessionFactory``.
    """
    info = session.info
    if not info.get("factory_managed"):
        raise SessionScopeError(
            "this session was not created by an IsolatedSessionFactory, so it has no owner "
            "tags; open it with factory.session(ctx)"
        )
    return SessionTags(**{key: info[key] for key in _TAG_KEYS})


def validate_session_is_request_scoped(
    session: AsyncSession | Session, operation: str = ""
) -> None:
    """Raise unless ``session`` is factory-managed, inside its block, and not global.

    Raises:
        SessionScopeError: naming ``operation`` and what is wrong.
    """
    where = f"{operation}: " if operation else ""
    entry = _entry_of(session)
    if entry is None:
        raise SessionScopeError(
            f"{where}this session is not managed by an IsolatedSessionFactory (a global or "
            "hand-made session?); use `async with factory.session(ctx) as session`"
        )
    if entry.state is EntryState.GLOBAL:
        raise SessionScopeError(f"{where}session {entry.session_id} is marked global")
    if entry.state is EntryState.RECLAIMED:
        raise SessionReclaimedError(
            f"{where}session {entry.session_id} was reclaimed by the leak detector; open a new one"
        )
    if entry.state is not EntryState.ACTIVE:
        raise SessionScopeError(
            f"{where}session {entry.session_id} is used after its request scope ended; "
            "open a new one per request"
        )


def mark_session_as_global(session: AsyncSession | Session) -> None:
    """Mark a session as global (legacy code under test): every later use is refused."""
    session.info["is_request_scoped"] = False
    entry = _entry_of(session)
    if entry is not None and entry.state is EntryState.ACTIVE:  # an ended one stays refused
        entry.state = EntryState.GLOBAL


async def hand_over(session: AsyncSession, ctx: UserExecutionContext) -> None:
    """Make ``ctx`` the owner of ``session``, opened for the same request before its user was known.

    The tags, the logs, the tenant filter and (inside an open transaction) the row-level
    security setting follow the new owner from the next statement on.

    Raises:
        SessionScopeError: ``session`` is not a live factory-made session.
        IsolationViolation: ``ctx`` is not of the request that opened ``session``.
    """
    validate_session_is_request_scoped(session, "hand_over")
    entry = _entry_of(session)
    assert entry is not None  # noqa: S101 - validated above
    if not same_request(entry.ctx, ctx):
        raise IsolationViolation(
            f"session {entry.session_id} of request {entry.ctx.request_id} cannot be handed "
            f"to request {ctx.request_id}: a session changes owner only within its request"
        )
    entry.ctx = ctx
    session.info.update(entry.log_fields())  # made from the new owner, or brought up to date
    if entry.tenant is None:
        return
    policy = entry.tenant[0]
    tenant = entry.tenant = (policy, ctx.user_id)
    connection = entry.connection
    if (
        policy.rls
        and session.in_transaction()
        and connection is not None
        and connection.dialect.name == "postgresql"
    ):
        await session.run_sync(lambda sync: set_tenant_setting(sync.connection(), *tenant))
