"""The meter's column path (meter_columns.py; the native decoder's columns where it is built, and
columns made from fastavro's records) against its per-event path: for every message the same
prices, spend, counted ids, statuses, dead letters and PricedBatch bytes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream_processors.meter as meter
from producers import build_event
from spendstream.usage import KEY_TAG, columns_valid, usage_problem
from spendstream.wire import default_codec
from stream_processors.meter import MeterResult, MeterStage
from stream_processors.meter_columns import MIN_COLUMN_EVENTS
from stream_processors.priced_writer import PricedBatchWriter
from stream_processors.pricing import Catalogue
from stream_processors.usage_columns import NATIVE, UsageColumns

CODEC = default_codec()
WRITER = PricedBatchWriter(CODEC)
CATALOGUE = Catalogue.load()
NOW = int(datetime(2026, 12, 1, 0, 30, tzinfo=UTC).timestamp()) * 1_000_000
HORIZON_US = 3_600 * 1_000_000
BUDGETED = frozenset({"team:*", "user:u-1", "key:*", "project:p-0/model:gpt-4o*"})
GLOBS = {"p-0": ["gpt-4o*"]}
MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-5"),  # long context above 200k input tokens
    ("openai", "dall-e-3"),  # priced per image by size and quality: the per-event path
    ("openai", "no-such-model"),  # a fallback card: the per-event path
]
# How the paths are chosen: (least events per message for columns, native decoder on)
PATHS = {
    "per event": (10**9, False),
    "columns": (MIN_COLUMN_EVENTS, False),
    "native": (MIN_COLUMN_EVENTS, True),
}


def stage() -> MeterStage:
    return MeterStage(CATALOGUE, CODEC, GLOBS, BUDGETED, dedupe_horizon_us=HORIZON_US)


@contextmanager
def path(name: str) -> Iterator[None]:
    least, native = PATHS[name]
    module = vars(meter)
    before = module["MIN_COLUMN_EVENTS"], module["NATIVE"]
    module["MIN_COLUMN_EVENTS"], module["NATIVE"] = least, native and NATIVE
    try:
        yield
    finally:
        module["MIN_COLUMN_EVENTS"], module["NATIVE"] = before


def run(name: str, takes: list[list[tuple[int, bytes, bytes]]]) -> list[MeterResult]:
    """Every take through one stage on the path `name`: the results, in order."""
    with path(name):
        s = stage()
        return [result for take in takes for result in s.process_many(take, NOW)]


def view(result: MeterResult) -> dict[str, Any]:
    """Everything a result says, as plain values (the PricedBatch bytes for its prices)."""
    source = {"usage": result.usage, "priced_at": result.priced_at, "prices": result.prices}
    return {
        "project": result.project,
        "prices": list(result.prices),
        "priced_batch": WRITER.write([source]) if result.project else b"",
        "spend": result.spend,
        "full_deltas": result.full_deltas,
        "dead": result.dead,
        "rekey": result.rekey,
        "statuses": dict(result.statuses),
        "unbudgeted": result.unbudgeted,
        "seen": result.seen,
    }


def event(draw: st.DrawFn, project: str, clean: bool) -> dict[str, Any]:
    """An event; a clean one (no image or audio, a model with a card) is one columns can price."""
    provider, model = draw(st.sampled_from(MODELS[:3] if clean else MODELS))
    extra: dict[str, Any] = {}
    if model == "dall-e-3":
        extra = {"images": draw(st.integers(0, 3)), "image_size": "1024x1024", "image_quality": "standard"}
    if not clean and draw(st.integers(0, 30)) == 0:
        extra["audio_seconds"] = Decimal("1.5")
    ago = draw(st.sampled_from([timedelta(seconds=30), timedelta(minutes=3), timedelta(hours=2)]))
    return build_event(
        service="s",
        project=project,
        provider=provider,
        model=model,
        input_tokens=draw(st.sampled_from([0, 1, 900, 150_000, 250_000])),
        cached_input_tokens=draw(st.sampled_from([0, 0, 400])),
        output_tokens=draw(st.integers(1, 4_000)),
        team=draw(st.sampled_from([None, "t-1", "t-2"])),
        user=draw(st.sampled_from([None, "u-1", "u-2"])),
        tags=draw(st.sampled_from([{}, {KEY_TAG: "k-1"}, {"env": "prod"}])),
        usage_source=draw(st.sampled_from(["reported", "reported", "cache", "estimated"])),
        event_time=datetime.fromtimestamp(NOW / 1e6, UTC) - ago,
        **extra,
    )


@st.composite
def takes(draw: st.DrawFn) -> list[list[tuple[int, bytes, bytes]]]:
    """Takes of usage.raw messages: batches of one project each, some events sent again."""
    sent: list[dict[str, Any]] = []
    out = []
    for _ in range(draw(st.integers(1, 3))):
        take = []
        for _ in range(draw(st.integers(1, 4))):
            project = draw(st.sampled_from(["p-0", "p-1"]))
            clean = draw(st.integers(0, 3)) > 0
            events = [event(draw, project, clean) for _ in range(draw(st.sampled_from([1, 5, 20, 40])))]
            again = [e for e in sent if e["project"] == project]
            retry = draw(st.booleans())
            if again and retry:  # a retry: copies of events already sent
                events[:0] = again[: draw(st.integers(1, len(again)))]
            sent += events
            take.append((0, project.encode(), CODEC.encode("UsageBatch", {"events": events})))
        out.append(take)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(takes())
def test_every_path_gives_the_same_results(messages: list[list[tuple[int, bytes, bytes]]]) -> None:
    expected = [view(r) for r in run("per event", messages)]
    for name in ("columns", "native"):
        assert [view(r) for r in run(name, messages)] == expected, name


def realistic(n: int, project: str = "p-0") -> bytes:
    events = [
        build_event(
            service="s",
            project=project,
            provider="openai",
            model=("gpt-4o", "gpt-4o-mini")[i % 2],
            input_tokens=1_000 + i,
            cached_input_tokens=i % 3 * 100,
            output_tokens=50 + i,
            team=f"t-{i % 3}",
            user=f"u-{i % 7}",
            tags={KEY_TAG: "k-1"} if i % 4 == 0 else {},
            usage_source="cache" if i % 5 == 0 else "reported",  # free: no itemised costs at all
            event_time=datetime.fromtimestamp(NOW / 1e6 - 60, UTC),
        )
        for i in range(n)
    ]
    return CODEC.encode("UsageBatch", {"events": events})


@pytest.mark.parametrize("name", ["columns", "native"])
def test_the_common_case_goes_by_columns(name: str) -> None:
    """500 valid events of known models: priced as columns, equal to the per-event path; the
    native decoder's run never decodes the message into records."""
    take = [(0, b"p-0", realistic(500)), (0, b"p-0", realistic(30)), (0, b"p-0", realistic(5))]
    [big, small, tiny] = run(name, [take])
    assert big.run is not None
    assert small.run is not None
    assert tiny.run is None  # 5 < MIN_COLUMN_EVENTS
    if name == "native":
        assert "events" not in vars(big.run.columns)  # never made: the records were not needed
    assert (len(big.prices), len(small.prices), len(tiny.prices)) == (500, 30, 5)
    assert [view(r) for r in (big, small, tiny)] == [view(r) for r in run("per event", [take])]


