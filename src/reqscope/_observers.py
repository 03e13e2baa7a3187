"""SessionObserver: what instrumentation hears about each session scope of a factory.

``factory.add_observer(observer)`` calls the observer's methods as sessions open, get their
first connection, close, leak and are refused; the OpenTelemetry tracing of
:mod:`reqscope.otel` and ``factory.on_session_close()`` are observers. The methods run in
the task (or the leak detector) where it happens, synchronously: keep them short. An
observer's exception is logged and never reaches the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from reqscope._context import UserExecutionContext
    from reqscope._leaks import LeakReport
    from reqscope.exceptions import ReqscopeError

__all__ = ["ObservedSession", "SessionObserver"]


class ObservedSession(Protocol):
    """The open session an observer hears about (one object per scope, for its life).

    Attributes:
        session_id: the session's id, as in logs, leak reports and ``active_sessions()``.
        ctx: the context the session was opened for.
        lifetime: seconds after which it counts as leaked.
        stack: where it was opened, when the factory captures stacks (else ``None``).
    """

    @property
    def session_id(self) -> str: ...

    @property
    def ctx(self) -> UserExecutionContext: ...

    @property
    def lifetime(self) -> float: ...

    @property
    def stack(self) -> str | None: ...


class SessionObserver:
    """Override the methods you need; each is a no-op here.

    Example:
        >>> class CountCommits(SessionObserver):
        ...     commits = 0
        ...     def session_closed(self, session, *, committed, error):
        ...         self.commits += committed
    """

    def session_opened(self, session: ObservedSession) -> None:
        """A scope opened ``session`` (it has no connection yet)."""

    def session_began(self, session: ObservedSession) -> None:
        """``session`` got its first connection: its first statement is about to run."""

    def session_closed(
        self, session: ObservedSession, *, committed: bool, error: BaseException | None
    ) -> None:
        """``session``'s scope ended: committed (``factory.begin()``), or rolled back.

        ``error`` is the exception that ended the block, if one did.
        """

    def session_leaked(self, session: ObservedSession, report: LeakReport) -> None:
        """The leak detector found ``session`` held past its lifetime (``report``)."""

    def session_refused(self, session: ObservedSession, error: ReqscopeError) -> None:
        """A use of ``session`` was refused: another user, or after its scope (``error``)."""
