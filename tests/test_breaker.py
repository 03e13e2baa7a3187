from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from reqscope import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    DatabaseUnavailableError,
    IsolatedSessionFactory,
    PoolConfig,
    PoolExhaustedError,
)
from reqscope._breaker import is_configuration_error, is_connection_failure


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(
    st.lists(st.sampled_from(["failure", "success", "wait", "call", "release"]), max_size=40),
    st.integers(min_value=1, max_value=4),
)
def test_a_circuit_that_is_not_closed_always_has_failures(steps: list[str], threshold: int) -> None:
    # Sessions test consecutive_failures alone for "anything to reset" (one test per
    # request instead of two): that is right only while this holds.
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=threshold, recovery_timeout=10, clock=clock)
    for step in steps:
        if step == "failure":
            breaker.record_failure()
        elif step == "success":
            breaker.record_success()
        elif step == "wait":
            clock.now += 10
        elif step == "call":
            with contextlib.suppress(CircuitOpenError):
                breaker.before_call()
        else:
            breaker.release_probe()
        if breaker.state is not CircuitState.CLOSED:
            assert breaker.consecutive_failures >= 1


def test_state_machine() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=10, clock=clock)
    assert breaker.state is CircuitState.CLOSED
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        breaker.before_call()
    assert info.value.retry_after == pytest.approx(10)
    clock.now = 4
    with pytest.raises(CircuitOpenError) as info:
        breaker.before_call()
    assert info.value.retry_after == pytest.approx(6)
    assert "retry in" in str(info.value)
    clock.now = 10
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.before_call() is True  # the probe
    with pytest.raises(CircuitOpenError):  # one probe at a time
        breaker.before_call()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    clock.now = 20
    assert breaker.before_call() is True
    breaker.release_probe()
    assert breaker.before_call() is True
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.before_call() is False
    assert breaker.times_opened == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="recovery_timeout"):
        CircuitBreaker(recovery_timeout=0)


def test_only_connection_failures_count() -> None:
    refused = ConnectionRefusedError(111, "refused")
    assert is_connection_failure(refused, connecting=True)
    assert is_connection_failure(TimeoutError(), connecting=True)
    # asyncpg's connect timeout on Python 3.10, where it is not the builtin TimeoutError
    assert is_connection_failure(asyncio.TimeoutError(), connecting=True)
    assert not is_connection_failure(TimeoutError())  # the app's own timeout in a request
    # a full pool is overload, not an outage
    assert not is_connection_failure(sa_exc.TimeoutError("pool"))
    assert not is_connection_failure(PoolExhaustedError("x"))
    # a server refusing the login is up
    wrong_password = Exception("FATAL:  password authentication failed for user 'app'")
    assert not is_connection_failure(wrong_password, connecting=True)
    refused_login = sa_exc.OperationalError(None, {}, wrong_password)  # type: ignore[arg-type]
    assert not is_connection_failure(refused_login)
    assert is_connection_failure(sa_exc.OperationalError(None, {}, refused))  # type: ignore[arg-type]
    dropped = sa_exc.OperationalError(
        "SELECT 1", {}, Exception("gone"), connection_invalidated=True
    )
    assert is_connection_failure(dropped)
    integrity = sa_exc.IntegrityError("INSERT", {}, Exception("dup"))
    assert not is_connection_failure(integrity)
    assert not is_connection_failure(ValueError("app"))
    breaker = CircuitBreaker(failure_threshold=1)
    assert not breaker.observe(ValueError("app"))
    assert breaker.state is CircuitState.CLOSED
    assert breaker.observe(refused, connecting=True)
    assert breaker.state is CircuitState.OPEN


class _SQLStateError(Exception):
    def __init__(self, sqlstate: str, message: str = "") -> None:
        super().__init__(message or sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "configuration"),
    [
        (_SQLStateError("28P01"), True),  # invalid password
        (_SQLStateError("28000"), True),  # unknown role, no pg_hba.conf entry
        (_SQLStateError("3D000"), True),  # unknown database
        (_SQLStateError("53300"), False),  # too many connections: the server is overloaded
        (_SQLStateError("57P03"), False),  # the server is starting up
        (Exception(1045, "Access denied for user 'app'"), True),  # MySQL/MariaDB
        (Exception(1049, "Unknown database 'x'"), True),
        (Exception(2003, "Can't connect to MySQL server"), False),
        (Exception('FATAL:  database "x" does not exist'), True),  # libpq, no SQLSTATE
        (Exception('FATAL:  role "x" does not exist'), True),
        (Exception("FATAL:  no pg_hba.conf entry for host"), True),
        (ConnectionRefusedError(111, "refused"), False),
        # PgBouncer relays a refused login under its protocol-violation SQLSTATE
        (_SQLStateError("08P01", 'database "x" does not exist'), True),
        (_SQLStateError("08P01", "no such user"), True),
        (_SQLStateError("08P01", "server login has been failing, try again later"), False),
    ],
)
def test_configuration_errors_are_told_apart_from_outages(error, configuration) -> None:
    assert is_configuration_error(error) is configuration
    if configuration:
        assert not is_connection_failure(error, connecting=True)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


