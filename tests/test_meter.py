"""The meter stage on real Avro bytes: pricing, window deltas, dead letters, re-keying."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from producers import build_event
from spendstream.usage import KEY_TAG, METERS
from spendstream.wire import default_codec
from stream_processors.meter import MeterBatch, MeterStage
from stream_processors.pricing import Catalogue
from stream_processors.sink import usage_row
from tests.test_emitter_validation import NO_USAGE

CODEC = default_codec()
STAGE = MeterStage(Catalogue.load(fallback="none"), CODEC)
NOW = int(datetime(2026, 12, 1, 0, 30, tzinfo=UTC).timestamp()) * 1_000_000  # the meter's clock


def ev(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "service": "s",
        "project": "a",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 100,
        "event_time": datetime.fromtimestamp(NOW / 1e6 - 60, UTC),
    }
    return build_event(**{**base, **kw})


def test_batch_is_priced_and_spend_split_by_window() -> None:

    e1 = ev(event_time=datetime(2026, 11, 30, 23, 59, tzinfo=UTC))
    e2 = ev(event_time=datetime(2026, 12, 1, 0, 0, tzinfo=UTC), model="gpt-4o-mini")
    result = STAGE.process(b"a", CODEC.encode("UsageBatch", {"events": [e1, e2]}), NOW)
    assert result.project == "a"
    assert [p["cost_pico_usd"] for p in result.priced] == [3_500_000_000, 210_000_000]
    assert [p["price_card"] for p in result.priced] == [
        "openai/gpt-4o@2024-10-02",
        "openai/gpt-4o-mini@2024-07-18",
    ]
    assert [p["pricing_status"] for p in result.priced] == ["priced", "priced"]
    assert result.priced[0]["itemised"] == {"input": 2_500_000_000, "output": 1_000_000_000}
    m1 = e1["event_time"] // 60_000_000
    m2 = e2["event_time"] // 60_000_000
    assert result.spend == {  # every scope the events count against, per minute of event time
        ("org", m1): [3_500_000_000, 1],
        ("project:a", m1): [3_500_000_000, 1],
        ("org", m2): [210_000_000, 1],
        ("project:a", m2): [210_000_000, 1],
    }
    assert result.dead == []
    assert result.rekey == []


def test_garbage_is_dead_lettered_as_undecodable() -> None:
    result = STAGE.process(b"a", b"\x00garbage", NOW)
    assert [(d.reason, d.payload) for d in result.dead] == [("undecodable", b"\x00garbage")]
    assert result.priced == []


def test_schema_valid_but_invalid_event_is_dead_lettered_alone() -> None:
    bad = {**ev(), "output_tokens": -5}
    good = ev()
    result = STAGE.process(b"a", CODEC.encode("UsageBatch", {"events": [bad, good]}), NOW)
    assert [(d.reason, d.detail) for d in result.dead] == [
        ("invalid_event", "output_tokens is negative (-5)")
    ]
    assert CODEC.decode(result.dead[0].payload) == ("UsageEvent", bad)
    assert [p["usage"]["event_id"] for p in result.priced] == [good["event_id"]]


def test_unknown_model_is_stored_unpriced_never_zero() -> None:
    result = STAGE.process(b"a", CODEC.encode("UsageEvent", ev(model="gpt-9")), NOW)
    assert result.dead == []
    [priced] = result.priced
    assert (priced["pricing_status"], priced["cost_pico_usd"], priced["price_card"]) == ("unpriced", None, "")
    assert "gpt-9" in priced["unpriced_reason"]
    assert not result.spend  # unknown moves no budget without a fallback ...
    assert result.statuses == {"unpriced": 1}


def test_unknown_model_with_fallback_moves_the_budget() -> None:
    stage = MeterStage(Catalogue.load(fallback="openai/gpt-4o@2024-10-02"), CODEC)
    result = stage.process(b"a", CODEC.encode("UsageEvent", ev(model="gpt-9")), NOW)
    [priced] = result.priced
    assert (priced["pricing_status"], priced["cost_pico_usd"]) == ("fallback", 3_500_000_000)
    assert sorted(result.spend.values()) == [[3_500_000_000, 1], [3_500_000_000, 1]]  # ... with one it does


def test_spend_is_split_by_team_user_and_model_filter_scopes() -> None:
    budgeted = {"team:t", "user:u1", "user:u2", "project:a/model:gpt-4o*"}
    stage = MeterStage(Catalogue.load(fallback="none"), CODEC, {"a": ["gpt-4o*", "claude-*"]}, budgeted)
    events = [ev(team="t", user="u1"), ev(team="t", user="u2"), ev(team="t", user="u1", model="gpt-4o-mini")]
    for e in events:
        e["event_time"] = events[0]["event_time"]
    result = stage.process(b"a", CODEC.encode("UsageBatch", {"events": events}), NOW)
    by_scope = {scope: v for (scope, _), v in result.spend.items()}
    assert by_scope == {
        "org": [7_210_000_000, 3],
        "project:a": [7_210_000_000, 3],
        "team:t": [7_210_000_000, 3],
        "user:u1": [3_710_000_000, 2],
        "user:u2": [3_500_000_000, 1],
        "project:a/model:gpt-4o*": [7_210_000_000, 3],
    }
    unbudgeted = MeterStage(Catalogue.load(fallback="none"), CODEC).process(
        b"a", CODEC.encode("UsageBatch", {"events": events}), NOW
    )
    assert {scope for scope, _ in unbudgeted.spend} == {"org", "project:a"}  # no fan-out without budgets


def test_wrong_schema_on_usage_raw() -> None:
    signal = {
        "scope": "project:a",
        "state": "ok",
        "reason": "x",
        "window": "day:x",
        "window_start": 0,
        "window_end": 1,
        "spend_pico_usd": 0,
        "limit_pico_usd": 1,
        "decided_at": 0,
        "sequence": 1,
    }
    result = STAGE.process(b"a", CODEC.encode("ControlSignal", signal), NOW)
    assert [d.reason for d in result.dead] == ["wrong_schema"]


def test_event_under_another_key_is_forwarded_to_its_owner() -> None:
    e = ev(project="b")
    result = STAGE.process(None, CODEC.encode("UsageEvent", e), NOW)
    assert result.priced == []
    assert [(p, CODEC.decode(b)[1]["event_id"]) for p, b in result.rekey] == [("b", e["event_id"])]


def test_a_take_of_messages_is_coalesced_per_project_and_per_owning_partition() -> None:
    from stream_processors.meter import PRICED_BATCH_EVENTS, MeterBatch, partition_for

    batch = MeterBatch(partitions=4)
    sources = [("a", 0, 10), ("b", 1, 7), ("a", 0, 11)]  # (project, usage.raw partition, offset)
    for project, partition, offset in sources:
        events = [ev(project=project, event_time=datetime.fromtimestamp(NOW / 1e6, UTC)) for _ in range(3)]
        result = STAGE.process(project.encode(), CODEC.encode("UsageBatch", {"events": events}), NOW)
        batch.add(result, partition, offset)
    # one PricedBatch per project, carrying each usage.raw message whole with its prices
    assert {p: [len(s["prices"]) for s in ss] for p, ss in batch.priced.items()} == {"a": [3, 3], "b": [3]}
    deltas = [d for ds in batch.deltas.values() for d in ds]
    assert all(partition_for(d["scope"], 4) == owner for owner, ds in batch.deltas.items() for d in ds)
    # every delta remembers the usage.raw message it came from: re-delivery stays exactly-once
    assert sorted((d["scope"], d["source_partition"], d["source_offset"]) for d in deltas) == sorted(
        [
            ("org", 0, 10),
            ("project:a", 0, 10),
            ("org", 1, 7),
            ("project:b", 1, 7),
            ("org", 0, 11),
            ("project:a", 0, 11),
        ]
    )
    one_event_cost = batch.priced["a"][0]["prices"][0]["cost_pico_usd"]
    assert {d["pico_usd"] for d in deltas} == {3 * one_event_cost}
    encoded = CODEC.encode("SpendDeltaBatch", {"deltas": deltas})
    assert CODEC.decode(encoded)[1]["deltas"] == deltas

    # whole sources per message, cut before the one that would pass PRICED_BATCH_EVENTS events
    big = MeterBatch(partitions=4)
    sizes = [PRICED_BATCH_EVENTS // 2, PRICED_BATCH_EVENTS // 2, 1, PRICED_BATCH_EVENTS + 1, 3]
    big.priced["a"] = [{"prices": [{}] * n} for n in sizes]
    assert [[len(s["prices"]) for s in ss] for _, ss in big.priced_batches()] == [
        sizes[:2],
        [1],
        [PRICED_BATCH_EVENTS + 1],
        [3],
    ]


def test_partition_for_is_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from stream_processors.meter import partition_for

    for key in ["org", "project:a", "team:x", "user:émile", "project:p/model:gpt-4*"]:
        assert partition_for(key, 4) == DefaultPartitioner()(key.encode(), [0, 1, 2, 3], [0, 1, 2, 3])


def test_spend_deltas_are_cut_between_source_messages_never_inside_one() -> None:
    from stream_processors import meter

    batch = MeterBatch(partitions=1)
    events = [ev(event_time=datetime.fromtimestamp(NOW / 1e6 - 60 * i, UTC)) for i in range(30)]
    for offset in range(4):  # 4 messages of 30 minutes x 2 scopes: 60 deltas each
        result = MeterStage(Catalogue.load(fallback="none"), CODEC).process(
            b"a", CODEC.encode("UsageBatch", {"events": events}), NOW
        )
        batch.add(result, 0, offset)
    old, meter.MAX_DELTAS_PER_MESSAGE = meter.MAX_DELTAS_PER_MESSAGE, 130
    try:
        cut = batch.delta_batches()
    finally:
        meter.MAX_DELTAS_PER_MESSAGE = old
    assert [len(deltas) for _, deltas in cut] == [120, 120]  # two whole messages each, under 130
    assert [sorted({d["source_offset"] for d in deltas}) for _, deltas in cut] == [[0, 1], [2, 3]]


def test_an_event_that_spreads_a_message_over_too_many_minutes_is_dead_lettered_alone() -> None:
    from stream_processors import meter

    events = [ev(event_time=datetime.fromtimestamp(NOW / 1e6 - 60 * i, UTC)) for i in range(10)]
    old, meter.MAX_DELTAS_PER_MESSAGE = meter.MAX_DELTAS_PER_MESSAGE, 12  # 2 scopes per minute
    try:
        result = MeterStage(Catalogue.load(fallback="none"), CODEC).process(
            b"a", CODEC.encode("UsageBatch", {"events": [*events, events[0]]}), NOW
        )
    finally:
        meter.MAX_DELTAS_PER_MESSAGE = old
    assert len(result.priced) == 6  # six minutes fit; a copy of the first is skipped as a copy
    assert [d.reason for d in result.dead] == ["too_many_windows"] * 4
    assert len(result.spend) == 12


def only(model: str, provider: str = "openai", **meters: Any) -> dict[str, Any]:
    """An event that sets nothing but `meters`: every other meter is left to its default of 0."""
    return build_event(
        service="s",
        project="a",
        provider=provider,
        model=model,
        event_time=datetime.fromtimestamp(NOW / 1e6 - 60, UTC),
        **meters,
    )


def test_an_event_with_one_meter_is_priced_exactly() -> None:
    events = [
        only("whisper-1", audio_seconds="90.5"),  # $0.0001 per second
        only("tts-1", characters=1000),  # $15 per 1M characters
        only("text-embedding-3-small", input_tokens=1000),  # $0.02 per 1M tokens
        only("dall-e-3", images=2, image_size="1024x1024", image_quality="standard"),  # $0.04 each
        only("rerank-v3.5", provider="cohere", requests=3),  # $0.002 per search
    ]
    result = STAGE.process(b"a", CODEC.encode("UsageBatch", {"events": events}), NOW)
    assert result.dead == []
    assert [(p["pricing_status"], p["cost_pico_usd"], p["itemised"]) for p in result.priced] == [
        ("priced", 9_050_000_000, {"audio_seconds": 9_050_000_000}),
        ("priced", 15_000_000_000, {"characters": 15_000_000_000}),
        ("priced", 20_000_000, {"input": 20_000_000}),
        ("priced", 80_000_000_000, {"images": 80_000_000_000}),
        ("priced", 6_000_000_000, {"requests": 6_000_000_000}),
    ]
    assert result.spend[("project:a", NOW // 60_000_000 - 1)] == [110_070_000_000, 5]  # the sum, exact


def test_a_reported_event_without_usage_is_dead_lettered_and_a_missing_one_is_priced() -> None:
    base = {k: v for k, v in only("gpt-4o", input_tokens=1).items() if k != "input_tokens"}
    missing = {**base, "event_id": "00000000-0000-4000-8000-000000000002", "usage_source": "missing"}
    result = STAGE.process(b"a", CODEC.encode("UsageBatch", {"events": [base, missing]}), NOW)
    assert [(d.reason, d.detail) for d in result.dead] == [("invalid_event", NO_USAGE)]
    assert CODEC.decode(result.dead[0].payload)[1]["input_tokens"] == 0
    # unknown usage is flagged as such, never passed off as a free call
    assert [(p["usage"]["event_id"], p["usage"]["usage_source"]) for p in result.priced] == [
        (missing["event_id"], "missing")
    ]


def test_an_old_writers_explicit_zeros_and_a_new_event_without_them_price_and_store_identically() -> None:
    """tests/golden/UsageEvent.v2.bin: whisper-1, 90.5 s, written by the v2 schema (tokens required)."""
    old_bytes = (Path(__file__).parent / "golden" / "UsageEvent.v2.bin").read_bytes()
    assert old_bytes[2:10] != CODEC.fingerprint("UsageEvent")  # really an older writer
    _, old = CODEC.decode(old_bytes)
    new = {k: v for k, v in old.items() if not (k in METERS and k != "audio_seconds")}
    assert {"input_tokens", "output_tokens"}.isdisjoint(new)
    rows = []
    for data in (old_bytes, CODEC.encode("UsageEvent", new)):
        result = STAGE.process(b"voice", data, NOW)
        assert result.dead == []
        [priced] = result.priced
        assert (priced["cost_pico_usd"], priced["price_card"]) == (
            9_050_000_000,
            "openai/whisper-1@2023-03-01",
        )
        rows.append(usage_row(CODEC.decode(CODEC.encode("PricedUsage", priced))[1]))
    assert rows[0] == rows[1]
    assert rows[0][8:13] == (0, 0, 0, 0, 0)  # input, cached, cache write, output, reasoning tokens


def test_templates_fan_out_to_every_member_and_the_gateway_key_is_a_scope() -> None:
    """`user:*` / `key:*` track every member; a single `key:k2` budget tracks that key alone."""
    events = [
        ev(team="t", user="u1", tags={KEY_TAG: "k1"}),
        ev(team="t", user="u2", tags={KEY_TAG: "k2"}),
        ev(team="t", user="u1", tags={KEY_TAG: "k1"}),
    ]
    for e in events:
        e["event_time"] = events[0]["event_time"]
    message = CODEC.encode("UsageBatch", {"events": events})
    templated = MeterStage(Catalogue.load(fallback="none"), CODEC, {}, {"user:*", "key:*"})
    by_scope = {scope: v for (scope, _), v in templated.process(b"a", message, NOW).spend.items()}
    assert by_scope == {
        "org": [10_500_000_000, 3],
        "project:a": [10_500_000_000, 3],
        "user:u1": [7_000_000_000, 2],
        "user:u2": [3_500_000_000, 1],
        "key:k1": [7_000_000_000, 2],
        "key:k2": [3_500_000_000, 1],
    }
    one_key = MeterStage(Catalogue.load(fallback="none"), CODEC, {}, {"key:k2"})
    assert {s for s, _ in one_key.process(b"a", message, NOW).spend} == {"org", "project:a", "key:k2"}


def test_a_cache_hit_costs_nothing_moves_no_budget_and_records_its_list_price_as_saved() -> None:
    hit, call = ev(usage_source="cache"), ev()
    result = STAGE.process(b"a", CODEC.encode("UsageBatch", {"events": [hit, call]}), NOW)
    [cached, paid] = result.priced
    assert (cached["cost_pico_usd"], cached["saved_pico_usd"], cached["itemised"]) == (0, 3_500_000_000, {})
    assert (cached["pricing_status"], cached["price_card"]) == ("priced", "openai/gpt-4o@2024-10-02")
    assert (paid["cost_pico_usd"], paid["saved_pico_usd"]) == (3_500_000_000, 0)
    assert {scope: v for (scope, _), v in result.spend.items()} == {  # the hit moves no budget
        "org": [3_500_000_000, 1],
        "project:a": [3_500_000_000, 1],
    }
    unknown = STAGE.process(b"a", CODEC.encode("UsageEvent", ev(usage_source="cache", model="gpt-9")), NOW)
    assert [(p["cost_pico_usd"], p["saved_pico_usd"], p["pricing_status"]) for p in unknown.priced] == [
        (0, 0, "unpriced")  # free is known; what it saved is not
    ]
    row = usage_row(CODEC.decode(CODEC.encode("PricedUsage", cached))[1])
    assert row[14:15] + row[-2:] == (Decimal(0), "cache", Decimal("0.0035"))  # cost_usd, source, saved_usd


def test_a_priced_batch_carries_the_usage_message_as_sent_and_reads_back_as_priced_usage() -> None:
    """v5: each event is decoded once and never re-encoded; priced_events gives the records a v4
    PricedBatch held (the sink's rows are the same either way), duplicates and dead events left out."""
    from spendstream.priced import priced_events

    good, bad, other = ev(), {**ev(), "output_tokens": -1}, ev(project="b")
    value = CODEC.encode("UsageBatch", {"events": [good, bad, other, good, ev(model="gpt-4o-mini")]})
    result = STAGE.process(b"a", value, NOW, partition=3)
    batch = MeterBatch(partitions=4)
    batch.add(result, 3, 0)
    [(project, sources)] = batch.priced_batches()
    assert project == "a"
    assert [s["usage"] for s in sources] == [value]
    assert [p["index"] for p in sources[0]["prices"]] == [0, 4]  # bad dead, other re-keyed, copy skipped
    encoded = CODEC.encode("PricedBatch", {"sources": sources})
    name, decoded = CODEC.decode(encoded)
    assert name == "PricedBatch"
    assert decoded["events"] == []
    records = list(priced_events(decoded, CODEC))
    as_v4 = CODEC.decode(CODEC.encode("PricedBatch", {"events": result.priced}))[1]["events"]
    assert records == as_v4  # what a v4 meter wrote for the same message
    assert [usage_row(r) for r in records] == [usage_row(p) for p in result.priced]
    assert [r["priced_at"] for r in records] == [NOW, NOW]


def test_priced_events_refuses_a_source_that_is_not_usage_or_a_price_without_its_event() -> None:
    import pytest

    from spendstream.errors import DecodeError
    from spendstream.priced import priced_events

    price = {
        "index": 1,
        "cost_pico_usd": 1,
        "price_card": "c",
        "pricing_status": "priced",
        "card_version": "v",
        "itemised": {},
        "unpriced_reason": "",
        "saved_pico_usd": 0,
    }
    one_event = CODEC.encode("UsageEvent", ev())
    cases = [
        (one_event, "a price for event 1 of a source with 1 events"),
        (CODEC.encode("SeenIds", {"source_partition": 0, "offsets": b"", "ids": b""}), "holds a SeenIds"),
        (b"junk", "not an Avro single-object message"),
    ]
    for usage, message in cases:
        batch = {"events": [], "sources": [{"usage": usage, "priced_at": NOW, "prices": [price]}]}
        with pytest.raises(DecodeError, match=message):
            list(priced_events(CODEC.decode(CODEC.encode("PricedBatch", batch))[1], CODEC))


@given(st.lists(st.integers(min_value=0, max_value=50)), st.integers(min_value=1, max_value=60))
def test_parts_by_size_keeps_order_and_cuts_only_where_the_next_item_would_pass_the_limit(
    sizes: list[int], limit: int
) -> None:
    from stream_processors.meter import parts_by_size

    parts = parts_by_size(sizes, lambda n: n, limit)
    assert [n for part in parts for n in part] == sizes  # nothing lost, doubled or reordered
    assert all(part for part in parts)
    assert all(sum(part) <= limit or len(part) == 1 for part in parts)
    assert all(sum(a) + b[0] > limit for a, b in pairwise(parts))  # greedy: no cut before it was needed
