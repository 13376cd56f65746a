"""The meter's fast paths give exactly what the plain code gives, on generated events, invalid ones
included: `DecodedUsageCheck` against `usage_problem`, the catalogue's remembered cards against a
fresh lookup, `event_keys` against `event_key`, and a meter using them against one that does not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.usage import (
    COUNT_FIELDS,
    MAX_FUTURE_US,
    MIN_EVENT_TIME_US,
    DecodedUsageCheck,
    usage_problem,
)
from spendstream.wire import default_codec
from stream_processors.dedupe import event_key, event_keys
from stream_processors.meter import MeterStage
from stream_processors.priced_writer import PricedBatchWriter
from stream_processors.pricing import Catalogue, card_from_mapping, parse_instant

CODEC = default_codec()
CAT = Catalogue.load()  # fallback "max": priced, fallback and unpriced all occur below
NOW = int(datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()) * 1_000_000
LONG = "x" * 257  # one character over MAX_TEXT

# Mostly valid values, with each kind of invalid one among them.
text = st.sampled_from(["a", "proj-1", "svc", "team-x", "", " ", LONG, "ünïcode"])
providers = st.sampled_from(["openai", "anthropic", "google", "OpenAI", "", "nobody"])
models = st.sampled_from(
    ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-20250514", "gemini-2.5-pro", "dall-e-3", "unknown-model", ""]
)
counts = st.one_of(
    st.integers(0, 5_000),
    st.sampled_from([0, 0, 0, -1, 100_000, 100_001, 1_000_000, 1_000_001, 10**9, 10**9 + 1, 2**62]),
)
times = st.one_of(
    st.integers(NOW - 7 * 86_400_000_000, NOW),
    st.sampled_from(
        [0, -5, MIN_EVENT_TIME_US - 1, MIN_EVENT_TIME_US, NOW + MAX_FUTURE_US, NOW + MAX_FUTURE_US + 1]
    ),
)
event_ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: str(u).upper()),
    st.sampled_from(["", "not-a-uuid", "0" * 31, "0" * 33, "g" * 32, "0" * 32 + "\n"]),
)
audio = st.sampled_from(
    [b"\x00", b"", b"\x01", b"\xff", b"\x0f\x42\x40", b"\x01" * 9, b"\x00\xe8\xd4\xa5\x10\x00"]
)
tags: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.dictionaries(st.sampled_from(["env", "spendstream.key", "k", "", LONG]), text, max_size=3),
    st.just({f"t{i}": "v" for i in range(65)}),
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A UsageEvent record as the codec decodes it (encoded, then decoded)."""
    record = {
        "event_id": draw(event_ids),
        "event_time": draw(times),
        "project": draw(text),
        "team": draw(st.one_of(st.none(), text)),
        "user": draw(st.one_of(st.none(), text)),
        "service": draw(text),
        "provider": draw(providers),
        "model": draw(models),
        "tags": draw(tags),
        "audio_seconds": draw(audio),
        "image_size": draw(st.sampled_from(["", "1024x1024", LONG])),
        "image_quality": draw(st.sampled_from(["", "standard", "hd"])),
        "service_tier": draw(st.sampled_from(["standard", "standard", "batch", "priority", "cheap"])),
        "region": draw(st.sampled_from(["global", "global", "", "us", "eu"])),
        "usage_source": draw(st.sampled_from(["reported", "reported", "cache", "missing", "guessed"])),
    }
    for field in COUNT_FIELDS:
        record[field] = draw(counts) if draw(st.booleans()) else 0
    _, decoded = CODEC.decode(CODEC.encode("UsageEvent", record))
    return decoded


def valid_event(i: int) -> dict[str, Any]:
    """A valid event; `i` picks its texts, so some are new to a checker and some are not."""
    record = {
        "event_id": str(uuid.UUID(int=i + 1)),
        "event_time": NOW - 1_000_000 * i,
        "project": f"p{i % 3}",
        "team": None,
        "user": f"u{i % 5}",
        "service": "svc",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 100 + i,
        "output_tokens": 10,
        "tags": {"env": "test"},
    }
    return CODEC.decode(CODEC.encode("UsageEvent", record))[1]


