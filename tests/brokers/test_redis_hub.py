"""RedisEventHub on a real Redis: events cross instances, never users, and survive a restart.

Two hubs on one Redis stand for two app instances; the restart tests run a Redis server of
their own (``redis-server`` on a free loopback port), so stopping it disturbs nothing else.
The two-process test runs the chat example twice under uvicorn, with WebSocket clients on
both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from conftest import REQUIRE_SERVICES, in_forked_child, server_url
from reqscope import Event, EventChannel, UserExecutionContext
from reqscope.redis_hub import RedisEventHub

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PrivateRedis:
    """A redis-server of the test's own, which it may stop and start again."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: S603 - the machine's redis-server
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _listening(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


@pytest.fixture(name="private_redis")
def _private_redis() -> Iterator[PrivateRedis]:
    server_url("redis")  # the Redis tests are configured (skipped on a SQLite-only run)
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not installed but REQSCOPE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="hubs")
async def _hubs() -> AsyncIterator[tuple[RedisEventHub, RedisEventHub]]:
    url = server_url("redis")
    prefix = f"reqscope:test:{uuid.uuid4().hex}"  # pub/sub ignores the database number: our own
    async with (
        RedisEventHub(url, prefix=prefix) as first,
        RedisEventHub(url, prefix=prefix, max_queue=4) as second,
    ):
        yield first, second


def _ctx(user: str, connection: str | None = None) -> UserExecutionContext:
    return UserExecutionContext.create(user, websocket_client_id=connection)


async def _next(channel: EventChannel, timeout: float = 5.0) -> Event:
    with anyio.fail_after(timeout):
        return await channel.receive()


async def _nothing_for(channel: EventChannel, seconds: float = 0.3) -> None:
    with anyio.move_on_after(seconds):
        event = await channel.receive()
        pytest.fail(f"{channel.user_id}'s channel got {event.type!r}")


async def test_an_event_reaches_its_user_on_every_instance_and_no_one_else(hubs) -> None:
    here, there = hubs
    alice = _ctx("alice")
    async with (
        here.connect(alice, "alice-here") as alice_here,
        there.connect(alice, "alice-there") as alice_there,
        there.connect(_ctx("bob"), "bob-there") as bob_there,
    ):
        assert await here.emitter(alice).emit("token", {"text": "hi"}) == 1  # queued
        for channel in (alice_here, alice_there):
            event = await _next(channel)
            assert (event.type, event.payload["text"], event.user_id) == ("token", "hi", "alice")
            assert event.request_id == alice.request_id
        # aimed at one connection (the context's WebSocket): only that one, wherever it is
        await here.emitter(_ctx("alice", "alice-there")).emit("only-there")
        assert (await _next(alice_there)).type == "only-there"
        # one connection by id, on the other instance
        assert await here.send("alice-there", "direct", {"n": 1}, ctx=alice)
        assert (await _next(alice_there)).type == "direct"
        # another user's connection elsewhere: published on alice's channel, never delivered
        assert await here.send("bob-there", "forged", ctx=alice)
        await _nothing_for(bob_there)
        await _nothing_for(alice_here)
    assert here.stats().backend == "redis"
    assert here.stats().published >= 4
    assert there.stats().received >= 4
    assert there.stats().violations == 0


async def test_a_slow_connection_overflows_alone_and_publishers_never_wait(hubs) -> None:
    here, there = hubs  # `there` keeps 4 events per connection
    alice = _ctx("alice")
    async with there.connect(alice, "slow") as slow, there.connect(alice, "fast") as fast:
        emitter = here.emitter(alice)
        started = time.perf_counter()
        for n in range(100):
            emitter.emit_nowait("n", {"n": n})  # never waits for Redis or for a reader
        assert time.perf_counter() - started < 1.0
        received = []
        with anyio.fail_after(10):
            while len(received) < 100:
                event = await fast.receive()
                if event.type != Event.GAP:
                    received.append(event.payload["n"])
                if len(received) % 4 == 0:
                    await anyio.lowlevel.checkpoint()  # a fast reader, but the slow one never reads
        # the fast reader may have overflowed too (4 slots): what it got is in order
        assert received == sorted(received)
        assert received[-1] == 99
        assert slow.dropped >= 96  # kept the newest 4
        first = await slow.receive()
        assert (first.type, first.payload["dropped"]) == (Event.GAP, slow.dropped)
    assert here.stats().publish_dropped == 0


async def test_a_misaddressed_or_malformed_message_is_ignored(hubs) -> None:
    here, there = hubs
    async with there.connect(_ctx("bob"), "bob") as bob:
        event = here.event(_ctx("alice"), "stolen", {"secret": 1}).to_dict()
        client = here._client
        await client.publish(f"{here.prefix}:user:bob", json.dumps(event))  # alice's, on bob's
        await client.publish(f"{here.prefix}:user:bob", "not json")
        await _nothing_for(bob, 0.5)
    assert there.stats().violations == 1


