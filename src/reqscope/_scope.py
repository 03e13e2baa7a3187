"""One request's session scope: open, tag, register, and clean up whatever happens.

``factory.session(ctx)`` returns a :class:`SessionScope`. Opening it checks a connection out
of the pool (so pool exhaustion and outages surface there, as reqscope errors the circuit
breaker sees), binds a new ``AsyncSession`` to it, tags and registers the session and makes
``ctx`` current. Closing it rolls back and returns the connection inside a shielded cancel
scope, bounded by the factory's ``cleanup_timeout``.

This is the per-request hot path: it is written to stay within a few percent of a plain
``async_sessionmaker`` session (``benchmarks/sessions.py``), which is why the cleanup deadline
is one shared timer (:class:`CleanupWatchdog`) instead of one timer per scope.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from threading import get_ident
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, ClassVar, Final
from weakref import WeakKeyDictionary, ref

import anyio
from sqlalchemy import exc as sa_exc
from sqlalchemy.util import greenlet_spawn

from reqscope._breaker import CircuitState
from reqscope._context import UserExecutionContext, _current, current_context
from reqscope._enforcement import _invalidate
from reqscope._leaks import LeakDetector
from reqscope._registry import Entry, EntryState

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from types import TracebackType

    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncSession

    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["CleanupWatchdog", "CommitScope", "SessionScope"]

logger = logging.getLogger("reqscope")

_ACTIVE: Final = EntryState.ACTIVE
_CLOSED: Final = EntryState.CLOSED
_RECLAIMED: Final = EntryState.RECLAIMED
_CIRCUIT_CLOSED: Final = CircuitState.CLOSED


class CleanupWatchdog:
    """Cancels cleanups that outlive their deadline, with one timer for all.

    A cancel scope with its own deadline arms and cancels an event-loop timer per request,
    which costs more than everything else reqscope adds to a request. Cleanups instead
    register here; a single timer, armed only while some cleanup is in progress, fires at
    the earliest deadline and cancels what is overdue. Two kinds of cleanup register:

    - an anyio shield scope (the cleanup runs inside an anyio cancel scope): cancelled once,
      which anyio keeps delivering until the scope exits;
    - an asyncio task (no anyio scope can reach it, :func:`_anyio_internals`): only
      ``Task.cancel()`` can interrupt it, so the watchdog cancels the task at the deadline
      and again every ``timeout`` seconds until it is unwatched (a driver may swallow one
      cancellation); :meth:`unwatch` says how many cancellations it sent.
    """

    __slots__ = ("_armed_on", "_cuts", "_handle", "_loop", "_pending")

    def __init__(self) -> None:
        # scope or task -> (deadline on the monotonic clock, timeout)
        self._pending: dict[anyio.CancelScope | asyncio.Task[Any], tuple[float, float]] = {}
        self._cuts: dict[asyncio.Task[Any], int] = {}  # tasks cancelled while watched
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed_on: asyncio.AbstractEventLoop | None = None  # _loop while _handle is set

    def watch(
        self,
        scope: anyio.CancelScope | asyncio.Task[Any],
        timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Cancel ``scope`` if it is still watched ``timeout`` seconds from now.

        ``loop`` is the running loop, when the caller knows it: on Python 3.10 and 3.11
        ``asyncio.get_running_loop()`` costs a system call. Deadlines are on the monotonic
        clock (what asyncio's ``loop.time()`` reads, without a Python call).
        """
        if loop is None or loop is not self._armed_on:  # one test while the timer is armed
            self._arm(loop, timeout)
        self._pending[scope] = (_monotonic() + timeout, timeout)

    def _arm(self, loop: asyncio.AbstractEventLoop | None, timeout: float) -> None:
        """Make sure the timer runs on ``loop`` (the running one when None)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or the factory moved to another loop
            if self._handle is not None:
                self._handle.cancel()
            self._pending.clear()
            self._cuts.clear()
            self._loop, self._handle = loop, None
        if self._handle is None:
            self._handle = loop.call_later(timeout, self._expire)
        self._armed_on = loop

    def unwatch(self, scope: anyio.CancelScope | asyncio.Task[Any]) -> int:
        """Stop watching ``scope`` (its cleanup finished).

        Returns:
            How many times the watchdog cancelled the task ``scope`` while it was watched
            (0 for a scope: its ``cancel_called`` says).
        """
        self._pending.pop(scope, None)
        cuts = self._cuts
        return cuts.pop(scope, 0) if cuts else 0  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._pending)

    def _expire(self) -> None:
        loop = self._loop
        assert loop is not None  # noqa: S101 - armed by watch()
        self._handle = self._armed_on = None
        now = _monotonic()
        pending = self._pending
        overdue = [(scope, timeout) for scope, (at, timeout) in pending.items() if at <= now]
        for scope, timeout in overdue:
            if isinstance(scope, asyncio.Task):
                self._cuts[scope] = self._cuts.get(scope, 0) + 1
                pending[scope] = (now + timeout, timeout)  # again, until unwatched
                scope.cancel()
            else:
                del pending[scope]
                scope.cancel()  # anyio keeps delivering it until the scope exits
        if pending:
            earliest = min(at for at, _ in pending.values())
            self._handle = loop.call_later(max(0.0, earliest - now), self._expire)
            self._armed_on = loop


# Task.cancelling() and Task.uncancel(), Python 3.11+
_UNCANCEL: Final = sys.version_info >= (3, 11)


class _EveryTaskInAScope:
    """Stands in for anyio's task records when they cannot be read (a future anyio).

    Every task then counts as inside an anyio cancel scope, so every cleanup gets the
    public, always safe ``anyio.CancelScope`` shield: only slower.
    """

    cancel_scope = True

    def get(self, _task_ref: object) -> _EveryTaskInAScope:
        return self


def _anyio_internals() -> tuple[Any, Any]:
    """Return anyio's per-task records (by weak key) and its asyncio ``CancelScope`` class.

    A cleanup needs anyio's shield only in a task that anyio may cancel, that is a task
    inside one of its cancel scopes; anyio records them per task (``_task_states``, a
    ``WeakKeyDictionary``; its own dict is read, without the Python ``get()``). A plain
    asyncio task, as servers such as uvicorn run requests in, has no record: a shield there
    would only cost (three system calls on Python 3.10/3.11, and most of what reqscope adds
    to such a request: docs/performance.md).
    """
    try:
        from anyio._backends import _asyncio as backend  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a future anyio
        return _EveryTaskInAScope(), anyio.CancelScope
    states = getattr(backend, "_task_states", None)
    record = getattr(backend, "TaskState", None)
    scope_class = getattr(backend, "CancelScope", None)
    if (
        not isinstance(states, WeakKeyDictionary)
        or "cancel_scope" not in getattr(record, "__slots__", ())
        or scope_class is None
    ):  # pragma: no cover - a future anyio
        return _EveryTaskInAScope(), anyio.CancelScope
    return states.data, scope_class  # type: ignore[attr-defined]  # the dict behind it


# task weak reference -> anyio's record of it; what anyio.CancelScope() makes on asyncio
_TASK_STATES, _ShieldScope = _anyio_internals()

# The loop the last session scope found running, and its thread.
_last_loop: list[Any] = [None, None]

# loop -> its running task: asyncio.current_task(loop) is a C function from Python 3.12; on
# 3.10 and 3.11 it is a Python function around this dict lookup.
_task_of: Callable[[Any], asyncio.Task[Any] | None]
if sys.version_info >= (3, 12):
    _task_of = asyncio.current_task
else:
    _task_of = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]  # noqa: SLF001


def _running_loop_and_task() -> tuple[Any, asyncio.Task[Any] | None]:
    """The running loop and task, asked of asyncio; remembered for the next scope.

    A scope first asks the loop the last scope found (``_last_loop``) for its current task,
    without ``get_running_loop()``, which on Python 3.10 and 3.11 is a system call. That is
    exact: on one thread only one loop runs at a time, and a loop has a current task only
    while it runs one, so a task the remembered loop reports on the thread that remembered it
    is the caller's. Only when it reports none, or on another thread, is asyncio asked.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on asyncio (or no loop)
        return None, None
    _last_loop[:] = (loop, get_ident())
    return loop, _task_of(loop)