CHECK = DecodedUsageCheck()  # shared: the texts it remembers carry over from example to example


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(events(), st.integers(0, 30).map(valid_event)), max_size=8))
def test_the_decoded_check_gives_usage_problems_answer_and_reason(message: list[dict[str, Any]]) -> None:
    plain = [usage_problem(e, now_us=NOW) for e in message]
    if CHECK.all_valid(message, NOW):  # never for a message with one invalid event
        assert plain == [None] * len(message)
    assert [CHECK.problem(e, NOW) for e in message] == plain  # the texts are remembered now
    assert [CHECK.problem(e, NOW) for e in message] == plain  # and answers stay the same
    # A message of valid events with tokens and no audio passes the fast check once its texts are known.
    if (
        message
        and all(p is None for p in plain)
        and all(
            e["audio_seconds"] in (b"\x00", b"") and (e["input_tokens"] or e["output_tokens"])
            for e in message
        )
    ):
        assert CHECK.all_valid(message, NOW)


def test_the_decoded_check_passes_a_known_message_whole_and_finds_the_one_bad_event() -> None:
    check = DecodedUsageCheck()
    message = [valid_event(i) for i in range(40)]
    assert not check.all_valid(message, NOW)  # texts not seen yet: event by event
    assert [check.problem(e, NOW) for e in message] == [None] * 40
    assert check.all_valid(message, NOW)
    bad = {**message[7], "output_tokens": 5, "reasoning_tokens": 6}
    assert not check.all_valid([*message[:7], bad, *message[8:]], NOW)
    assert check.problem(bad, NOW) == usage_problem(bad, now_us=NOW) is not None
    assert not check.all_valid([*message, {**message[0], "event_id": message[0]["event_id"] + "\n"}], NOW)
    assert not check.all_valid([*message, {**message[0], "tags": {"k": LONG}}], NOW)


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), min_size=1, max_size=10))
def test_the_remembered_card_prices_exactly_as_a_fresh_lookup(batch: list[dict[str, Any]]) -> None:
    for event in batch:
        fresh = Catalogue(CAT.cards(), fallback=CAT.fallback)  # nothing remembered
        assert CAT.price(event) == fresh.price(event)
        assert CAT.price_fields(event) == tuple(fresh.price(event))


def test_a_card_added_at_run_time_replaces_the_remembered_one_from_its_start() -> None:
    cat = Catalogue(CAT.cards())
    at = parse_instant("2026-12-01T12:00:00Z")
    event = {**valid_event(0), "event_time": at, "input_tokens": 1_000_000, "output_tokens": 0}
    old = cat.price(event)  # remembered now
    cat.add(
        card_from_mapping(
            {
                "provider": "openai",
                "models": ["gpt-4o"],
                "effective_from": "2026-12-01T12:00:00Z",
                "source": "https://example.test/price-change",
                "per_million": {"input": "1.25", "output": "5"},
            }
        )
    )
    assert old.cost_pico == 2_500_000_000_000  # the seed card's 2.50 USD per million
    assert cat.price(event).cost_pico == 1_250_000_000_000
    assert cat.price({**event, "event_time": at - 1}).cost_pico == old.cost_pico


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "proj-7"]),
            st.one_of(
                st.uuids().map(str),
                st.uuids().map(lambda u: u.hex.upper()),
                st.uuids().map(lambda u: f"{u.hex[:8]}-{u.hex[8:]}"),  # some dashes only
            ),
        ),
        max_size=50,
    )
)
def test_event_keys_at_once_equal_event_key_one_by_one(pairs: list[tuple[str, str]]) -> None:
    projects, ids = [p for p, _ in pairs], [i for _, i in pairs]
    assert event_keys(projects, ids).tolist() == [event_key(p, i) for p, i in pairs]


def test_event_keys_of_ids_that_are_not_uuids_fall_back_to_one_by_one() -> None:
    ids = ["0" * 31, "1" * 33]  # 64 hex digits together: the at-once path would cut them wrong
    assert event_keys(["a", "a"], ids).tolist() == [event_key("a", i) for i in ids]


