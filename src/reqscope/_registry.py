"""The registry of open sessions, their records, and the factory's counters.

Open sessions live in one ``OrderedDict`` per lifetime (the factory default and any
``max_lifetime`` a scope asked for). Within a bucket, open order is deadline order, so a leak
scan pops expired entries from the front and stops at the first live one: a pass costs
O(expired sessions + buckets), never O(open sessions).
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reqscope._context import new_id

if TYPE_CHECKING:
    import asyncio

    from sqlalchemy.engine import Connection

    from reqscope._breaker import CircuitState
    from reqscope._context import UserExecutionContext
    from reqscope._keeper import SessionKeeper
    from reqscope._pool import PoolStats
    from reqscope.tenancy import TenantPolicy

__all__ = ["FactoryMetrics", "SessionRecord", "SessionRegistry", "SessionTags"]


@dataclass(frozen=True, slots=True)
class SessionTags:
    """Who owns a factory-managed session (from ``session.info``)."""

    user_id: str
    request_id: str
    thread_id: str
    run_id: str
    session_id: str
    created_at: dt.datetime
    is_request_scoped: bool
    factory_managed: bool
    root_request_id: str  # the request the session's context was derived from (X-Request-ID)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """An open session as ``factory.active_sessions()`` reports it."""

    session_id: str
    user_id: str
    request_id: str
    thread_id: str
    run_id: str
    opened_at: dt.datetime
    age: float
    max_lifetime: float
    task_name: str | None
    stack: str | None


@dataclass(frozen=True, slots=True)
class FactoryMetrics:
    """Counters and gauges of an ``IsolatedSessionFactory`` (a snapshot).

    ``active_sessions`` is always ``sessions_opened - sessions_closed``: a session counts as
    closed when its scope ends or when the leak detector reclaims it (its connection is
    gone then), and a leak reported but left open stays active until its scope ends.
    ``pool_timeouts`` counts scopes that ended in ``PoolExhaustedError`` (overload, which
    never opens the circuit). ``transaction_retries`` counts the attempts
    ``run_in_transaction()`` ran again after a serialization failure or deadlock, and
    ``transaction_conflicts_exhausted`` the calls that ran out of retries. With read
    replicas, ``replica_sessions`` counts the read-only sessions a replica took,
    ``replica_fallbacks`` those sent to the primary because no replica was available, and
    ``sticky_reads`` those kept on the primary because their request had used it.
    """

    active_sessions: int
    peak_active_sessions: int
    sessions_opened: int
    sessions_closed: int
    sessions_failed: int
    leaks_detected: int
    leaks_reclaimed: int
    isolation_violations: int
    scope_violations: int
    cleanup_failures: int
    circuit_state: CircuitState
    pool: PoolStats | None
    pool_timeouts: int = 0
    transaction_retries: int = 0
    transaction_conflicts_exhausted: int = 0
    replica_sessions: int = 0
    replica_fallbacks: int = 0
    sticky_reads: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the metrics as JSON-safe data."""
        pool = self.pool
        return {
            "active_sessions": self.active_sessions,
            "peak_active_sessions": self.peak_active_sessions,
            "sessions_opened": self.sessions_opened,
            "sessions_closed": self.sessions_closed,
            "sessions_failed": self.sessions_failed,
            "leaks_detected": self.leaks_detected,
            "leaks_reclaimed": self.leaks_reclaimed,
            "isolation_violations": self.isolation_violations,
            "scope_violations": self.scope_violations,
            "cleanup_failures": self.cleanup_failures,
            "circuit_state": self.circuit_state.value,
            "pool": None if pool is None else pool.to_dict(),
            "pool_timeouts": self.pool_timeouts,
            "transaction_retries": self.transaction_retries,
            "transaction_conflicts_exhausted": self.transaction_conflicts_exhausted,
            "replica_sessions": self.replica_sessions,
            "replica_fallbacks": self.replica_fallbacks,
            "sticky_reads": self.sticky_reads,
        }


