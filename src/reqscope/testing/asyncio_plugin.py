"""reqscope's fixtures for pytest-asyncio's strict mode.

Strict mode runs only the async fixtures declared with ``pytest_asyncio.fixture``; this
module declares reqscope's that way. Enable it in your root ``conftest.py``::

    pytest_plugins = ["reqscope.testing.asyncio_plugin"]

(auto mode, and anyio's plugin, need nothing: the fixtures registered with reqscope work
there as they are).
"""

from __future__ import annotations

try:
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - exercised by hand only
    raise ImportError(
        "reqscope.testing.asyncio_plugin is for pytest-asyncio: pip install pytest-asyncio"
    ) from exc

from reqscope.testing._plugin import declare_async_fixtures

__all__ = ["reqscope_factory", "reqscope_transaction"]


reqscope_factory, reqscope_transaction = declare_async_fixtures(pytest_asyncio.fixture)
