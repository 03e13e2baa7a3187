"""HandoffQueue: the fair queue behind reqscope's pool, without a database."""

from __future__ import annotations

import asyncio

import pytest

from reqscope._handoff import HandoffQueue

pytestmark = pytest.mark.anyio


async def test_a_returned_item_goes_to_the_oldest_waiter_not_to_whoever_asks_next() -> None:
    queue: HandoffQueue[str] = HandoffQueue()
    served: list[str] = []

    async def waiter(name: str) -> None:
        served.append(f"{name}:{await queue.get(1.0)}")

    tasks = [asyncio.create_task(waiter(f"w{i}")) for i in range(3)]
    await asyncio.sleep(0)  # all three wait, in order
    assert queue.waiting == 3
    queue.put_nowait("a")
    # The task that returned the item asks again at once: it must queue behind the others.
    with pytest.raises(IndexError):
        queue.get_nowait()
    queue.put_nowait("b")
    queue.put_nowait("c")
    await asyncio.gather(*tasks)
    assert served == ["w0:a", "w1:b", "w2:c"]
    assert queue.waits == 3
    assert queue.wait_seconds >= 0
    assert queue.waiting == 0


async def test_an_item_is_kept_when_nobody_waits_and_refused_when_full() -> None:
    queue: HandoffQueue[int] = HandoffQueue(2)
    assert queue.put_nowait(1)
    assert queue.put_nowait(2)
    assert queue.full()
    assert not queue.put_nowait(3)
    assert len(queue) == 2
    assert await queue.get(0.1) == 1  # no wait, no count
    assert queue.waits == 0


async def test_lifo_hands_out_the_most_recent_idle_item() -> None:
    queue: HandoffQueue[int] = HandoffQueue(lifo=True)
    for item in (1, 2, 3):
        queue.put_nowait(item)
    assert [queue.get_nowait() for _ in range(3)] == [3, 2, 1]


async def test_a_timed_out_waiter_leaves_the_line() -> None:
    queue: HandoffQueue[str] = HandoffQueue()
    with pytest.raises(TimeoutError):
        await queue.get(0.01)
    assert queue.waiting == 0
    assert queue.put_nowait("x")  # kept, not handed to the dead waiter
    assert queue.get_nowait() == "x"


async def test_a_cancelled_waiter_passes_on_an_item_it_was_handed() -> None:
    queue: HandoffQueue[str] = HandoffQueue()
    first = asyncio.create_task(queue.get(1.0))
    second = asyncio.create_task(queue.get(1.0))
    await asyncio.sleep(0)
    queue.put_nowait("x")  # handed to `first`...
    first.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "x"  # nothing lost


async def test_a_waiter_whose_loop_closed_is_skipped() -> None:
    queue: HandoffQueue[str] = HandoffQueue()
    other = asyncio.new_event_loop()
    try:
        stale: asyncio.Future[str] = other.create_future()
        queue._waiters.append(stale)
    finally:
        other.close()
    assert queue.put_nowait("x")
    assert queue.get_nowait() == "x"
