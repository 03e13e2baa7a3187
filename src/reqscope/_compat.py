"""Every place reqscope relies on another library's private internals, each with a fallback.

Each access lives here, says what it buys, and falls back to public behaviour when the
internal is gone. Setting ``REQSCOPE_COMPAT_FALLBACKS=1`` in the environment before reqscope
is imported forces every fallback at once; ``tests/test_compat.py`` runs the isolation suites
that way, so each fallback is exercised, not just written.

- **SQLAlchemy's pool queue** (``AsyncAdaptedQueuePool._queue_class``, the pool's
  ``_pool``): reqscope's pool puts a :class:`~reqscope._handoff.HandoffQueue` there, so
  waiting checkouts are served in order (a task returning a connection took it straight
  back, and others timed out on a busy but healthy pool). Fallback: SQLAlchemy's own pool,
  whose waiters are not served in order, and no wait figures in ``PoolStats``.
- **SQLAlchemy's ``Session._execute_internal``**, the one method every statement of a
  session passes through: reqscope checks the session's owner there. Fallback: the public
  ``do_orm_execute`` event, which makes SQLAlchemy build an ``ORMExecuteState`` for every
  statement (slower, same checks).
- **anyio's per-task records** (``anyio._backends._asyncio._task_states``): whether anyio
  can cancel a task at all. A request that a server such as uvicorn runs in a plain asyncio
  task then closes its session without an anyio shield scope, which would only cost.
  Fallback: every task counts as cancellable by anyio, and every close runs in a shield.
- **SQLAlchemy's ``QueuePool._max_overflow``**, for a pool's capacity in ``PoolStats``.
  Fallback: the overflow of pools :func:`~reqscope.build_engine` made, else the overflow in
  use now (a lower bound).
- **SQLAlchemy's ``_ConnectionRecord.starttime``**, which the pool stamps just before it
  opens a connection: the start of ``db.client.connection.create_time`` (no public event
  fires before a pool's creator runs when the engine has one, as reqscope's engines do).
  Fallback: that histogram records nothing.
- **asyncpg's ``Connection._cancellations``**, the CancelRequests asyncpg sends by itself
  when a statement's task is cancelled. Behind a pooler in transaction mode reqscope waits
  for them before SQLAlchemy force-closes the connection (which would abort them half-way:
  the statement runs on, and PgBouncer 1.18 crashes on a cancel client that vanishes).
  Fallback: no wait (the statement runs on until it ends or hits ``statement_timeout``).
- **aiosqlite's ``Connection._running``/``_thread``**, to make a second ``stop()`` of a
  connection a no-op (otherwise a cancelled statement can leave a task that never ends),
  and to let a closing factory wait for the worker threads SQLAlchemy force-stopped
  (otherwise a thread that finishes after the event loop closed fails with "Event loop
  is closed"). Fallback: aiosqlite as it is.
"""

from __future__ import annotations

import asyncio
import functools
import os
import weakref
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool, Pool

from reqscope._handoff import HandoffQueue

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.util.queue import QueueCommon

__all__ = [
    "FALLBACKS_FORCED",
    "add_statement_check",
    "aiosqlite_connect",
    "aiosqlite_stopped",
    "anyio_may_cancel",
    "asyncpg_cancellations",
    "connection_started_at",
    "fair_pool_class",
    "handoff_queue_of",
    "pool_max_overflow",
    "remember_max_overflow",
]

#: Every fallback below is in use (``REQSCOPE_COMPAT_FALLBACKS=1``): for tests.
FALLBACKS_FORCED: Final = os.environ.get("REQSCOPE_COMPAT_FALLBACKS") == "1"


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
    made = None if FALLBACKS_FORCED else _pool_queue_class()
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


# -- the statement check ------------------------------------------------------------------


def add_statement_check(cls: type[Session], check: Callable[[Session], None]) -> None:
    """Make every statement a session of ``cls`` executes call ``check(session)`` first.

    ``check`` raises to refuse the statement. Through ``Session._execute_internal`` when
    SQLAlchemy has it (one call per statement); else through the public ``do_orm_execute``
    event, which also sees every statement ``Session.execute`` runs (ORM or Core, lazy
    loads, ``get``, refreshes) but makes SQLAlchemy build an ``ORMExecuteState`` for each.
    """
    if not FALLBACKS_FORCED and hasattr(Session, "_execute_internal"):

        def _execute_internal(self: Session, *args: Any, **kwargs: Any) -> Any:
            check(self)
            return super(cls, self)._execute_internal(*args, **kwargs)  # type: ignore[misc]

        cls._execute_internal = _execute_internal  # type: ignore[method-assign]
        return

    def on_execute(state: Any) -> None:
        check(state.session)

    event.listen(cls, "do_orm_execute", on_execute)


# -- anyio's task records -----------------------------------------------------------------


