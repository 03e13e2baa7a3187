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
from typing import TYPE_CHECKING, Any, Final

from reqscope._context import new_id

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from reqscope._breaker import CircuitState
    from reqscope._context import UserExecutionContext
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
    """Counters and gauges of an ``IsolatedSessionFactory`` (a snapshot)."""

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
        }


class EntryState(enum.Enum):
    """Where a session is in its life."""

    ACTIVE = "active"
    RECLAIMED = "reclaimed"
    CLOSED = "closed"


_ACTIVE: Final = EntryState.ACTIVE


class Entry:
    """The factory's private bookkeeping for one open session.

    The session id and the opening time as a datetime are made on first use (tags, logs,
    records): most sessions never need them, and each costs about as much as a Python call.
    A factory's own sessions are recorded by their :class:`~reqscope._scope.SessionScope`,
    a subclass: one object per request instead of two.
    """

    __slots__ = (
        "__weakref__",
        "_opened_at",
        "_session_id",
        "bypass_tenant",
        "connection",
        "connection_guard",
        "ctx",
        "deadline",
        "global_",
        "leak_reported",
        "lifetime",
        "opened_mono",
        "owner",
        "stack",
        "state",
        "task_name",
        "tenant",
    )

    def __init__(  # noqa: PLR0917 - internal, built in one place
        self,
        session_id: str | None,
        ctx: UserExecutionContext,
        opened_at: dt.datetime | None,
        lifetime: float,
        task_name: str | None,
        stack: str | None,
    ) -> None:
        self._session_id = session_id  # None: a fresh id on first use
        self.ctx = ctx
        self._opened_at = opened_at  # None: from opened_mono on first use
        self.opened_mono = time.monotonic()
        self.lifetime = lifetime
        self.deadline = self.opened_mono + lifetime
        self.task_name = task_name
        self.stack = stack
        self.state = _ACTIVE
        self.global_ = False
        self.leak_reported = False
        # The connection of the session's latest transaction (set in after_begin; None
        # until the session first gets one).
        self.connection: Connection | None = None
        # before_execute listener put on that connection once session.connection() hands it out
        self.connection_guard: Callable[..., None] | None = None
        self.owner: Any = None  # the IsolatedSessionFactory that opened it
        self.bypass_tenant = False
        # (policy, user id) this session is confined to; None without a policy or in bypass.
        self.tenant: tuple[TenantPolicy, str] | None = None

    @property
    def session_id(self) -> str:
        """The session's id: 32 random hex digits, fixed on first use."""
        session_id = self._session_id
        if session_id is None:
            session_id = self._session_id = new_id()
        return session_id

    @property
    def opened_at(self) -> dt.datetime:
        """When the session was opened (UTC), fixed on first use.

        Derived from the monotonic opening time, so opening a session reads one clock, not
        two: the wall clock now, less the session's age.
        """
        opened_at = self._opened_at
        if opened_at is None:
            age = time.monotonic() - self.opened_mono
            opened_at = self._opened_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(
                seconds=age
            )
        return opened_at

    def tags(self) -> dict[str, Any]:
        """The ``session.info`` keys that say who owns the session."""
        return {
            **self.log_fields(),  # the session id and the context's four ids
            "created_at": self.opened_at,
            "is_request_scoped": not self.global_,
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
            "thread_id": ctx.thread_id,
            "run_id": ctx.run_id,
        }


class SessionRegistry:
    """Open sessions by lifetime bucket, plus reported-but-unreclaimed leaks, plus counters."""

    __slots__ = (
        "_active",
        "_buckets",
        "_reported",
        "cleanup_failures",
        "isolation_violations",
        "leaks_detected",
        "leaks_reclaimed",
        "peak_active",
        "scope_violations",
        "sessions_closed",
        "sessions_failed",
        "sessions_opened",
    )

    def __init__(self) -> None:
        self._buckets: dict[float, OrderedDict[Entry, Entry]] = {}
        self._reported: dict[Entry, Entry] = {}
        self._active = 0
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.sessions_failed = 0
        self.leaks_detected = 0
        self.leaks_reclaimed = 0
        self.isolation_violations = 0
        self.scope_violations = 0
        self.cleanup_failures = 0
        self.peak_active = 0

    def __len__(self) -> int:
        return self._active

    def add(self, entry: Entry) -> None:
        """Register a newly opened session."""
        bucket = self._buckets.get(entry.lifetime)
        if bucket is None:
            bucket = self._buckets[entry.lifetime] = OrderedDict()
        bucket[entry] = entry
        self.sessions_opened += 1
        active = self._active = self._active + 1
        if active > self.peak_active:  # noqa: PLR1730 - max() is a call on the hot path
            self.peak_active = active

    def discard(self, entry: Entry) -> None:
        """Forget a session (closed or reclaimed); a no-op when already gone."""
        bucket = self._buckets.get(entry.lifetime)
        if bucket is not None and bucket.pop(entry, None) is not None:
            self._active -= 1
            if not bucket and len(self._buckets) > 1:
                del self._buckets[entry.lifetime]
            return
        if self._reported.pop(entry, None) is not None:
            self._active -= 1

    def pop_expired(self, now: float) -> Iterator[Entry]:
        """Yield and unlink entries whose deadline passed, oldest first, per bucket."""
        for bucket in list(self._buckets.values()):
            while bucket:
                entry = next(iter(bucket.values()))
                if entry.deadline > now:
                    break
                bucket.popitem(last=False)
                self._active -= 1
                yield entry

    def keep_reported(self, entry: Entry) -> None:
        """Keep a reported, unreclaimed leak as active without scanning it again."""
        if entry not in self._reported:
            self._reported[entry] = entry
            self._active += 1

    def entries(self) -> Iterator[Entry]:
        """Every open session, oldest first within each bucket."""
        for bucket in self._buckets.values():
            yield from bucket.values()
        yield from self._reported.values()
