"""Per-request agents: a registry of classes, a fresh instance per request, cleanup at the end."""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
from typing_extensions import Self

from reqscope._context import UserExecutionContext, _current, current_context, log_fields
from reqscope._logging import get_logger
from reqscope.exceptions import (
    AgentCreationError,
    AgentNotRegisteredError,
    IsolationViolation,
    ReqscopeError,
    SessionScopeError,
)

if TYPE_CHECKING:
    from reqscope._scope import SessionScope
    from reqscope._sessions import IsolatedSessionFactory

__all__ = [
    "AgentInstanceFactory",
    "AgentRegistry",
    "AgentScope",
    "SessionProvider",
    "SharedStateWarning",
]

logger = get_logger(__name__)

T = TypeVar("T")
AgentFactory = Callable[..., Any]
RESERVED = ("context", "sessions")

# Every agent created by a scope -> that scope (weakly: agents die with their requests).
_owners: weakref.WeakKeyDictionary[Any, AgentScope] = weakref.WeakKeyDictionary()


class SharedStateWarning(UserWarning):
    """An agent class keeps mutable state in its class body, shared by every request."""


def _shared_state(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__[:-1]:  # not object
        for name, value in vars(klass).items():
            if not name.startswith("__") and isinstance(value, (list, dict, set, bytearray)):
                names.append(f"{klass.__name__}.{name}")
    return names


class AgentRegistry:
    """Agent names → classes or factory callables (never instances).

    Args:
        strict: refuse classes with class-level mutable state instead of warning.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._agents: dict[str, AgentFactory] = {}

    def register(
        self, name: str, agent: Callable[..., T], *, replace: bool = False
    ) -> Callable[..., T]:
        """Register ``agent`` (a class or a callable returning a new agent) as ``name``.

        Returns:
            ``agent``, so this also works as ``registry.register("x", X)`` in an assignment.

        Raises:
            TypeError: ``agent`` is an instance (it would be shared by every request), or a
                class with class-level mutable state while ``strict``.
            ValueError: ``name`` is taken and ``replace`` is false.
        """
        given: object = name
        if not isinstance(given, str) or not given:
            raise ValueError(f"agent names are non-empty strings, got {name!r}")
        if not (
            isinstance(agent, type)
            or inspect.isfunction(agent)
            or inspect.ismethod(agent)
            or inspect.isbuiltin(agent)
            or isinstance(agent, functools.partial)
        ):
            raise TypeError(
                f"register() takes an agent class or a factory function, got an instance of "
                f"{type(agent).__name__}: one instance would be shared by every request; "
                f"register the class ({type(agent).__name__}) instead"
            )
        if name in self._agents and not replace:
            raise ValueError(f"an agent is already registered as {name!r}; pass replace=True")
        if isinstance(agent, type):
            shared = _shared_state(agent)
            if shared:
                message = (
                    f"agent {name!r} ({agent.__qualname__}) keeps mutable state in its class "
                    f"body ({', '.join(shared)}), which every request would share; move it "
                    "into __init__"
                )
                if self.strict:
                    raise TypeError(message)
                warnings.warn(message, SharedStateWarning, stacklevel=2)
        self._agents[name] = agent
        return agent

    def get(self, name: str) -> AgentFactory:
        """The class or callable registered as ``name``.

        Raises:
            AgentNotRegisteredError: unknown name.
        """
        try:
            return self._agents[name]
        except KeyError:
            raise AgentNotRegisteredError(name, tuple(sorted(self._agents))) from None

    def name_of(self, agent: AgentFactory) -> str:
        """The name under which ``agent`` is registered."""
        for name, registered in self._agents.items():
            if registered is agent:
                return name
        qualname = getattr(agent, "__qualname__", repr(agent))
        raise AgentNotRegisteredError(qualname, tuple(sorted(self._agents)))

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._agents))

    def __contains__(self, name: object) -> bool:
        return name in self._agents


class SessionProvider:
    """What agents get instead of a session: opens sessions for *their* request only.

    ``async with sessions() as s`` and ``async with sessions.begin() as s`` open a new
    session through the factory, for the context the agent was created with.
    """

    __slots__ = ("_ctx", "_factory", "_scope")

    def __init__(
        self, factory: IsolatedSessionFactory, ctx: UserExecutionContext, scope: AgentScope
    ) -> None:
        self._factory = factory
        self._ctx = ctx
        self._scope = scope

    @property
    def context(self) -> UserExecutionContext:
        """The context sessions are opened for."""
        return self._ctx

    def _check(self) -> None:
        if self._scope.closed:
            raise SessionScopeError(
                f"the agent scope of request {self._ctx.request_id} has ended; an agent must "
                "not outlive its request: create a new one in the new request's scope"
            )
        current = _current.get()
        if current is not None and current.user_id != self._ctx.user_id:
            self._scope.factory.isolation_violations += 1
            raise IsolationViolation(
                f"an agent of user {self._ctx.user_id!r} (request {self._ctx.request_id}) "
                f"opened a session while user {current.user_id!r} is current; agents "
                "belong to one request: create one per request with scope.create()"
            )

    def __call__(self, *, max_lifetime: float | None = None) -> SessionScope:
        """Open a session for the agent's request (rolled back unless committed)."""
        self._check()
        return self._factory.session(self._ctx, max_lifetime=max_lifetime)

    def begin(self, *, max_lifetime: float | None = None) -> SessionScope:
        """Open a session for the agent's request that commits on success."""
        self._check()
        return self._factory.begin(self._ctx, max_lifetime=max_lifetime)


class AgentScope:
    """The agents of one request; ``async with agents.scope(ctx) as scope``."""

    def __init__(self, factory: AgentInstanceFactory, ctx: UserExecutionContext) -> None:
        self.factory = factory
        self.context = ctx
        self.closed = False
        self._agents: list[Any] = []
        self._sessions: SessionProvider | None = None

    @overload
    def create(self, agent: type[T], /, **overrides: Any) -> T: ...
    @overload
    def create(self, agent: str, /, **overrides: Any) -> Any: ...

    def create(self, agent: str | type[Any], /, **overrides: Any) -> Any:
        """Create a new agent for this request, injecting constructor arguments by name.

        Parameters named ``context`` and ``sessions`` get this request's context and a
        :class:`SessionProvider`; other names come from the factory's ``infrastructure``;
        ``overrides`` win over both.

        Raises:
            AgentNotRegisteredError: unknown name (or an unregistered class).
            AgentCreationError: a required parameter nobody can fill, or the constructor
                raised.
        """
        if self.closed:
            raise ReqscopeError(
                f"the agent scope of request {self.context.request_id} has ended; open a "
                "new scope with agents.scope(ctx)"
            )
        registry = self.factory.registry
        name = agent if isinstance(agent, str) else registry.name_of(agent)
        build = registry.get(name)
        kwargs = self._arguments(name, build, overrides)
        try:
            instance = build(**kwargs)
        except Exception as exc:
            raise AgentCreationError(
                f"creating agent {name!r} for request {self.context.request_id} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._agents.append(instance)
        try:
            _owners[instance] = self
        except TypeError:  # not weak-referenceable: cleanup still happens, checks do not
            logger.debug("reqscope: agent %r cannot be tracked (no __weakref__)", name)
        self.factory.agents_created += 1
        return instance

    def _arguments(  # noqa: C901 - one pass over the signature, one rule per parameter kind
        self, name: str, build: AgentFactory, overrides: Mapping[str, Any]
    ) -> dict[str, Any]:
        available: dict[str, Any] = dict(self.factory.infrastructure)
        available["context"] = self.context
        if self.factory.sessions is not None:
            available["sessions"] = self.sessions
        available.update(overrides)
        kwargs: dict[str, Any] = {}
        accepts_any = False
        for parameter in _parameters(build):
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                accepts_any = True
                continue
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                if parameter.default is inspect.Parameter.empty:
                    raise AgentCreationError(
                        f"agent {name!r} needs positional-only parameter {parameter.name!r}, "
                        "which cannot be injected by name; make it a normal parameter"
                    )
                continue
            if parameter.name in available:
                kwargs[parameter.name] = available[parameter.name]
            elif parameter.default is inspect.Parameter.empty:
                hint = (
                    "pass sessions= to AgentInstanceFactory"
                    if parameter.name == "sessions"
                    else f"add {parameter.name!r} to AgentInstanceFactory(infrastructure=...) "
                    f"or pass scope.create({name!r}, {parameter.name}=...)"
                )
                raise AgentCreationError(
                    f"agent {name!r} needs parameter {parameter.name!r}, which the factory "
                    f"cannot provide; {hint}"
                )
        unknown = set(overrides) - set(kwargs)
        if unknown and not accepts_any:
            raise AgentCreationError(
                f"agent {name!r} takes no parameter(s) {', '.join(sorted(unknown))}"
            )
        if accepts_any:
            kwargs.update({key: overrides[key] for key in unknown})
        return kwargs

    @property
    def sessions(self) -> SessionProvider:
        """A :class:`SessionProvider` for this request."""
        if self.factory.sessions is None:
            raise ReqscopeError(
                "this AgentInstanceFactory has no session factory; pass "
                "AgentInstanceFactory(registry, sessions=factory)"
            )
        if self._sessions is None:
            self._sessions = SessionProvider(self.factory.sessions, self.context, self)
        return self._sessions

    @property
    def agents(self) -> tuple[Any, ...]:
        """The agents created so far, in creation order."""
        return tuple(self._agents)

    def check(self, agent: object) -> None:
        """Raise :class:`IsolationViolation` unless ``agent`` belongs to this scope."""
        owner = _owners.get(agent)
        if owner is not None and owner is not self:
            self.factory.isolation_violations += 1
            raise IsolationViolation(
                f"agent {type(agent).__name__} was created for request "
                f"{owner.context.request_id} of user {owner.context.user_id!r}, not for "
                f"request {self.context.request_id} of user {self.context.user_id!r}; "
                "create a new agent in this scope"
            )

    async def __aenter__(self) -> Self:
        self.factory.scopes_opened += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closed = True
        agents, self._agents = self._agents, []
        try:
            with anyio.CancelScope(shield=True):
                for agent in reversed(agents):
                    await self.factory._cleanup(agent, self.context)  # noqa: SLF001
        finally:
            self.factory.scopes_closed += 1


@functools.lru_cache(maxsize=512)
def _parameters_cached(build: AgentFactory) -> tuple[inspect.Parameter, ...]:
    return tuple(inspect.signature(build).parameters.values())


def _parameters(build: AgentFactory) -> tuple[inspect.Parameter, ...]:
    try:
        return _parameters_cached(build)
    except TypeError:  # unhashable callables
        return tuple(inspect.signature(build).parameters.values())


class AgentInstanceFactory:
    """Creates a fresh agent per request and cleans them all up when the request ends.

    Args:
        registry: the agents that can be created.
        sessions: the session factory agents open sessions through (via ``sessions()``).
        infrastructure: shared, stateless-per-user dependencies injected by parameter name
            (an LLM client, an HTTP client).
        cleanup_timeout: seconds each agent's ``aclose()``/``close()`` may take.
    """

    def __init__(
        self,
        registry: AgentRegistry,
        *,
        sessions: IsolatedSessionFactory | None = None,
        infrastructure: Mapping[str, Any] | None = None,
        cleanup_timeout: float = 5.0,
    ) -> None:
        infrastructure = dict(infrastructure or {})
        clash = set(infrastructure) & set(RESERVED)
        if clash:
            raise ValueError(f"infrastructure names {sorted(clash)} are reserved for reqscope")
        self.registry = registry
        self.sessions = sessions
        self.infrastructure = infrastructure
        self.cleanup_timeout = cleanup_timeout
        self.agents_created = 0
        self.agents_cleaned = 0
        self.scopes_opened = 0  # agent scopes entered
        self.scopes_closed = 0  # and ended (open now: the difference)
        self.cleanup_failures = 0
        self.isolation_violations = 0

    def scope(self, ctx: UserExecutionContext | None = None) -> AgentScope:
        """Open the agent scope of one request (``ctx``: the current context when omitted)."""
        return AgentScope(self, ctx if ctx is not None else current_context())

    async def _cleanup(self, agent: Any, ctx: UserExecutionContext) -> None:
        close = getattr(agent, "aclose", None) or getattr(agent, "close", None)
        if close is None:
            self.agents_cleaned += 1
            return
        extra = {**log_fields(ctx), "agent": type(agent).__name__}
        with anyio.move_on_after(self.cleanup_timeout) as deadline:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
                self.agents_cleaned += 1
            except Exception:
                self.cleanup_failures += 1
                logger.exception(
                    "reqscope: cleaning up agent %s of request %s failed",
                    type(agent).__name__,
                    ctx.request_id,
                    extra=extra,
                )
        if deadline.cancelled_caught:
            self.cleanup_failures += 1
            logger.warning(
                "reqscope: cleaning up agent %s of request %s took over %.3g s; moved on",
                type(agent).__name__,
                ctx.request_id,
                self.cleanup_timeout,
                extra=extra,
            )


def check_agent_use(ctx: UserExecutionContext, objects: Iterable[object]) -> None:
    """Raise :class:`IsolationViolation` if any object is (or is bound to) another user's agent."""
    for obj in objects:
        candidate = getattr(obj, "__self__", obj)
        try:
            owner = _owners.get(candidate)
        except TypeError:
            continue
        if owner is not None and owner.context.user_id != ctx.user_id:
            owner.factory.isolation_violations += 1
            raise IsolationViolation(
                f"agent {type(candidate).__name__} of user {owner.context.user_id!r} "
                f"(request {owner.context.request_id}) used in a request of user "
                f"{ctx.user_id!r}; agents belong to one request: create one per request"
            )