def test_a_message_the_columns_cannot_price_goes_event_by_event() -> None:
    """An unknown model in a message sends that message down the per-event path (its fallback
    card), the others of the take stay columns."""
    unknown = CODEC.decode(realistic(40))[1]["events"]
    unknown[7] = {**unknown[7], "model": "no-such-model"}
    take = [(0, b"p-0", realistic(40)), (0, b"p-0", CODEC.encode("UsageBatch", {"events": unknown}))]
    for name in ("columns", "native"):
        known, fallback = run(name, [take])
        assert known.run is not None
        assert fallback.run is None
        assert fallback.statuses == {"priced": 39, "fallback": 1}
        assert [view(r) for r in (known, fallback)] == [view(r) for r in run("per event", [take])]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_valid_columns_are_valid_events(data: st.DataObject) -> None:
    """`columns_valid` says True only when `usage_problem` finds nothing in any event."""
    base = CODEC.decode(realistic(3))[1]["events"]
    changes = st.fixed_dictionaries(
        {},
        optional={
            "input_tokens": st.sampled_from([-1, 0, 10**9, 10**9 + 1]),
            "output_tokens": st.sampled_from([0, 5]),
            "reasoning_tokens": st.sampled_from([0, 6]),
            "images": st.sampled_from([0, 100_000, 100_001]),
            "provider": st.sampled_from(["openai", "OpenAI", " ", ""]),
            "model": st.sampled_from(["", "   ", "m" * 256, "m" * 257]),
            "team": st.sampled_from([None, "", "t" * 257]),
            "service_tier": st.sampled_from(["standard", "premium"]),
            "usage_source": st.sampled_from(["reported", "missing", "guessed"]),
            "event_id": st.sampled_from(["not-a-uuid", "0" * 32]),
            "event_time": st.sampled_from([1, NOW, NOW + 2 * 86_400_000_000]),
            "audio_seconds": st.sampled_from([b"\x00", b"\x01", b"\xff"]),
        },
    )
    events = [{**e, **data.draw(changes)} for e in base]
    columns = UsageColumns.of_events(events)
    texts = {**columns.texts}
    for field in ("service", "image_size", "image_quality"):  # the native decoder's, for the rules
        values = [e[field] for e in events]
        distinct = list(dict.fromkeys(values))
        texts[field] = (np.array([distinct.index(v) for v in values]), distinct)
    tags = (max(map(len, (e["tags"] for e in events))), 15, 3)
    valid = columns_valid(texts, columns.counts, columns.audio, columns.times, columns.event_ids, tags, NOW)
    problems = [usage_problem(e, now_us=NOW) for e in events]
    assert not valid or problems == [None] * len(events), problems
