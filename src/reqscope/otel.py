"""OpenTelemetry metrics and traces of a factory: ``pip install "reqscope[otel]"``.

Example:
    >>> instrumentation = reqscope.otel.instrument(factory, hub=hub)  # at startup
    >>> instrumentation.close()  # at shutdown (or use it as a context manager)

Only the OpenTelemetry API is needed at runtime: without an SDK configured, the
instruments and spans are no-ops. Counts and levels are observed when the SDK's reader
collects them (nothing on the request path); the three connection-time histograms are
recorded on the pool's events, and a span is made per session scope.
"""

from __future__ import annotations

import collections
import traceback
import weakref
from typing import TYPE_CHECKING, Any, Final

import greenlet
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from reqscope import __version__
from reqscope._observers import SessionObserver
from reqscope._telemetry import METRICS, POOL_NAME, SECONDS_BUCKETS, PoolTimings, read

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

    from typing_extensions import Self

    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._leaks import LeakReport
    from reqscope._observers import ObservedSession
    from reqscope._sessions import IsolatedSessionFactory
    from reqscope.exceptions import ReqscopeError

__all__ = ["FLUSH_AT", "Instrumentation", "instrument"]

#: pending connection-time samples recorded at once when no collection came first
FLUSH_AT: Final = 4096


def instrument(
    factory: IsolatedSessionFactory,
    *,
    hub: EventHub | None = None,
    agents: AgentInstanceFactory | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    record_user_ids: bool = False,
    traces: bool = True,
) -> Instrumentation:
    """Emit ``factory``'s metrics (and ``hub``'s, ``agents``') and a span per session scope.

    Args:
        factory: the factory to observe, with its read replicas.
        hub: an event hub whose channels to count too.
        agents: an agent factory whose agents to count too.
        meter_provider: default: the global one (``opentelemetry.metrics``).
        tracer_provider: default: the global one (``opentelemetry.trace``).
        record_user_ids: put the user id on session spans (``user.id``). Off by default:
            a user id is personal data. Request ids are always there; metrics never carry
            either.
        traces: make a span per session scope.

    Returns:
        The :class:`Instrumentation`; :meth:`Instrumentation.close` stops it.
    """
    return Instrumentation(
        factory,
        hub=hub,
        agents=agents,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        record_user_ids=record_user_ids,
        traces=traces,
    )


