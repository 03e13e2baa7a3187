"""Shared fixtures: the anyio backend and the parametrized database fixtures.

Server-backed databases are read from environment variables and skipped without them,
except when ``REQSCOPE_REQUIRE_SERVICES=1`` (CI), where a missing or unreachable server
fails the test instead.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy.engine import make_url

from models import create_tables, drop_tables
from reqscope import IsolatedSessionFactory, PoolConfig, UserExecutionContext

pytest_plugins = ["pytester"]

REQUIRE_SERVICES = os.environ.get("REQSCOPE_REQUIRE_SERVICES") == "1"
# The PostgreSQL suites run a second time through PgBouncer in transaction mode (.ci/run):
# the URLs then point at the pooler, REQSCOPE_POOLER=pgbouncer declares it, and
# REQSCOPE_TEST_POOLED_SERVER_PORT is the port of the server behind it.
POOLER = os.environ.get("REQSCOPE_POOLER") or None

# Timings on a shared machine, under coverage's tracer, say nothing about the code: no
# deadline, and no health check failing a test because generating its inputs was slow.
settings.register_profile("reqscope", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("reqscope")


def _version(package: str) -> tuple[int, ...]:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def pytest_configure(config: pytest.Config) -> None:
    # Starlette before 0.45.2 never closes the memory streams of its TestClient's lifespan
    # (fixed upstream by closing them on exit); anyio then warns from their __del__ at the
    # next garbage collection, inside whichever test runs then. Only the lowest-versions
    # session installs such a Starlette: every other session keeps the warning an error,
    # so an unclosed stream of reqscope's own still fails there.
    if () < _version("starlette") < (0, 45, 2):
        config.addinivalue_line(
            "filterwarnings", r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning"
        )


@dataclass(frozen=True)
class Database:
    name: str
    url: str

    @property
    def backend(self) -> str:
        return make_url(self.url).get_backend_name()

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgresql"


_SERVERS = {
    "postgres-asyncpg": "REQSCOPE_TEST_POSTGRES_URL",
    "postgres-psycopg": "REQSCOPE_TEST_PSYCOPG_URL",
    "mysql-asyncmy": "REQSCOPE_TEST_MYSQL_URL",
}
# Message brokers, the read replica (a hot standby of the PostgreSQL server, which refuses
# writes) and PgBouncer in front of the server: not in the `database` fixture's parameters.
_BROKERS = {
    "rabbitmq": "REQSCOPE_TEST_AMQP_URL",
    "redis": "REQSCOPE_TEST_REDIS_URL",
    "postgres-replica": "REQSCOPE_TEST_REPLICA_URL",
    "pgbouncer": "REQSCOPE_TEST_PGBOUNCER_URL",  # transaction mode, in front of the server
}


def _reachable(url: str) -> bool:
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5432), 2):
            return True
    except OSError:
        return False


def server_url(name: str) -> str:
    """The URL of server ``name`` (a database or a broker), or skip (fail under REQUIRE_SERVICES)."""
    variable = {**_SERVERS, **_BROKERS}[name]
    url = os.environ.get(variable)
    if not url:
        if REQUIRE_SERVICES:
            pytest.fail(f"{variable} is not set but REQSCOPE_REQUIRE_SERVICES=1")
        pytest.skip(f"{variable} is not set")
    if not _reachable(url):
        if REQUIRE_SERVICES:
            pytest.fail(f"{name} at {variable} is unreachable but REQSCOPE_REQUIRE_SERVICES=1")
        pytest.skip(f"{name} at {variable} is unreachable")
    return url


async def marked_sqlite(path: Path, name: str) -> str:
    """The URL of a new SQLite file whose table ``whereami`` holds ``name``.

    Stand-ins for a primary and its read replicas: ``SELECT name FROM whereami`` says which
    database a session reads.
    """
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    url = f"sqlite+aiosqlite:///{path}"
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE whereami (name TEXT)"))
        await conn.execute(text("INSERT INTO whereami VALUES (:name)"), {"name": name})
    await engine.dispose()
    return url


def server_behind(url: str) -> str:
    """``url``, or behind a pooler the same URL to the server itself (for observers)."""
    if POOLER is None:
        return url
    port = int(os.environ.get("REQSCOPE_TEST_POOLED_SERVER_PORT", "5432"))
    return make_url(url).set(port=port).render_as_string(hide_password=False)


async def in_forked_child(target: Callable[..., None], *args: object, timeout: float = 30) -> Any:
    """Run ``target(*args, report)`` in a forked child; what it sends through ``report``."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=target, args=(*args, send))
    child.start()
    with anyio.fail_after(timeout):
        while not receive.poll():
            await anyio.sleep(0.05)
    outcome = receive.recv()
    child.join(10)
    return outcome


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(name="database", params=["sqlite", *_SERVERS])
def _database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return Database("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}")
    return Database(request.param, server_url(request.param))


@pytest.fixture(name="postgres", params=["postgres-asyncpg", "postgres-psycopg"])
def _postgres(request: pytest.FixtureRequest) -> Database:
    return Database(request.param, server_url(request.param))


@pytest.fixture(name="factory")
async def _factory(database: Database) -> AsyncIterator[IsolatedSessionFactory]:
    async with IsolatedSessionFactory(
        database.url, pool=PoolConfig(pool_size=5, max_overflow=5, pool_timeout=5.0)
    ) as factory:
        yield factory
        metrics = factory.metrics()
        assert metrics.active_sessions == 0
        assert metrics.pool is None or metrics.pool.checked_out == 0


@pytest.fixture(name="tables")
async def _tables(factory: IsolatedSessionFactory) -> AsyncIterator[None]:
    """The tables of ``models`` in the factory's database, dropped after the test."""
    await create_tables(factory.engine)
    yield
    await drop_tables(factory.engine)


@pytest.fixture(name="alice")
def _alice() -> UserExecutionContext:
    return UserExecutionContext.create("alice")


@pytest.fixture(name="bob")
def _bob() -> UserExecutionContext:
    return UserExecutionContext.create("bob")