class SessionScope(Entry):
    """``async with factory.session(ctx)`` / ``factory.begin(ctx)``.

    The scope is also the registry's record of the session it opens (an :class:`Entry`,
    which the session points at for its checks): one object per request, not two.
    """

    __slots__ = ("_loop", "_previous", "_probe", "_session")

    owner: IsolatedSessionFactory  # the record's owner is the factory that opens the scope
    _begin: ClassVar[bool] = False  # commit on success: factory.begin(), a CommitScope
    _loop: asyncio.AbstractEventLoop | None  # the loop it was entered on
    _probe: bool  # the circuit breaker's half-open probe
    _session: AsyncSession | None  # None once released
    # The context current before the scope, restored on exit. Kept instead of the Token
    # that set() returns: one object less alive per request in flight, for the cyclic GC to
    # scan (docs/performance.md), and a restore that works from any contextvars.Context.
    _previous: UserExecutionContext | None

    def __init__(
        self,
        factory: IsolatedSessionFactory,
        ctx: UserExecutionContext | None,
        lifetime: float | None,
        *,
        bypass_tenant: bool = False,
        statement_timeout: float | None = None,
    ) -> None:
        # Entry.__init__ is not called: __aenter__ fills in the record when it opens the
        # session (the context may be the current one only then).
        if (
            ctx.__class__ is not UserExecutionContext  # the one test, for a context given
            and ctx is not None
            and not isinstance(ctx, UserExecutionContext)
        ):
            raise TypeError(
                f"factory.session() takes a UserExecutionContext, got {type(ctx).__name__}"
            )
        if lifetime is None:
            lifetime = factory.max_session_lifetime
        elif lifetime <= 0:
            raise ValueError(f"max_lifetime must be positive seconds, got {lifetime!r}")
        else:
            lifetime = float(lifetime)
        self.owner = factory
        self.ctx = ctx  # type: ignore[assignment]  # None: the current context, on entry
        self.lifetime = lifetime
        self.bypass_tenant = bypass_tenant
        self.statement_timeout = (
            factory.statement_timeout if statement_timeout is None else statement_timeout
        )
        self.state = None  # not entered yet

    async def __aenter__(self) -> AsyncSession:
        # The per-request hot path: everything is inline (a Python call costs as much as
        # most of what it would wrap).
        if self.state is not None:
            raise RuntimeError(
                "this session scope is already open or was used before; call "
                "factory.session() again for a new one"
            )
        factory = self.owner
        if factory._state != "started":  # noqa: SLF001
            await factory._start_on_first_use()  # noqa: SLF001 - or the error for a closed one
        ctx = self.ctx
        if ctx is None:  # not given: the current one
            ctx = self.ctx = current_context()  # type: ignore[unreachable]
        if self.bypass_tenant:  # refused before the breaker could admit it as its probe
            factory._authorize_bypass(ctx)  # noqa: SLF001
            self.tenant = None
        else:
            policy = factory.tenant
            self.tenant = None if policy is None else (policy, ctx.user_id)
        breaker = factory.circuit_breaker
        # before_call() only when the circuit is not closed: a call per request saved.
        self._probe = breaker._state is not _CIRCUIT_CLOSED and breaker.before_call()  # noqa: SLF001
        # The session checks a connection out of the pool on first use, inside the same
        # greenlet as its first statement (as a plain session does): connecting eagerly
        # would cost a greenlet switch per request. Connect failures surface there as
        # DatabaseUnavailableError (the factory's do_connect hook), pool timeouts as
        # PoolExhaustedError (on exit).
        session = factory._new_session()  # noqa: SLF001
        # The running task: the remembered loop's, on its own thread (_running_loop_and_task)
        loop, thread = _last_loop
        if thread != get_ident() or (task := _task_of(loop)) is None:
            loop, task = _running_loop_and_task()
        self._loop = loop
        self.task = task
        if factory.capture_stacks:
            self._stack = "".join(traceback.format_stack(limit=25)[:-1])
        self.state = _ACTIVE
        self.leak_reported = False
        self.connection = None
        self.deadline = _monotonic() + self.lifetime
        sync_session = session.sync_session
        sync_session._reqscope_entry = self  # type: ignore[attr-defined]  # noqa: SLF001 - our Session subclass
        if "info" in sync_session.__dict__:  # made already (info= given): tag it now
            sync_session.info.update(self.tags())
        factory._registry.add(self)  # noqa: SLF001
        self._session = session
        self._previous = _current.get()
        _current.set(ctx)
        return session

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Coroutine[Any, Any, bool]:
        # Not a coroutine itself: it returns the one that closes the scope, so a request's
        # exit runs one coroutine frame less, which every resumption after an I/O wait
        # would pass through again (docs/performance.md).
        if self._begin and exc is None:
            return self._commit_and_release()
        return self._release(exc)

    async def _commit_and_release(self) -> bool:
        """``factory.begin(ctx)`` ending without an error: commit, then release."""
        error: BaseException | None = None
        try:
            await self._session.commit()  # type: ignore[union-attr]
        except Exception as commit_error:
            # SQLAlchemy rolled the transaction back: the connection is reusable.
            error = commit_error
            raise
        except BaseException as commit_error:
            # Interrupted mid-commit: the outcome is unknown, so never report success,
            # and never trust the connection again.
            error = commit_error
            await self.owner._invalidate_gracefully(self.connection)  # noqa: SLF001
            raise
        finally:
            if error is not None:  # the commit's own error propagates as it is
                await self._release(error, translate=False)
        return await self._release(None)

    async def _release(  # noqa: PLR0912 - every request's exit, in one frame
        self, error: BaseException | None, *, translate: bool = True
    ) -> bool:
        """Close the session, unregister it, restore the previous context; ``__aexit__``.

        The close rolls back and returns the connection, within ``cleanup_timeout`` and
        shielded from cancellation; if it does not complete, the connection is invalidated.
        In a plain asyncio task (the path of every request an ASGI server runs) the close is
        awaited right here, not in a method of its own: each coroutine frame costs again on
        every resumption after an I/O wait (docs/performance.md).

        ``error`` (the block's exception) is raised as its reqscope translation, if it has
        one, when ``translate``.
        """
        factory = self.owner
        conn = self.connection  # the latest transaction's connection, if it had one
        try:
            try:
                loop = self._loop
                task = None if loop is None else _task_of(loop)  # the exiting task
                if self.state is _RECLAIMED:  # by the leak detector: its connection is invalid
                    clean = False
                elif task is None or (
                    (anyio_record := _TASK_STATES.get(ref(task))) is not None
                    and anyio_record.cancel_scope is not None
                ):  # anyio can cancel it (through the scopes it is in): close in a shield
                    clean = await self._close_in_shield(task, loop)
                    self.state = _CLOSED
                else:  # only Task.cancel() can interrupt it: the watchdog's, when overdue
                    watchdog = factory._cleanup_watchdog  # noqa: SLF001
                    before = task.cancelling() if _UNCANCEL else 0  # type: ignore[attr-defined]  # 3.11+
                    cancelled: asyncio.CancelledError | None = None
                    watchdog.watch(task, factory.cleanup_timeout, loop)
                    try:
                        await greenlet_spawn(self._session.sync_session.close)  # type: ignore[union-attr]
                        clean = True
                    except asyncio.CancelledError as interrupted:
                        cancelled, clean = interrupted, False
                    except Exception as close_error:
                        self._log_close_failure(close_error)
                        clean = False
                    finally:
                        cuts = watchdog.unwatch(task)
                    if cuts or cancelled is not None:  # cut when overdue, or interrupted
                        clean = self._after_interrupted_close(task, cuts, before, cancelled)
                    self.state = _CLOSED
                if not clean:
                    await factory._invalidate_gracefully(conn)  # noqa: SLF001
            except BaseException:
                await self._abandon(conn)
                raise
            finally:
                # The session points at this scope (its record): drop the ways back, so that
                # session, scope and task are freed by reference counting, not the GC (an
                # exception kept by the task can hold the frame that holds the session).
                self.connection = self.task = None
                self._session = None
                factory._registry.discard(self)  # noqa: SLF001
            if error is not None or self._probe or self.leak_reported:
                self._settle(error, conn)
        finally:
            _current.set(self._previous)
        if error is not None and translate:
            self._raise_translated(error)
        return False

    async def _abandon(self, conn: Connection | None) -> None:
        """The cleanup was interrupted half-way: invalidate the connection.

        The shield stops anyio cancellation, not asyncio's ``Task.cancel()``. The connection
        is never returned half-cleaned: it is invalidated, through the driver's graceful
        close unless that is interrupted too.
        """
        factory = self.owner
        self.state = _CLOSED
        factory._registry.cleanup_failures += 1  # noqa: SLF001
        try:
            await factory._invalidate_gracefully(conn)  # noqa: SLF001
        finally:
            if conn is not None:
                _invalidate(conn)  # a no-op once the graceful path finished
            if self._probe:
                factory.circuit_breaker.release_probe()

    def _after_interrupted_close(
        self,
        task: asyncio.Task[Any],
        cuts: int,
        before: int,
        cancelled: asyncio.CancelledError | None,
    ) -> bool:
        """A close that the watchdog cut ``cuts`` times, or that ``cancelled`` interrupted.

        The watchdog's cancellations are taken back (``Task.uncancel()``; ``before`` is the
        task's ``cancelling()`` count when the close began), so the task is left as it was,
        and the overdue close is logged. A cancellation from elsewhere propagates, exactly as
        it does through an anyio shield: raised here, the caller invalidates the connection.
        Returns False: the close did not complete.
        """
        if not cuts:
            raise cancelled  # type: ignore[misc]  # not the watchdog's
        if _UNCANCEL:
            for _ in range(cuts):
                task.uncancel()  # type: ignore[attr-defined]  # 3.11+
        self._log_overdue()
        if cancelled is not None and _UNCANCEL and task.cancelling() > before:  # type: ignore[attr-defined]
            raise asyncio.CancelledError  # a Task.cancel() from elsewhere landed too
        return False

    def _raise_translated(self, error: BaseException) -> None:
        """Raise the block's ``error`` as reqscope's error for it, if it has one."""
        translated = self.owner._translate(error)  # noqa: SLF001
        if translated is not error:
            raise translated from error

    def _settle(self, error: BaseException | None, conn: Connection | None) -> None:
        """After a release: count a failure, tell the breaker, follow up a reported leak."""
        factory = self.owner
        if error is not None:
            registry = factory._registry  # noqa: SLF001
            registry.sessions_failed += 1
            if isinstance(error, sa_exc.TimeoutError):  # the pool's: overload, not an outage
                registry.pool_timeouts += 1
            breaker = factory.circuit_breaker
            if not breaker.observe(error) and self._probe:
                breaker.release_probe()
        elif self._probe and conn is None:
            factory.circuit_breaker.release_probe()  # the probe never reached the database
        if self.leak_reported:
            LeakDetector.log_late_close(self)

    async def _close(self) -> bool:
        """Close the session (roll back, return the connection); False if that failed."""
        try:
            await greenlet_spawn(self._session.sync_session.close)  # type: ignore[union-attr]
        except Exception as error:
            self._log_close_failure(error)
            return False
        return True

    def _log_close_failure(self, error: Exception) -> None:
        """Count and log a close that failed with ``error``."""
        self.owner._registry.cleanup_failures += 1  # noqa: SLF001
        logger.error(
            "reqscope: closing session %s failed; invalidating its connection",
            self.session_id,
            exc_info=error,
            extra=self.log_fields(),
        )

    def _log_overdue(self) -> None:
        factory = self.owner
        factory._registry.cleanup_failures += 1  # noqa: SLF001
        logger.error(
            "reqscope: closing session %s took longer than cleanup_timeout=%s s; "
            "invalidating its connection",
            self.session_id,
            factory.cleanup_timeout,
            extra=self.log_fields(),
        )

    async def _close_in_shield(
        self, task: asyncio.Task[Any] | None, loop: asyncio.AbstractEventLoop | None
    ) -> bool:
        """Close inside an anyio shield scope, which the watchdog cancels when overdue."""
        # In an asyncio task, what anyio.CancelScope() would make, without its dispatch.
        shield = anyio.CancelScope(shield=True) if task is None else _ShieldScope(shield=True)
        watchdog = self.owner._cleanup_watchdog  # noqa: SLF001
        clean = False
        with shield:
            watchdog.watch(shield, self.owner.cleanup_timeout, loop)
            try:
                clean = await self._close()
            finally:
                if not shield.cancel_called:
                    watchdog.unwatch(shield)
        if shield.cancelled_caught:
            self._log_overdue()
        return clean


class CommitScope(SessionScope):
    """``async with factory.begin(ctx)``: a session scope that commits when its block succeeds."""

    __slots__ = ()

    _begin = True
