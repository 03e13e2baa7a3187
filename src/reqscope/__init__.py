"""reqscope: every request is an island.

Per-request SQLAlchemy sessions, agents and event channels for async multi-user services,
with the context that says whose request it is carried in contextvars.

Framework adapters live in :mod:`reqscope.fastapi`, :mod:`reqscope.starlette` and
:mod:`reqscope.asyncio`; this package never imports them.
"""

from __future__ import annotations

from reqscope._agents import (
    AgentInstanceFactory,
    AgentRegistry,
    AgentScope,
    SessionProvider,
    SharedStateWarning,
)
from reqscope._breaker import BreakerTransition, CircuitBreaker, CircuitState
from reqscope._containment import RunResult, gather_isolated, run_isolated
from reqscope._context import (
    AuditEvent,
    UserExecutionContext,
    current_context,
    current_context_or_none,
    use_context,
)
from reqscope._enforcement import (
    ReqscopeSession,
    mark_session_as_global,
    session_tags,
    validate_session_is_request_scoped,
)
from reqscope._events import Event, EventChannel, EventHub, HubStats, UserEventEmitter
from reqscope._health import HealthReport
from reqscope._leaks import LeakDetector, LeakReport
from reqscope._logging import ContextLogFilter
from reqscope._observers import ObservedSession, SessionObserver
from reqscope._pool import PoolConfig, PoolStats, build_engine
from reqscope._registry import FactoryMetrics, SessionRecord, SessionTags
from reqscope._replicas import ReplicaStatus
from reqscope._sessions import (
    IsolatedSessionFactory,
    configure,
    get_default_factory,
    isolated_session,
)
from reqscope.exceptions import (
    AgentCreationError,
    AgentNotRegisteredError,
    CircuitOpenError,
    ContextValidationError,
    DatabaseBusyError,
    DatabaseConfigurationError,
    DatabaseUnavailableError,
    IsolationViolation,
    NoActiveContextError,
    NotAuthenticated,
    PoolExhaustedError,
    ReqscopeError,
    RequestTimeoutError,
    SessionReclaimedError,
    SessionScopeError,
    TenancyConfigurationError,
    TransactionConflictError,
    UserResolverError,
)
from reqscope.tenancy import TenancyReport, TenantPolicy, TenantScoped

__version__ = "0.1.0.dev0"

__all__ = [
    "AgentCreationError",
    "AgentInstanceFactory",
    "AgentNotRegisteredError",
    "AgentRegistry",
    "AgentScope",
    "AuditEvent",
    "BreakerTransition",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "ContextLogFilter",
    "ContextValidationError",
    "DatabaseBusyError",
    "DatabaseConfigurationError",
    "DatabaseUnavailableError",
    "Event",
    "EventChannel",
    "EventHub",
    "FactoryMetrics",
    "HealthReport",
    "HubStats",
    "IsolatedSessionFactory",
    "IsolationViolation",
    "LeakDetector",
    "LeakReport",
    "NoActiveContextError",
    "NotAuthenticated",
    "ObservedSession",
    "PoolConfig",
    "PoolExhaustedError",
    "PoolStats",
    "ReplicaStatus",
    "ReqscopeError",
    "ReqscopeSession",
    "RequestTimeoutError",
    "RunResult",
    "SessionObserver",
    "SessionProvider",
    "SessionReclaimedError",
    "SessionRecord",
    "SessionScopeError",
    "SessionTags",
    "SharedStateWarning",
    "TenancyConfigurationError",
    "TenancyReport",
    "TenantPolicy",
    "TenantScoped",
    "TransactionConflictError",
    "UserEventEmitter",
    "UserExecutionContext",
    "UserResolverError",
    "__version__",
    "build_engine",
    "configure",
    "current_context",
    "current_context_or_none",
    "gather_isolated",
    "get_default_factory",
    "isolated_session",
    "mark_session_as_global",
    "run_isolated",
    "session_tags",
    "use_context",
    "validate_session_is_request_scoped",
]