class PlainCheck(DecodedUsageCheck):
    """The meter's check without its fast paths: `usage_problem` per event."""

    def all_valid(self, events: list[dict[str, Any]], now_us: int) -> bool:
        return False

    def problem(self, event: dict[str, Any], now_us: int) -> str | None:
        return usage_problem(event, now_us=now_us)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(events(), st.integers(0, 30).map(valid_event)), min_size=1, max_size=6), max_size=4
    )
)
def test_a_meter_with_its_fast_paths_gives_what_one_without_them_gives(
    messages: list[list[dict[str, Any]]],
) -> None:
    fast, plain = MeterStage(CAT, CODEC), MeterStage(Catalogue(CAT.cards(), fallback=CAT.fallback), CODEC)
    plain._check = PlainCheck()
    raw = [(i % 2, b"p0", CODEC.encode("UsageBatch", {"events": m})) for i, m in enumerate(messages)]
    for _ in range(2):  # again: every event is a copy now, and the fast paths have remembered
        for a, b in zip(fast.process_many(raw, NOW), plain.process_many(raw, NOW), strict=True):
            assert a.priced == b.priced
            assert [(d.reason, d.detail, d.payload) for d in a.dead] == [
                (d.reason, d.detail, d.payload) for d in b.dead
            ]
            assert (a.spend, a.full_deltas, a.rekey, a.statuses, a.seen, a.unbudgeted, a.project) == (
                b.spend,
                b.full_deltas,
                b.rekey,
                b.statuses,
                b.seen,
                b.unbudgeted,
                b.project,
            )


longs = st.one_of(
    st.integers(0, 5_000), st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 63, 64, 4095, 4096])
)
prices = st.fixed_dictionaries(
    {
        "index": st.one_of(st.integers(0, 600), st.integers(-(2**31), 2**31 - 1)),
        "cost_pico_usd": st.one_of(st.none(), longs),
        "price_card": st.sampled_from(["", "openai/gpt-4o@2024-10-02", "ü/ß@x"]),
        "pricing_status": st.sampled_from(["priced", "fallback", "unpriced"]),
        "card_version": st.sampled_from(["", "2024-10-02"]),
        "itemised": st.dictionaries(st.sampled_from(["input", "output", "images", "ö"]), longs, max_size=4),
        "unpriced_reason": st.text(max_size=20),
        "saved_pico_usd": longs,
    }
)
sources = st.lists(
    st.fixed_dictionaries(
        {"usage": st.binary(max_size=300), "priced_at": longs, "prices": st.lists(prices, max_size=6)}
    ),
    max_size=5,
)
WRITER = PricedBatchWriter(CODEC)


@settings(max_examples=400, deadline=None)
@given(sources)
def test_the_priced_writer_writes_what_fastavro_writes(batch: list[dict[str, Any]]) -> None:
    assert WRITER.exact
    assert WRITER.write(batch) == CODEC.encode("PricedBatch", {"sources": batch})


@pytest.mark.parametrize(
    ("field", "value"),
    [("cost_pico_usd", 2**63), ("cost_pico_usd", 1.5), ("saved_pico_usd", "5"), ("index", None)],
)
def test_the_priced_writer_leaves_what_it_cannot_write_to_fastavro_and_its_error(
    field: str, value: Any
) -> None:
    price = {
        "index": 0,
        "cost_pico_usd": 1,
        "price_card": "",
        "pricing_status": "priced",
        "card_version": "",
        "itemised": {},
        "unpriced_reason": "",
        "saved_pico_usd": 0,
    }
    batch = [{"usage": b"x", "priced_at": 1, "prices": [{**price, field: value}]}]
    errors = []
    for encode in (WRITER.write, lambda b: CODEC.encode("PricedBatch", {"sources": b})):
        try:
            encode(batch)
        except Exception as exc:  # whatever fastavro raises, the writer raises too
            errors.append((type(exc), str(exc)))
    assert len(errors) == 2
    assert errors[0] == errors[1]