URLS = {
    "asyncpg": "postgresql+asyncpg://postgres@127.0.0.1:{port}/test",
    "psycopg": "postgresql+psycopg://postgres@127.0.0.1:{port}/test",
    "asyncmy": "mysql+asyncmy://root@127.0.0.1:{port}/test",
}


@pytest.mark.anyio
@pytest.mark.parametrize("driver", list(URLS))
async def test_refused_connections_open_the_circuit(driver, alice) -> None:
    url = URLS[driver].format(port=closed_port())
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=30)
    async with IsolatedSessionFactory(url, circuit_breaker=breaker) as factory:
        for _ in range(3):
            with pytest.raises(DatabaseUnavailableError, match="cannot connect") as info:
                async with factory.session(alice) as session:  # connects on first use
                    await session.execute(text("SELECT 1"))
            assert isinstance(info.value, ConnectionError)
            assert "check that it is running" in str(info.value)
        assert breaker.state is CircuitState.OPEN
        started = time.perf_counter()
        with pytest.raises(CircuitOpenError):
            async with factory.session(alice):
                pass
        assert time.perf_counter() - started < 0.01  # fails fast (not a timing benchmark)
        assert factory.metrics().sessions_failed == 3
        assert factory.metrics().circuit_state is CircuitState.OPEN
        report = await factory.health(timeout=1)
        assert report.status == "down"
        assert report.error


@pytest.mark.anyio
@pytest.mark.parametrize("driver", list(URLS))
async def test_a_silent_listener_fails_within_the_connect_timeout(driver, alice) -> None:
    # A server that accepts TCP and never answers: bounded by PoolConfig.connect_timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    port = listener.getsockname()[1]
    try:
        breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=30)
        pool = PoolConfig(pool_size=2, max_overflow=0, pool_timeout=1, connect_timeout=1.0)
        async with IsolatedSessionFactory(
            URLS[driver].format(port=port), pool=pool, circuit_breaker=breaker
        ) as factory:
            started = time.perf_counter()
            for _ in range(2):
                with anyio.fail_after(10), pytest.raises(DatabaseUnavailableError):
                    async with factory.session(alice) as session:
                        await session.execute(text("SELECT 1"))
            assert time.perf_counter() - started < 8
            assert breaker.state is CircuitState.OPEN
            with pytest.raises(CircuitOpenError):
                async with factory.session(alice):
                    pass
            report = await factory.health(timeout=0.5)
            assert report.status == "down"
            assert "0.5" in (report.error or "") or report.error
    finally:
        listener.close()


@pytest.mark.anyio
async def test_application_errors_never_open_the_circuit(factory, alice) -> None:
    breaker = factory.circuit_breaker
    for _ in range(breaker.failure_threshold + 2):
        with pytest.raises(sa_exc.DBAPIError):
            async with factory.session(alice) as session:
                await session.execute(text("SELECT * FROM no_such_table_anywhere"))
        with pytest.raises(ValueError, match="mine"):
            async with factory.session(alice):
                raise ValueError("mine")
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.anyio
async def test_a_probe_session_decides_the_half_open_circuit_only_by_reaching_the_database(
    database, alice
) -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=0.05)
    async with IsolatedSessionFactory(database.url, circuit_breaker=breaker) as factory:
        breaker.record_failure()
        await anyio.sleep(0.06)
        assert breaker.state is CircuitState.HALF_OPEN
        async with factory.session(alice):  # the probe, but it never runs a statement
            with pytest.raises(CircuitOpenError):  # one probe at a time
                async with factory.session(alice):
                    pass
        assert breaker.state is CircuitState.HALF_OPEN  # no verdict, and the slot is free
        async with factory.session(alice) as session:  # the next probe reaches the database
            await session.execute(text("SELECT 1"))
            assert breaker.state is CircuitState.CLOSED


@pytest.mark.anyio
async def test_a_session_that_reaches_the_database_resets_the_failure_count(
    database, alice
) -> None:
    # "Consecutive" failures: a request that reaches the database in between starts the
    # count again, even though the circuit never left CLOSED.
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=60)
    async with IsolatedSessionFactory(database.url, circuit_breaker=breaker) as factory:
        breaker.record_failure()
        breaker.record_failure()
        async with factory.session(alice) as session:
            await session.execute(text("SELECT 1"))
        assert breaker.consecutive_failures == 0
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.state is CircuitState.CLOSED


def test_reading_the_state_changes_nothing_and_transitions_are_kept() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10, clock=clock)
    breaker.record_failure()
    clock.now = 10
    for _ in range(3):  # a metrics reader, from its own thread: no side effect
        assert breaker.state is CircuitState.HALF_OPEN
    assert [t.state for t in breaker.history] == [CircuitState.OPEN]
    assert breaker.before_call() is True  # the probe: now it is half-open
    breaker.record_success()
    assert [t.state for t in breaker.history] == [
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]
    assert breaker.transitions == 3
    assert breaker.history[0].to_dict()["state"] == "open"
    assert breaker.history[0].at <= breaker.history[-1].at
