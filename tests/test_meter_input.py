"""The meter's own usage.raw consumer (stream_processors/meter_input.py) on the real broker: takes
in offset order, offsets committed only after the flush, a failed take read again, and partitions
moving between two members with every offset handled once."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_processors.meter_input import MeterInput

PARTITIONS = 4


async def fresh_topic(kafka: str, messages_per_partition: int) -> str:
    """A topic of PARTITIONS partitions holding `messages_per_partition` messages in each."""
    topic = f"meter-input-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    await produce(kafka, topic, 0, messages_per_partition)
    return topic


async def produce(kafka: str, topic: str, first: int, per_partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        for i in range(first, first + per_partition):
            for partition in range(PARTITIONS):
                await producer.send(topic, f"{partition}:{i}".encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def committed(kafka: str, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


class Recorder:
    """A meter stand-in: records every take it is handed; `fail` takes raise first."""

    def __init__(self, fail: int = 0, seconds_per_take: float = 0.0) -> None:
        self.takes: list[list[tuple[int, int]]] = []
        self.failed: list[list[tuple[int, int]]] = []
        self.flushes: list[int] = []  # records handled when each flush began
        self._fail, self._seconds = fail, seconds_per_take

    async def handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        got = [(r.partition, r.offset) for r in records]
        await asyncio.sleep(self._seconds)
        if self._fail:
            self._fail -= 1
            self.failed.append(got)
            raise RuntimeError("a bug in the meter")
        self.takes.append(got)

    async def flush(self) -> None:
        self.flushes.append(self.handled_count())

    def handled_count(self) -> int:
        return sum(map(len, self.takes))

    def handled(self) -> Counter[tuple[int, int]]:
        return Counter(pair for take in self.takes for pair in take)


def member(
    kafka: str, topic: str, group: str, recorder: Recorder, metrics: Counter[str], take: int = 50
) -> MeterInput:
    async def ready() -> None:
        return None

    return MeterInput(
        bootstrap=kafka,
        topic=topic,
        group_id=group,
        previous_group=f"{group}-before",
        handle=recorder.handle,
        flush=recorder.flush,
        ready=ready,
        stopping=lambda: False,
        take=take,
        wait=0.01,
        fetch_max_wait_ms=20,
        metrics=metrics,
    )


async def until(check: Callable[[], Awaitable[bool]] | Callable[[], bool], seconds: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        got: Any = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        assert asyncio.get_running_loop().time() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.1)


async def handle_until_committed(
    kafka: str, topic: str, group: str, recorder: Recorder, metrics: Counter[str], handled: int, offset: int
) -> list[int]:
    """Run one member until `handled` records are handled and every partition is committed at
    `offset`, then stop it; returns the partitions it held."""
    service = member(kafka, topic, group, recorder, metrics)
    await service.start()
    try:
        await until(lambda: recorder.handled_count() >= handled, 30, f"{handled} records handled")
        await until(
            lambda: _committed_all(kafka, group, offset), 10, f"every partition committed at offset {offset}"
        )
        return service.partitions()
    finally:
        await service.stop()


async def _committed_all(kafka: str, group: str, offset: int) -> bool:
    return await committed(kafka, group) == dict.fromkeys(range(PARTITIONS), offset)


def test_takes_come_in_offset_order_and_are_committed_after_the_flush(kafka: str) -> None:
    async def scenario() -> None:
        topic, group = await fresh_topic(kafka, 100), f"g-{uuid.uuid4().hex[:8]}"
        recorder, metrics = Recorder(), Counter[str]()
        assert await handle_until_committed(kafka, topic, group, recorder, metrics, 400, 100) == [0, 1, 2, 3]
        handled = recorder.handled()
        assert sorted(handled) == [(p, o) for p in range(PARTITIONS) for o in range(100)]
        assert set(handled.values()) == {1}  # nothing twice
        for take in recorder.takes:
            assert len(take) <= 50
            for p in range(PARTITIONS):
                offsets = [o for q, o in take if q == p]
                assert offsets == sorted(offsets)  # in offset order, none missing in between
                assert len(offsets) == len(set(offsets)) == (offsets[-1] - offsets[0] + 1 if offsets else 0)
        assert recorder.flushes
        assert recorder.flushes[-1] == 400  # the commit of offset 100 everywhere came after a flush
        assert metrics["meter_takes|handled"] == len(recorder.takes)
        assert metrics["meter_takes|failed"] == 0
        assert metrics["meter_commits|committed"] >= 1

    asyncio.run(scenario())


def test_a_failed_take_is_counted_and_read_again(kafka: str) -> None:
    async def scenario() -> None:
        topic, group = await fresh_topic(kafka, 25), f"g-{uuid.uuid4().hex[:8]}"
        recorder, metrics = Recorder(fail=1), Counter[str]()
        await handle_until_committed(kafka, topic, group, recorder, metrics, 100, 25)
        assert len(recorder.failed) == 1
        assert recorder.failed[0]
        handled = recorder.handled()
        assert sorted(handled) == [(p, o) for p in range(PARTITIONS) for o in range(25)]
        assert set(handled.values()) == {1}
        assert set(recorder.failed[0]) <= set(handled)  # the failed take's records, handled later
        assert metrics["meter_takes|failed"] == 1

    asyncio.run(scenario())


def test_partitions_move_between_two_members_and_every_offset_is_handled_once(kafka: str) -> None:
    """A second member joins mid-stream and the first then stops: the revocations wait for the
    take being handled and commit it, so nothing is skipped and nothing handled twice."""

    async def scenario() -> None:
        topic, group = await fresh_topic(kafka, 150), f"g-{uuid.uuid4().hex[:8]}"
        first, second, metrics = (
            Recorder(seconds_per_take=0.1),
            Recorder(seconds_per_take=0.1),
            Counter[str](),
        )
        a = member(kafka, topic, group, first, metrics, take=10)
        b = member(kafka, topic, group, second, metrics, take=10)
        await a.start()
        try:
            await until(lambda: first.handled_count() >= 100, 30, "the first member handling")
            await b.start()
            await until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 30, "2 + 2 partitions")
            split_at = first.handled_count() + second.handled_count()
            await until(lambda: second.handled_count() >= 40, 30, "the second member handling")
            await a.stop()  # leaves the group after committing what it handled
            await until(lambda: b.partitions() == [0, 1, 2, 3], 30, "all four partitions on the second")
            await produce(kafka, topic, 150, 50)  # and more after the move
            await until(
                lambda: first.handled_count() + second.handled_count() >= 800, 60, "800 records handled"
            )
            await until(lambda: _committed_all(kafka, group, 200), 10, "every partition committed at 200")
        finally:
            await a.stop()
            await b.stop()
        both = first.handled() + second.handled()
        print(f"first {first.handled_count()}, second {second.handled_count()}, split at {split_at}")
        assert sorted(both) == [(p, o) for p in range(PARTITIONS) for o in range(200)]
        assert set(both.values()) == {1}, [pair for pair, n in both.items() if n > 1][:10]
        assert first.handled_count() >= 100
        assert second.handled_count() >= 40

    asyncio.run(scenario())


def test_a_new_meter_group_starts_where_the_previous_group_committed(kafka: str) -> None:
    """The upgrade from the meter as a Faust agent (group `<worker id>`): the meter group, with
    no offsets of its own, adopts that group's on usage.raw instead of reading from the start;
    once it has offsets of its own, it keeps them."""

    async def commit_as(group: str, topic: str, offsets: dict[int, int]) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = {TopicPartition(topic, p): offset for p, offset in offsets.items()}
            consumer.assign(list(tps))
            await consumer.commit(tps)
        finally:
            await consumer.stop()

    async def scenario() -> None:
        topic, group = await fresh_topic(kafka, 10), f"g-{uuid.uuid4().hex[:8]}"
        await commit_as(f"{group}-before", topic, {0: 6, 1: 4, 2: 10})  # partition 3: none
        recorder, metrics = Recorder(), Counter[str]()
        await handle_until_committed(kafka, topic, group, recorder, metrics, 20, 10)
        expected = (
            [(0, o) for o in range(6, 10)] + [(1, o) for o in range(4, 10)] + [(3, o) for o in range(10)]
        )
        assert sorted(recorder.handled()) == expected
        assert set(recorder.handled().values()) == {1}

        await commit_as(f"{group}-before", topic, {p: 0 for p in range(PARTITIONS)})  # stale now
        await produce(kafka, topic, 10, 2)
        again = Recorder()
        service = member(kafka, topic, group, again, metrics)
        await service.start()
        try:
            await until(lambda: again.handled_count() >= 8, 30, "the 8 new records handled")
            await asyncio.sleep(1)
        finally:
            await service.stop()
        assert sorted(again.handled()) == [(p, o) for p in range(PARTITIONS) for o in (10, 11)]

    asyncio.run(scenario())
