"""Assertions and fixtures for testing services built on reqscope.

The pytest plugin (registered through the ``pytest11`` entry point) provides the fixtures
``reqscope_factory`` and ``reqscope_context``; :mod:`reqscope.testing.strategies` has
hypothesis strategies.
"""

from __future__ import annotations

from reqscope.testing._assertions import assert_no_leaks, assert_no_violations

__all__ = ["assert_no_leaks", "assert_no_violations"]
