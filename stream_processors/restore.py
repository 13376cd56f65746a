"""Tables restored from their changelog with one bulk read, not Faust's per-record recovery.

Faust recovers an in-memory table by replaying its changelog through its own per-message
machinery: about 190 us of CPU per record here, so 100,000 scopes kept a restarted worker from
enforcing for 30 s. A `RestoredTable` reads its changelog partitions itself when they become
active on this worker (a plain aiokafka getmany loop, a few microseconds per record) and tells
Faust how far it got through the store's `persisted_offset`, the hook Faust's own RocksDB store
uses: Faust's recovery then replays only the records after that offset (none, on a restart).

Guarantees (one writer per scope holds through rebalances):
1. A changelog partition that becomes active here (start, rebalance, a standby promoted) is
   restored from its first record: the keys this store held for that partition are dropped
   first (a standby's copy, or an old one from before the partition left), then the records
   up to the partition's end offset are applied as in offset order, tombstones deleting: only
   each key's last record is decoded (what applying all of them in order leaves).
2. The offset reported to Faust is the last one applied: the end read, then each record this
   worker writes to the partition (acknowledged in order; as active, it is the only writer).
   Records someone wrote after the read (a previous owner's last writes) are replayed by
   Faust's recovery from that offset on, as before.
3. A partition that stops being active here (revoked, or kept only as a standby) loses its
   offset, so it is read in full again if it comes back: its data is never trusted stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.stores.memory import Store as MemoryStore
from faust.tables import TableManager
from faust.types import TP, StoreT

__all__ = ["CHANGELOG_TOPIC_CONFIGS", "PromptTableManager", "RestoredStore", "RestoredTable"]

log = logging.getLogger(__name__)

# Kafka compacts only segments that have rolled, and rolls one at 1 GiB or after 7 days by
# default: a changelog then keeps every update of the week, and a restore reads them all (about
# 10 per scope after 1,000,000 events over 100,000 scopes in bench/restart.py). Rolled every
# minute, the log cleaner leaves at most about two records per key (it cleans once the dirty part
# is half the log) plus the last minute's updates. Set when the changelog is created: an existing
# one keeps its configs (`kafka-configs.sh --alter --entity-type topics --entity-name
# <worker id>-scopes-changelog --add-config segment.ms=60000`).
CHANGELOG_TOPIC_CONFIGS = {"segment.ms": "60000"}


class RestoredStore(MemoryStore):  # type: ignore[type-arg]
    """Faust's in-memory store, filled from the changelog by a bulk read on assignment."""

    table: RestoredTable

    def __post_init__(self) -> None:
        super().__post_init__()
        self.restored: dict[TP, int] = {}  # active changelog partition -> last offset in `data`

    def persisted_offset(self, tp: TP) -> int | None:
        """Where Faust's recovery resumes: the last offset applied here (None: replay it all)."""
        return self.restored.get(tp)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Faust calls this as each record this worker wrote to the changelog is acknowledged."""
        if tp in self.restored and offset > self.restored[tp]:
            self.restored[tp] = offset

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        """Before Faust's recovery starts: restore the partitions newly active here."""
        topic = self.table.changelog_topic_name
        actives = {tp for tp in self.app.assignor.assigned_actives() if tp.topic == topic}
        for tp in set(self.restored) - actives:
            del self.restored[tp]
        if missing := actives - self.restored.keys():
            await self.restore(missing)

    async def restore(self, tps: Iterable[TP]) -> int:
        """Replace this store's keys of `tps` with their changelog, up to the end offsets; returns
        the number of records read."""
        tps = sorted(tps)
        started = time.monotonic()
        partitions = {tp.partition for tp in tps}
        for key in [k for k, p in self._key_partition.items() if p in partitions]:
            self.data.pop(key, None)
            del self._key_partition[key]
        records = 0
        consumer = self.table.changelog_consumer()
        await consumer.start()
        try:
            wanted = [TopicPartition(tp.topic, tp.partition) for tp in tps]
            consumer.assign(wanted)
            ends: dict[TopicPartition, int] = await consumer.end_offsets(wanted)
            firsts: dict[TopicPartition, int] = await consumer.beginning_offsets(wanted)
            left = {tp for tp in wanted if firsts[tp] < ends[tp]}
            for tp in left:
                consumer.seek(tp, firsts[tp])
            # A scope's changelog holds a record per update (compaction only reaches rolled
            # segments): keep each key's last record, in the order of last writes, and decode only
            # those, once the partitions are read.
            latest: dict[tuple[int, bytes | None], bytes | None] = {}
            while left:
                fetched = await consumer.getmany(*left, timeout_ms=500)
                for tp, messages in fetched.items():
                    for m in messages:
                        if m.offset >= ends[tp]:
                            break  # written after the end was read: Faust's recovery replays it
                        raw = (tp.partition, m.key)
                        latest.pop(raw, None)
                        latest[raw] = m.value
                        records += 1
                for tp in list(left):
                    if await consumer.position(tp) >= ends[tp]:
                        left.discard(tp)
        finally:
            await consumer.stop()
        decode_key, decode_value = self._decode_key, self._decode_value
        data, key_partition = self.data, self._key_partition
        for (partition, raw_key), raw_value in latest.items():
            key = decode_key(raw_key)
            if raw_value is None:
                data.pop(key, None)
                key_partition.pop(key, None)
            else:
                data[key] = decode_value(raw_value)
                key_partition[key] = partition
        for tp in tps:
            self.restored[tp] = ends[TopicPartition(tp.topic, tp.partition)] - 1
        log.info(
            "%s: restored %d changelog records of partitions %s in %.0f ms",
            self.table.name,
            records,
            sorted(partitions),
            (time.monotonic() - started) * 1_000,
        )
        return records


class RestoredTable(faust.Table):  # type: ignore[type-arg]  # faust.Table is generic in its stubs only
    """A `faust.Table` on a `RestoredStore`, its changelog created with CHANGELOG_TOPIC_CONFIGS.
    `changelog_consumer` makes a fresh, unstarted AIOKafkaConsumer (no group) with the worker's
    Kafka connection settings."""

    def __init__(
        self, app: faust.App, *, changelog_consumer: Callable[[], AIOKafkaConsumer], **kwargs: Any
    ) -> None:
        kwargs["extra_topic_configs"] = {**CHANGELOG_TOPIC_CONFIGS, **kwargs.get("extra_topic_configs", {})}
        super().__init__(app, **kwargs)
        self.changelog_consumer = changelog_consumer

    def _new_store(self) -> StoreT[Any, Any]:
        return RestoredStore(
            "memory://",
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )


class PromptTableManager(TableManager):
    """Faust's table manager without the second it sleeps when it starts (for tables added
    after the app started, which Faust then refuses anyway: "Too late to add tables"). Every
    table of the worker is added as the app is built, and the sleep held up every start: the
    subscription, and so the partitions' assignment and the recovery, waited for it."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()
