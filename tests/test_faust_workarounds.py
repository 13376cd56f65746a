"""The worker's faust-streaming workarounds, on Faust's own Consumer.ack (no broker needed)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from faust.exceptions import PartitionsMismatch
from faust.tables.base import Collection
from faust.transport.consumer import Consumer
from faust.types.tuples import TP

from stream_processors.faust_fixes import (
    ack_only_what_this_generation_handled,
    check_internals,
    check_partitions_once_known,
    hold_flow_while_seeking,
    partitions_in_flight,
)

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


def test_a_record_acknowledged_again_leaves_the_in_flight_set() -> None:
    ack_only_what_this_generation_handled()
    c = consumer(generation=3)
    first, again = message(715, generation=3), message(715, generation=3)  # the same offset, delivered twice
    c._unacked_messages |= {first, again}
    assert Consumer.ack(c, first) is True  # type: ignore[arg-type]
    assert Consumer.ack(c, again) is False  # type: ignore[arg-type]  # Faust does not count it twice ...
    assert (again.acked, c._unacked_messages) == (True, set())  # ... and it is no longer in flight
    assert c._acked[RAW] == [715]


def test_only_records_not_yet_acknowledged_keep_their_partition_in_flight() -> None:
    deltas = TP("spend.deltas", 1)
    handled, waiting = message(715, generation=3), Message(52, 3, tp=deltas, topic=deltas.topic)
    handled.acked = True  # still referenced (the meter's last batch), so still in Faust's WeakSet
    assert partitions_in_flight({handled, waiting}) == {deltas}
    waiting.acked = True
    assert partitions_in_flight({handled, waiting}) == set()


def test_the_seek_to_committed_offsets_runs_with_the_flow_stopped() -> None:
    hold_flow_while_seeking()
    hold_flow_while_seeking()  # installing twice wraps once
    flow_at_seek: list[bool] = []
    c = SimpleNamespace(flow_active=True, _read_offset={RAW: 715}, _committed_offset={})

    def stop_flow() -> None:
        c.flow_active = False

    async def seek_to_committed() -> dict[TP, int]:
        flow_at_seek.append(c.flow_active)
        return {RAW: 372}

    c.stop_flow, c.seek_to_committed = stop_flow, seek_to_committed
    asyncio.run(Consumer.perform_seek(c))  # type: ignore[arg-type]
    # nothing fetched after the seek is delivered before recovery clears the queues
    assert flow_at_seek == [False]
    assert (c.flow_active, c._read_offset, c._committed_offset) == (False, {RAW: 372}, {RAW: 372})


def test_every_internal_the_workarounds_patch_exists_in_the_pinned_versions() -> None:
    from pathlib import Path

    from stream_processors.faust_fixes import CHECKED_VERSIONS, _patched_names, check_internals

    assert [name for name, present in _patched_names() if not present()] == []
    assert check_internals() == []  # the installed versions are the checked ones
    pins = (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines()
    pinned = dict(p.split("==") for p in pins if p and not p.startswith("#"))
    assert {name: pinned.get(name) for name in CHECKED_VERSIONS} == CHECKED_VERSIONS


def test_a_missing_internal_refuses_to_start_and_another_version_warns(monkeypatch: Any) -> None:
    import pytest
    from faust.types import tuples

    from spendstream.errors import ConfigError
    from stream_processors import faust_fixes

    monkeypatch.setitem(faust_fixes.CHECKED_VERSIONS, "aiokafka", "0.0.1")
    [warning] = faust_fixes.check_internals()
    assert warning.startswith(
        "aiokafka 0.14.0 is installed; the worker's Faust workarounds were checked with 0.0.1"
    )
    monkeypatch.delattr(tuples, "ack_lock")  # as if an upgrade had renamed it
    with pytest.raises(
        ConfigError, match=r"internals that spendstream patches are missing: faust types.tuples.ack_lock;"
    ):
        faust_fixes.check_internals()


def test_the_worker_never_stalls_delivery_on_its_producer_or_commits(kafka: str, tmp_path: Any) -> None:
    """A take's output (PricedBatches of tens of KiB, several to one partition) must not queue
    one produce round trip per message: aiokafka keeps one request in flight per broker and a
    send to a partition whose batch is full waits for that batch to go out. With the worker's
    producer settings, 20 sends of 40 KiB to one partition go out in at most 2 requests (with
    Faust's default 16 KiB batches: 20, and the meter waited out each one's round trip)."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.sender import Sender

    from spendstream.settings import Settings
    from spendstream.topics import ensure_topics
    from stream_processors.app import create_app
    from stream_processors.meter_process import MeterProcess

    settings = Settings(topic_prefix=f"coalesce-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(kafka, settings.topics, 1))
    conf = create_app(settings, datadir=str(tmp_path), history=None, meter=MeterProcess(settings)).conf

    async def requests_for(batch_size: int) -> tuple[int, int]:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka,
            acks="all",
            linger_ms=round(conf.producer_linger * 1000),  # the worker's 1 ms
            max_batch_size=batch_size,
            max_request_size=conf.producer_max_request_size,
        )
        await producer.start()
        sent = Sender._send_produce_req
        calls = 0

        def counted(self: Any, *args: Any) -> Any:
            nonlocal calls
            calls += 1
            return sent(self, *args)

        Sender._send_produce_req = counted  # type: ignore[method-assign]
        try:
            futures = [
                await producer.send(settings.topics.usage_priced, b"x" * 40_000, partition=0)
                for _ in range(20)
            ]
            delivered = len(await asyncio.gather(*futures))
        finally:
            Sender._send_produce_req = sent  # type: ignore[method-assign]
            await producer.stop()
        return calls, delivered

    assert conf.producer_max_batch_size >= 1 << 20
    # Faust's delivery loop commits inline every broker_commit_every records, stopping delivery
    # for a flush and a commit; the 1 s timer commits instead, beside the delivery loop.
    assert conf.broker_commit_every >= 1_000_000
    assert conf.broker_commit_interval == 1.0
    worker_requests, delivered = asyncio.run(requests_for(conf.producer_max_batch_size))
    faust_default_requests, _ = asyncio.run(requests_for(16_384))
    assert delivered == 20
    assert worker_requests <= 2, worker_requests
    assert faust_default_requests == 20, faust_default_requests