class EntryState(enum.Enum):
    """Where a session is in its life."""

    ACTIVE = "active"
    GLOBAL = "global"  # open, but marked global (mark_session_as_global): every use refused
    RECLAIMED = "reclaimed"
    CLOSED = "closed"


class Entry:
    """The record of one open session: who owns it, since when, and where it is in its life.

    Made by the session scope that opens the session (:mod:`reqscope._scope`), pointed at by
    the session for its checks (:mod:`reqscope._enforcement`), kept in the factory's
    :class:`SessionRegistry` while open and read by the leak detector. The scope runs the
    session's lifecycle; the record only describes it. The session id and the opening time
    as a datetime are made on first use: most sessions never need them.
    """

    __slots__ = (
        "__weakref__",
        "_opened_at",
        "_session_id",
        "connection",
        "connection_guard",
        "ctx",
        "deadline",
        "keeper",
        "leak_reported",
        "lifetime",
        "stack",
        "state",
        "statement_timeout",
        "task",
        "tenant",
    )

    _session_id: str  # set on first use
    _opened_at: dt.datetime  # set on first use

    def __init__(
        self,
        keeper: SessionKeeper,
        ctx: UserExecutionContext,
        *,
        lifetime: float,
        task: asyncio.Task[Any] | None = None,
        tenant: tuple[TenantPolicy, str] | None = None,
        statement_timeout: float | None = None,
        stack: str | None = None,
    ) -> None:
        self.keeper = keeper  # what the session's checks report to
        self.ctx = ctx
        self.lifetime = lifetime
        self.deadline = time.monotonic() + lifetime
        self.task = task  # the task that opened it (None once closed)
        self.state = EntryState.ACTIVE
        self.leak_reported = False
        # The connection of the session's latest transaction (set in after_begin; None
        # until the session first gets one).
        self.connection: Connection | None = None
        # The before_execute listener put on a connection session.connection() handed out.
        self.connection_guard: Callable[..., None] | None = None
        # (policy, user id) this session is confined to; None without a policy or in bypass.
        self.tenant = tenant
        # seconds a statement may run (PostgreSQL, SET LOCAL per transaction); None: no bound
        self.statement_timeout = statement_timeout
        self.stack = stack  # where it was opened, when the factory captures stacks

    @property
    def session_id(self) -> str:
        """The session's id: 32 random hex digits, fixed on first use."""
        try:
            return self._session_id
        except AttributeError:  # first use
            session_id = self._session_id = new_id()
            return session_id

    @property
    def opened_mono(self) -> float:
        """When the session was opened, on the monotonic clock."""
        return self.deadline - self.lifetime

    @property
    def opened_at(self) -> dt.datetime:
        """When the session was opened (UTC), fixed on first use.

        Derived from the monotonic opening time, so opening a session reads one clock, not
        two: the wall clock now, less the session's age.
        """
        try:
            return self._opened_at
        except AttributeError:  # first use
            age = time.monotonic() - self.opened_mono
            opened_at = self._opened_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(
                seconds=age
            )
            return opened_at

    @property
    def task_name(self) -> str | None:
        """The name of the asyncio task that opened the session (None outside one, or closed)."""
        task = self.task
        return None if task is None else task.get_name()

    def tags(self) -> dict[str, Any]:
        """The ``session.info`` keys that say who owns the session."""
        return {
            **self.log_fields(),  # the session id and the context's ids
            "created_at": self.opened_at,
            "is_request_scoped": self.state is not EntryState.GLOBAL,
            "factory_managed": True,
        }

    def age(self, now: float | None = None) -> float:
        """Seconds since the session was opened."""
        return (time.monotonic() if now is None else now) - self.opened_mono

    def record(self, now: float | None = None) -> SessionRecord:
        """A public, frozen view of this entry."""
        ctx = self.ctx
        return SessionRecord(
            session_id=self.session_id,
            user_id=ctx.user_id,
            request_id=ctx.request_id,
            thread_id=ctx.thread_id,
            run_id=ctx.run_id,
            opened_at=self.opened_at,
            age=self.age(now),
            max_lifetime=self.lifetime,
            task_name=self.task_name,
            stack=self.stack,
        )

    def log_fields(self) -> dict[str, Any]:
        """Structured ``extra=`` fields for log records about this session."""
        ctx = self.ctx
        return {
            "session_id": self.session_id,
            "user_id": ctx.user_id,
            "request_id": ctx.request_id,
            "root_request_id": ctx.root_request_id,
            "thread_id": ctx.thread_id,
            "run_id": ctx.run_id,
        }


