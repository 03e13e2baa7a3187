"""CPU per request of ``factory.session(ctx)``: this checkout against another commit.

    python benchmarks/versus.py --against 196fe19 [--rounds 401] [--requests 100]
        [--concurrency 100] [--postgres URL]

Two runs of ``sessions.py`` on this machine differ by more than a small change to the session
scope does (docs/performance.md), so comparing a change's "before" and "after" runs cannot
size it. This runs both in one process instead: the other commit's ``src/reqscope`` is
exported with ``git archive`` into a temporary directory and imported as ``reqscope_other``
(its imports of ``reqscope`` rewritten), and every round runs a plain session, the other
commit's scope and this checkout's scope, each on an engine of its own with the same
settings, in a freshly shuffled order. Printed: the median per-round CPU ratio with a 95 %
confidence interval for this/other, this/plain and other/plain ("context given":
each user's context is made beforehand). Everything runs in one process; run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sessions import (
    POOL,
    measure,
    median_ci,
    parse_ab_arguments,
    round_order,
    select_one,
)  # benchmarks/sessions.py
from sqlalchemy.ext.asyncio import async_sessionmaker

import reqscope

_IMPORT = re.compile(r"^(\s*)(from|import) reqscope\b", re.MULTILINE)


def export(commit: str, into: Path) -> None:
    """Put ``commit``'s ``src/reqscope`` at ``into/reqscope_other``, imports rewritten."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(  # noqa: S603 - the user's own commit name, no shell
        ["git", "-C", str(root), "archive", commit, "src/reqscope"],  # noqa: S607
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "reqscope_other"
    (into / "src" / "reqscope").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(_IMPORT.sub(r"\1\2 reqscope_other", path.read_text()))


async def compare(other, args: argparse.Namespace) -> None:
    url = args.postgres
    plain_engine = reqscope.build_engine(url, pool=POOL)
    maker = async_sessionmaker(plain_engine, expire_on_commit=False)
    this = reqscope.IsolatedSessionFactory(reqscope.build_engine(url, pool=POOL))
    that = other.IsolatedSessionFactory(reqscope.build_engine(url, pool=POOL))
    users = [f"user-{i}" for i in range(100)]
    this_ctx = {u: reqscope.UserExecutionContext.create(u) for u in users}
    that_ctx = {u: other.UserExecutionContext.create(u) for u in users}

    async def plain(workload, user: str) -> None:
        async with maker() as session:
            await workload(session, user)

    async def this_scope(workload, user: str) -> None:
        async with this.session(this_ctx[user]) as session:
            await workload(session, user)

    async def that_scope(workload, user: str) -> None:
        async with that.session(that_ctx[user]) as session:
            await workload(session, user)

    runs = {"plain": plain, "other": that_scope, "this": this_scope}
    c, n = args.concurrency, max(args.requests, args.concurrency)
    async with this, that:
        for run in runs.values():  # warm up: fill the pools, cache statements
            await measure(run, select_one, 400, min(c, 100))
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for index in range(args.rounds):
            for name in round_order(list(runs), index):
                cpu[name].append((await measure(runs[name], select_one, n, c))[0])
    await plain_engine.dispose()
    print(f"concurrency {c}, plain {statistics.median(cpu['plain']):.0f} µs CPU per request")
    print("| ratio | median | 95 % CI |")
    print("|---|---|---|")
    for a, b in (("this", "other"), ("this", "plain"), ("other", "plain")):
        ratios = [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]
        print(f"| {a} / {b} | {statistics.median(ratios):.3f} | {median_ci(ratios)} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", required=True, help="a commit, e.g. HEAD~1")
    args = parse_ab_arguments(parser, rounds=401)
    with tempfile.TemporaryDirectory() as tmp:
        export(args.against, Path(tmp))
        sys.path.insert(0, tmp)
        other = importlib.import_module("reqscope_other")
        asyncio.run(compare(other, args))


if __name__ == "__main__":
    main()
