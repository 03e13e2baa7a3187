"""The reqscope error hierarchy.

Every error the library raises on purpose derives from :class:`ReqscopeError`, and mixes in
the builtin a caller would naturally catch where there is one::

    ReqscopeError(Exception)
    ├── ContextValidationError(ValueError)
    ├── NoActiveContextError(LookupError)
    ├── SessionScopeError
    │   └── SessionReclaimedError
    ├── IsolationViolation
    ├── PoolExhaustedError(TimeoutError)
    ├── CircuitOpenError
    ├── DatabaseUnavailableError(ConnectionError)
    ├── DatabaseConfigurationError
    ├── DatabaseBusyError
    ├── TransactionConflictError
    ├── AgentNotRegisteredError(KeyError)
    ├── AgentCreationError
    ├── RequestTimeoutError(TimeoutError)
    ├── TenancyConfigurationError
    ├── NotAuthenticated
    └── UserResolverError

Every message says what went wrong and what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reqscope._pool import PoolStats

__all__ = [
    "AgentCreationError",
    "AgentNotRegisteredError",
    "CircuitOpenError",
    "ContextValidationError",
    "DatabaseBusyError",
    "DatabaseConfigurationError",
    "DatabaseUnavailableError",
    "IsolationViolation",
    "NoActiveContextError",
    "NotAuthenticated",
    "PoolExhaustedError",
    "ReqscopeError",
    "RequestTimeoutError",
    "SessionReclaimedError",
    "SessionScopeError",
    "TenancyConfigurationError",
    "TransactionConflictError",
    "UserResolverError",
]


class ReqscopeError(Exception):
    """Base class of every error reqscope raises on purpose."""


class ContextValidationError(ReqscopeError, ValueError):
    """Raised by ``UserExecutionContext`` when an id, metadata key or value is invalid."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class NoActiveContextError(ReqscopeError, LookupError):
    """Raised by ``current_context()`` (and what uses it) when no context is set."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "no UserExecutionContext is active: wrap the work in "
            "`with reqscope.use_context(ctx):` or pass the context explicitly"
        )


class SessionScopeError(ReqscopeError):
    """Raised when a session is used outside its request scope, marked global, or unmanaged."""


class SessionReclaimedError(SessionScopeError):
    """Raised when a session the leak detector reclaimed is used again."""


class IsolationViolation(ReqscopeError):  # noqa: N818 - the name is the public contract
    """Raised when one user's session, agent or event is used in another user's context."""


class PoolExhaustedError(ReqscopeError, TimeoutError):
    """Raised by a session scope when no pooled connection came within ``pool_timeout``.

    Overload, not an outage: it never opens the circuit breaker, and it is counted in
    ``FactoryMetrics.pool_timeouts``.
    """

    def __init__(self, message: str, stats: PoolStats | None = None) -> None:
        self.stats = stats
        super().__init__(message)


class CircuitOpenError(ReqscopeError):
    """Raised by ``IsolatedSessionFactory.session()`` while the database circuit is open."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(
            "the database circuit is open after repeated connection failures; "
            f"retry in {retry_after:.2f} s (check database availability and "
            "factory.health())"
        )


class DatabaseUnavailableError(ReqscopeError, ConnectionError):
    """Raised by a session scope when no connection to the database could be made."""


class DatabaseConfigurationError(ReqscopeError):
    """Raised by a session scope when the server refused the URL's login or database.

    A wrong password, an unknown role or database: the server is up, so this never opens
    the circuit breaker.
    """


class DatabaseBusyError(ReqscopeError):
    """Raised when SQLite reports "database is locked" past its busy timeout."""


class TransactionConflictError(ReqscopeError):
    """Raised by ``run_in_transaction()`` when every attempt lost to a concurrent transaction.

    Each attempt ended in a serialization failure or a deadlock; the last one's error is the
    ``__cause__``. ``attempts`` says how many times the function ran.
    """

    def __init__(self, message: str, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(message)


class AgentNotRegisteredError(ReqscopeError, KeyError):
    """Raised by ``AgentRegistry`` and ``AgentScope.create`` for an unknown agent name."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        self.name = name
        listed = ", ".join(repr(k) for k in known) or "none"
        self.message = (
            f"no agent is registered as {name!r} (registered: {listed}); "
            f"call registry.register({name!r}, AgentClass) first"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return self.message


class AgentCreationError(ReqscopeError):
    """Raised by ``AgentScope.create`` when a constructor needs something it cannot give."""


class RequestTimeoutError(ReqscopeError, TimeoutError):
    """Raised by ``RunResult.unwrap()`` when ``run_isolated`` ran past its timeout."""


class TenancyConfigurationError(ReqscopeError):
    """Raised by ``IsolatedSessionFactory.check_tenancy()`` when RLS would be bypassed."""


class UserResolverError(ReqscopeError):
    """Raised when a user resolver or user dependency fails or returns no valid user id.

    A bug in the app, not the client's fault: the ASGI adapters log it and answer 500.
    """


class NotAuthenticated(ReqscopeError):  # noqa: N818 - reads as the condition it is
    """Raised when a request that needs a user has none (the ASGI adapters answer 401)."""
