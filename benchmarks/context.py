"""Exact per-call cost of context construction (not a test; prints a table).

python benchmarks/context.py
Median of 9 batches of 20,000 calls each, timed with time.perf_counter_ns().
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from reqscope import UserExecutionContext

BATCHES = 9
CALLS = 20_000


def per_call_ns(fn) -> float:
    for _ in range(2_000):  # warm up
        fn()
    samples = []
    for _ in range(BATCHES):
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter_ns() - started) / CALLS)
    return statistics.median(samples)


def main() -> None:
    parent = UserExecutionContext.create("alice", metadata={"plan": "pro", "tags": ["a", "b"]})
    cases = {
        "UserExecutionContext.create(user_id)": lambda: UserExecutionContext.create("alice"),
        "create(user_id, metadata={3 keys})": lambda: UserExecutionContext.create(
            "alice", metadata={"plan": "pro", "tags": ["a", "b"], "n": 1}
        ),
        "UserExecutionContext(4 ids) (validating)": lambda: UserExecutionContext(
            "alice", "thread", "run", "request"
        ),
        "ctx.child(operation)": lambda: parent.child("tool_call"),
        "from_dict(to_dict())": lambda: UserExecutionContext.from_dict(parent.to_dict()),
    }
    print(f"command: python benchmarks/context.py   python {sys.version.split()[0]}")
    print(f"machine: {platform.machine()}, nproc={os.cpu_count()}; median of {BATCHES}x{CALLS}")
    print(f"{'case':45s} {'µs/call':>8s}")
    for name, fn in cases.items():
        print(f"{name:45s} {per_call_ns(fn) / 1000:8.2f}")


if __name__ == "__main__":
    main()
