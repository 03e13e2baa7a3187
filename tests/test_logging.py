"""Every reqscope record carries request_id, user_id and session_id; ContextLogFilter."""

from __future__ import annotations

import io
import json
import logging

import anyio
import pytest
import sqlalchemy as sa

from reqscope import ContextLogFilter, IsolatedSessionFactory, UserExecutionContext, use_context
from reqscope._logging import get_logger

pytestmark = pytest.mark.anyio


def test_records_get_the_current_contexts_ids_or_none(caplog: pytest.LogCaptureFixture) -> None:
    logger = get_logger("reqscope._test")
    alice = UserExecutionContext.create("alice")
    with caplog.at_level(logging.INFO, logger="reqscope"):
        logger.info("outside")
        with use_context(alice):
            logger.info("inside")
            logger.info("given", extra={"user_id": "bob", "session_id": "s-1"})
    outside, inside, given = caplog.records
    assert (outside.request_id, outside.user_id, outside.session_id) == (None, None, None)
    assert (inside.request_id, inside.user_id, inside.session_id) == (
        alice.request_id,
        "alice",
        None,
    )
    # what the record was logged with wins
    assert (given.request_id, given.user_id, given.session_id) == (alice.request_id, "bob", "s-1")
    assert get_logger("reqscope._test").filters.count(logger.filters[0]) == 1  # added once


async def test_a_leak_report_names_its_session_in_a_json_log(tmp_path) -> None:
    # The docs' recipe: one JSON object per record, the ids as fields.
    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps(
                {
                    "level": record.levelname,
                    "logger": record.name,
                    "message": record.getMessage(),
                    "request_id": record.request_id,  # type: ignore[attr-defined]
                    "user_id": record.user_id,  # type: ignore[attr-defined]
                    "session_id": record.session_id,  # type: ignore[attr-defined]
                }
            )

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextLogFilter())
    reqscope_logger = logging.getLogger("reqscope")
    reqscope_logger.addHandler(handler)
    app_logger = logging.getLogger("app.test")
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    alice = UserExecutionContext.create("alice")
    try:
        url = f"sqlite+aiosqlite:///{tmp_path / 'log.sqlite3'}"
        factory = IsolatedSessionFactory(url)
        async with factory, factory.session(alice, max_lifetime=0.01) as session:
            app_logger.info("the app's own record")
            await session.execute(sa.text("SELECT 1"))
            await anyio.sleep(0.03)
            (report,) = await factory.leak_detector.ascan()
    finally:
        reqscope_logger.removeHandler(handler)
        app_logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    app, leak = lines[0], next(line for line in lines if line["logger"] == "reqscope._leaks")
    assert app == {
        "level": "INFO",
        "logger": "app.test",
        "message": "the app's own record",
        "request_id": alice.request_id,
        "user_id": "alice",
        "session_id": None,
    }
    assert leak["level"] == "ERROR"
    assert (leak["request_id"], leak["user_id"], leak["session_id"]) == (
        alice.request_id,
        "alice",
        report.session_id,
    )
