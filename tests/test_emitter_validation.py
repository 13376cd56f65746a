"""Invalid input raises a clear error at the call site, before anything is buffered."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from producers import build_event
from spendstream.errors import InvalidUsage
from spendstream.usage import METERS

GOOD: dict[str, Any] = {
    "service": "svc",
    "project": "p",
    "provider": "openai",
    "model": "gpt-4o",
    "input_tokens": 1,
    "output_tokens": 1,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_tokens": -1}, "input_tokens is negative"),
        ({"cached_input_tokens": -3}, "cached_input_tokens is negative"),
        ({"project": ""}, "project is missing or empty"),
        ({"model": "  "}, "model is missing or empty"),
        ({"provider": "OpenAI"}, "must be lowercase"),
        ({"output_tokens": 1.5}, "must be an integer count"),
        ({"reasoning_tokens": 5}, "must include the reasoning share"),
        ({"event_id": "not-a-uuid"}, "is not a UUID"),
        ({"event_time": datetime(2026, 1, 1)}, "timezone-aware"),  # noqa: DTZ001 (the point of the test)
        # every meter has a per-event maximum far above any real call (spendstream/usage.py)
        ({"input_tokens": 4 * 10**12}, "input_tokens 4000000000000 is above the maximum of 1,000,000,000"),
        ({"output_tokens": 2**62}, "output_tokens .* is above the maximum"),
        ({"images": 100_001}, "images 100001 is above the maximum of 100,000"),
        ({"audio_seconds": "1000000.000001"}, "audio_seconds is above the maximum of 1,000,000"),
        ({"model": "m" * 257}, "model must be a string of at most 256 characters"),
        ({"tags": {f"k{i}": "v" for i in range(65)}}, "65 tags: at most 64"),
        ({"event_time": datetime(2014, 12, 31, tzinfo=UTC)}, "before 2015"),
        ({"event_time": datetime(2999, 1, 1, tzinfo=UTC)}, "more than a day in the future"),
    ],
)
def test_invalid_usage_raises_with_the_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidUsage, match=message):
        build_event(**{**GOOD, **change})


def test_valid_event_has_uuid_and_microsecond_time() -> None:
    e = build_event(**GOOD, event_time=datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC), tags={"k": "v"})
    assert e["event_time"] == 1_795_780_800_123_456
    assert len(e["event_id"]) == 36
    assert (e["team"], e["user"], e["tags"], e["reasoning_tokens"]) == (None, None, {"k": "v"}, 0)


NO_USAGE = (  # the same words from build_event, `spendstream price` and the meter's dead letter
    "no usage: set at least one of input_tokens, cached_input_tokens, cache_write_tokens, "
    "cache_write_1h_tokens, output_tokens, input_audio_tokens, output_audio_tokens, audio_seconds, "
    "characters, images, requests (every meter defaults to 0); a call whose usage is unknown is "
    'sent with usage_source="missing"'
)
NO_METERS = {k: v for k, v in GOOD.items() if not k.endswith("_tokens")}


@pytest.mark.parametrize(
    "meter",
    [
        {"audio_seconds": "90.5"},  # whisper
        {"characters": 1000},  # tts
        {"input_tokens": 1000},  # embeddings
        {"images": 1},
        {"requests": 3},
        {"cached_input_tokens": 5},
    ],
)
def test_an_event_needs_one_meter_and_the_others_are_zero(meter: dict[str, Any]) -> None:
    e = build_event(**NO_METERS, **meter)
    counts = {k: e[k] for k in METERS if k != "audio_seconds" and k not in meter}
    assert counts == dict.fromkeys(counts, 0)
    assert e["audio_seconds"] == (b"\x05d\xeb\xa0" if "audio_seconds" in meter else b"\x00")


def test_an_event_with_no_usage_is_refused_with_the_meters_that_exist() -> None:
    zeros: dict[str, Any] = {m: "0" if m == "audio_seconds" else 0 for m in (*METERS, "reasoning_tokens")}
    for given in ({}, zeros):
        with pytest.raises(InvalidUsage) as refused:
            build_event(**NO_METERS, **given)
        assert str(refused.value) == NO_USAGE


@pytest.mark.parametrize("source", ["missing", "estimated"])
def test_unknown_usage_is_flagged_not_refused(source: str) -> None:
    """What @metered and instrument() send for a call without usage: a lower bound, not a zero."""
    e = build_event(**NO_METERS, usage_source=source)
    assert (e["usage_source"], e["input_tokens"], e["output_tokens"]) == (source, 0, 0)


def test_batches_stay_under_the_message_size_with_the_largest_valid_events() -> None:
    """64 tags of 256 characters on every event: 500 of them would pass Kafka's request limit."""
    from producers import Emitter
    from producers._emitter import _MAX_BATCH_BYTES

    big = {f"k{i:03d}" + "k" * 252: "v" * 256 for i in range(64)}
    events = [build_event(**GOOD, tags=big) for _ in range(500)]
    emitter = Emitter(bootstrap_servers="127.0.0.1:1", service="svc")
    batches = emitter._batches({"p": events})
    assert all(len(value) <= _MAX_BATCH_BYTES for _, value, _ in batches)
    assert sum(len(chunk) for _, _, chunk in batches) == 500  # every event, once, in order
    assert [e["event_id"] for _, _, chunk in batches for e in chunk] == [e["event_id"] for e in events]
    assert len(batches) > 1
