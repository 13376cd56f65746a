"""The meter's input: usage.raw read in takes by a Kafka consumer of its own, not through Faust.

Faust hands its agents one record at a time: fetched in its consumer thread, passed to the event
loop, queued per agent, acknowledged one by one. The meter prices messages by the take, so that
per-record path was much of what the worker spent besides pricing: at 5,000 events/s (~410
messages a second) the same takes read here cost the worker 10-20% less CPU, and the kill
switch's p99 on a busy machine fell from 218 to 138 ms (means of 8 interleaved runs;
bench/README.md, ninth pass). The budget agent and the tables stay on Faust.

At least once, as before: a take's offsets are committed only after every record the worker has
sent up to then (its prices, deltas and the ids it counted) is acknowledged by Kafka, once a
second and whenever partitions are revoked; a take is never handled across a rebalance. What is
read again after a crash or a move is skipped by the dedupe (`usage.seen`, reloaded by the
meter's `follow_on` when a partition does not continue where it left off).

The consumer group is `<worker id>-meter`: Kafka spreads usage.raw's partitions over the meter
workers by itself, and a worker that dies loses its partitions after the session timeout (6 s).
Before, the meter was a Faust agent in the group `<worker id>`: on its first start after that
upgrade, the meter group takes over the offsets that group committed on usage.raw, so the worker
goes on where it stopped instead of reading all of usage.raw again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from mode import Service

from spendstream.kafka_auth import PLAINTEXT, KafkaAuth

__all__ = ["MeterInput", "meter_group"]

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # after a take failed: read it again after this long
STOP_COMMIT_SECONDS = 10.0  # a clean stop waits this long at most for the last commit


def meter_group(worker_id: str) -> str:
    """The consumer group of the meter workers of `worker_id` (the Faust app id)."""
    return f"{worker_id}-meter"


class MeterInput(Service):
    """Reads `topic` in takes of up to `take` records (what is there, plus what arrives within
    `wait` seconds) and awaits `handle` on each, in offset order per partition; commits what
    was handled once `flush` (every record sent so far acknowledged) returns. Takes nothing more
    once `stopping()` (the worker has begun to stop: its last commit comes at on_stop)."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        group_id: str,
        previous_group: str,
        handle: Callable[[list[ConsumerRecord[bytes, bytes]]], Awaitable[None]],
        flush: Callable[[], Awaitable[None]],
        ready: Callable[[], Awaitable[None]],
        stopping: Callable[[], bool],
        take: int,
        wait: float,
        fetch_max_wait_ms: int,
        metrics: Counter[str],
        kafka_auth: KafkaAuth = PLAINTEXT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._bootstrap, self._topic, self._group_id = bootstrap, topic, group_id
        self._previous_group = previous_group  # whose usage.raw offsets a new meter group adopts
        self._handle, self._flush, self._ready, self._stopping = handle, flush, ready, stopping
        self._take, self._wait, self._fetch_max_wait_ms = take, wait, fetch_max_wait_ms
        self._kafka_auth = kafka_auth
        self._metrics = metrics  # meter_takes|handled and |failed, meter_commits|committed and |failed
        self._consumer: AIOKafkaConsumer | None = None
        self._taking = asyncio.Lock()  # held from a fetch to its take handled: a revocation waits
        self._committing = asyncio.Lock()  # one commit at a time: offsets never go backwards
        self._generation = 0  # +1 at each revocation: a take fetched before it is dropped
        self._handled: dict[TopicPartition, int] = {}  # the next offset to commit, once delivered
        self._committed: dict[TopicPartition, int] = {}

    def partitions(self) -> list[int]:
        """The usage.raw partitions this worker meters now."""
        consumer = self._consumer
        return sorted(tp.partition for tp in consumer.assignment()) if consumer is not None else []

    @Service.task
    async def _run(self) -> None:
        await self._ready()
        try:
            await self._adopt_previous_offsets()
        except KafkaError as exc:  # another member joined first, or the broker is away: theirs win
            log.warning("the meter group did not take over %s's offsets (%r)", self._previous_group, exc)
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # As Faust's consumer is set up in app.py: a dead worker's partitions move after 6 s
            # (the least a broker accepts by default); heartbeats run as a task of this event
            # loop, which the meter never holds for more than a part of a take (~0.2 s).
            session_timeout_ms=6_000,
            heartbeat_interval_ms=2_000,
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            # aiokafka resets a partition with no committed offset by asking the leader it knows,
            # and on NotLeaderForPartition retries the same broker without refreshing metadata:
            # after a broker restart moved a leader, a partition taken over in a rebalance was
            # not read for 2 minutes (test_scale, once in 3 CI runs). The metadata is refreshed
            # every 10 s instead of aiokafka's 5 minutes.
            metadata_max_age_ms=10_000,
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
            **self._kafka_auth.client_kwargs(),
        )
        consumer.subscribe([self._topic], listener=_Revocations(self))
        await consumer.start()
        while not (self.should_stop or self._stopping()):
            # Never fetch while holding `_taking`: during a rebalance aiokafka's getmany waits for
            # the new assignment, which waits for on_revoked, which waits for `_taking`.
            generation = self._generation
            try:
                take = await self._fetch(consumer)
            except KafkaError as exc:  # e.g. an offset out of range: aiokafka resets it, and says so
                log.warning("reading usage.raw failed (%r); trying again in %.0f s", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if not take:
                continue
            async with self._taking:
                if generation != self._generation:  # a revocation came since the fetch
                    await self._read_again(consumer, take)
                    continue
                handled = await self._take_once(consumer, take)
            if not handled:
                await asyncio.sleep(RETRY_SECONDS)

    async def _adopt_previous_offsets(self) -> None:
        """A meter group with no offsets on the topic starts where `previous_group` committed it."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._kafka_auth.client_kwargs())
        await admin.start()
        try:
            if any(tp.topic == self._topic for tp in await admin.list_consumer_group_offsets(self._group_id)):
                return
            previous = await admin.list_consumer_group_offsets(self._previous_group)
        finally:
            await admin.close()
        offsets = {
            tp: meta.offset for tp, meta in previous.items() if tp.topic == self._topic and meta.offset >= 0
        }
        if not offsets:
            return
        # Kafka takes a commit from outside the group while the group has no member: the first
        # worker up commits them; one later than a member gets an error and follows the group.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            enable_auto_commit=False,
            **self._kafka_auth.client_kwargs(),
        )
        await consumer.start()
        try:
            consumer.assign(list(offsets))
            await consumer.commit(offsets)
        finally:
            await consumer.stop()
        log.warning(
            "the meter group %s starts where %s committed %s: %s",
            self._group_id,
            self._previous_group,
            self._topic,
            {tp.partition: offset for tp, offset in sorted(offsets.items())},
        )

    async def _fetch(
        self, consumer: AIOKafkaConsumer
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """What is fetched already, up to `take` records, plus what arrives within `wait` seconds."""
        take: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
        take = await consumer.getmany(timeout_ms=500, max_records=self._take)
        got = sum(map(len, take.values()))
        if got and got < self._take and self._wait > 0:
            await asyncio.sleep(self._wait)
            more = await consumer.getmany(timeout_ms=0, max_records=self._take - got)
            for tp, records in more.items():
                take[tp] = take.get(tp, []) + records
        return take

    async def _take_once(
        self, consumer: AIOKafkaConsumer, take: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> bool:
        """Handle a take; False if it failed (then its partitions are read again from it)."""
        records = [record for tp in sorted(take) for record in take[tp]]
        try:
            await self._handle(records)
        except Exception:  # a bug or a send refused: nothing of this take counts as handled
            self._metrics["meter_takes|failed"] += 1
            log.exception(
                "the meter failed on a take of %d usage.raw messages; reading them again in %.0f s",
                len(records),
                RETRY_SECONDS,
            )
            for tp, part in take.items():
                if tp in consumer.assignment():
                    consumer.seek(tp, part[0].offset)
            return False
        self._metrics["meter_takes|handled"] += 1
        for tp, part in take.items():
            self._handled[tp] = part[-1].offset + 1
        return True

    async def _read_again(
        self, consumer: AIOKafkaConsumer, take: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        """A take fetched across a revocation is not handled: the partitions of it still assigned
        (the new assignment) go back to their committed offsets, the others are someone else's."""
        for tp, part in take.items():
            if tp not in consumer.assignment():
                continue
            try:
                committed = await consumer.committed(tp)
            except KafkaError:
                committed = None
            consumer.seek(tp, part[0].offset if committed is None else committed)

    @Service.timer(1.0)
    async def _commit_handled(self) -> None:
        await self.commit()

    async def commit(self) -> None:
        """Commit the offsets handled so far, once every record sent up to now is acknowledged.
        A failure (a broker away, the group rebalancing) is logged; the next tick tries again."""
        consumer = self._consumer
        if consumer is None:
            return
        async with self._committing:
            assigned = consumer.assignment()
            offsets = {
                tp: offset
                for tp, offset in self._handled.items()
                if tp in assigned and self._committed.get(tp) != offset
            }
            if not offsets:
                return
            try:
                await self._flush()
                await consumer.commit(offsets)
            except Exception as exc:  # any failure: the offsets stay uncommitted
                self._metrics["meter_commits|failed"] += 1
                log.warning("committing the meter's usage.raw offsets failed (%r); retrying", exc)
                return
            self._committed.update(offsets)
            self._metrics["meter_commits|committed"] += 1

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move: wait for the take being handled, commit it, forget them."""
        async with self._taking:
            self._generation += 1
            await self.commit()
            for tp in revoked:
                self._handled.pop(tp, None)
                self._committed.pop(tp, None)

    async def on_stop(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            await asyncio.wait_for(self.on_revoked(consumer.assignment()), STOP_COMMIT_SECONDS)
        except (TimeoutError, KafkaError) as exc:  # read again after the restart, deduplicated
            log.warning("the meter's last commit did not finish (%r)", exc)
        await consumer.stop()  # leaves the group at once


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka's ABC is untyped
    def __init__(self, owner: MeterInput) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("metering usage.raw partitions %s", sorted(tp.partition for tp in assigned))
