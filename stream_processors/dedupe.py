"""Event-id dedupe: an event re-sent with the same event_id moves budgets once.

    usage.raw --meter--> spend.deltas         (only events whose id was not seen before)
                    \\--> usage.seen           (the ids it counted, per usage.raw partition)

Emitters deliver at least once: a retry after a lost acknowledgement, a re-created producer after
an outage, a spool replayed after a restart, or a client's own retry all send an event again with
the same `event_id`. ClickHouse collapses such copies (ReplacingMergeTree on event_id); the spend
tables must not count them either, or budgets block on money never spent.

Guarantee (the dedupe horizon H, `SPENDSTREAM_DEDUPE_HORIZON_SECONDS`, default 6 hours):
1. An event whose event time is within H of the meter's clock moves budgets exactly once, however
   many copies arrive, across meter restarts, rebalances and re-deliveries.
2. An event older than H is priced and stored (ClickHouse still dedupes it) but moves no budget:
   its first copy may have arrived more than H ago and been forgotten, so counting it could count
   it twice. The meter counts such events (`events{pricing_status="beyond_dedupe_horizon"}`).
   Why that is safe: a copy arrives after its event time, so two copies of an event younger than H
   arrive within H of each other.

Where the ids live: per usage.raw partition (key = project, so every copy of an event meets the
same partition), 8 bytes per id (a 64-bit key of project and event_id) in sorted numpy blocks, one block per H/12 of arrival time, pruned
when it is older than H: about 8 MB per million ids (plus the blocks of the current slice while it
fills). The ids the meter counts are also written to `usage.seen` (16 bytes each: id and source
offset; retention H + 1 hour), and a partition the meter starts reading at an offset other than the
one it last handled (start, rebalance, re-seek) is re-loaded from there first, keeping only the ids
of usage.raw messages before that offset: messages from it on are read again, and their ids are
counted again as they come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import lru_cache
from hashlib import blake2b
from itertools import repeat

import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, TopicPartition

from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.wire import Codec

__all__ = ["SeenIds", "event_key", "event_keys", "reload_seen"]

log = logging.getLogger(__name__)

Ids = npt.NDArray[np.uint64]
_U64 = (1 << 64) - 1


def event_key(project: str, event_id: str) -> int:
    """The 64-bit dedupe key of an event: its UUID's two halves folded, mixed with the project.

    The project is part of the key, so an id reused in another project is not taken for a copy.
    (A fold, not a cryptographic hash: a writer could craft an id colliding with one it knows,
    but an event already counted cannot be un-counted, and a future event's random id is unknown.)
    """
    x = int(event_id.replace("-", ""), 16)
    return (x ^ (x >> 64) ^ _project_hash(project)) & _U64


def event_keys(projects: Sequence[str], event_ids: Sequence[str]) -> Ids:
    """`event_key` of each (project, event_id) pair, computed at once (a fraction of the CPU per
    event). Each id must be a UUID as `usage_problem` accepts it: 32 hex digits, dashes optional."""
    digits = list(map(str.replace, event_ids, repeat("-"), repeat("")))
    if digits and set(map(len, digits)) != {32}:  # not all UUIDs: a caller's bug, but every key right
        return np.fromiter(map(event_key, projects, event_ids), dtype=np.uint64, count=len(event_ids))
    halves = np.frombuffer(bytes.fromhex("".join(digits)), dtype=">u8").reshape(-1, 2)  # x >> 64, x & _U64
    hashes = np.fromiter(map(_project_hash, projects), dtype=np.uint64, count=len(projects))
    keys: Ids = halves[:, 0] ^ halves[:, 1] ^ hashes
    return keys


@lru_cache(maxsize=65536)
def _project_hash(project: str) -> int:
    return int.from_bytes(blake2b(project.encode(), digest_size=8).digest(), "little")


class SeenIds:
    """The event keys one usage.raw partition counted within the horizon (no Kafka, no clock)."""

    def __init__(self, horizon_us: int) -> None:
        self.horizon_us = horizon_us
        self.slice_us = max(horizon_us // 12, 1)
        self._closed: list[tuple[int, Ids]] = []  # (slice, sorted keys), oldest first
        self._open: list[Ids] = []  # sorted runs of the current slice
        self._slice: int | None = None

    def __len__(self) -> int:
        return sum(len(a) for _, a in self._closed) + sum(len(a) for a in self._open)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self._closed) + sum(a.nbytes for a in self._open)

    def _arrays(self) -> list[Ids]:
        return [a for _, a in self._closed] + self._open

    def first_seen(self, keys: Ids, now_us: int) -> npt.NDArray[np.bool_]:
        """True for each key seen neither before nor earlier in `keys`; those are remembered."""
        fresh = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return fresh
        unique, first = np.unique(keys, return_index=True)
        new = np.ones(len(unique), dtype=bool)
        for seen in self._arrays():
            at = np.searchsorted(seen, unique)
            at[at == len(seen)] = 0
            new &= seen[at] != unique
        fresh[first[new]] = True
        self.add(unique[new], now_us)
        return fresh

    def add(self, keys: Ids, at_us: int) -> None:
        """Remember sorted, unique `keys` as seen at `at_us` (arrival time), pruning what is past H."""
        current = at_us // self.slice_us
        if self._slice is None or current > self._slice:
            self._close()
            self._slice = current
        if len(keys):
            # Runs of the current slice, each at least twice the next (a binary counter): a key
            # is merged O(log n) times and a lookup checks O(log n) runs.
            runs = self._open
            runs.append(keys)
            while len(runs) > 1 and 2 * len(runs[-1]) >= len(runs[-2]):
                newer = runs.pop()
                runs[-1] = _merge(runs[-1], newer)
        oldest = (at_us - self.horizon_us) // self.slice_us
        if self._closed and self._closed[0][0] < oldest:
            self._closed = [(s, a) for s, a in self._closed if s >= oldest]

    def _close(self) -> None:
        if self._open and self._slice is not None:
            merged = self._open[0]
            for run in self._open[1:]:
                merged = _merge(merged, run)
            self._closed.append((self._slice, merged))
        self._open = []


def _merge(a: Ids, b: Ids) -> Ids:
    merged = np.concatenate((a, b))
    merged.sort(kind="stable")  # radix sort for integers: linear
    return merged


async def reload_seen(
    bootstrap: str,
    topic: str,
    partition: int,
    before_offset: int,
    seen: SeenIds,
    codec: Codec,
    kafka_auth: KafkaAuth = PLAINTEXT,
) -> int:
    """Fill `seen` from usage.seen: the ids counted from usage.raw `partition` within the horizon,
    from messages before `before_offset` (those after it will be read, and counted, again).
    Returns the number of ids loaded."""
    started = time.monotonic()
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        **kafka_auth.client_kwargs(),
    )
    await consumer.start()
    loaded = 0
    try:
        consumer.assign([tp])
        since_ms = (time.time_ns() // 1_000 - seen.horizon_us) // 1_000
        found = (await consumer.offsets_for_times({tp: since_ms}))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if found is None:
            return 0
        consumer.seek(tp, found.offset)
        # Every id once, in the slice of its latest arrival (an id is written again when a message
        # is re-read), each slice added whole in arrival order: one sort for the lot, not a merge
        # per message.
        keys_read: list[Ids] = []
        slices_read: list[npt.NDArray[np.int64]] = []
        while await consumer.position(tp) < end:
            for msg in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                _, record = codec.decode(msg.value)
                offsets = np.frombuffer(record["offsets"], dtype="<i8")
                keys = np.frombuffer(record["ids"], dtype="<u8").astype(np.uint64)[offsets < before_offset]
                keys_read.append(keys)
                slices_read.append(np.full(len(keys), msg.timestamp * 1_000 // seen.slice_us, dtype=np.int64))
        if keys_read:
            keys, slices = np.concatenate(keys_read), np.concatenate(slices_read)
            order = np.lexsort((-slices, keys))  # by key, its latest slice first
            keys, slices = keys[order], slices[order]
            first = np.ones(len(keys), dtype=bool)
            first[1:] = keys[1:] != keys[:-1]
            keys, slices = keys[first], slices[first]
            for slice_ in np.unique(slices):  # ascending: the horizon prunes as it goes
                seen.add(keys[slices == slice_], int(slice_) * seen.slice_us)  # sorted: keys are
            loaded = len(keys)
    finally:
        await consumer.stop()
    log.info(
        "dedupe: partition %d re-loaded %d event ids counted before offset %d (%.0f ms)",
        partition,
        loaded,
        before_offset,
        (time.monotonic() - started) * 1_000,
    )
    return loaded
