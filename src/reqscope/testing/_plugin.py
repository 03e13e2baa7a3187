"""The reqscope pytest plugin: ``reqscope_factory`` and ``reqscope_context`` fixtures.

``reqscope_factory`` uses the embedded SQLite database, or ``REQSCOPE_TEST_DATABASE_URL``
when it is set; after each test it is checked with :func:`assert_no_leaks` and closed.
The fixtures are async: run the tests with anyio's pytest plugin (``@pytest.mark.anyio``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from reqscope._context import UserExecutionContext
from reqscope._sessions import IsolatedSessionFactory
from reqscope.testing._assertions import assert_no_leaks

__all__ = ["reqscope_context", "reqscope_factory"]


@pytest.fixture
async def reqscope_factory() -> AsyncIterator[IsolatedSessionFactory]:
    """An ``IsolatedSessionFactory`` for one test, leak-checked and closed afterwards."""
    factory = IsolatedSessionFactory(os.environ.get("REQSCOPE_TEST_DATABASE_URL") or None)
    async with factory:
        yield factory
        assert_no_leaks(factory)


@pytest.fixture
def reqscope_context() -> UserExecutionContext:
    """A fresh context for a test user (``user_id="test-user"``)."""
    return UserExecutionContext.create("test-user", metadata={"test": True})
