"""Identities in tests: act as a user in a request, and check whom a request's work ran as."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reqscope._registry import SessionRecord
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["SessionLog", "acting_as", "record_sessions"]


@contextmanager
def acting_as(app: Any, dependency: Callable[..., Any], user: Any) -> Iterator[None]:
    """Inside the block, ``app``'s requests are authenticated as ``user``.

    ``dependency`` is the app's authentication dependency (the one wrapped in
    :func:`reqscope.fastapi.authenticated`); it is answered with ``user`` through
    ``app.dependency_overrides``, and what was there before is restored after the block.

    Example:
        >>> with acting_as(app, get_current_user, alice):
        ...     response = client.get("/notes")
    """
    overrides: dict[Any, Any] = app.dependency_overrides
    missing = object()
    previous = overrides.get(dependency, missing)
    overrides[dependency] = lambda: user
    try:
        yield
    finally:
        if previous is missing:
            overrides.pop(dependency, None)
        else:
            overrides[dependency] = previous


@dataclass
class SessionLog:
    """The sessions of a factory that ended inside :func:`record_sessions`, as whom."""

    records: list[SessionRecord] = field(default_factory=list)

    @property
    def user_ids(self) -> list[str]:
        """The users the sessions were opened for, in order."""
        return [record.user_id for record in self.records]

    def assert_ran_as(self, user_id: str) -> None:
        """Fail unless at least one session was opened, and every one for ``user_id``.

        Raises:
            AssertionError: naming the sessions opened for someone else.
        """
        if not self.records:
            raise AssertionError(
                f"no reqscope session was opened, so nothing ran as {user_id!r}; did the "
                "request reach the database through the factory?"
            )
        others = [record for record in self.records if record.user_id != user_id]
        if others:
            shown = ", ".join(
                f"session {record.session_id} as {record.user_id!r} (request {record.request_id})"
                for record in others
            )
            raise AssertionError(f"expected every session to run as {user_id!r}, not {shown}")


@contextmanager
def record_sessions(factory: IsolatedSessionFactory) -> Iterator[SessionLog]:
    """Record every session of ``factory`` that ends inside the block, with its user.

    Example:
        >>> with record_sessions(factory) as log:
        ...     client.post("/notes", json={"body": "hi"}, headers=alice_headers)
        >>> log.assert_ran_as("alice")
    """
    log = SessionLog()
    stop = factory.on_session_close(log.records.append)
    try:
        yield log
    finally:
        stop()
