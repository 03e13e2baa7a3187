"""HealthReport and the health probe, which never borrows from the application's pool."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from reqscope._breaker import CircuitState
from reqscope._pool import PoolStats, _connect_args, _sqlite_pragmas

if TYPE_CHECKING:
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["HealthReport", "check_health"]

logger = logging.getLogger("reqscope")

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


def _probe_engine(factory: IsolatedSessionFactory, timeout: float) -> AsyncEngine:
    # A separate, unpooled engine: a saturated application pool must read "degraded",
    # not make the health check wait for a slot.
    engine = factory._health_engine  # noqa: SLF001
    if engine is None:
        url = factory.engine.url
        engine = create_async_engine(
            url, poolclass=NullPool, connect_args=_connect_args(url, timeout)
        )
        if url.get_backend_name() == "sqlite":
            from sqlalchemy import event  # noqa: PLC0415

            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        factory._health_engine = engine  # noqa: SLF001
    return engine


async def check_health(factory: IsolatedSessionFactory, timeout: float) -> HealthReport:
    """Run one bounded ``SELECT 1`` on its own connection and summarise the factory."""
    latency: float | None = None
    error: str | None = None
    started = time.perf_counter()
    try:
        with anyio.fail_after(timeout):
            async with _probe_engine(factory, timeout).connect() as conn:
                await conn.execute(text("SELECT 1"))
                latency = round((time.perf_counter() - started) * 1000, 3)
                if factory._transport_warnings is None:  # noqa: SLF001 - checked once
                    factory._transport_warnings = await _transport_warnings(conn)  # noqa: SLF001
    except TimeoutError:
        error = f"the database did not answer within {timeout} s"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    metrics = factory.metrics()
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
        warnings=factory._transport_warnings or (),  # noqa: SLF001
    )


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
