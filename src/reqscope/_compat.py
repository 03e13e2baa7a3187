"""Where reqscope relies on another library's private internals, each with a fallback.

Every such access lives here, says what it buys, and falls back to public behaviour when
the internal is gone; ``tests/test_compat.py`` runs each fallback.

- SQLAlchemy's async pool keeps its idle connections in a queue made by the class
  attribute ``AsyncAdaptedQueuePool._queue_class`` (a ``sqlalchemy.util.queue.QueueCommon``,
  whose ``get`` and ``put`` the pool calls), and the pool's instance in ``pool._pool``.
  reqscope's pool puts a :class:`~reqscope._handoff.HandoffQueue` there, so waiting
  checkouts are served in order (issue: a task returning a connection took it straight
  back, and others timed out on a busy but healthy pool). Fallback: SQLAlchemy's own pool,
  whose waiters are not served in order, and no wait figures in ``PoolStats``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import AsyncAdaptedQueuePool, Pool

from reqscope._handoff import HandoffQueue

if TYPE_CHECKING:
    from sqlalchemy.util.queue import QueueCommon

__all__ = ["fair_pool_class", "handoff_queue_of"]


def _pool_queue_class() -> type[QueueCommon[Any]] | None:  # noqa: C901 - one adapter class of one-line methods
    """SQLAlchemy's pool-queue protocol over a HandoffQueue; None without its internals."""
    try:
        from sqlalchemy.util import await_only  # noqa: PLC0415
        from sqlalchemy.util.queue import Empty, Full, QueueCommon  # noqa: PLC0415
    except ImportError:  # pragma: no cover - forced in tests through _FAIR_POOL_CLASS
        return None

    class _PoolQueue(QueueCommon[Any]):
        """The queue the pool calls, in the greenlet of a session's statement."""

        def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
            self.maxsize = maxsize
            self.use_lifo = use_lifo
            self.handoff: HandoffQueue[Any] = HandoffQueue(maxsize, lifo=use_lifo)

        def empty(self) -> bool:
            return not self.handoff

        def full(self) -> bool:
            return self.handoff.full()

        def qsize(self) -> int:
            return len(self.handoff)

        def put_nowait(self, item: Any) -> None:
            if not self.handoff.put_nowait(item):
                raise Full

        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:  # noqa: ARG002 - the pool never blocks on a put
            self.put_nowait(item)

        def get_nowait(self) -> Any:
            try:
                return self.handoff.get_nowait()
            except IndexError:
                raise Empty from None

        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            if self.handoff or not block:
                return self.get_nowait()
            try:
                return await_only(self.handoff.get(timeout))
            except TimeoutError:
                raise Empty from None

    return _PoolQueue


def _make_fair_pool_class() -> type[Pool] | None:
    """An ``AsyncAdaptedQueuePool`` over a :class:`HandoffQueue`; None if it cannot be made."""
    made = _pool_queue_class()
    if made is None or not hasattr(AsyncAdaptedQueuePool, "_queue_class"):
        return None  # pragma: no cover - forced in tests through _FAIR_POOL_CLASS
    queue_class: type[QueueCommon[Any]] = made  # narrowed, for the class body below

    class FairAsyncQueuePool(AsyncAdaptedQueuePool):
        """SQLAlchemy's async queue pool, serving waiting checkouts first come, first served."""

        _queue_class = queue_class

    return FairAsyncQueuePool


_FAIR_POOL_CLASS = _make_fair_pool_class()


def fair_pool_class() -> type[Pool]:
    """The pool class :func:`~reqscope.build_engine` uses: fair, or SQLAlchemy's own."""
    return _FAIR_POOL_CLASS or AsyncAdaptedQueuePool


def handoff_queue_of(pool: Pool) -> HandoffQueue[Any] | None:
    """The :class:`HandoffQueue` of a pool made by :func:`fair_pool_class`, else None."""
    queue = getattr(pool, "_pool", None)
    handoff = getattr(queue, "handoff", None)
    return handoff if isinstance(handoff, HandoffQueue) else None