class Instrumentation:
    """The instruments and the span observer :func:`instrument` set up on a factory."""

    def __init__(
        self,
        factory: IsolatedSessionFactory,
        *,
        hub: EventHub | None,
        agents: AgentInstanceFactory | None,
        meter_provider: metrics.MeterProvider | None,
        tracer_provider: trace.TracerProvider | None,
        record_user_ids: bool,
        traces: bool,
    ) -> None:
        meter = metrics.get_meter("reqscope", __version__, meter_provider)
        self._closed = False
        self._histograms: dict[str, metrics.Histogram] = {}
        self._pending: collections.deque[tuple[str, float, str]] = collections.deque()
        for metric in METRICS:
            if metric.kind == "histogram":
                self._histograms[metric.name] = meter.create_histogram(
                    metric.name,
                    unit=metric.unit,
                    description=metric.description,
                    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
                )
                continue
            create = {
                "counter": meter.create_observable_counter,
                "updowncounter": meter.create_observable_up_down_counter,
                "gauge": meter.create_observable_gauge,
            }[metric.kind]
            callback = self._observe(metric.name, factory, hub, agents)
            create(
                metric.name, callbacks=[callback], unit=metric.unit, description=metric.description
            )
        self._attributes: dict[str, dict[str, str]] = {}  # pool name -> its attributes
        self._timings = PoolTimings(factory, self._record)
        self._timings.install()
        self._remove_observer: Callable[[], None] | None = None
        if traces:
            tracer = trace.get_tracer("reqscope", __version__, tracer_provider)
            self._remove_observer = factory.add_observer(
                _SessionSpans(tracer, record_user_ids=record_user_ids)
            )

    def _observe(
        self,
        name: str,
        factory: IsolatedSessionFactory,
        hub: EventHub | None,
        agents: AgentInstanceFactory | None,
    ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        def callback(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            # A collection runs the callbacks before it reads the histograms: what the pool
            # timed since the last one is in this collection.
            self._flush()
            if self._closed:
                return []
            readings = read(factory, hub=hub, agents=agents).get(name, [])
            return [metrics.Observation(value, attributes) for value, attributes in readings]

        return callback

    def _record(self, metric: str, seconds: float, pool_name: str) -> None:
        # On the request path: keep the sample (a deque's append is atomic) and record it
        # into the histogram when the reader collects (see _flush). An SDK's record costs
        # about 10 µs, 2 % of a request; a service without a reader flushes at FLUSH_AT.
        pending = self._pending
        pending.append((metric, seconds, pool_name))
        if len(pending) >= FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        """Record the pending samples (the reader's thread, at collection, or FLUSH_AT)."""
        pending = self._pending
        while True:
            try:
                metric, seconds, pool_name = pending.popleft()
            except IndexError:
                return
            attributes = self._attributes.get(pool_name)
            if attributes is None:
                attributes = self._attributes[pool_name] = {POOL_NAME: pool_name}
            self._histograms[metric].record(seconds, attributes)

    def close(self) -> None:
        """Stop observing: the instruments report nothing more, no more spans are made."""
        if self._closed:
            return
        self._closed = True
        self._timings.remove()
        self._flush()
        if self._remove_observer is not None:
            self._remove_observer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _refused_caller() -> str:
    """Where the refused use came from.

    A statement runs in a greenlet of SQLAlchemy's, whose own stack stops at SQLAlchemy:
    the caller's frames are those of the greenlet that switched to it.
    """
    parent = greenlet.getcurrent().parent
    frame = parent.gr_frame if parent is not None else None
    return "".join(traceback.format_stack(frame, limit=25))


class _SessionSpans(SessionObserver):
    """A span per session scope, child of the span current when the scope opened.

    Its events: the first statement, the commit or rollback, a leak report (with the stack
    that opened the session, when the factory captures stacks) and each refused use (with
    the refused caller's stack). SQLAlchemy's own instrumentation makes the statement spans;
    this one makes none.
    """

    def __init__(self, tracer: trace.Tracer, *, record_user_ids: bool) -> None:
        self._tracer = tracer
        self._record_user_ids = record_user_ids
        # weakly: a scope that never ends (its task lost) must not keep its span forever
        self._spans: weakref.WeakKeyDictionary[ObservedSession, trace.Span] = (
            weakref.WeakKeyDictionary()
        )

    def session_opened(self, session: ObservedSession) -> None:
        ctx = session.ctx
        attributes: dict[str, Any] = {
            "reqscope.session.id": session.session_id,
            "reqscope.request_id": ctx.request_id,
            "reqscope.session.max_lifetime": session.lifetime,
        }
        if self._record_user_ids:
            attributes["user.id"] = ctx.user_id
        self._spans[session] = self._tracer.start_span(
            "reqscope.session", kind=SpanKind.INTERNAL, attributes=attributes
        )

    def session_began(self, session: ObservedSession) -> None:
        span = self._spans.get(session)
        if span is not None:
            span.add_event("reqscope.first_statement")

    def session_closed(
        self, session: ObservedSession, *, committed: bool, error: BaseException | None
    ) -> None:
        span = self._spans.pop(session, None)
        if span is None:
            return
        span.add_event("reqscope.commit" if committed else "reqscope.rollback")
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    def session_leaked(self, session: ObservedSession, report: LeakReport) -> None:
        span = self._spans.get(session)
        if span is not None:
            span.add_event(
                "reqscope.leak",
                {
                    "reqscope.session.age": report.age,
                    "reqscope.leak.reclaimed": report.reclaimed,
                    "reqscope.session.stack": report.stack or "",
                },
            )

    def session_refused(self, session: ObservedSession, error: ReqscopeError) -> None:
        span = self._spans.get(session)
        if span is not None:
            attributes = {
                "exception.type": type(error).__name__,
                "reqscope.session.stack": session.stack or "",
                "reqscope.violation.stack": _refused_caller(),
            }
            if self._record_user_ids:  # its message names the users
                attributes["exception.message"] = str(error)
            span.add_event("reqscope.violation", attributes)
