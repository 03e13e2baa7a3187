"""The reqscope pytest plugin: ``reqscope_factory``, ``reqscope_transaction``, ``reqscope_context``.

``reqscope_factory`` uses the embedded SQLite database, or ``REQSCOPE_TEST_DATABASE_URL``
when it is set; after each test it is checked with :func:`assert_no_leaks` and closed.
Override it in your ``conftest.py`` to hand the plugin your app's factory.
``reqscope_transaction`` runs the test inside ``reqscope_factory.outer_transaction()``:
whatever the test's requests wrote is rolled back after it.

The async fixtures run under anyio's pytest plugin (``@pytest.mark.anyio``) and under
pytest-asyncio's auto mode as they are; in pytest-asyncio's strict mode, add
``pytest_plugins = ["reqscope.testing.asyncio_plugin"]`` to your root ``conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from reqscope._context import UserExecutionContext
from reqscope._sessions import IsolatedSessionFactory
from reqscope.testing._assertions import assert_no_leaks

__all__ = ["reqscope_context", "reqscope_factory", "reqscope_transaction"]


def declare_async_fixtures(
    fixture: Callable[..., Callable[[Callable[..., Any]], Any]],
) -> tuple[Any, Any]:
    """``reqscope_factory`` and ``reqscope_transaction``, declared with ``fixture``.

    ``pytest.fixture`` here; ``pytest_asyncio.fixture`` in
    :mod:`reqscope.testing.asyncio_plugin`, for pytest-asyncio's strict mode.
    """

    @fixture(name="reqscope_factory")
    async def factory_fixture() -> AsyncIterator[IsolatedSessionFactory]:
        """An ``IsolatedSessionFactory`` for one test, leak-checked and closed afterwards."""
        factory = IsolatedSessionFactory(os.environ.get("REQSCOPE_TEST_DATABASE_URL") or None)
        async with factory:
            yield factory
            assert_no_leaks(factory)

    @fixture(name="reqscope_transaction")
    async def transaction_fixture(
        reqscope_factory: IsolatedSessionFactory,
    ) -> AsyncIterator[AsyncConnection]:
        """The test inside ``reqscope_factory.outer_transaction()``: its writes roll back."""
        async with reqscope_factory.outer_transaction() as connection:
            yield connection

    return factory_fixture, transaction_fixture


reqscope_factory, reqscope_transaction = declare_async_fixtures(pytest.fixture)


@pytest.fixture
def reqscope_context() -> UserExecutionContext:
    """A fresh context for a test user (``user_id="test-user"``)."""
    return UserExecutionContext.create("test-user", metadata={"test": True})
