"""Failure containment: one request's exception or timeout is its own result."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import anyio

from reqscope._agents import check_agent_use
from reqscope._context import UserExecutionContext, log_fields, use_context
from reqscope._logging import get_logger
from reqscope.exceptions import RequestTimeoutError

__all__ = ["RunResult", "gather_isolated", "run_isolated"]

logger = get_logger(__name__)

T = TypeVar("T")
RunStatus = Literal["ok", "error", "timeout"]
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class RunResult(Generic[T]):
    """The outcome of one contained request."""

    ok: bool
    value: T | None
    error: BaseException | None
    status: RunStatus
    user_id: str
    run_id: str
    request_id: str
    duration: float

    def unwrap(self) -> T:
        """Return the value, or raise the request's error.

        Raises:
            RequestTimeoutError: the request ran past its timeout.
            Exception: the exception the request raised.
        """
        if self.status == "ok":
            return self.value  # type: ignore[return-value]  # ok means fn returned a T
        if self.status == "timeout":
            raise RequestTimeoutError(
                f"request {self.request_id} of user {self.user_id!r} ran past its timeout "
                f"({self.duration:.3f} s); raise run_isolated(timeout=...) or make it faster"
            )
        assert self.error is not None  # noqa: S101 - status "error" always carries one
        raise self.error

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-safe data (the value only when it is JSON-like)."""
        value = self.value if isinstance(self.value, (str, int, float, bool, type(None))) else None
        return {
            "ok": self.ok,
            "status": self.status,
            "value": value,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            "user_id": self.user_id,
            "run_id": self.run_id,
            "request_id": self.request_id,
            "duration": self.duration,
        }


async def run_isolated(
    ctx: UserExecutionContext,
    fn: Callable[..., Awaitable[T] | T],
    *args: Any,
    timeout: float | None = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> RunResult[T]:
    """Run ``fn(*args, **kwargs)`` as ``ctx``'s request, containing its failure.

    ``ctx`` is the current context inside ``fn``. An ``Exception`` or running past
    ``timeout`` seconds becomes this request's :class:`RunResult`; cancellation from outside
    still propagates.

    Raises:
        IsolationViolation: ``fn`` or an argument is an agent created for another user.
    """
    if not isinstance(ctx, UserExecutionContext):
        raise TypeError(f"run_isolated() takes a UserExecutionContext, got {type(ctx).__name__}")
    check_agent_use(ctx, (fn, *args, *kwargs.values()))
    started = time.perf_counter()
    value: Any = None
    error: BaseException | None = None
    with use_context(ctx), anyio.CancelScope() as scope:
        if timeout is not None:
            scope.deadline = anyio.current_time() + timeout
        try:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            error = exc
    duration = time.perf_counter() - started
    status: RunStatus
    if scope.cancelled_caught:
        status = "timeout"
        value = None
        logger.warning(
            "reqscope: request %s of user %r timed out after %.3f s",
            ctx.request_id,
            ctx.user_id,
            duration,
            extra=log_fields(ctx),
        )
    elif error is not None:
        status = "error"
        # contained (the caller gets it in the RunResult), and logged with its traceback:
        # consume()'s handler errors are only seen here
        logger.warning(
            "reqscope: request %s of user %r failed: %s: %s",
            ctx.request_id,
            ctx.user_id,
            type(error).__name__,
            error,
            exc_info=error,
            extra=log_fields(ctx),
        )
    else:
        status = "ok"
    return RunResult(
        ok=status == "ok",
        value=value,
        error=error,
        status=status,
        user_id=ctx.user_id,
        run_id=ctx.run_id,
        request_id=ctx.request_id,
        duration=duration,
    )


async def gather_isolated(
    calls: Iterable[tuple[UserExecutionContext, Callable[[], Awaitable[T] | T]]],
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    limit: int | None = None,
) -> list[RunResult[T]]:
    """Run many requests concurrently, each contained; results come back in order.

    Args:
        calls: ``(ctx, fn)`` pairs; ``fn`` takes no arguments (use ``functools.partial``).
        timeout: each call's own timeout in seconds (``None``: none).
        limit: at most this many calls run at once.

    One call failing or hanging never cancels or delays the others beyond its own timeout.
    """
    pairs: Sequence[tuple[UserExecutionContext, Callable[[], Awaitable[T] | T]]] = list(calls)
    results: list[RunResult[T] | None] = [None] * len(pairs)
    limiter = anyio.CapacityLimiter(limit) if limit else None

    async def one(index: int) -> None:
        ctx, fn = pairs[index]
        if limiter is None:
            results[index] = await run_isolated(ctx, fn, timeout=timeout)
            return
        async with limiter:
            results[index] = await run_isolated(ctx, fn, timeout=timeout)

    async with anyio.create_task_group() as group:
        for index in range(len(pairs)):
            group.start_soon(one, index)
    return [result for result in results if result is not None]