async def test_redis_going_away_is_survived_counted_and_reported(private_redis) -> None:
    prefix = f"reqscope:test:{uuid.uuid4().hex}"
    here = RedisEventHub(private_redis.url, prefix=prefix, max_outbox=5, timeout=0.5)
    there = RedisEventHub(private_redis.url, prefix=prefix, timeout=0.5)
    alice = _ctx("alice")
    async with here, there, there.connect(alice, "alice") as channel:
        await here.emitter(alice).emit("before")
        assert (await _next(channel)).type == "before"
        assert here.stats().connected
        assert there.stats().connected

        private_redis.stop()
        with anyio.fail_after(10):
            while there.stats().connected:  # the listener notices
                await anyio.sleep(0.05)
        emitter = here.emitter(alice)
        for n in range(10):  # never raises, never waits: the outbox keeps the newest 5
            assert await emitter.emit("during", {"n": n}) == 1
        with anyio.fail_after(10):
            while here.stats().connected:
                await anyio.sleep(0.05)
        assert here.stats().publish_dropped == 5
        assert here.stats().publish_failures >= 1

        private_redis.start()
        with anyio.fail_after(15):  # both reconnect by themselves
            while not (here.stats().connected and there.stats().connected):
                await anyio.sleep(0.05)
        assert there.stats().reconnects == 1
        seen = []
        with anyio.fail_after(10):
            while "after" not in seen:
                if len(seen) == 1:
                    await emitter.emit("after")
                event = await channel.receive()
                seen.append(event.type if event.type != Event.GAP else "gap")
                if event.type == Event.GAP:
                    assert event.payload["reconnected"] is True
        assert seen[0] == "gap"  # told it may have missed events
        assert here.stats().connected


@pytest.fixture(name="chat_instances")
def _chat_instances(private_redis, tmp_path) -> Iterator[list[int]]:
    """The chat example, twice, under uvicorn, sharing the private Redis: their ports."""
    ports = [_free_port(), _free_port()]
    processes = [
        subprocess.Popen(  # noqa: S603 - this interpreter, the project's example
            [sys.executable, str(ROOT / "examples" / "fastapi_chat" / "app.py")],
            env={
                **os.environ,
                "PORT": str(port),
                "REDIS_URL": private_redis.url,
                "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / f'chat{port}.db'}",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 30
            while not _listening(port):
                assert time.monotonic() < deadline, f"the chat app did not start on {port}"
                time.sleep(0.1)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            process.kill()


async def _chat(http, port: int, user: str, text: str) -> None:
    reply = await http.post(
        f"http://127.0.0.1:{port}/chat",
        json={"body": text},
        headers={"Authorization": f"Bearer {user}"},
    )
    assert reply.status_code == 200, reply.text


async def _health(http, port: int) -> dict:
    reply = await http.get(f"http://127.0.0.1:{port}/reqscope/health")
    assert reply.status_code == 200, reply.text  # the database is fine: never a 503
    return reply.json()


async def _until_done(socket_, text: str) -> list[str]:
    """The event types a socket receives up to the ``done`` event of the reply to ``text``."""
    kinds = []
    with anyio.fail_after(15):
        while True:
            event = json.loads(await socket_.recv())
            kinds.append(event["type"])
            assert event["user_id"] == "alice"
            if event["type"] == "done" and event["payload"]["text"].endswith(text):
                return kinds


async def test_two_app_processes_share_events_through_redis(private_redis, chat_instances) -> None:
    websockets = pytest.importorskip("websockets")
    httpx = pytest.importorskip("httpx")
    first, second = chat_instances

    def ws(port: int, user: str):
        return websockets.connect(
            f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {user}"}
        )

    async with (
        httpx.AsyncClient(timeout=10) as http,
        ws(first, "alice") as alice_first,
        ws(second, "alice") as alice_second,
        ws(second, "bob") as bob_second,
    ):
        await anyio.sleep(0.3)  # both sockets registered with their hubs
        assert (await _health(http, first))["events"]["backend"] == "redis"
        await _chat(http, first, "alice", "hello")
        for socket_ in (alice_first, alice_second):
            assert "token" in await _until_done(socket_, "hello")
        with anyio.move_on_after(0.5):
            leaked = await bob_second.recv()
            pytest.fail(f"bob's socket on the other instance got {leaked!r}")

        private_redis.stop()
        with anyio.fail_after(10):  # the health endpoint says the events are cut off
            while (await _health(http, second))["events"]["connected"]:
                await anyio.sleep(0.1)
        private_redis.start()
        with anyio.fail_after(15):  # both instances reconnect by themselves, and say so
            for port in (first, second):
                while not (await _health(http, port))["events"]["connected"]:
                    await anyio.sleep(0.1)
        await _chat(http, second, "alice", "again")
        for socket_ in (alice_first, alice_second):
            assert Event.GAP in await _until_done(socket_, "again")  # told they may have missed


def _in_forked_worker(hub: RedisEventHub, report: Any) -> None:
    """A worker forked from a parent that started ``hub``: it starts it on its own loop."""

    async def main() -> str:
        alice = _ctx("alice")
        async with hub, hub.connect(alice, "alice") as channel:
            await hub.emitter(alice).emit("from-the-worker")
            return (await _next(channel)).type

    try:
        report.send(asyncio.run(main()))
    except BaseException as error:  # the parent asserts on it
        report.send(repr(error))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_a_worker_forked_after_the_hub_started_starts_its_own(hubs) -> None:
    here, _ = hubs  # started on this loop, as in a parent before gunicorn forks its workers
    assert await in_forked_child(_in_forked_worker, here) == "from-the-worker"
