"""The filter stage of a sync: messages waiting to be filtered count against the window (by count and by
octets) like messages waiting to be stored, and leave the stage in the order they entered it."""

from __future__ import annotations

import trio
import trio.testing
from plugins import pipeline_filters

from pop3proxy.filtering.pipeline import build_pipeline
from pop3proxy.proxy.stages import FilterStage, Item, Window

P = "plugins.pipeline_filters"


def message(i: int, size: int = 100) -> bytes:
    head = b"Subject: %d\r\n\r\n" % i
    return head + b"x" * (size - len(head))


async def test_messages_waiting_to_be_filtered_are_bounded_by_count_and_octets():
    pipeline_filters.gate.clear()
    try:
        for window, blocked_at in ((Window(10_000, count=3), 3), (Window(250, count=64), 2)):
            stage = FilterStage(build_pipeline([{"use": f"{P}:Gate"}]), window, "alice", None, depth=64)
            added = 0

            async def feed(nursery: trio.Nursery) -> None:
                nonlocal added
                for i in range(5):
                    await stage.add(nursery, Item(i, str(i), ""), message(i))
                    added += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed, nursery)
                await trio.testing.wait_all_tasks_blocked()
                assert added == blocked_at  # the filter holds them all; the next one waits for room
                assert window.count == blocked_at and window.used == 100 * blocked_at
                pipeline_filters.gate.set()
                out_send, out_receive = trio.open_memory_channel[Item](0)
                nursery.start_soon(stage.in_order, out_send)
                order = []
                async with out_receive:
                    for _ in range(5):
                        item = await out_receive.receive()
                        order.append(item.uid)
                        await window.release(item.reserved)  # stored
                    await stage.send.aclose()
            assert order == ["0", "1", "2", "3", "4"] and window.used == 0 and window.count == 0
            pipeline_filters.gate.clear()
    finally:
        pipeline_filters.gate.set()


async def test_filtered_messages_leave_in_the_order_they_came():
    # Message 0 is slow (its filter holds it until the gate opens); 1..3 finish first but wait for it.
    stage = FilterStage(build_pipeline([{"use": f"{P}:Tag"}]), Window(1 << 20, 64), "alice", None, depth=8)
    assert stage.limiter.total_tokens == 2
    release = trio.Event()
    real_run = stage.pipeline.run

    async def run(data, context):
        if context.uid == "0":
            await release.wait()
        return await real_run(data, context)

    stage.pipeline.run = run
    out_send, out_receive = trio.open_memory_channel[Item](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.in_order, out_send)
        items = [Item(i, str(i), "") for i in range(4)]
        for i, item in enumerate(items):
            await stage.add(nursery, item, message(i))
        await stage.send.aclose()
        for item in items[1:]:  # filtered (in threads or pool processes) while message 0 waits
            await item.ready.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert [item.ready.is_set() for item in items] == [False, True, True, True]
        assert out_receive.statistics().current_buffer_used == 0
        release.set()
        got = [item.uid async for item in out_receive]
    assert got == ["0", "1", "2", "3"]
    assert all(item.cached.startswith(b"X-Tag: tagged\r\n") for item in items)