class SessionRegistry:
    """Open sessions by lifetime bucket, plus reported-but-unreclaimed leaks, plus counters."""

    __slots__ = (
        "_buckets",
        "_reported",
        "isolation_violations",
        "leaks_detected",
        "leaks_reclaimed",
        "peak_active",
        "pool_timeouts",
        "replica_fallbacks",
        "replica_sessions",
        "scope_violations",
        "sessions_closed",
        "sessions_failed",
        "sessions_opened",
        "sticky_reads",
        "transaction_conflicts_exhausted",
        "transaction_retries",
    )

    def __init__(self) -> None:
        self._buckets: dict[float, OrderedDict[Entry, Entry]] = {}
        self._reported: dict[Entry, Entry] = {}
        # Open sessions are those opened and not closed: two counters, not three.
        self.sessions_opened = 0
        # Ended by their scope or reclaimed as leaks (a leak kept open counts as open again).
        self.sessions_closed = 0
        self.sessions_failed = 0
        self.leaks_detected = 0
        self.leaks_reclaimed = 0
        self.isolation_violations = 0
        self.scope_violations = 0
        self.pool_timeouts = 0
        self.transaction_retries = 0
        self.transaction_conflicts_exhausted = 0
        self.replica_sessions = 0
        self.replica_fallbacks = 0
        self.sticky_reads = 0
        self.peak_active = 0

    def __len__(self) -> int:
        return self.sessions_opened - self.sessions_closed

    def add(self, entry: Entry) -> None:
        """Register a newly opened session."""
        try:  # the bucket exists, except for the first session of a lifetime: no get() call
            self._buckets[entry.lifetime][entry] = entry
        except KeyError:
            self._buckets[entry.lifetime] = OrderedDict(((entry, entry),))
        self.sessions_opened += 1
        self.peak_active = max(self.peak_active, len(self))

    def discard(self, entry: Entry) -> None:
        """Forget a session (closed or reclaimed); a no-op when already gone.

        A bucket left empty stays until the next leak scan (:meth:`pop_expired`), so that the
        next session of its lifetime finds it: a request does not pay for removing it.
        """
        try:
            del self._buckets[entry.lifetime][entry]
        except KeyError:  # reported as a leak, reclaimed, or discarded already
            if self._reported.pop(entry, None) is not None:
                self.sessions_closed += 1
            return
        self.sessions_closed += 1

    def pop_expired(self, now: float) -> Iterator[Entry]:
        """Yield and unlink entries whose deadline passed, oldest first, per bucket.

        Empty buckets are dropped here, so a pass costs O(expired sessions + lifetimes in
        use since the last pass).
        """
        buckets = self._buckets
        for lifetime, bucket in list(buckets.items()):
            while bucket:
                entry = next(iter(bucket.values()))
                if entry.deadline > now:
                    break
                bucket.popitem(last=False)
                self.sessions_closed += 1  # reclaimed, or kept open again (keep_reported)
                yield entry
            if not bucket and buckets.get(lifetime) is bucket:
                del buckets[lifetime]

    def keep_reported(self, entry: Entry) -> None:
        """Keep a reported, unreclaimed leak as active without scanning it again."""
        if entry not in self._reported:
            self._reported[entry] = entry
            self.sessions_closed -= 1

    def forget_all(self) -> None:
        """Count every open session as closed and forget it (a forked child holds none)."""
        for entry in list(self.entries()):
            self.discard(entry)

    def entries(self) -> Iterator[Entry]:
        """Every open session, oldest first within each bucket."""
        for bucket in self._buckets.values():
            yield from bucket.values()
        yield from self._reported.values()
