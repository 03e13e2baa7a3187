"""HealthReport and the health probe, which never borrows from the application's pool."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from reqscope._breaker import CircuitState
from reqscope._logging import get_logger
from reqscope._pool import PoolStats, connect_args, sqlite_pragmas

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from reqscope._registry import FactoryMetrics

__all__ = ["HealthProbe", "HealthReport"]

logger = get_logger(__name__)

HealthStatus = Literal["ok", "degraded", "down"]


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What ``await factory.health()`` found."""

    status: HealthStatus
    database_latency_ms: float | None
    circuit_state: CircuitState
    pool: PoolStats | None
    active_sessions: int
    leaks_detected: int
    error: str | None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True unless the status is "down"."""
        return self.status != "down"

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-safe data."""
        pool = self.pool
        return {
            "status": self.status,
            "database_latency_ms": self.database_latency_ms,
            "circuit_state": self.circuit_state.value,
            "pool": None if pool is None else pool.to_dict(),
            "active_sessions": self.active_sessions,
            "leaks_detected": self.leaks_detected,
            "error": self.error,
            "warnings": list(self.warnings),
        }


class HealthProbe:
    """Probes a factory's database on a connection of its own, never from the app's pool.

    A saturated application pool must read "degraded", not make the check wait for a slot.
    """

    def __init__(self, url: URL, pooler: str | None = None) -> None:
        self._url = url
        self._pooler = pooler
        self._engine: AsyncEngine | None = None
        # warnings about how the URL reaches the server; None until the first probe asks
        self._warnings: tuple[str, ...] | None = None

    def _probe_engine(self, timeout: float) -> AsyncEngine:
        if self._engine is None:
            url = self._url
            self._engine = create_async_engine(
                url, poolclass=NullPool, connect_args=connect_args(url, timeout, self._pooler)
            )
            if url.get_backend_name() == "sqlite":
                event.listen(self._engine.sync_engine, "connect", sqlite_pragmas)
        return self._engine

    async def check(self, metrics: FactoryMetrics, timeout: float) -> HealthReport:
        """Run one bounded ``SELECT 1`` and summarise it with the factory's ``metrics``."""
        latency: float | None = None
        error: str | None = None
        started = time.perf_counter()
        try:
            with anyio.fail_after(timeout):
                async with self._probe_engine(timeout).connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    latency = round((time.perf_counter() - started) * 1000, 3)
                    if self._warnings is None:  # asked once
                        self._warnings = await _transport_warnings(conn)
        except TimeoutError:
            error = f"the database did not answer within {timeout} s"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        pool = metrics.pool
        saturated = pool is not None and pool.checked_out >= pool.capacity
        status: HealthStatus
        if error is not None:
            latency = None
            status = "down"
        elif metrics.circuit_state is not CircuitState.CLOSED or saturated:
            status = "degraded"
        else:
            status = "ok"
        return HealthReport(
            status=status,
            database_latency_ms=latency,
            circuit_state=metrics.circuit_state,
            pool=pool,
            active_sessions=metrics.active_sessions,
            leaks_detected=metrics.leaks_detected,
            error=error,
            warnings=self._warnings or (),
        )

    async def aclose(self, timeout: float) -> None:
        """Dispose of the probe's engine (made again by the next probe)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            with anyio.move_on_after(timeout):
                await engine.dispose()


async def _transport_warnings(conn: AsyncConnection) -> tuple[str, ...]:
    """What about the way this URL reaches the server deserves a warning (asked once).

    asyncpg's default TLS mode ("prefer") tries TLS first; against a server that offers
    none, every cancelled query then logs "Future exception was never retrieved ...
    unexpected connection_lost()" (an asyncpg bug, harmless but loud).
    """
    url = conn.engine.url
    if url.get_driver_name() != "asyncpg" or {"ssl", "sslmode"} & set(url.query):
        return ()
    tls = await conn.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
    if tls:
        return ()
    warning = (
        f"the server at {url.render_as_string(hide_password=True)} does not offer TLS, and "
        "asyncpg connects in its default TLS mode ('prefer'), which makes every cancelled "
        "query log 'Future exception was never retrieved ... unexpected connection_lost()'; "
        "add ?ssl=disable to the URL (or enable TLS on the server) to remove the noise"
    )
    logger.warning("reqscope: %s", warning)
    return (warning,)
