"""A circuit breaker for database outages.

Only connection-level failures count: refused or dropped connections, connect timeouts and
pool timeouts. Application errors (an ``IntegrityError``, your own exceptions) prove the
database answered, and never open the circuit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

from sqlalchemy import exc as sa_exc

from reqscope.exceptions import CircuitOpenError, DatabaseUnavailableError, PoolExhaustedError

__all__ = ["CircuitBreaker", "CircuitState", "is_connection_failure"]

logger = logging.getLogger("reqscope")


class CircuitState(str, enum.Enum):
    """The state of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


def is_connection_failure(error: BaseException, *, connecting: bool = False) -> bool:
    """True when ``error`` means the database could not be reached or the link broke.

    Drivers report an outage as a raw ``ConnectionRefusedError``/``OSError``/``TimeoutError``
    at connect time, not always wrapped in a SQLAlchemy ``DBAPIError``: while ``connecting``
    those count too. Inside a request they may be the application's own (an HTTP call
    timing out), so there only errors SQLAlchemy marks as disconnects count.
    """
    if isinstance(error, (PoolExhaustedError, DatabaseUnavailableError, sa_exc.TimeoutError)):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        # Connect-time failures come wrapped as OperationalError/InterfaceError without a
        # statement; errors of a statement the server rejected are application errors.
        return error.statement is None and isinstance(
            error, (sa_exc.OperationalError, sa_exc.InterfaceError)
        )
    if not connecting:
        return False
    # ConnectionError is an OSError; asyncio.TimeoutError is TimeoutError from Python 3.11 on,
    # a class of its own before (asyncpg's connect timeout raises it there).
    if isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError)):
        return True
    return type(error).__name__ in {
        "ConnectionDoesNotExistError",
        "CannotConnectNowError",
        "InterfaceError",
    }


class CircuitBreaker:
    """Fail fast while the database is down.

    Closed → open after ``failure_threshold`` consecutive connection failures → half-open
    after ``recovery_timeout`` seconds → closed on the first success (open again on failure).

    While open, :meth:`before_call` raises :class:`~reqscope.exceptions.CircuitOpenError`
    at once, so requests fail in microseconds instead of waiting on a dead database. In the
    half-open state one probe at a time is let through.

    Args:
        failure_threshold: consecutive connection failures that open the circuit.
        recovery_timeout: seconds the circuit stays open before a probe is allowed.
        clock: a monotonic clock (tests may pass a fake one).
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if recovery_timeout <= 0:
            raise ValueError(f"recovery_timeout must be positive, got {recovery_timeout}")
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self._clock = clock
        self._state = CircuitState.CLOSED
        # Consecutive connection failures: at least 1 whenever the circuit is not closed (it
        # opens only on a failure, and only a success closes it and resets them), so
        # sessions test this alone for "anything to reset".
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.times_opened = 0

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit past its recovery timeout reads half-open."""
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= (
            self.recovery_timeout
        ):
            self._state = CircuitState.HALF_OPEN
            self._probing = False
            logger.info("database circuit half-open: letting one probe through")
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Connection failures since the last success."""
        return self._failures

    def before_call(self) -> bool:
        """Admit a call or raise :class:`~reqscope.exceptions.CircuitOpenError`.

        Returns:
            True when the admitted call is the half-open probe.
        """
        if self._state is CircuitState.CLOSED:  # the hot path: one comparison
            return False
        state = self.state
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        retry_after = max(0.0, self.recovery_timeout - (self._clock() - self._opened_at))
        raise CircuitOpenError(retry_after=retry_after if state is CircuitState.OPEN else 0.1)

    def record_success(self) -> None:
        """Note that the database answered; closes a half-open circuit."""
        if self._state is not CircuitState.CLOSED:
            logger.info("database circuit closed: the database answers again")
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._probing = False

    def record_failure(self, error: BaseException | None = None) -> None:
        """Note a connection-level failure; may open the circuit."""
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
            self._probing = False
            self.times_opened += 1
            logger.error(
                "database circuit opened after %d consecutive connection failures; "
                "failing fast for %.1f s",
                self._failures,
                self.recovery_timeout,
                extra={"error": repr(error)},
            )

    def release_probe(self) -> None:
        """Give back the half-open probe slot when the probe ended without a verdict."""
        self._probing = False

    def observe(self, error: BaseException, *, connecting: bool = False) -> bool:
        """Record ``error`` if it is a connection failure; return whether it was one."""
        if is_connection_failure(error, connecting=connecting):
            self.record_failure(error)
            return True
        return False
