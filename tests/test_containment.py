from __future__ import annotations

import functools
import random
import time

import anyio
import anyio.lowlevel
import pytest

from reqscope import (
    RequestTimeoutError,
    RunResult,
    UserExecutionContext,
    current_context,
    current_context_or_none,
    gather_isolated,
    run_isolated,
)

pytestmark = pytest.mark.anyio


async def test_ok_error_and_timeout_are_results() -> None:
    ctx = UserExecutionContext.create("alice")

    async def whoami(suffix: str, *, twice: bool = False) -> str:
        await anyio.lowlevel.checkpoint()
        name = current_context().user_id + suffix
        return name * 2 if twice else name

    ok = await run_isolated(ctx, whoami, "!", twice=True)
    assert (ok.ok, ok.status, ok.value, ok.error) == (True, "ok", "alice!alice!", None)
    assert ok.unwrap() == "alice!alice!"
    assert (ok.user_id, ok.run_id, ok.request_id) == (ctx.user_id, ctx.run_id, ctx.request_id)
    assert ok.duration >= 0
    assert current_context_or_none() is None

    async def boom() -> None:
        raise KeyError("k")

    failed = await run_isolated(ctx, boom)
    assert (failed.ok, failed.status) == (False, "error")
    assert isinstance(failed.error, KeyError)
    with pytest.raises(KeyError):
        failed.unwrap()

    slow = await run_isolated(ctx, anyio.sleep, 10, timeout=0.05)
    assert (slow.ok, slow.status, slow.value) == (False, "timeout", None)
    with pytest.raises(RequestTimeoutError, match="timeout") as info:
        slow.unwrap()
    assert isinstance(info.value, TimeoutError)
    assert slow.to_dict()["status"] == "timeout"

    sync = await run_isolated(ctx, lambda: current_context().user_id)
    assert sync.unwrap() == "alice"
    assert sync.to_dict() == {
        "ok": True,
        "status": "ok",
        "value": "alice",
        "error": None,
        "user_id": "alice",
        "run_id": ctx.run_id,
        "request_id": ctx.request_id,
        "duration": sync.duration,
    }
    assert failed.to_dict()["error"] == "KeyError: 'k'"


async def test_outer_cancellation_still_propagates() -> None:
    ctx = UserExecutionContext.create("alice")
    with anyio.move_on_after(0.05) as outer:
        await run_isolated(ctx, anyio.sleep, 10, timeout=30)
        pytest.fail("run_isolated swallowed the outer cancellation")  # pragma: no cover
    assert outer.cancelled_caught


async def test_an_application_timeout_error_is_an_error_not_a_timeout() -> None:
    async def raises_timeout() -> None:
        raise TimeoutError("my http call")

    result = await run_isolated(UserExecutionContext.create("a"), raises_timeout)
    assert result.status == "error"


async def test_bad_context() -> None:
    with pytest.raises(TypeError, match="UserExecutionContext"):
        await run_isolated("alice", lambda: 1)  # type: ignore[arg-type]


async def test_gather_a_thousand_with_failures_and_hangs() -> None:
    rng = random.Random(7)
    kinds = ["raise"] * 100 + ["hang"] * 50 + ["ok"] * 850
    rng.shuffle(kinds)

    async def call(kind: str, n: int) -> int:
        await anyio.sleep(rng.uniform(0, 0.01))
        if kind == "raise":
            raise RuntimeError(f"call {n} failed")
        if kind == "hang":
            await anyio.sleep(3600)
        assert current_context().user_id == f"user-{n % 50}"
        return n

    calls = [
        (UserExecutionContext.create(f"user-{n % 50}"), functools.partial(call, kind, n))
        for n, kind in enumerate(kinds)
    ]
    started = time.perf_counter()
    results = await gather_isolated(calls, timeout=0.5)
    elapsed = time.perf_counter() - started
    assert len(results) == 1000
    for n, (kind, result) in enumerate(zip(kinds, results, strict=True)):
        assert isinstance(result, RunResult)
        assert result.user_id == f"user-{n % 50}"
        expected = {"raise": "error", "hang": "timeout", "ok": "ok"}[kind]
        assert result.status == expected
        if kind == "ok":
            assert result.value == n
    assert elapsed < 10  # bounded by the 0.5 s timeout, not by the hour-long hangs


async def test_gather_limit() -> None:
    running = 0
    peak = 0

    async def call() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1

    calls = [(UserExecutionContext.create(f"u{i}"), call) for i in range(20)]
    results = await gather_isolated(calls, limit=3)
    assert all(r.ok for r in results)
    assert peak == 3
    assert await gather_isolated([]) == []
