"""A Prometheus exposition of a factory's metrics: ``pip install "reqscope[prometheus]"``.

For services without an OpenTelemetry pipeline. The metrics are those of
:mod:`reqscope.otel`, under the names OpenTelemetry's Prometheus exporter gives them (dots
become underscores, seconds get ``_seconds``, counters ``_total``), so one dashboard reads
either. Built on the official ``prometheus-client``: its registry, its text format, and no
OpenTelemetry SDK needed.

Example:
    >>> exporter = PrometheusMetrics(factory, hub=hub)
    >>> body = exporter.exposition()  # serve with exporter.content_type
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from reqscope._telemetry import METRICS, POOL_NAME, SECONDS_BUCKETS, Metric, PoolTimings, read
from reqscope.exceptions import ReqscopeError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric as Family

    from reqscope._agents import AgentInstanceFactory
    from reqscope._events import EventHub
    from reqscope._sessions import IsolatedSessionFactory

__all__ = ["PrometheusMetrics", "prometheus_name"]


def prometheus_name(metric: Metric) -> str:
    """``metric``'s Prometheus name (a counter's samples add ``_total`` to it)."""
    name = metric.name.replace(".", "_")
    return f"{name}_seconds" if metric.unit == "s" else name


def _label(attribute: str) -> str:
    return attribute.replace(".", "_")


class PrometheusMetrics:
    """The metrics of ``factory`` (and ``hub``'s, ``agents``') in a Prometheus registry.

    Counts and levels are read at each scrape; the connection-time histograms are recorded
    on the pool's events. ``registry`` defaults to a registry of its own (not the global
    one): serve it with :meth:`exposition`, or pass yours to scrape everything in one place.
    :meth:`close` stops the recording and unregisters.
    """

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(
        self,
        factory: IsolatedSessionFactory,
        *,
        hub: EventHub | None = None,
        agents: AgentInstanceFactory | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._collector = _Collector(factory, hub, agents)
        try:
            self.registry.register(self._collector)
        except ValueError as error:  # prometheus-client: "Duplicated timeseries ..."
            raise ReqscopeError(
                "this registry already has reqscope's metrics (a PrometheusMetrics made "
                "earlier, not closed); one PrometheusMetrics per registry: close() the other, "
                "or leave registry= out for a registry of its own"
            ) from error
        self._histograms = {
            metric.name: Histogram(
                prometheus_name(metric),
                metric.description,
                labelnames=[_label(POOL_NAME)],
                buckets=SECONDS_BUCKETS,
                registry=self.registry,
            )
            for metric in METRICS
            if metric.kind == "histogram"
        }
        self._children: dict[tuple[str, str], Histogram] = {}
        self._timings = PoolTimings(factory, self._record)
        self._timings.install()
        self._closed = False

    def _record(self, metric: str, seconds: float, pool_name: str) -> None:
        # on the request path: the labelled child is looked up once per pool
        child = self._children.get((metric, pool_name))
        if child is None:
            child = self._children[metric, pool_name] = self._histograms[metric].labels(pool_name)
        child.observe(seconds)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (serve with :attr:`content_type`)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop recording and take the metrics out of the registry."""
        if self._closed:
            return
        self._closed = True
        self._timings.remove()
        self.registry.unregister(self._collector)
        for histogram in self._histograms.values():
            self.registry.unregister(histogram)


class _Collector(Collector):
    def __init__(
        self,
        factory: IsolatedSessionFactory,
        hub: EventHub | None,
        agents: AgentInstanceFactory | None,
    ) -> None:
        self._factory = factory
        self._hub = hub
        self._agents = agents

    def collect(self) -> Iterator[Family]:
        readings = read(self._factory, hub=self._hub, agents=self._agents)
        for metric in METRICS:
            points = readings.get(metric.name)
            if metric.kind == "histogram" or not points:
                continue
            family = _family(metric)
            for value, attributes in points:
                family.add_metric(
                    [attributes[POOL_NAME], *(attributes[name] for name in metric.attributes)],
                    value,
                )
            yield family

    def describe(self) -> Iterator[Family]:
        # the names, without reading anything: a second registration of them is refused
        for metric in METRICS:
            if metric.kind != "histogram":
                yield _family(metric)


def _family(metric: Metric) -> CounterMetricFamily | GaugeMetricFamily:
    labels = [_label(POOL_NAME), *(_label(name) for name in metric.attributes)]
    family_class = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
    return family_class(prometheus_name(metric), metric.description, labels=labels)
