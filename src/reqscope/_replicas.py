"""Read replicas: where a read-only session goes, and which replicas may take one.

An :class:`~reqscope.IsolatedSessionFactory` built with ``replicas=`` gives each replica a
:class:`Replica`: a :class:`~reqscope._keeper.SessionKeeper` of its own (its engine, its
circuit breaker, its connection cleanup) sharing the factory's registry of open sessions,
so tags, owner checks, tenancy settings and leak detection are the same on every engine.
:class:`ReplicaSet` routes: a read-only session goes to an available replica in turn,
unless its request already wrote (read-your-writes: that request's reads stay on the
primary) or no replica is available (then the primary, counted). A replica is available
while its last check answered within the timeout, with a replay lag within ``max_lag``
(PostgreSQL), and its circuit is not open. The checks run in the background, every
``check_interval`` seconds, on a connection of their own, never in a request's path.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from reqscope._breaker import CircuitState
from reqscope._context import request_token
from reqscope._logging import get_logger
from reqscope._pool import connect_args

if TYPE_CHECKING:
    from collections.abc import Sequence

    from reqscope._context import UserExecutionContext
    from reqscope._engine_hooks import EngineHooks
    from reqscope._keeper import SessionKeeper

__all__ = ["Replica", "ReplicaSet", "ReplicaStatus"]

logger = get_logger(__name__)

# Seconds the replica is behind: 0 when it has replayed all it received (an idle primary
# sends nothing, and the last replayed transaction's age would read as lag), else the age
# of the last transaction it replayed. NULL on a server that is not a standby.
_POSTGRES_LAG = text(
    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL "
    "WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END"
)


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """What a factory knows of one read replica (``factory.replica_status()``).

    Attributes:
        name: ``host:port/database`` of the replica.
        available: read-only sessions may go to it now.
        lag_seconds: its replay lag at the last check (PostgreSQL standbys; ``None``
            elsewhere, or when the check failed).
        reason: why it is not available (``None`` when it is).
        circuit_state: its circuit breaker's state.
        checked_at: when it was last checked (monotonic seconds; ``None``: not yet).
    """

    name: str
    available: bool
    lag_seconds: float | None
    reason: str | None
    circuit_state: CircuitState
    checked_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-safe data."""
        return {
            "name": self.name,
            "available": self.available,
            "lag_seconds": self.lag_seconds,
            "reason": self.reason,
            "circuit_state": self.circuit_state.value,
        }


class Replica:
    """One read replica: its keeper, its engine's hooks, and what its last check found."""

    def __init__(self, keeper: SessionKeeper, hooks: EngineHooks, *, owns_engine: bool) -> None:
        self.keeper = keeper
        self.hooks = hooks
        self.owns_engine = owns_engine
        url = keeper.engine.url
        self.name = f"{url.host or 'localhost'}:{url.port or ''}/{url.database or ''}"
        self.lag: float | None = None
        self.reason: str | None = "not checked yet"
        self.checked_at: float | None = None
        self._probe: AsyncEngine | None = None

    @property
    def available(self) -> bool:
        """Its last check passed and its circuit is not open."""
        return self.reason is None and self.keeper.breaker.state is not CircuitState.OPEN

    def status(self) -> ReplicaStatus:
        """A frozen view of this replica."""
        breaker = self.keeper.breaker.state
        reason = self.reason
        if reason is None and breaker is CircuitState.OPEN:
            reason = "its circuit is open after connection failures"
        return ReplicaStatus(
            name=self.name,
            available=reason is None,
            lag_seconds=self.lag,
            reason=reason,
            circuit_state=breaker,
            checked_at=self.checked_at,
        )

    async def check(self, max_lag: float, timeout: float) -> None:
        """Measure reachability and lag on a connection of the check's own; never raises."""
        engine = self.keeper.engine
        if self._probe is None:
            url = engine.url
            self._probe = create_async_engine(
                url, poolclass=NullPool, connect_args=connect_args(url, timeout)
            )
        lag: float | None = None
        try:
            with anyio.fail_after(timeout):
                async with self._probe.connect() as conn:
                    if engine.dialect.name == "postgresql":
                        value = (await conn.execute(_POSTGRES_LAG)).scalar_one()
                        lag = None if value is None else float(value)
                    else:
                        await conn.execute(text("SELECT 1"))
        except TimeoutError:
            reason: str | None = f"it did not answer within {timeout} s"
        except Exception as error:  # a replica that is down is skipped, not an error
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
        else:
            too_far = lag is not None and lag > max_lag
            reason = f"it is {lag:.1f} s behind (max_lag={max_lag} s)" if too_far else None
        if reason != self.reason:
            if reason is None:
                logger.info("reqscope: read replica %s is available", self.name)
            else:
                logger.warning(
                    "reqscope: read replica %s is skipped: %s; its reads go to the primary",
                    self.name,
                    reason,
                )
        self.lag, self.reason, self.checked_at = lag, reason, time.monotonic()

    async def aclose(self, timeout: float) -> None:
        """Dispose of the check's engine, and of the replica's engine when the factory built it."""
        probe, self._probe = self._probe, None
        with anyio.move_on_after(timeout):
            if probe is not None:
                await probe.dispose()
            await self.hooks.aclose()
            if self.owns_engine:
                await self.keeper.engine.dispose()


class ReplicaSet:
    """The factory's replicas, the choice between them, and the requests that wrote."""

    def __init__(
        self, replicas: Sequence[Replica], *, max_lag: float, check_interval: float
    ) -> None:
        self.replicas = tuple(replicas)
        self.max_lag = max_lag
        self.check_interval = check_interval
        self._turn = itertools.cycle(range(len(self.replicas)))
        # the requests that opened a session on the primary (forgotten with the request)
        self._wrote: weakref.WeakSet[object] = weakref.WeakSet()

    def __bool__(self) -> bool:
        return bool(self.replicas)

    def wrote(self, ctx: UserExecutionContext | None) -> None:
        """Remember that ``ctx``'s request opened a session on the primary."""
        if ctx is not None:
            self._wrote.add(request_token(ctx))

    def has_written(self, ctx: UserExecutionContext | None) -> bool:
        """Whether ``ctx``'s request opened a session on the primary before."""
        return ctx is not None and request_token(ctx) in self._wrote

    def choose(self) -> Replica | None:
        """The next available replica in turn, or ``None`` when none is."""
        for _ in self.replicas:
            replica = self.replicas[next(self._turn)]
            if replica.available:
                return replica
        return None

    async def check_all(self, timeout: float) -> None:
        """Check every replica at once."""
        async with anyio.create_task_group() as group:
            for replica in self.replicas:
                group.start_soon(replica.check, self.max_lag, timeout)

    async def run(self, timeout: float) -> None:
        """Check every replica every ``check_interval`` seconds, until cancelled."""
        while True:
            await anyio.sleep(self.check_interval)
            await self.check_all(timeout)
