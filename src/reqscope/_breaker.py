"""A circuit breaker for database outages.

Only what says the database is unavailable counts: a refused connection, a connect timeout,
a connection lost. Application errors (an ``IntegrityError``, your own exceptions) prove the
database answered; a full pool is overload (``PoolExhaustedError``), and a wrong password or
a missing database is a configuration error (``DatabaseConfigurationError``): none of them
opens the circuit.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import exc as sa_exc

from reqscope._logging import get_logger
from reqscope.exceptions import CircuitOpenError, DatabaseUnavailableError

__all__ = [
    "BreakerTransition",
    "CircuitBreaker",
    "CircuitState",
    "is_configuration_error",
    "is_connection_failure",
]

logger = get_logger(__name__)


class CircuitState(str, enum.Enum):
    """The state of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


# SQLSTATEs a server sends when it is up but refuses this login: invalid authorization
# (class 28: wrong password, unknown role, no pg_hba.conf entry) and an unknown database.
_CONFIGURATION_SQLSTATES: Final = ("28", "3D000")
# MySQL/MariaDB error codes for the same: access denied (to the server, to the database),
# unknown database.
_CONFIGURATION_MYSQL_CODES: Final = frozenset({1044, 1045, 1049, 1698})
# What libpq says for them (psycopg sets no SQLSTATE on a failed connect), and what
# PgBouncer says, under its protocol-violation SQLSTATE, when the server refused the login.
_MESSAGE_SQLSTATES: Final = (None, "08P01")
_CONFIGURATION_MESSAGES: Final = re.compile(
    r"password authentication failed|role \".*\" does not exist|"
    r"database \".*\" does not exist|no pg_hba\.conf entry|no such user"
)


def is_configuration_error(error: BaseException) -> bool:
    """True when the server answered a connect by refusing this URL's login or database.

    A wrong password, an unknown role or database: the database is up, the URL is wrong.
    Such an error must not open the circuit, and its message must not send operators
    looking for an outage.
    """
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        error = error.orig
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_CONFIGURATION_SQLSTATES):
        return True
    args = getattr(error, "args", ())
    if args and isinstance(args[0], int) and args[0] in _CONFIGURATION_MYSQL_CODES:
        return True
    return sqlstate in _MESSAGE_SQLSTATES and _CONFIGURATION_MESSAGES.search(str(error)) is not None


def is_connection_failure(error: BaseException, *, connecting: bool = False) -> bool:
    """True when ``error`` means the database could not be reached or the link broke.

    Drivers report an outage as a raw ``ConnectionRefusedError``/``OSError``/``TimeoutError``
    at connect time, not always wrapped in a SQLAlchemy ``DBAPIError``: while ``connecting``
    those count too. Inside a request they may be the application's own (an HTTP call
    timing out), so there only errors SQLAlchemy marks as disconnects count. A pool timeout
    (overload) and a refused login (:func:`is_configuration_error`) never count.
    """
    if isinstance(error, DatabaseUnavailableError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        # Connect-time failures come wrapped as OperationalError/InterfaceError without a
        # statement; errors of a statement the server rejected are application errors.
        return (
            error.statement is None
            and isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError))
            and not is_configuration_error(error)
        )
    if not connecting or is_configuration_error(error):
        return False
    # ConnectionError is an OSError; asyncio.TimeoutError is TimeoutError from Python 3.11 on,
    # a class of its own before (asyncpg's connect timeout raises it there).
    if isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError)):
        return True
    return type(error).__name__ in {
        "ConnectionDoesNotExistError",
        "CannotConnectNowError",
        "InterfaceError",
        "TooManyConnectionsError",  # the server is up but cannot take this connection
    }


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """The circuit entered ``state`` at ``at`` (UTC)."""

    state: CircuitState
    at: dt.datetime

    def to_dict(self) -> dict[str, str]:
        """Return the transition as JSON-safe data."""
        return {"state": self.state.value, "at": self.at.isoformat()}


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
        self.transitions = 0  # state changes since the breaker was made
        self._history: collections.deque[BreakerTransition] = collections.deque(maxlen=50)

    def _enter(self, state: CircuitState) -> None:
        self._state = state
        self.transitions += 1
        self._history.append(BreakerTransition(state, dt.datetime.now(dt.timezone.utc)))

    @property
    def history(self) -> tuple[BreakerTransition, ...]:
        """The latest state changes (up to 50), oldest first."""
        return tuple(self._history)

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit past its recovery timeout reads half-open.

        Reading it changes nothing (metrics readers read it from a thread of their own):
        the circuit enters the half-open state when it lets the probe through.
        """
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= (
            self.recovery_timeout
        ):
            return CircuitState.HALF_OPEN
        return self._state

    @property
    def retry_after(self) -> float:
        """Seconds until an open circuit lets a probe through (0.0 unless it is open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.recovery_timeout - (self._clock() - self._opened_at))

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
            if self._state is CircuitState.OPEN:
                self._enter(CircuitState.HALF_OPEN)
                logger.info("database circuit half-open: letting one probe through")
            self._probing = True
            return True
        raise CircuitOpenError(retry_after=self.retry_after if state is CircuitState.OPEN else 0.1)

    def record_success(self) -> None:
        """Note that the database answered; closes a half-open circuit."""
        if self._state is not CircuitState.CLOSED:
            logger.info("database circuit closed: the database answers again")
            self._enter(CircuitState.CLOSED)
        self._failures = 0
        self._probing = False

    def record_failure(self, error: BaseException | None = None) -> None:
        """Note a connection-level failure; may open the circuit."""
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._enter(CircuitState.OPEN)
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
