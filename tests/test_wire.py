"""The Avro single-object wire format: golden bytes, fingerprints, evolution, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from spendstream.errors import DecodeError
from spendstream.wire import MAGIC, Codec, default_codec

GOLDEN = Path(__file__).parent / "golden"
SCHEMAS = Path(__file__).parent.parent / "schemas"

EVENT = {
    "event_id": "2f1c4a9e-5b7d-4e1a-9c3f-0d8e6b5a4c21",
    "event_time": 1_764_201_600_000_000,  # 2025-11-27T00:00:00Z
    "project": "checkout",
    "team": "commerce",
    "user": None,
    "service": "checkout-api",
    "provider": "openai",
    "model": "gpt-4o",
    "input_tokens": 1200,
    "cached_input_tokens": 300,
    "cache_write_tokens": 0,
    "output_tokens": 250,
    "reasoning_tokens": 100,
    "tags": {"env": "prod"},
}
V2_DEFAULTS = {
    "cache_write_1h_tokens": 0,
    "input_audio_tokens": 0,
    "output_audio_tokens": 0,
    "audio_seconds": b"\x00",
    "characters": 0,
    "images": 0,
    "image_size": "",
    "image_quality": "",
    "requests": 0,
    "service_tier": "standard",
    "region": "global",
    "usage_source": "reported",
}
EVENT_V2 = {
    **EVENT,
    **V2_DEFAULTS,
    "audio_seconds": b"\x01\xe8\x48",
    "service_tier": "batch",
    "characters": 12,
}


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification writes it (independent of fastavro)."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("UsageEvent", EVENT_V2),
        (
            "UsageBatch",
            {"events": [EVENT_V2, {**EVENT_V2, "event_id": "00000000-0000-4000-8000-000000000001"}]},
        ),
    ],
)
def test_golden_bytes_round_trip(name: str, record: dict[str, object]) -> None:
    codec = default_codec()
    golden = (GOLDEN / f"{name}.bin").read_bytes()
    assert codec.encode(name, record) == golden  # the bytes on the wire never change silently
    assert codec.decode(golden) == (name, record)


@pytest.mark.parametrize("name", ["UsageEvent", "UsageBatch"])
def test_v1_bytes_written_before_the_pricing_engine_still_decode(name: str) -> None:
    """schemas/history keeps v1: old emitters go on working, new meters take their defaults."""
    kind, record = default_codec().decode((GOLDEN / f"{name}.v1.bin").read_bytes())
    first = record if kind == "UsageEvent" else record["events"][0]
    assert kind == name
    # fastavro gives a bytes default back as str; the pricing engine reads both alike
    assert {**first, "audio_seconds": b"\x00"} == {**EVENT, **V2_DEFAULTS}


# tests/golden/*.v2.bin: written by the v2 schemas (schemas/history/), whose tokens had no default,
# so a whisper and a TTS event carry explicit zero tokens. No usage_source field before v3.
WHISPER_V2 = {
    **EVENT,
    **V2_DEFAULTS,
    "event_id": "7a0c3d52-9e41-4b8f-a6d2-3c5e1f0b9d47",
    "project": "voice",
    "team": None,
    "service": "voice-api",
    "model": "whisper-1",
    "input_tokens": 0,
    "cached_input_tokens": 0,
    "output_tokens": 0,
    "reasoning_tokens": 0,
    "tags": {},
    "audio_seconds": b"\x05d\xeb\xa0",  # 90.500000 s
}
TTS_V2 = {**WHISPER_V2, "event_id": "7a0c3d52-9e41-4b8f-a6d2-3c5e1f0b9d48", "model": "tts-1"}
TTS_V2.update(audio_seconds=b"\x00", characters=1000)
ZERO_TOKENS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("UsageEvent", WHISPER_V2), ("UsageBatch", {"events": [WHISPER_V2, TTS_V2]})],
)
def test_v2_bytes_with_explicit_zero_tokens_decode_like_a_v4_record_without_them(
    name: str, expected: dict[str, object]
) -> None:
    codec = default_codec()
    old = (GOLDEN / f"{name}.v2.bin").read_bytes()
    assert old[2:10] != codec.fingerprint(name)  # an older writer schema, resolved into the current
    assert codec.decode(old) == (name, expected)
    events = [expected] if name == "UsageEvent" else expected["events"]
    without = [{k: v for k, v in e.items() if k not in ZERO_TOKENS} for e in events]  # type: ignore[attr-defined]
    record = without[0] if name == "UsageEvent" else {"events": without}
    assert codec.decode(codec.encode(name, record)) == (name, expected)


def test_a_meter_left_out_is_written_as_its_zero_default_with_an_unchanged_fingerprint() -> None:
    """v4 gave input_tokens and output_tokens a default: defaults are not in the Parsing Canonical
    Form, so the fingerprint (and every byte) stays that of v3; a v3 writer needs no history file."""
    codec = default_codec()
    bare = {k: v for k, v in EVENT_V2.items() if k not in ("input_tokens", "output_tokens", "audio_seconds")}
    zeros = {**bare, "input_tokens": 0, "output_tokens": 0, "audio_seconds": b"\x00"}
    assert codec.encode("UsageEvent", bare) == codec.encode("UsageEvent", zeros)
    assert codec.fingerprint("UsageEvent") == (GOLDEN / "UsageEvent.bin").read_bytes()[2:10]


def test_header_is_magic_plus_spec_fingerprint_of_canonical_form() -> None:
    codec = default_codec()
    data = (GOLDEN / "UsageEvent.v1.bin").read_bytes()
    canonical = (GOLDEN / "UsageEvent.canonical.json").read_bytes()
    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:10] == struct.pack("<Q", _crc64_avro(canonical))
    current = (GOLDEN / "UsageEvent.bin").read_bytes()
    assert codec.fingerprint("UsageEvent") == current[2:10] != data[2:10]


def test_every_schema_has_a_distinct_fingerprint() -> None:
    codec = default_codec()
    fps = {codec.fingerprint(n) for n in codec.names}
    assert len(fps) == len(codec.names) == 11


def test_old_writer_schema_resolves_into_current(tmp_path: Path) -> None:
    # An older UsageEvent without `tags` and `reasoning_tokens`, kept in schemas/history/.
    current = json.loads((SCHEMAS / "dev.spendstream.UsageEvent.avsc").read_text())
    old = {
        **current,
        "fields": [f for f in current["fields"] if f["name"] not in ("tags", "reasoning_tokens")],
    }
    for path in SCHEMAS.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "dev.spendstream.UsageEvent.avsc").write_text(json.dumps(old))
    writer_dir = tmp_path / "writer"
    writer_dir.mkdir()
    (writer_dir / "dev.spendstream.UsageEvent.avsc").write_text(json.dumps(old))
    old_record = {k: v for k, v in EVENT_V2.items() if k not in ("tags", "reasoning_tokens", "region")}
    data = Codec(writer_dir).encode("UsageEvent", old_record)
    name, record = Codec(tmp_path).decode(data)
    assert name == "UsageEvent"
    assert record == {**old_record, "tags": {}, "reasoning_tokens": 0, "region": "global"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an Avro single-object message"),
        (b"hello world, not avro", "not an Avro single-object message"),
        (MAGIC + b"\x00" * 8 + b"\x02", "unknown writer schema fingerprint"),
    ],
)
def test_garbage_is_a_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        default_codec().decode(data)


def test_truncated_and_padded_bodies_are_decode_errors() -> None:
    good = (GOLDEN / "UsageEvent.bin").read_bytes()
    with pytest.raises(DecodeError, match="corrupt UsageEvent body"):
        default_codec().decode(good[:-5])
    with pytest.raises(DecodeError, match="trailing bytes"):
        default_codec().decode(good + b"\x00")


def test_crc64_avro_matches_the_spec_test_vector() -> None:
    # Avro's schema-tests: the fingerprint of "null" is 7195948357588979594.
    assert _crc64_avro(b'"null"') == 7195948357588979594


# A PricedUsage as a v3 meter wrote it (v4 added saved_pico_usd, PricedBatch v5 added sources).
PRICED_V3 = {
    "usage": EVENT_V2,
    "cost_pico_usd": 3_500_000_000,
    "price_card": "openai/gpt-4o@2024-10-02",
    "priced_at": 1_764_201_600_000_001,
    "pricing_status": "priced",
    "card_version": "2024-10-02",
    "itemised": {"input": 2_500_000_000, "output": 1_000_000_000},
    "unpriced_reason": "",
}


def test_a_priced_batch_of_the_v3_schema_decodes_with_nothing_saved(tmp_path: Path) -> None:
    """PricedUsage v4 added saved_pico_usd (default 0): usage.priced messages a v3 meter wrote
    before an upgrade are still stored, as events that saved nothing."""
    (tmp_path / "dev.spendstream.PricedBatch.avsc").write_text(
        (SCHEMAS / "history" / "dev.spendstream.PricedBatch.v3.avsc").read_text()
    )
    priced = PRICED_V3
    old = Codec(tmp_path).encode("PricedBatch", {"events": [priced]})
    codec = default_codec()
    assert old[2:10] != codec.fingerprint("PricedBatch")
    assert codec.decode(old) == ("PricedBatch", {"events": [{**priced, "saved_pico_usd": 0}], "sources": []})


def test_a_priced_batch_of_the_v4_schema_decodes_as_events_with_no_sources(tmp_path: Path) -> None:
    """PricedBatch v5 added `sources` (default []): what a v4 meter wrote before an upgrade is
    still read, whole PricedUsage records in `events`."""
    (tmp_path / "dev.spendstream.PricedBatch.avsc").write_text(
        (SCHEMAS / "history" / "dev.spendstream.PricedBatch.v4.avsc").read_text()
    )
    priced = {**PRICED_V3, "saved_pico_usd": 7}
    old = Codec(tmp_path).encode("PricedBatch", {"events": [priced]})
    codec = default_codec()
    assert old[2:10] != codec.fingerprint("PricedBatch")
    assert codec.decode(old) == ("PricedBatch", {"events": [priced], "sources": []})
