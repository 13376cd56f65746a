"""spendstream_native.decode_usage_batch (stream_processors/native, built by ./dev setup) against
fastavro (spendstream.wire.Codec.decode).

The contract: for any bytes, the native decoder returns None or exactly the values fastavro
decodes from the same bytes; never an exception, never different values. Every test here fails
(not skips) where the module is not built: the meter would silently decode with fastavro.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._common import usage_calls
from producers import build_event
from spendstream.errors import DecodeError
from spendstream.usage import COUNT_FIELDS, KEY_TAG
from spendstream.wire import avro_long, default_codec

try:
    from spendstream_native import decode_usage_batch
except ImportError:  # every test fails on this: see not_built
    decode_usage_batch = None


@pytest.fixture(scope="module", autouse=True)
def not_built() -> None:
    if decode_usage_batch is None:
        pytest.fail(
            "spendstream_native is not importable: run ./dev setup (needs cargo: install Rust with "
            "rustup) to build stream_processors/native into .venv",
            pytrace=False,
        )


# -- native output and fastavro records as the same per-event rows --------------------------------

TEXTS = (
    "project",
    "team",
    "user",
    "service",
    "provider",
    "model",
    "image_size",
    "image_quality",
    "service_tier",
    "region",
    "usage_source",
    "key",
)
COUNTS = COUNT_FIELDS  # the order of the native counts: what UsageColumns reads them as


def arrays(out: tuple) -> dict[str, Any]:
    """Native output -> numpy views (what a caller would do)."""
    n, ids, et, texts, counts, audio, stats = out
    return {
        "n": n,
        "event_id": ids,
        "event_time": np.frombuffer(et, dtype="<i8"),
        "texts": {k: (np.frombuffer(c, dtype="<u4"), v) for k, (c, v) in texts.items()},
        "counts": np.frombuffer(counts, dtype="<i8").reshape(n, len(COUNTS)),
        "audio_micros": np.frombuffer(audio, dtype="<i8"),
        "tag_stats": stats,
    }


def native_rows(out: tuple) -> tuple[list[dict[str, Any]], tuple[int, int, int]]:
    a = arrays(out)
    n = a["n"]
    assert len(a["event_id"]) == len(a["event_time"]) == len(a["audio_micros"]) == n
    for name in TEXTS:
        codes, values = a["texts"][name]
        assert len(codes) == n
        # distinct values, in first-seen order, each code valid
        assert len(values) == len(set(values)), (name, values)
        seen: list[Any] = []
        for c in codes.tolist():
            assert 0 <= c < len(values)
            if values[c] not in seen:
                assert c == len(seen), (name, "not first-seen order")
                seen.append(values[c])
        assert len(seen) == len(values)
        for v in values:
            assert v is None or type(v) is str
    assert set(a["texts"]) == set(TEXTS)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"event_id": a["event_id"][i], "event_time": int(a["event_time"][i])}
        for name in TEXTS:
            codes, values = a["texts"][name]
            row[name] = values[codes[i]]
        for j, name in enumerate(COUNTS):
            row[name] = int(a["counts"][i, j])
        row["audio_micros"] = int(a["audio_micros"][i])
        rows.append(row)
    return rows, tuple(a["tag_stats"])


def fastavro_rows(record: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[int, int, int]]:
    rows = []
    max_tags = max_k = max_v = 0
    for ev in record["events"]:
        row = {"event_id": ev["event_id"], "event_time": ev["event_time"]}
        for name in TEXTS:
            row[name] = ev["tags"].get(KEY_TAG) if name == "key" else ev[name]
        for name in COUNTS:
            row[name] = ev[name]
        row["audio_micros"] = int.from_bytes(ev["audio_seconds"], "big", signed=True)
        rows.append(row)
        tags = ev["tags"]
        max_tags = max(max_tags, len(tags))
        max_k = max([max_k, *map(len, tags)])
        max_v = max([max_v, *map(len, tags.values())])
    return rows, (max_tags, max_k, max_v)


CODEC = default_codec()
HEAD = b"\xc3\x01" + CODEC.fingerprint("UsageBatch")


def fastavro(body: bytes) -> dict[str, Any] | None:
    """The record fastavro decodes from `body`, or None if it refuses it."""
    try:
        name, record = CODEC.decode(HEAD + body)
    except DecodeError:
        return None
    assert name == "UsageBatch"
    return record


def check(body: bytes) -> str:
    """Assert the contract for `body`; say which way it went."""
    out = decode_usage_batch(body)
    record = fastavro(body)
    if out is None:
        return "native None, fastavro ok" if record is not None else "both refuse"
    assert record is not None, "native accepted a body fastavro refuses"
    assert native_rows(out) == fastavro_rows(record)
    return "both ok, equal"


def encode(events: list[dict[str, Any]]) -> bytes:
    return CODEC.encode("UsageBatch", {"events": events})[len(HEAD) :]


T0 = datetime(2025, 6, 1, tzinfo=UTC)


def realistic(n: int, seed: int = 7, **extra: Any) -> list[dict[str, Any]]:
    """`n` events of the bench's workload; ids and times from `seed` too, so every body is the same
    on every run."""
    rng = random.Random(seed)
    return [
        build_event(
            service="checkout-api",
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            event_time=T0 + timedelta(milliseconds=i),
            **{**c, **extra},
        )
        for i, c in enumerate(usage_calls(n, projects=1, seed=seed))
    ]


# -- a hand-written Avro writer, for what fastavro's writer never produces (blocks, bad bytes) --

FIELDS = (
    ("event_id", "s"),
    ("event_time", "l"),
    ("project", "s"),
    ("team", "u"),
    ("user", "u"),
    ("service", "s"),
    ("provider", "s"),
    ("model", "s"),
    ("input_tokens", "l"),
    ("cached_input_tokens", "l"),
    ("cache_write_tokens", "l"),
    ("output_tokens", "l"),
    ("reasoning_tokens", "l"),
    ("tags", "m"),
    ("cache_write_1h_tokens", "l"),
    ("input_audio_tokens", "l"),
    ("output_audio_tokens", "l"),
    ("audio_seconds", "b"),
    ("characters", "l"),
    ("images", "l"),
    ("image_size", "s"),
    ("image_quality", "s"),
    ("requests", "l"),
    ("service_tier", "s"),
    ("region", "s"),
    ("usage_source", "s"),
)


def raw(v: str | bytes) -> bytes:
    b = v.encode() if isinstance(v, str) else v
    return avro_long(len(b)) + b


def write_event(
    ev: dict[str, Any], tag_blocks: list[list[tuple[Any, Any]]] | None = None, sized: bool = False
) -> bytes:
    """One UsageEvent body; str or raw bytes for text fields; tags as explicit blocks if given."""
    out = b""
    for name, kind in FIELDS:
        v = ev[name]
        if kind == "s":
            out += raw(v)
        elif kind == "l":
            out += avro_long(v)
        elif kind == "b":
            out += raw(v)
        elif kind == "u":
            out += avro_long(0) if v is None else avro_long(1) + raw(v)
        else:
            blocks = tag_blocks if tag_blocks is not None else ([list(v.items())] if v else [])
            for block in blocks:
                items = b"".join(raw(k) + raw(x) for k, x in block)
                out += (
                    avro_long(-len(block)) + avro_long(len(items)) if sized else avro_long(len(block))
                ) + items
            out += avro_long(0)
    return out


def test_hand_writer_matches_fastavro_writer() -> None:
    events = realistic(3, tags={"a": "b", KEY_TAG: "k1"})
    assert avro_long(3) + b"".join(map(write_event, events)) + b"\x00" == encode(events)


# -- realistic batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 500])
def test_realistic_batches(n: int) -> None:
    body = encode(realistic(n))
    assert check(body) == "both ok, equal"
    out = decode_usage_batch(body)
    assert out[0] == n


def test_realistic_mixed_meters_and_keys() -> None:
    events = realistic(40, seed=3)
    for i, ev in enumerate(events):
        if i % 3 == 0:
            ev["tags"] = {**ev["tags"], KEY_TAG: f"key-{i % 4}"}
        if i % 5 == 0:
            ev["team"] = None
            ev["user"] = None
        ev["audio_seconds"] = (i * 1_234_567).to_bytes(8, "big", signed=True)[-(1 + i % 8) :]
        ev["image_size"] = "1024x1024" if i % 2 else ""
    assert check(encode(events)) == "both ok, equal"
    out = decode_usage_batch(encode(events))
    values = out[3]["key"][1]
    assert values[0] == "key-0"
    assert None in values
    assert len(values) == 5


# -- random events --------------------------------------------------------------------------------

text = st.one_of(
    st.sampled_from(["", "a", "proj-1", "ümlaut", "日本語", "😀x", "\x00", "\U0010ffff"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),  # lone surrogates cannot be encoded
)
count = st.one_of(
    st.integers(0, 2**62),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 63, 64, -64, -65, 2**63 - 1, -(2**63)]),
)
tags = st.builds(
    lambda d, key: d if key is None else {**d, KEY_TAG: key},
    st.dictionaries(text.filter(lambda k: k != KEY_TAG), text, max_size=4),
    st.none() | text,
)
audio = st.one_of(st.binary(max_size=8), st.binary(min_size=9, max_size=12))
LONG_FIELDS = [name for name, kind in FIELDS if kind == "l" and name != "event_time"]
event: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "event_id": st.uuids().map(str) | text,
        "event_time": count,
        "project": text,
        "team": st.none() | text,
        "user": st.none() | text,
        "service": text,
        "provider": text,
        "model": text,
        "tags": tags,
        "audio_seconds": audio,
        "image_size": text,
        "image_quality": text,
        "service_tier": text,
        "region": text,
        "usage_source": text,
        **{name: count for name in LONG_FIELDS},
    }
)
batch = st.lists(event, max_size=12)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch)
def test_random_events(events: list[dict[str, Any]]) -> None:
    body = encode(events)
    outcome = check(body)
    too_long_audio = any(len(ev["audio_seconds"]) > 8 for ev in events)
    assert outcome == ("native None, fastavro ok" if too_long_audio else "both ok, equal")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(event, min_size=2, max_size=6).map(
        lambda evs: [dict(e, audio_seconds=e["audio_seconds"][:8]) for e in evs]
    )
)
def test_random_events_repeat_values(events: list[dict[str, Any]]) -> None:
    """Every event repeated, interleaved: the dictionary codes must be reused."""
    body = encode(events + events[::-1] + events)
    assert check(body) == "both ok, equal"
    out = decode_usage_batch(body)
    for _codes, values in out[3].values():
        assert len(values) <= len(events)


# -- corrupt bodies -------------------------------------------------------------------------------


def small_body() -> bytes:
    events = realistic(3, seed=11)
    events[0]["team"] = None
    events[1]["tags"] = {"ünï": "cödé 😀", KEY_TAG: "key-1"}
    events[2]["project"] = "проект"
    events[2]["audio_seconds"] = b"\x01\x02\x03"
    return encode(events)


def test_every_prefix_is_refused() -> None:
    for body in (small_body(), encode(realistic(20))):
        assert check(body) == "both ok, equal"
        for k in range(len(body)):
            assert decode_usage_batch(body[:k]) is None, k
            assert fastavro(body[:k]) is None, k


def test_trailing_bytes_refused() -> None:
    body = small_body()
    for extra in (b"\x00", b"\x01", b"\x80", body):
        assert check(body + extra) == "both refuse"


def test_single_byte_substitutions() -> None:
    """Every position of a small body (505 bytes) x 32 byte values: at position i the values
    i % 8, i % 8 + 8, ..., so each of the 256 values is tried at every eighth position; 16,104
    bodies (the original byte left out). (All 255 values at every position, 128,775 bodies, take
    ~8 s here; this sample ~1.5 s.) Here 9,082 both refuse, 7,020 decode equal, 2 native None."""
    body = small_body()
    assert len(body) == 505
    outcomes: Counter[str] = Counter()
    for i in range(len(body)):
        for b in range(i % 8, 256, 8):
            if b != body[i]:
                outcomes[check(body[:i] + bytes([b]) + body[i + 1 :])] += 1
    print(dict(outcomes))
    assert sum(outcomes.values()) == 16_104
    assert outcomes["both ok, equal"] > 0
    assert outcomes["both refuse"] > 0


@settings(max_examples=2000, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 8))
def test_random_flips_inserts_deletes(rng: random.Random, edits: int) -> None:
    data = bytearray(small_body())
    for _ in range(edits):
        i = rng.randrange(len(data))
        op = rng.randrange(4)
        if op == 0:
            data[i] = rng.randrange(256)
        elif op == 1:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            data.insert(i, rng.randrange(256))
        elif len(data) > 1:
            del data[i]
    check(bytes(data))


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    check(data)
    check(b"\x02" + data)


# -- blocks ---------------------------------------------------------------------------------------


def test_multi_block_array() -> None:
    events = realistic(7, seed=5)
    evs = [write_event(e) for e in events]
    two = evs[0] + evs[1]
    body = (
        avro_long(-2)
        + avro_long(len(two))
        + two  # negative count + byte size
        + avro_long(1)
        + evs[2]  # plain block
        + avro_long(-3)
        + avro_long(len(b"".join(evs[3:6])))
        + b"".join(evs[3:6])
        + avro_long(1)
        + evs[6]
        + avro_long(0)
    )
    assert check(body) == "both ok, equal"
    assert decode_usage_batch(body)[0] == 7
    # fastavro ignores the byte size of a block; so do we (a wrong size decodes the same)
    wrong = avro_long(-2) + avro_long(12345) + two + avro_long(0)
    assert check(wrong) == "both ok, equal"


def test_multi_block_map() -> None:
    ev = realistic(1)[0]
    blocks = [[("a", "1"), ("b", "22")], [(KEY_TAG, "the-key")], [("ć", "ü" * 7)]]
    for sized in (False, True):
        body = avro_long(1) + write_event(ev, blocks, sized=sized) + avro_long(0)
        assert check(body) == "both ok, equal"
        assert decode_usage_batch(body)[6] == (4, 15, 7)
        assert decode_usage_batch(body)[3]["key"][1] == ["the-key"]


def test_duplicate_tag_keys_left_to_fastavro() -> None:
    """fastavro keeps the last value of a repeated map key; we return None instead."""
    ev = realistic(1)[0]
    for blocks in (
        [[("a", "1"), ("a", "2")]],
        [[(KEY_TAG, "k1")], [(KEY_TAG, "k2")]],
        [[(f"k{i}", "v") for i in range(20)] + [("k3", "w")]],
    ):
        body = avro_long(1) + write_event(ev, blocks) + avro_long(0)
        assert check(body) == "native None, fastavro ok"


def test_many_tags() -> None:
    ev = realistic(1)[0]
    blocks = [[(f"k{i}", "v" * i) for i in range(40)]]
    body = avro_long(1) + write_event(ev, blocks) + avro_long(0)
    assert check(body) == "both ok, equal"
    assert decode_usage_batch(body)[6] == (40, 3, 39)


# -- UTF-8 edge cases -----------------------------------------------------------------------------

BAD_UTF8 = [
    b"\xed\xa0\x80",  # lone high surrogate U+D800 (CESU/WTF-8)
    b"\xed\xbf\xbf",  # lone low surrogate U+DFFF
    b"\xed\xa0\xbd\xed\xb8\x80",  # surrogate pair as CESU-8 (what Java's modified UTF-8 writes)
    b"\xc0\x80",  # overlong NUL (Java modified UTF-8)
    b"\xe0\x80\xaf",  # overlong '/'
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\xff",
    b"\x80",  # lone continuation byte
    b"a\xc3",  # truncated sequence
    b"\xe2\x82",
]
GOOD_UTF8 = [
    b"\xf4\x8f\xbf\xbf",
    b"\xef\xbf\xbf",
    b"\xee\x80\x80",
    b"\x00",
    "\ufeffbom".encode(),
    b"\xc2\x80",
]


@pytest.mark.parametrize(
    "where", ["event_id", "project", "team", "model", "usage_source", "tag_key", "tag_value", "key_tag"]
)
@pytest.mark.parametrize("value", BAD_UTF8 + GOOD_UTF8, ids=lambda b: b.hex())
def test_utf8_edge_cases(where: str, value: bytes) -> None:
    events = realistic(2)
    blocks: list[list[tuple[str | bytes, str | bytes]]] | None = None
    if where == "tag_key":
        blocks = [[(value, "v")]]
    elif where == "tag_value":
        blocks = [[("k", value)]]
    elif where == "key_tag":
        blocks = [[(KEY_TAG, value)]]
    else:
        events[1][where] = value
    body = avro_long(2) + write_event(events[0]) + write_event(events[1], blocks) + avro_long(0)
    expected = "both refuse" if value in BAD_UTF8 else "both ok, equal"
    assert check(body) == expected


# -- malformed scalars ----------------------------------------------------------------------------


def test_union_index_out_of_range() -> None:
    ev = realistic(1)[0]
    good = write_event(ev)
    i = good.index(raw(ev["team"]))  # team: index 1 then the string
    assert good[i - 1] == 2  # zigzag(1)
    for index in (2, 3, -1, 1000):
        bad = good[: i - 1] + avro_long(index) + good[i:]
        assert decode_usage_batch(avro_long(1) + bad + b"\x00") is None


def test_negative_and_huge_lengths() -> None:
    ev = realistic(1)[0]
    good = write_event(ev)
    n = len(ev["event_id"])
    for length in (-1, -36, 2**62, 2**63 - 1, n + 1):
        bad = avro_long(length) + good[1 + n :] if length != n + 1 else avro_long(length) + good[1:]
        assert decode_usage_batch(avro_long(1) + bad + b"\x00") is None
    # huge array counts: refused without trying to reserve memory
    for count in (2**62, 2**63 - 1, -(2**63) + 1, -(2**63)):
        assert decode_usage_batch(avro_long(count) + good + b"\x00") is None


def test_varint_edges() -> None:
    ev = realistic(1)[0]
    for v in (2**63 - 1, -(2**63), 2**62, -1, 0):
        body = encode([dict(ev, input_tokens=v, event_time=v)])
        assert check(body) == "both ok, equal"
    body = encode([ev])
    i = body.index(avro_long(ev["input_tokens"]), 1 + 37 + 10)
    # over-long but accepted encodings of 0 (fastavro accepts them too)
    for zero in (b"\x80\x00", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00"):
        mod = body[:i] + zero + body[i + len(avro_long(ev["input_tokens"])) :]
        assert check(mod) == "both ok, equal"
    # 11-byte varint, and a 10th byte above 1: refused by us (fastavro may accept: fine)
    for bad in (b"\x80" * 10 + b"\x00", b"\xff" * 9 + b"\x02"):
        mod = body[:i] + bad + body[i + len(avro_long(ev["input_tokens"])) :]
        assert decode_usage_batch(mod) is None
        check(mod)


def test_audio_seconds() -> None:
    ev = realistic(1)[0]
    for b, micros in (
        (b"", 0),
        (b"\x00", 0),
        (b"\xff", -1),
        (b"\x7f" + b"\xff" * 7, 2**63 - 1),
        (b"\x80" + b"\x00" * 7, -(2**63)),
        (b"\x0f\x42\x40", 1_000_000),
    ):
        out = decode_usage_batch(encode([dict(ev, audio_seconds=b)]))
        assert int.from_bytes(out[5], "little", signed=True) == micros
    assert check(encode([dict(ev, audio_seconds=b"\x00" * 9)])) == "native None, fastavro ok"


def test_tag_stats_count_code_points() -> None:
    evs = realistic(3)
    evs[0]["tags"] = {"😀😀": "日本語x"}
    evs[1]["tags"] = {}
    evs[2]["tags"] = {"a": "b", "c": "d", KEY_TAG: "é"}
    body = encode(evs)
    assert check(body) == "both ok, equal"
    assert decode_usage_batch(body)[6] == (3, 15, 4)


def test_not_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode_usage_batch("text")  # type: ignore[arg-type]
