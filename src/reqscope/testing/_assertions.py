"""assert_no_leaks and assert_no_violations."""

from __future__ import annotations

from reqscope._agents import AgentInstanceFactory
from reqscope._sessions import IsolatedSessionFactory

__all__ = ["assert_no_leaks", "assert_no_violations"]


def assert_no_leaks(factory: IsolatedSessionFactory) -> None:
    """Fail unless no session is open, no connection is checked out and none was reclaimed.

    Raises:
        AssertionError: listing what is still open, with ids and ages.
    """
    metrics = factory.metrics()
    problems = [
        f"session {record.session_id} of user {record.user_id!r} (request "
        f"{record.request_id}, task {record.task_name}) open for {record.age:.2f} s"
        for record in factory.active_sessions()
    ]
    if metrics.pool is not None and metrics.pool.checked_out:
        problems.append(
            f"{metrics.pool.checked_out} connection(s) still checked out ({metrics.pool})"
        )
    if metrics.leaks_detected:
        problems.append(
            f"{metrics.leaks_detected} leak(s) detected, {metrics.leaks_reclaimed} reclaimed"
        )
    if problems:
        raise AssertionError("reqscope found leaks:\n  " + "\n  ".join(problems))


def assert_no_violations(factory: IsolatedSessionFactory | AgentInstanceFactory) -> None:
    """Fail if reqscope refused any cross-user or out-of-scope use.

    For an :class:`IsolatedSessionFactory`: a session used by another user or request, or
    after its scope. For an :class:`AgentInstanceFactory`: an agent used by another user's
    request, and the violations of the session factory it hands sessions from (``sessions=``).

    Raises:
        AssertionError: with the counts.
    """
    problems = []
    if isinstance(factory, AgentInstanceFactory):
        if factory.isolation_violations:
            problems.append(f"{factory.isolation_violations} agent isolation violation(s)")
        sessions = factory.sessions
    else:
        sessions = factory
    if sessions is not None:
        metrics = sessions.metrics()
        if metrics.isolation_violations or metrics.scope_violations:
            problems.append(
                f"{metrics.isolation_violations} isolation violation(s) and "
                f"{metrics.scope_violations} scope violation(s) of sessions"
            )
    if problems:
        raise AssertionError(
            "reqscope refused " + "; ".join(problems) + "; see the 'reqscope' log for ids"
        )
