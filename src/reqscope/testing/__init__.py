"""Assertions and fixtures for testing services built on reqscope.

The pytest plugin (registered through the ``pytest11`` entry point) provides the fixtures
``reqscope_factory``, ``reqscope_transaction`` (the test's writes rolled back after it) and
``reqscope_context``; :mod:`reqscope.testing.asyncio_plugin` declares them for
pytest-asyncio's strict mode; :mod:`reqscope.testing.strategies` has hypothesis strategies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reqscope.testing._assertions import assert_no_leaks, assert_no_violations
from reqscope.testing._identities import SessionLog, acting_as, record_sessions

if TYPE_CHECKING:
    from reqscope.testing._machine import IsolationMachine

__all__ = [
    "IsolationMachine",
    "SessionLog",
    "acting_as",
    "assert_no_leaks",
    "assert_no_violations",
    "record_sessions",
]


def __getattr__(name: str) -> Any:
    # hypothesis is optional (the "testing" extra); the pytest plugin imports this package
    # in every project that has reqscope installed, so import it only when asked for.
    if name == "IsolationMachine":
        from reqscope.testing._machine import IsolationMachine  # noqa: PLC0415

        return IsolationMachine
    raise AttributeError(f"module 'reqscope.testing' has no attribute {name!r}")