def test_records_handled_but_not_yet_committed_are_not_read_again() -> None:
    """The re-read check seeks back only over records nobody acknowledged: a slow commit (10-73 s
    on a busy broker) left handled records between the committed offset and the fetch position,
    and taking them for dropped ones priced 31,500-250,000 events again per bench run."""
    from stream_processors.faust_fixes import all_acknowledged

    assert all_acknowledged([100, 101, 102, 103], committed=100, position=104)
    assert all_acknowledged(
        [97, 98, 100, 101, 102, 103, 104], committed=100, position=104
    )  # older/newer ignored
    assert not all_acknowledged([100, 101, 103], committed=100, position=104)  # 102 was dropped
    assert not all_acknowledged([], committed=100, position=104)  # fetched, none handled
    assert all_acknowledged([], committed=104, position=104)


def test_a_changelog_not_yet_in_the_metadata_is_no_partition_mismatch() -> None:
    """A table written before the consumer's metadata has its new changelog (0 partitions) must not
    crash the agent (PartitionsMismatch on every delivery: the budget agent decided nothing for
    270 s once); the check runs once both counts are known, and a real mismatch still raises."""
    check_partitions_once_known()
    check_partitions_once_known()  # installed once, whatever the number of apps made
    assert check_internals() == []  # the library's method is still the one checked

    def table(changelog_partitions: int) -> Any:
        counts = {"budgets": 4, "specs-changelog": changelog_partitions}
        return SimpleNamespace(
            name="specs",
            changelog_topic_name="specs-changelog",
            app=SimpleNamespace(consumer=SimpleNamespace(topic_partitions=counts.get)),
            _verified_source_topics_for_partitions=set(),
        )

    fresh = table(0)
    Collection._verify_source_topic_partitions(fresh, "budgets")  # type: ignore[arg-type]
    assert fresh._verified_source_topics_for_partitions == set()  # not verified: checked again later
    known = table(4)
    Collection._verify_source_topic_partitions(known, "budgets")  # type: ignore[arg-type]
    assert known._verified_source_topics_for_partitions == {"budgets"}
    with pytest.raises(PartitionsMismatch):
        Collection._verify_source_topic_partitions(table(2), "budgets")  # type: ignore[arg-type]


def test_the_changelog_buffer_ebbs_to_its_bound_and_every_record_is_sent(kafka: str, tmp_path: Any) -> None:
    """A budget message updating thousands of scopes buffers a changelog record each (Faust's
    `send_soon`, as `Collection.send_changelog` does). The worker's Faust ebb only starts at
    FAUST_EBB, and `changelog_ebb` returns once no more than its bound is left: 5,000 records
    buffered, 1,000 or fewer after the wait, all 5,000 in the topic after the flush.
    (An ebb that did not wait leaves 5,000.)"""
    from aiokafka import AIOKafkaConsumer

    from spendstream.settings import Settings
    from spendstream.topics import ensure_topics
    from stream_processors.app import CHANGELOG_BUFFERED, FAUST_EBB, create_app
    from stream_processors.faust_fixes import changelog_ebb
    from stream_processors.meter_process import MeterProcess

    settings = Settings(bootstrap_servers=kafka, topic_prefix=f"ebb-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(kafka, settings.topics, 1))
    app = create_app(settings, datadir=str(tmp_path), history=None, meter=MeterProcess(settings))
    buffer = app.producer.buffer
    topic = app.topic(settings.topics.spend_deltas, value_serializer="raw")

    async def scenario() -> tuple[int, int, int]:
        await app.producer.start()
        try:
            for i in range(5_000):
                topic.send_soon(value=str(i).encode(), partition=0)
            buffered = buffer.size
            await changelog_ebb(app, CHANGELOG_BUFFERED)
            after = buffer.size
            await app.producer.flush()  # the rest, as the app's stop does before its producer's
        finally:
            await app.producer.stop()
        consumer = AIOKafkaConsumer(
            settings.topics.spend_deltas, bootstrap_servers=kafka, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            found: set[bytes] = set()
            deadline = asyncio.get_running_loop().time() + 30
            while len(found) < 5_000 and asyncio.get_running_loop().time() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found.update(r.value for r in records if r.value is not None)
        finally:
            await consumer.stop()
        return buffered, after, len(found)

    assert buffer.max_messages == FAUST_EBB == 20_000
    buffered, after, found = app.loop.run_until_complete(scenario())  # the loop its services run on
    assert buffered == 5_000
    assert after <= CHANGELOG_BUFFERED == 1_000  # it waited for 4,000 or more to go out
    assert found == 5_000
