"""Event-id dedupe (stream_processors/dedupe.py): against a plain set, at the horizon, in the meter."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from producers import build_event
from spendstream.wire import default_codec
from stream_processors.dedupe import SeenIds, event_key
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
