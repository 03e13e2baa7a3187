"""Plain asyncio integration: tasks and threads that carry a context, and queue workers."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio.to_thread

from reqscope._consume import ConsumeStats, FailedMessage, consume
from reqscope._context import UserExecutionContext, use_context

__all__ = ["ConsumeStats", "FailedMessage", "consume", "create_task", "to_thread"]

T = TypeVar("T")


async def _with_context(ctx: UserExecutionContext, coro: Coroutine[Any, Any, T]) -> T:
    with use_context(ctx):
        return await coro


def create_task(
    ctx: UserExecutionContext, coro: Coroutine[Any, Any, T], *, name: str | None = None
) -> asyncio.Task[T]:
    """``asyncio.create_task`` with ``ctx`` as the task's current context.

    Keep a reference to the task (asyncio only keeps weak ones).
    """
    return asyncio.create_task(_with_context(ctx, coro), name=name or f"reqscope:{ctx.request_id}")


async def to_thread(ctx: UserExecutionContext, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread with ``ctx`` as its current context."""
    context = contextvars.copy_context()

    def run() -> T:
        with use_context(ctx):
            return fn(*args)

    return await anyio.to_thread.run_sync(context.run, run)
