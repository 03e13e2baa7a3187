"""LeakDetector: finds sessions held past their lifetime, logs them, and reclaims them."""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from reqscope._logging import get_logger
from reqscope._registry import Entry, EntryState, SessionRegistry

__all__ = ["LeakDetector", "LeakReport"]

logger = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LeakReport:
    """A session found open past its lifetime by one :meth:`LeakDetector.scan`."""

    session_id: str
    user_id: str
    request_id: str
    thread_id: str
    run_id: str
    age: float
    max_lifetime: float
    task_name: str | None
    stack: str | None
    reclaimed: bool
    detected_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-safe data."""
        return {**asdict(self), "detected_at": self.detected_at.isoformat()}


class LeakDetector:
    """Scans a factory's open sessions for leaks; the factory runs it in the background.

    A session open longer than its lifetime (the factory's ``max_session_lifetime``, or the
    ``max_lifetime`` its scope asked for) is logged at ERROR with its tags (and the stack
    that opened it when the factory captures stacks). With ``reclaim`` it is also
    reclaimed: its connection is invalidated, which frees the pool slot without ever handing
    a possibly busy connection to another request, and its next use raises
    :class:`~reqscope.exceptions.SessionReclaimedError`.

    Without ``reclaim`` the leak stays open; when it finally closes, a follow-up line logs
    how long it was held, so operators can tell a leak from a slow request.
    """

    def __init__(
        self,
        registry: SessionRegistry,
        reclaim: Callable[[Entry, bool], None],
        drain: Callable[[], Awaitable[None]],
        *,
        reclaim_leaks: bool,
    ) -> None:
        self._registry = registry
        self._reclaim = reclaim
        self._drain = drain
        self.reclaim_leaks = reclaim_leaks
        self.passes = 0
        self._recent: collections.deque[LeakReport] = collections.deque(maxlen=20)

    @property
    def recent_reports(self) -> tuple[LeakReport, ...]:
        """The latest leak reports (up to 20), oldest first (the operator page shows them)."""
        return tuple(self._recent)

    async def ascan(self) -> list[LeakReport]:
        """Run one pass and finish invalidating what it reclaimed (the background task's pass)."""
        reports = self._scan(defer=True)
        await self._drain()
        return reports

    def scan(self) -> list[LeakReport]:
        """Run one pass now and return what it found (O(expired sessions)).

        Reclaimed sessions are poisoned at once. Their connections are invalidated at once
        on drivers that can close synchronously (asyncpg, aiosqlite, asyncmy); on others
        (psycopg) that finishes on the next :meth:`ascan`, which the background task runs.
        """
        return self._scan(defer=False)

    def _scan(self, *, defer: bool) -> list[LeakReport]:
        self.passes += 1
        now = time.monotonic()
        registry = self._registry
        reports: list[LeakReport] = []
        for entry in registry.pop_expired(now):
            registry.leaks_detected += 1
            entry.leak_reported = True
            reclaimed = False
            if self.reclaim_leaks:
                try:
                    self._reclaim(entry, defer)
                    reclaimed = True
                    registry.leaks_reclaimed += 1
                except Exception:
                    logger.exception(
                        "reqscope: reclaiming leaked session %s failed",
                        entry.session_id,
                        extra=entry.log_fields(),
                    )
            if not reclaimed:
                registry.keep_reported(entry)
            reports.append(self._report(entry, now, reclaimed=reclaimed))
        return reports

    def _report(self, entry: Entry, now: float, *, reclaimed: bool) -> LeakReport:
        ctx = entry.ctx
        age = entry.age(now)
        report = LeakReport(
            session_id=entry.session_id,
            user_id=ctx.user_id,
            request_id=ctx.request_id,
            thread_id=ctx.thread_id,
            run_id=ctx.run_id,
            age=age,
            max_lifetime=entry.lifetime,
            task_name=entry.task_name,
            stack=entry.stack,
            reclaimed=reclaimed,
        )
        action = (
            "reclaimed it (connection invalidated; further use raises SessionReclaimedError)"
            if reclaimed
            else "left it open (reclaim_leaks=False)"
        )
        logger.error(
            "reqscope: session %s of user %r (request %s, task %s) held %.3g s, past its "
            "%.3g s lifetime; %s. Close sessions with `async with factory.session(ctx)`, or "
            "pass max_lifetime= for a scope that is meant to be long.%s",
            entry.session_id,
            ctx.user_id,
            ctx.request_id,
            entry.task_name,
            age,
            entry.lifetime,
            action,
            f"\nOpened at:\n{entry.stack}" if entry.stack else "",
            extra={**entry.log_fields(), "age": age, "reclaimed": reclaimed},
        )
        self._recent.append(report)
        entry.keeper.leaked(entry, report)
        return report

    @staticmethod
    def log_late_close(entry: Entry) -> None:
        """Log the follow-up for a reported leak that finally closed by itself."""
        if entry.leak_reported and entry.state is not EntryState.RECLAIMED:
            held = entry.age()
            logger.warning(
                "reqscope: leaked session %s of user %r finally closed after %.3g s "
                "(lifetime %.3g s): a slow request, not a lost session",
                entry.session_id,
                entry.ctx.user_id,
                held,
                entry.lifetime,
                extra={**entry.log_fields(), "held": held},
            )

    async def run(self, interval: float) -> None:
        """Scan every ``interval`` seconds until cancelled."""
        while True:
            await anyio.sleep(interval)
            try:
                await self.ascan()
            except Exception:  # a bug here must not kill the detector
                logger.exception("reqscope: leak detector pass failed")
