"""The worker's faust-streaming workarounds, on Faust's own Consumer.ack (no broker needed)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer
from faust.types.tuples import TP

from stream_processors.faust_fixes import ack_only_what_this_generation_handled

RAW = TP("usage.raw", 0)


def consumer(generation: int, flowing: bool = True) -> Any:
    app = SimpleNamespace(
        consumer_generation_id=generation,
        flow_control=SimpleNamespace(is_active=lambda: flowing),
        topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
    )
    return SimpleNamespace(
        app=app,
        _committed_offset=defaultdict(lambda: None),
        _acked_index=defaultdict(set),
        _acked=defaultdict(list),
        _unacked_messages=set(),
        _n_acked=0,
        _waiting_for_ack=None,
    )


@dataclass(eq=False)  # hashed by identity, as Faust's messages are in its sets
class Message:
    offset: int
    generation_id: int
    tp: TP = RAW
    topic: str = RAW.topic
    acked: bool = False


def message(offset: int, generation: int) -> Any:
    return Message(offset, generation)


def test_a_record_skipped_across_a_rebalance_does_not_count_as_acknowledged() -> None:
    ack_only_what_this_generation_handled()
    ack_only_what_this_generation_handled()  # installing twice wraps once
    c = consumer(generation=3)
    stale, current = message(406, generation=2), message(568, generation=3)
    c._unacked_messages |= {stale, current}
    assert Consumer.ack(c, stale) is False  # type: ignore[arg-type]
    assert (stale.acked, stale in c._unacked_messages) == (True, False)  # released, not tracked
    assert 406 not in c._acked[RAW]  # so the committed offset cannot pass it
    assert Consumer.ack(c, current) is True  # type: ignore[arg-type]
    assert c._acked[RAW] == [568]


def test_nothing_counts_as_acknowledged_while_flow_is_stopped() -> None:
    ack_only_what_this_generation_handled()
    c = consumer(generation=3, flowing=False)
    handled = message(7, generation=3)
    assert Consumer.ack(c, handled) is False  # type: ignore[arg-type]
    assert c._acked[RAW] == []
