"""Assertions and fixtures for testing services built on reqscope.

The pytest plugin (registered through the ``pytest11`` entry point) provides the fixtures
``reqscope_factory`` and ``reqscope_context``; :mod:`reqscope.testing.strategies` has
hypothesis strategies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reqscope.testing._assertions import assert_no_leaks, assert_no_violations

if TYPE_CHECKING:
    from reqscope.testing._machine import IsolationMachine

__all__ = ["IsolationMachine", "assert_no_leaks", "assert_no_violations"]


def __getattr__(name: str) -> Any:
    # hypothesis is optional (the "testing" extra); the pytest plugin imports this package
    # in every project that has reqscope installed, so import it only when asked for.
    if name == "IsolationMachine":
        from reqscope.testing._machine import IsolationMachine  # noqa: PLC0415

        return IsolationMachine
    raise AttributeError(f"module 'reqscope.testing' has no attribute {name!r}")