def _anyio_task_states() -> Any:
    """Anyio's records of the asyncio tasks inside its cancel scopes; None if unreadable."""
    if FALLBACKS_FORCED:
        return None
    try:
        from anyio._backends import _asyncio as backend  # noqa: PLC0415 - private, guarded
    except ImportError:  # pragma: no cover - a future anyio
        return None
    states = getattr(backend, "_task_states", None)
    record = getattr(backend, "TaskState", None)
    if not isinstance(states, weakref.WeakKeyDictionary) or "cancel_scope" not in getattr(
        record, "__slots__", ()
    ):  # pragma: no cover - a future anyio
        return None
    return states


_TASK_STATES: Final = _anyio_task_states()


def anyio_may_cancel(task: asyncio.Task[Any]) -> bool:
    """Whether anyio can cancel ``task``: it runs inside one of anyio's cancel scopes.

    A task outside every anyio scope (as ASGI servers run requests) can only be cancelled
    by ``Task.cancel()``. Fallback: True (always safe: the caller then uses an anyio shield).
    """
    if _TASK_STATES is None:
        return True
    record = _TASK_STATES.get(task)
    return record is not None and record.cancel_scope is not None


# -- pool capacity ------------------------------------------------------------------------

# pool -> max_overflow, for pools build_engine made (the fallback's source)
_MAX_OVERFLOW: weakref.WeakKeyDictionary[Pool, int] = weakref.WeakKeyDictionary()


def remember_max_overflow(pool: Pool, max_overflow: int) -> None:
    """Record the ``max_overflow`` a pool was made with (:func:`~reqscope.build_engine`)."""
    _MAX_OVERFLOW[pool] = max_overflow


def pool_max_overflow(pool: Pool) -> int | None:
    """How many connections ``pool`` may open beyond its size; None when unknown."""
    value = None if FALLBACKS_FORCED else getattr(pool, "_max_overflow", None)
    if isinstance(value, int):
        return value
    return _MAX_OVERFLOW.get(pool)


# -- connection records -------------------------------------------------------------------


def connection_started_at(record: Any) -> float | None:
    """When the pool began opening ``record``'s connection (``time.time()``), if known."""
    started = None if FALLBACKS_FORCED else getattr(record, "starttime", None)
    return started if isinstance(started, float) else None


# -- asyncpg ------------------------------------------------------------------------------


def asyncpg_cancellations(connection: Any) -> list[asyncio.Task[Any]]:
    """The CancelRequests asyncpg is sending for ``connection`` now (empty when unknown)."""
    tasks = None if FALLBACKS_FORCED else getattr(connection, "_cancellations", None)
    if not isinstance(tasks, set):
        return []
    return [task for task in tasks if isinstance(task, asyncio.Task) and not task.done()]


# -- aiosqlite ----------------------------------------------------------------------------


@functools.cache
def aiosqlite_connect() -> Callable[..., Any] | None:
    """``aiosqlite.connect`` whose connections tell their worker thread to stop only once.

    When a statement is cancelled while SQLite busy-waits, SQLAlchemy starts a graceful
    ``close()`` in a task of its own and, cancelled again, force-stops the worker thread.
    aiosqlite's ``close()`` then queues a second stop on the exited thread and awaits it
    forever: a task that never ends, and an event loop that cannot shut down. Here a
    second ``stop()`` returns nothing to wait for. None: use aiosqlite's own ``connect``.
    """
    if FALLBACKS_FORCED:
        return None
    try:
        import sqlite3  # noqa: PLC0415 - some Python builds lack it

        import aiosqlite  # noqa: PLC0415 - an optional extra
    except ImportError:
        return None
    if not hasattr(aiosqlite.Connection, "stop"):  # before 0.22: no force-stop, no race
        return None

    class StopOnceConnection(aiosqlite.Connection):
        def stop(self) -> asyncio.Future[Any] | None:
            if not getattr(self, "_running", True):  # a stop is queued; the thread ends after it
                return None
            stopped = super().stop()
            if stopped is not None:  # SQLAlchemy's terminate() never awaits it
                _STOPPING.add(stopped)
            return stopped

    def connect(database: Any, *, iter_chunk_size: int = 64, **kwargs: Any) -> Any:
        location = database.decode() if isinstance(database, bytes) else str(database)
        connection = StopOnceConnection(
            functools.partial(sqlite3.connect, location, **kwargs), iter_chunk_size
        )
        thread = getattr(connection, "_thread", None)
        if thread is not None:  # as SQLAlchemy does: never keep the process alive
            thread.daemon = True
        return connection

    return connect


# stop() futures of aiosqlite worker threads that were told to stop and may still be running
_STOPPING: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()


async def aiosqlite_stopped(timeout: float) -> None:
    """Wait, at most ``timeout`` seconds, for the force-stopped worker threads of this loop.

    SQLAlchemy terminates an invalidated aiosqlite connection with ``stop()`` and never
    awaits it: the worker thread closes the connection later and hands its result to the
    event loop, which fails ("Event loop is closed") in the thread when the loop is gone by
    then, as it is right after an application shuts down. A closing factory waits here.
    """
    loop = asyncio.get_running_loop()
    pending = [stop for stop in _STOPPING if not stop.done() and stop.get_loop() is loop]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
