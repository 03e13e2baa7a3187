"""CPU per request of ``factory.session(ctx)`` with metrics and traces on, against off.

    python benchmarks/telemetry.py [--rounds 201] [--requests 100] [--concurrency 100]
        [--postgres URL]

In one process, each round runs the same ``SELECT 1`` requests through four factories with
the same pool settings, each on an engine of its own, in a freshly shuffled order:

- ``off``: no instrumentation (what a service without ``reqscope[otel]`` runs);
- ``metrics``: ``reqscope.otel.instrument(..., traces=False)`` with the OpenTelemetry SDK
  and an in-memory reader attached, collected every 20 rounds (the connection times are
  recorded into the SDK then);
- ``traces``: the same, plus a span per session scope (an SDK tracer, spans kept and
  dropped: no exporter);
- ``prometheus``: ``reqscope.prometheus.PrometheusMetrics``, scraped every 20 rounds.

Printed: the median per-round CPU ratio against ``off`` with its 95 % confidence interval
(benchmarks/sessions.py's method), and the CPU the collections took outside the rounds,
spread over the requests they covered. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from sessions import (
    POOL,
    measure,
    median_ci,
    parse_ab_arguments,
    round_order,
    select_one,
)  # benchmarks/sessions.py

import reqscope
from reqscope.otel import instrument
from reqscope.prometheus import PrometheusMetrics

COLLECT_EVERY = 20  # rounds between two collections (a reader every 60 s, in a service)


async def compare(args: argparse.Namespace) -> None:
    url = args.postgres
    names = ("off", "metrics", "traces", "prometheus")
    factories = {
        name: reqscope.IsolatedSessionFactory(reqscope.build_engine(url, pool=POOL), name=name)
        for name in names
    }
    reader = InMemoryMetricReader()
    traced_reader = InMemoryMetricReader()
    instrument(
        factories["metrics"], meter_provider=MeterProvider(metric_readers=[reader]), traces=False
    )
    instrument(
        factories["traces"],
        meter_provider=MeterProvider(metric_readers=[traced_reader]),
        tracer_provider=TracerProvider(),
    )
    exporter = PrometheusMetrics(factories["prometheus"])
    users = [f"user-{i}" for i in range(100)]
    contexts = {u: reqscope.UserExecutionContext.create(u) for u in users}

    def run(factory: reqscope.IsolatedSessionFactory):
        async def scope(workload, user: str) -> None:
            async with factory.session(contexts[user]) as session:
                await workload(session, user)

        return scope

    runs = {name: run(factory) for name, factory in factories.items()}
    c, n = args.concurrency, max(args.requests, args.concurrency)
    for factory in factories.values():
        await factory.start()
    try:
        for scope in runs.values():  # warm up: fill the pools, cache statements
            await measure(scope, select_one, 400, min(c, 100))
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        collections = {
            "metrics": reader.get_metrics_data,
            "traces": traced_reader.get_metrics_data,
            "prometheus": exporter.exposition,
        }
        collecting = dict.fromkeys(collections, 0.0)
        for index in range(args.rounds):
            for name in round_order(list(runs), index):
                cpu[name].append((await measure(runs[name], select_one, n, c))[0])
            if index % COLLECT_EVERY == COLLECT_EVERY - 1:
                for name, collect in collections.items():
                    started = time.process_time()
                    collect()
                    collecting[name] += time.process_time() - started
    finally:
        for factory in factories.values():
            await factory.aclose()
    report(cpu, collecting, args)


def report(cpu: dict[str, list[float]], collecting: dict[str, float], args) -> None:
    """The ratios against ``off``, and the collections' CPU per request they covered."""
    c, n = args.concurrency, max(args.requests, args.concurrency)
    print(f"concurrency {c}, off {statistics.median(cpu['off']):.0f} µs CPU per request")
    collected = (args.rounds // COLLECT_EVERY) * COLLECT_EVERY * n  # requests collected
    print("| ratio | median | 95 % CI | collecting, µs per request |")
    print("|---|---|---|---|")
    for name, seconds in collecting.items():
        ratios = [x / y for x, y in zip(cpu[name], cpu["off"], strict=True)]
        per_request = seconds / max(1, collected) * 1e6
        print(
            f"| {name} / off | {statistics.median(ratios):.3f} | {median_ci(ratios)} "
            f"| {per_request:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    args = parse_ab_arguments(parser, rounds=201)
    asyncio.run(compare(args))


if __name__ == "__main__":
    main()
