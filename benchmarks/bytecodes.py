"""Python bytecodes executed per request, reqscope vs plain, counted exactly.

    python benchmarks/bytecodes.py [--postgres URL] [--requests 20] [--top 25]

CPU time on this machine cannot resolve a 1 % change in one run (sessions.py), and valgrind's
instruction counts (instructions.py) take minutes. This counts, with ``sys.settrace`` and
``f_trace_opcodes``, every bytecode the interpreter executes for one ``SELECT 1`` request, by
function: the same count on every run, in seconds. It is the Python-level work only (a C
call counts as the one bytecode that makes it). Use it to compare two versions of the
session scope and to see where the scope's work goes, not to predict the CPU ratio to a
plain session: the plain session executes more bytecodes than the scoped one (its
``__aexit__`` closes in a task of its own) and still costs less CPU at concurrency 100
(docs/performance.md).

The variants are ``benchmarks/sessions.py``'s own, each request in an asyncio task of its
own as ASGI servers run them: "plain" (``async with async_sessionmaker()()``), "factory
session, bare" (the factory's session class closed inline, none of the scope), "reqscope,
context given" (``factory.session(ctx)``, the context made beforehand) and "reqscope" (the
context made in the request). Then the functions whose counts differ between the bare
session and the scope: where the scope's bytecodes go.

Last, the objects the cyclic garbage collector tracks per request in flight (20 requests
held open after their ``SELECT 1``, counted with ``gc.get_objects()``): at concurrency 100
the collector runs about every ten requests and each object a request keeps alive is work
for it (``sessions.py``'s GC column), which bytecodes do not show.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from sessions import DIAGNOSTICS, POOL, select_one, variants  # benchmarks/sessions.py

from reqscope import IsolatedSessionFactory, build_engine

PLAIN, BARE, GIVEN = "plain", "factory session, bare", "reqscope, context given"


def count_bytecodes(counts: Counter[str]) -> Callable[[FrameType, str, Any], Any]:
    """A trace function adding one to ``counts[function]`` per bytecode executed."""

    def trace(frame: FrameType, event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
        return trace

    return trace


async def per_request(run: Callable[[], Awaitable[None]], requests: int) -> dict[str, float]:
    """Bytecodes per request of ``run``, by function, after a warm-up."""
    loop = asyncio.get_running_loop()
    for _ in range(50):  # warm up: pool filled, statements cached
        await loop.create_task(run())
    counts: Counter[str] = Counter()
    sys.settrace(count_bytecodes(counts))
    try:
        for _ in range(requests):
            await loop.create_task(run())
    finally:
        sys.settrace(None)
    return {name: count / requests for name, count in counts.items()}


async def tracked_in_flight(run: Callable[..., Awaitable[None]], requests: int = 20) -> float:
    """GC-tracked objects alive per request while ``requests`` requests are in flight."""
    loop = asyncio.get_running_loop()
    release, all_in = asyncio.Event(), asyncio.Event()
    arrived: list[None] = []

    async def held(session: Any, user: str) -> None:
        await select_one(session, user)
        arrived.append(None)
        if len(arrived) == requests:
            all_in.set()
        await release.wait()

    for _ in range(3):  # warm up with as many at once: the pool holds that many connections
        await asyncio.gather(*(run(select_one, "user-1") for _ in range(requests)))
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        tasks = [loop.create_task(run(held, f"user-{i}")) for i in range(requests)]
        await all_in.wait()
        during = len(gc.get_objects())
        release.set()
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    return (during - before) / requests


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default=os.environ.get("REQSCOPE_TEST_POSTGRES_URL"))
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    args = parser.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    database = "PostgreSQL" if args.postgres else "SQLite (the embedded default)"
    print(f"python {sys.version.split()[0]}; database: {database}")
    engine = build_engine(args.postgres, pool=POOL) if args.postgres else None
    async with IsolatedSessionFactory(engine) as factory:  # None: the embedded SQLite file
        url = factory.engine.url.render_as_string(hide_password=False)
        plain_engine = build_engine(url, pool=POOL)  # untouched by reqscope, same settings
        DIAGNOSTICS[0] = True  # for "factory session, bare"
        runs = variants(plain_engine, factory)  # the very variants sessions.py times
        counts = {
            name: await per_request(lambda run=runs[name]: run(select_one, "user-1"), args.requests)
            for name in (PLAIN, BARE, GIVEN, "reqscope")
        }
        tracked = {name: await tracked_in_flight(runs[name]) for name in counts}
        await plain_engine.dispose()
    if engine is not None:
        await engine.dispose()
    totals = {name: sum(by_function.values()) for name, by_function in counts.items()}
    print("\n| variant | bytecodes/request | vs plain | vs bare | GC-tracked objects in flight |")
    print("|---|---|---|---|---|")
    for name, total in totals.items():
        print(
            f"| {name} | {total:,.0f} | {total / totals['plain']:.3f} | "
            f"{total / totals['factory session, bare']:.3f} | {tracked[name]:.1f} |"
        )
    bare_counts, scope_counts = counts[BARE], counts[GIVEN]
    differences = {
        name: scope_counts.get(name, 0.0) - bare_counts.get(name, 0.0)
        for name in bare_counts.keys() | scope_counts.keys()
        if not name.startswith("sessions.py:")  # the variants' own bodies
    }
    print(f"\n{GIVEN} minus {BARE}, by function (top {args.top}):")
    print("| function | bytecodes/request |")
    print("|---|---|")
    ranked = sorted(differences.items(), key=lambda item: -abs(item[1]))
    for name, difference in ranked[: args.top]:
        if difference:
            print(f"| {name} | {difference:+.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
