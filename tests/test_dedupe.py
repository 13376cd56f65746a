"""Event-id dedupe (stream_processors/dedupe.py): against a plain set, at the horizon, in the meter."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import given, settings
from hypothesis import strategies as st

from producers import build_event
from spendstream.wire import default_codec
from stream_processors.dedupe import SeenIds, event_key, reload_seen
from stream_processors.meter import MeterBatch, MeterStage
from stream_processors.pricing import Catalogue

CODEC = default_codec()
HOUR = 3_600_000_000
NOW = int(datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()) * 1_000_000


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5 * HOUR), st.lists(st.integers(0, 40), max_size=30)),
        max_size=40,
    )
)
def test_first_seen_matches_a_set_within_the_horizon(batches: list[tuple[int, list[int]]]) -> None:
    """Every key is fresh exactly once while it is younger than the horizon, whatever the batching."""
    seen = SeenIds(HOUR)
    last: dict[int, int] = {}  # key -> arrival of the copy that counted
    t = 0
    for step, keys in batches:
        t += step // 40  # arrivals move forward, sometimes by more than the horizon
        fresh = seen.first_seen(np.array(keys, dtype=np.uint64), t)
        for i, key in enumerate(keys):
            counted_recently = key in last and t - last[key] <= HOUR
            first_in_batch = keys.index(key) == i
            if counted_recently or not first_in_batch:
                assert not fresh[i], (key, t, last.get(key))  # a copy within the horizon: never twice
            elif key not in last:
                assert fresh[i], (key, t)  # never seen: always counted
            if fresh[i]:
                last[key] = t


def test_memory_is_eight_bytes_per_id_and_pruned_after_the_horizon() -> None:
    seen = SeenIds(HOUR)
    rng = np.random.default_rng(1)
    for minute in range(60):
        keys = rng.integers(0, 2**63, 10_000, dtype=np.uint64)
        assert seen.first_seen(keys, minute * 60_000_000).all()
    assert len(seen) == 600_000
    assert seen.nbytes == 600_000 * 8
    seen.first_seen(np.array([1], dtype=np.uint64), 3 * HOUR)  # two hours later: all pruned
    assert len(seen) == 1


def test_event_key_ignores_dashes_and_case_but_not_the_project() -> None:
    uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert event_key("a", uid) == event_key("a", uid.replace("-", "").upper())
    assert event_key("a", uid) != event_key("b", uid)


def ev(**kw: object) -> dict[str, object]:
    return build_event(
        service="s",
        project="a",
        provider="openai",
        model="gpt-4o",
        input_tokens=1000,
        output_tokens=100,
        event_time=datetime.fromtimestamp(NOW / 1e6 - 60, UTC),
        **kw,  # type: ignore[arg-type]
    )


def test_the_meter_counts_each_event_id_once_in_budgets() -> None:
    """Copies in one message, in later messages and in another partition's batch move no budget."""
    stage = MeterStage(Catalogue.load(fallback="none"), CODEC)
    events = [ev() for _ in range(5)]
    first = stage.process_many([(0, b"a", CODEC.encode("UsageBatch", {"events": events + events[:2]}))], NOW)[
        0
    ]
    assert (len(first.priced), first.statuses["duplicate"]) == (5, 2)
    again = stage.process_many(
        [
            (0, b"a", CODEC.encode("UsageBatch", {"events": events[2:]})),
            (0, b"a", CODEC.encode("UsageEvent", events[0])),
        ],
        NOW + 1_000_000,
    )
    assert [r.priced for r in again] == [[], []]
    assert sum(r.statuses["duplicate"] for r in again) == 4
    one = first.priced[0]["cost_pico_usd"]
    assert first.spend[("project:a", (NOW - 60_000_000) // 60_000_000)] == [5 * one, 5]
    batch = MeterBatch(4)
    batch.add(first, 0, 17)
    [(partition, record)] = batch.seen_records()
    assert partition == 0
    assert np.frombuffer(record["offsets"], "<i8").tolist() == [17] * 5
    assert sorted(np.frombuffer(record["ids"], "<u8").tolist()) == sorted(
        event_key("a", str(e["event_id"])) for e in events
    )


def test_an_event_older_than_the_horizon_is_stored_but_moves_no_budget() -> None:
    stage = MeterStage(Catalogue.load(fallback="none"), CODEC, dedupe_horizon_us=HOUR)
    old = ev()
    result = stage.process(b"a", CODEC.encode("UsageEvent", old), NOW + 2 * HOUR)
    assert [p["usage"]["event_id"] for p in result.priced] == [old["event_id"]]
    assert (result.spend, result.unbudgeted, result.seen) == ({}, 1, [])


@pytest.mark.integration
def test_a_reload_keeps_the_ids_counted_before_the_offset_in_the_slices_they_arrived_in(kafka: str) -> None:
    """80 usage.seen records of 50 ids (10 past the horizon, the rest over 23 minutes, copies of
    the record before in some) re-loaded up to usage.raw offset 302: the ids of messages before
    it are known, once each, each in the slice it arrived in; the others are not."""
    topic = f"t{uuid.uuid4().hex[:8]}.usage.seen"
    now_ms = time.time_ns() // 1_000_000
    rng = np.random.default_rng(14)
    # (arrival ms, usage.raw offsets, ids) of each record
    records: list[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.uint64]]] = []
    for i in range(80):  # record i: the ids of usage.raw offsets 4i .. 4i+3
        at_ms = now_ms - (90 * 60_000 if i < 10 else 30 * 60_000 - i * 20_000)
        offsets = np.repeat(np.arange(4 * i, 4 * i + 4, dtype=np.int64), [12, 13, 12, 13])
        ids = rng.integers(0, 2**63, 50, dtype=np.uint64)
        if i % 7 == 3:
            ids[:5] = records[-1][2][:5]  # re-delivered copies of 5 ids of the record before
        records.append((at_ms, offsets, ids))

    async def run(seen: SeenIds) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        try:
            for at_ms, offsets, ids in records:
                record = {"source_partition": 0, "offsets": offsets.tobytes(), "ids": ids.tobytes()}
                await producer.send(topic, CODEC.encode("SeenIds", record), key=b"0", timestamp_ms=at_ms)
            await producer.flush()
        finally:
            await producer.stop()
        return await reload_seen(kafka, topic, 0, 302, seen, CODEC)

    seen = SeenIds(HOUR)
    loaded = asyncio.run(run(seen))
    arrived: dict[int, int] = {}  # kept id -> the slice of its latest arrival
    for at_ms, offsets, ids in records[10:]:
        for key in ids[offsets < 302]:
            arrived[int(key)] = at_ms * 1_000 // seen.slice_us
    # records 10-74 whole, 25 ids of record 75 (offsets 300, 301), less 9 records' 5 copies
    # (record 10's are of record 9, past the horizon)
    assert loaded == len(seen) == len(arrived) == 65 * 50 + 25 - 9 * 5
    every = np.array(sorted({int(k) for _, _, ids in records for k in ids}), dtype=np.uint64)
    fresh = seen.first_seen(every, now_ms * 1_000)
    assert {int(k) for k in every[~fresh]} == set(arrived)
    # an hour after record 10's slice ended, that slice is pruned and only its ids are new again
    later = (arrived[int(records[10][2][0])] + 1) * seen.slice_us + HOUR
    seen.add(np.empty(0, dtype=np.uint64), later)
    kept = np.array(sorted(arrived), dtype=np.uint64)
    pruned = {int(k) for k in kept[seen.first_seen(kept, later)]}
    assert pruned == {k for k, s in arrived.items() if s < later // seen.slice_us - 12}
    assert 0 < len(pruned) < len(arrived)
