"""The operator page in a real headless Chromium, against an app served by uvicorn.

Chromium is Debian's (``.ci/run`` installs it); ``REQSCOPE_TEST_CHROMIUM`` names another
binary. ``REQSCOPE_SCREENSHOT=path.png`` also saves what the browser showed (the docs'
screenshot is made so).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from conftest import REQUIRE_SERVICES
from reqscope import IsolatedSessionFactory, PoolConfig
from reqscope.fastapi import RequestScopedDbDep, from_header, monitoring_router, setup

pytestmark = pytest.mark.slow

SNEAKY_USER = "<img src=x onerror=alert(1)>"  # an id is data, never markup


def chromium() -> str:
    browser = os.environ.get("REQSCOPE_TEST_CHROMIUM") or shutil.which("chromium")
    if browser is None:
        if REQUIRE_SERVICES:
            pytest.fail("no chromium (REQSCOPE_TEST_CHROMIUM) but REQSCOPE_REQUIRE_SERVICES=1")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return browser


def make_app(tmp_path: Path) -> FastAPI:
    factory = IsolatedSessionFactory(
        f"sqlite+aiosqlite:///{tmp_path / 'page.sqlite3'}",
        pool=PoolConfig(pool_size=3, max_overflow=0, pool_timeout=30),
        capture_stacks=True,
        max_session_lifetime=5,
        leak_check_interval=0.05,
        name="orders-db",
    )
    app = FastAPI()
    setup(app, factory, user_resolver=from_header("x-user"))
    app.include_router(monitoring_router(factory, page=True))

    @app.get("/work")
    async def work(session: RequestScopedDbDep) -> dict[str, int]:
        await session.execute(sa.text("SELECT 1"))
        await asyncio.sleep(0.15)
        return {"ok": 1}

    @app.get("/slow")
    async def slow_report_that_leaks() -> dict[str, int]:
        from reqscope import current_context

        async with factory.session(current_context(), max_lifetime=0.05) as session:
            await session.execute(sa.text("SELECT 1"))
            await asyncio.sleep(0.4)  # past its lifetime: reported and reclaimed
        return {"ok": 1}

    return app


@pytest.fixture(name="served")
def _served(tmp_path: Path) -> Iterator[str]:
    """The app under uvicorn on a loopback port; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(tmp_path), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def load(base: str, stop: threading.Event) -> None:
    """Requests of a few users until ``stop``, some holding every connection at once."""
    with httpx.Client(base_url=base, timeout=30) as client:
        client.get("/slow", headers={"x-user": SNEAKY_USER}).raise_for_status()
        while not stop.is_set():
            threads = [
                threading.Thread(
                    target=client.get, args=("/work",), kwargs={"headers": {"x-user": f"u{n}"}}
                )
                for n in range(5)  # 5 requests on 3 connections: some wait
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()


def browse(browser: str, url: str, profile: Path, *extra: str, budget: int = 6000) -> str:
    """What headless Chromium made of ``url`` after ``budget`` ms of the page's own time."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget}",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)  # noqa: S603
    return done.stdout


def test_the_page_renders_the_pool_chart_and_a_leak(served: str, tmp_path: Path) -> None:
    browser = chromium()
    stop = threading.Event()
    loader = threading.Thread(target=load, args=(served, stop))
    loader.start()
    try:
        time.sleep(0.6)  # the leak is reported; the load goes on while the page polls
        dom = browse(browser, f"{served}/reqscope/", tmp_path / "profile", "--dump-dom")
        screenshot = os.environ.get("REQSCOPE_SCREENSHOT")
        if screenshot:
            browse(
                browser,
                f"{served}/reqscope/",
                tmp_path / "profile-shot",
                f"--screenshot={screenshot}",
                "--window-size=1280,1100",
                "--hide-scrollbars",
                budget=40000,
            )
    finally:
        stop.set()
        loader.join(30)

    assert 'id="name" class="muted">orders-db</span>' in dom
    assert 'id="status" class="down"' not in dom  # every poll answered
    # the chart has samples, and one of them shows connections in use
    samples = int(re.search(r'id="pool-chart" data-samples="(\d+)"', dom).group(1))
    assert samples >= 2
    used = re.search(r'id="line-used"[^>]*points="([^"]*)"', dom).group(1)
    heights = [float(point.split(",")[1]) for point in used.split()]
    assert min(heights) < 160  # above the baseline: in use at some poll
    assert re.search(r'id="capacity">3<', dom)
    assert re.search(r'id="leaks-detected">[1-9]', dom)
    # the leak, with the stack that opened it, and its user shown as text, not markup
    leaks = dom[dom.index('<table id="leaks">') :]
    assert 'class="leak"' in leaks
    assert "slow_report_that_leaks" in leaks
    assert "&lt;img src=x onerror=alert(1)&gt;" in leaks
    assert "<img src=x" not in dom
    assert 'class="badge closed">closed<' in dom
