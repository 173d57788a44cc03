"""
The bounded per-connection outbox: order, byte counting, coalescing, overflow.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.messages import Spliced, splice_for_client
from bridge.outbox import CLOSE_TOO_SLOW, DEFAULT_MAX_BYTES, Close, Outbox


def drain(outbox: Outbox) -> list[bytes | Spliced | Close]:
    """
    Everything the outbox holds now, in order, without waiting.

    """
    items = []
    while len(outbox):
        items.append(asyncio.run(outbox.get()))
    return items


def overflow_log(outbox: Outbox) -> list[Close]:
    seen: list[Close] = []
    outbox.on_overflow = seen.append
    return seen


def test_the_default_limit_is_64_mib():
    assert DEFAULT_MAX_BYTES == 64 * 2**20
    assert Outbox().max_bytes == DEFAULT_MAX_BYTES


def test_messages_come_out_in_order_and_their_bytes_are_counted():
    outbox = Outbox(max_bytes=100)
    outbox.put_nowait(b"a" * 10)
    outbox.put_nowait(b"b" * 20)
    assert outbox.queued_bytes == 30
    assert len(outbox) == 2

    assert drain(outbox) == [b"a" * 10, b"b" * 20]
    assert outbox.queued_bytes == 0


def test_get_waits_for_a_message():
    async def scenario() -> bytes | Close:
        outbox = Outbox()
        waiting = asyncio.ensure_future(outbox.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        outbox.put_nowait(b"hello")
        return await asyncio.wait_for(waiting, 1)

    assert asyncio.run(scenario()) == b"hello"


def test_a_message_larger_than_the_limit_goes_through_an_empty_outbox():
    outbox = Outbox(max_bytes=10)
    overflows = overflow_log(outbox)
    outbox.put_nowait(b"x" * 1000)

    assert overflows == []
    assert drain(outbox) == [b"x" * 1000]


def test_the_outbox_may_fill_up_to_the_limit_exactly():
    outbox = Outbox(max_bytes=30)
    overflows = overflow_log(outbox)
    for _ in range(3):
        outbox.put_nowait(b"x" * 10)

    assert overflows == []
    assert outbox.queued_bytes == 30


def test_going_over_the_limit_drops_the_queue_and_queues_a_close():
    outbox = Outbox(max_bytes=30)
    overflows = overflow_log(outbox)
    for _ in range(3):
        outbox.put_nowait(b"x" * 10)
    outbox.put_nowait(b"y")

    close = Close(CLOSE_TOO_SLOW, "too slow: 31 bytes waiting")
    assert CLOSE_TOO_SLOW == 1008
    assert overflows == [close]
    assert outbox.closing
    assert outbox.queued_bytes == 0
    assert drain(outbox) == [close]


def test_nothing_is_queued_after_an_overflow():
    outbox = Outbox(max_bytes=10)
    overflows = overflow_log(outbox)
    outbox.put_nowait(b"x" * 10)
    outbox.put_nowait(b"x")
    outbox.put_nowait(b"z")
    outbox.put_latest(b"stats")
    outbox.put_nowait(Close(1011, "linkup core lost"))

    assert len(overflows) == 1
    assert drain(outbox) == [Close(1008, "too slow: 11 bytes waiting")]


def test_the_message_being_sent_does_not_count():
    # The send loop took the large message: the outbox is empty again, so
    # the next one is accepted whatever its size.
    outbox = Outbox(max_bytes=10)
    overflows = overflow_log(outbox)
    outbox.put_nowait(b"x" * 1000)
    drain(outbox)
    outbox.put_nowait(b"y" * 1000)

    assert overflows == []
    assert outbox.queued_bytes == 1000


def test_a_close_comes_after_what_is_queued_and_ends_the_outbox():
    outbox = Outbox()
    outbox.put_nowait(b"TASK_CANCELLED")
    outbox.put_nowait(Close(4000, "worker silent for 30s"))
    outbox.put_nowait(b"too late")
    outbox.put_latest(b"too late as well")
    outbox.put_nowait(Close(1011, "linkup core lost"))

    assert outbox.closing
    assert drain(outbox) == [b"TASK_CANCELLED", Close(4000, "worker silent for 30s")]


def test_a_waiting_snapshot_is_replaced_where_it_stands():
    outbox = Outbox()
    outbox.put_nowait(b"first")
    outbox.put_latest(b"stats 1")
    outbox.put_nowait(b"second")
    outbox.put_latest(b"stats 22")
    outbox.put_latest(b"stats 333")

    assert outbox.queued_bytes == len(b"first" + b"stats 333" + b"second")
    assert drain(outbox) == [b"first", b"stats 333", b"second"]


def test_a_snapshot_already_taken_is_not_replaced():
    outbox = Outbox()
    outbox.put_latest(b"stats 1")
    assert drain(outbox) == [b"stats 1"]
    outbox.put_nowait(b"message")
    outbox.put_latest(b"stats 2")
    outbox.put_latest(b"stats 3")

    assert drain(outbox) == [b"message", b"stats 3"]


def test_a_growing_snapshot_can_overflow_the_outbox():
    outbox = Outbox(max_bytes=20)
    overflows = overflow_log(outbox)
    outbox.put_nowait(b"x" * 10)
    outbox.put_latest(b"s" * 10)
    outbox.put_latest(b"s" * 11)

    assert overflows == [Close(1008, "too slow: 21 bytes waiting")]
    assert drain(outbox) == overflows


def test_a_snapshot_counts_towards_the_limit():
    outbox = Outbox(max_bytes=20)
    overflows = overflow_log(outbox)
    outbox.put_latest(b"s" * 15)
    outbox.put_nowait(b"x" * 15)

    assert overflows == [Close(1008, "too slow: 30 bytes waiting")]


@pytest.mark.parametrize("count", [1, 10, 1000])
def test_snapshots_alone_never_overflow(count: int):
    outbox = Outbox(max_bytes=100)
    overflows = overflow_log(outbox)
    for number in range(count):
        outbox.put_latest(b"%d" % number + b" " * 90)

    assert overflows == []
    assert len(outbox) == 1
    assert drain(outbox) == [b"%d" % (count - 1) + b" " * 90]


# take_ready: what the sender writes together with the message it took.


def test_take_ready_takes_what_waits_up_to_the_budget():
    outbox = Outbox(max_bytes=1000)
    for size in (10, 20, 30, 40):
        outbox.put_nowait(b"x" * size)
    assert asyncio.run(outbox.get()) == b"x" * 10
    assert outbox.take_ready(55) == [b"x" * 20, b"x" * 30]
    assert outbox.queued_bytes == 40
    assert drain(outbox) == [b"x" * 40]


def test_take_ready_stops_at_a_close_and_never_takes_it():
    outbox = Outbox()
    outbox.put_nowait(b"a")
    outbox.put_nowait(Close(1000, "bye"))
    assert outbox.take_ready(100) == [b"a"]
    assert outbox.take_ready(100) == []
    assert drain(outbox) == [Close(1000, "bye")]


def test_take_ready_takes_a_waiting_snapshot_and_frees_its_place():
    outbox = Outbox()
    outbox.put_nowait(b"a")
    outbox.put_latest(b"stats-1")
    assert outbox.take_ready(100) == [b"a", b"stats-1"]
    # The next snapshot is queued anew, not written into the one taken.
    outbox.put_latest(b"stats-2")
    assert drain(outbox) == [b"stats-2"]
    assert outbox.queued_bytes == 0


def test_spliced_messages_count_their_whole_size():
    outbox = Outbox(max_bytes=100)
    message = {"type": "TASK_ASSIGNED", "task": {"id": "t"}}
    spliced = splice_for_client(message, b"Q" * 60)
    outbox.put_nowait(spliced)
    assert outbox.queued_bytes == len(bytes(spliced))
    assert outbox.take_ready(len(spliced) - 1) == []
    assert outbox.take_ready(len(spliced)) == [spliced]
    assert outbox.queued_bytes == 0
