"""The sink's fast paths: PricedBatch messages handed to ClickHouse, which builds and checks the rows.

Two ways in, one SQL (`_select`): with the native module built (`./dev setup`, needs cargo),
`NativeRows` decodes each message in Rust (stream_processors/native/src/priced.rs) into a
ClickHouse Native block of `e Tuple(<UsageEvent>), p Tuple(<UsagePrice>), priced_at Int64`,
one row per price, the values as Avro wrote them: ClickHouse reads columns and only converts and
checks (measured: 2.6-3.5 CPU s per million rows for the insert, against 5.1-7.9 for the same
rows from Avro). A message it does not decode exactly (see priced.rs) goes the per-row path. The
same blocks are what ClickHouse itself writes for the rows `AvroRows` frames, byte for byte
(tests/test_sink_avro.py). Without the module, `AvroRows`:

A v5 PricedBatch carries each usage.raw message exactly as the emitter wrote it plus one
UsagePrice per priced event (spendstream/priced.py). Avro's binary encoding is concatenation, so
without parsing a single event this module turns each message into one record of an Avro Object
Container whose schema it writes itself:

    SinkRow {
      parsed:  array<SourceEvents {raw: bytes, rows: long, events: array<UsageEvent>, check: fixed(8)}>
      sources: array<PricedSource>   # the message's own sources array, bytes as written by the meter
      check:   fixed(8)
    }

`raw` is each source's usage.raw message, `events` its body again (a UsageBatch body is an
`array<UsageEvent>`; a UsageEvent body becomes an array of one by writing 0x02 before it and 0x00
after it), and `rows` the price count of the source. Python only finds the sources: the next
usage.raw message starts at the next `C3 01` + a UsageBatch/UsageEvent fingerprint, its length is
the varint just before it, and its price count the first varint after its `priced_at`. ClickHouse
then parses both, and `INSERT ... SELECT` (`insert_select`) builds the usage_events rows with exact
decimals, checking in SQL, for every row, that:

1. the split was right: each `raw` equals the `usage` ClickHouse parsed from the message itself,
   `rows` equals the number of its prices, and both `check`s equal this process's random nonce (a
   usage body with trailing or missing bytes shifts what is read as the nonce);
2. the row is one `priced_problem` accepts (`_valid`): the same limits, from spendstream.usage.

A failed check raises (`throwIf`), as does any parse or type error, and the sink then stores the
same messages through its per-row Python path, which dead-letters exactly the bad rows with their
reasons. The SQL is stricter than `priced_problem` where mirroring it exactly would be costly
(a non-ASCII provider, a UUID without its hyphens, a map with a repeated key): such a row only
takes the slow path, it is never stored differently. Messages the fast path does not take (v1-v4
PricedBatches, v5 `events`, usage written with an older UsageEvent/UsageBatch schema) go the per-row
path from the start.
"""

from __future__ import annotations

import io
import json
import os
import sys
from functools import cache

from spendstream.contracts import contract_dir
from spendstream.usage import (
    MAX_AUDIO_SECONDS,
    MAX_COUNT,
    MAX_EVENT_PICO,
    MAX_FUTURE_US,
    MAX_TAGS,
    MAX_TEXT,
    MIN_EVENT_TIME_US,
    SERVICE_TIERS,
    USAGE_SOURCES,
)
from spendstream.wire import MAGIC, Codec, avro_long
from stream_processors.store import sql_literal

try:
    from spendstream_native import NATIVE_STRUCTURE, priced_native, priced_rows
except ImportError:  # not built: the sink frames Avro in Python (AvroRows)
    NATIVE_STRUCTURE, priced_native, priced_rows = "", None, None

__all__ = ["NATIVE_ROWS", "AvroRows", "NativeRows"]

NATIVE_ROWS = priced_native is not None

_HEADER = len(MAGIC) + 8
_PRICING_STATUSES = ("priced", "fallback", "unpriced")  # as spendstream.usage.priced_problem
# ClickHouse's reading of the container: every field by name; logical types stay plain (exact
# integers, the decimal's bytes), and the SQL converts them.
_EVENT = (
    "event_id String, event_time Int64, project String, team Nullable(String), user Nullable(String), "
    "service String, provider String, model String, input_tokens Int64, cached_input_tokens Int64, "
    "cache_write_tokens Int64, output_tokens Int64, reasoning_tokens Int64, tags Map(String, String), "
    "cache_write_1h_tokens Int64, input_audio_tokens Int64, output_audio_tokens Int64, "
    "audio_seconds String, characters Int64, images Int64, image_size String, image_quality String, "
    "requests Int64, service_tier String, region String, usage_source String"
)
_PRICE = (
    "index Int32, cost_pico_usd Nullable(Int64), price_card String, pricing_status String, "
    "card_version String, itemised Map(String, Int64), unpriced_reason String, saved_pico_usd Int64"
)
STRUCTURE = (
    f"parsed Array(Tuple(raw String, rows Int64, events Array(Tuple({_EVENT})), check FixedString(8))), "
    f"sources Array(Tuple(usage String, priced_at Int64, prices Array(Tuple({_PRICE})))), "
    "check FixedString(8)"
)
_PICO = "toDecimal128('0.000000000001', 12)"  # pico-USD * this = USD, exact (Decimal(38, 12))
_MICRO = "toDecimal64('0.000001', 6)"
# usage_events columns (store.USAGE_COLUMNS order) from e (the event), p (its price), s (its source).
_COLUMNS = (
    "toUUID(e.event_id)",
    "fromUnixTimestamp64Micro(e.event_time, 'UTC')",
    "e.project",
    "e.team",
    "e.user",
    "e.service",
    "e.provider",
    "e.model",
    "e.input_tokens",
    "e.cached_input_tokens",
    "e.cache_write_tokens",
    "e.output_tokens",
    "e.reasoning_tokens",
    "e.tags",
    f"if(p.cost_pico_usd IS NULL, NULL, toDecimal128(assumeNotNull(p.cost_pico_usd), 0) * {_PICO})",
    "p.price_card",
    "fromUnixTimestamp64Micro(priced_at, 'UTC')",
    "e.cache_write_1h_tokens",
    "e.input_audio_tokens",
    "e.output_audio_tokens",
    f"toDecimal64(reinterpretAsUInt64(reverse(e.audio_seconds)), 0) * {_MICRO}",
    "e.characters",
    "e.images",
    "e.image_size",
    "e.image_quality",
    "e.requests",
    "e.service_tier",
    "e.region",
    "p.pricing_status",
    "p.card_version",
    f"mapApply((k, v) -> (k, toDecimal128(v, 0) * {_PICO}), p.itemised)",
    "p.unpriced_reason",
    "e.usage_source",
    f"toDecimal128(p.saved_pico_usd, 0) * {_PICO}",
)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The Avro long at `pos` and the position after it (IndexError past the end)."""
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("an Avro long longer than 10 bytes")


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(sql_literal(v) for v in values) + ")"


@cache
def _spaces() -> str:
    """An RE2 class of every character `str.isspace()` is true for (what a required text may not be
    made of alone)."""
    return "".join(f"\\x{{{c:x}}}" for c in range(sys.maxunicode + 1) if chr(c).isspace())


def _valid(now_us: int) -> str:
    """SQL true for a row `priced_problem(priced, now_us)` accepts (only for such rows; see the module
    docstring), over e (event), p (price) and priced_at."""
    return " AND ".join(f"({c})" for c in _checks(now_us))


def _checks(now_us: int) -> list[str]:
    """The checks, as few function calls as they take: each costs ClickHouse about a millisecond
    to plan, per insert, whatever the rows (least/greatest over many columns count as one)."""
    not_blank = sql_literal("[^" + _spaces() + "]")
    latest = now_us + MAX_FUTURE_US
    # Every string Python would decode (UTF-8), newline-separated: a broken sequence at the end of
    # one cannot be completed by the next.
    strings = ", '\\n', ".join(
        [
            *(f"e.{f}" for f in ("project", "service", "provider", "model", "image_size", "image_quality")),
            "ifNull(e.team, '')",
            "ifNull(e.user, '')",
            "e.region",
            "p.price_card",
            "p.card_version",
            "p.unpriced_reason",
            "arrayStringConcat(mapKeys(e.tags), '\\n')",
            "arrayStringConcat(mapValues(e.tags), '\\n')",
            "arrayStringConcat(mapKeys(p.itemised), '\\n')",
        ]
    )
    texts = ", ".join(
        f"lengthUTF8({f})"
        for f in (
            "e.project",
            "e.service",
            "e.model",
            "e.image_size",
            "e.image_quality",
            "ifNull(e.team, '')",
        )
    )
    counts = [f"e.{f}" for f in MAX_COUNT]
    top = max(MAX_COUNT.values())
    capped = [f"e.{f} <= {cap}" for f, cap in MAX_COUNT.items() if cap != top]
    billed = [f"e.{m}" for m in MAX_COUNT if m != "reasoning_tokens"]
    audio = "reinterpretAsUInt64(reverse(e.audio_seconds))"  # valid for at most 8 bytes, sign clear
    return [
        f"isValidUTF8(concat({strings}))",
        f"greatest({texts}, lengthUTF8(ifNull(e.user, ''))) <= {MAX_TEXT}",
        f"match(e.project, {not_blank}) AND match(e.service, {not_blank}) AND match(e.model, {not_blank})",
        # Lowercase as Python means it, for ASCII (the providers' ids); anything else takes the slow path.
        f"match(e.provider, {sql_literal('^[ -~]*[!-~][ -~]*$')}) AND length(e.provider) <= {MAX_TEXT} "
        "AND lower(e.provider) = e.provider",
        f"length(e.tags) <= {MAX_TAGS} AND length(arrayDistinct(mapKeys(e.tags))) = length(e.tags)",
        f"arrayMax(arrayMap(x -> lengthUTF8(x), arrayConcat(mapKeys(e.tags), mapValues(e.tags)))) <= {MAX_TEXT}",
        f"least({', '.join(counts)}) >= 0 AND greatest({', '.join(counts)}) <= {top} AND {' AND '.join(capped)}",
        "e.reasoning_tokens <= e.output_tokens",
        "length(e.audio_seconds) <= 8 AND reinterpretAsUInt8(substring(e.audio_seconds, 1, 1)) < 128 "
        f"AND {audio} <= {MAX_AUDIO_SECONDS * 1_000_000}",
        f"e.service_tier IN {_in(SERVICE_TIERS)} AND e.usage_source IN {_in(USAGE_SOURCES)} "
        f"AND p.pricing_status IN {_in(_PRICING_STATUSES)}",
        f"greatest({', '.join(billed)}) > 0 OR {audio} > 0 OR e.usage_source NOT IN ('reported', 'cache')",
        "match(e.event_id, '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')",
        f"least(e.event_time, priced_at) >= {MIN_EVENT_TIME_US} AND greatest(e.event_time, priced_at) <= {latest}",
        f"ifNull(p.cost_pico_usd, 0) BETWEEN 0 AND {MAX_EVENT_PICO}",
        f"length(p.itemised) <= {MAX_TAGS} AND length(arrayDistinct(mapKeys(p.itemised))) = length(p.itemised)",
        f"arrayAll(v -> v BETWEEN 0 AND {MAX_EVENT_PICO}, mapValues(p.itemised))",
    ]


def _rows(source: str, nonce: str) -> str:
    """One row per price: e (its event), p (the price), priced_at, and `framed`: whether the source's
    split was right (see the module docstring). Each source's arrays are referenced once, where
    they are ARRAY JOINed: a column used after a join is copied to every row of it."""
    return (
        "SELECT events[p.index + 1] AS e, p, priced_at, framed AND p.index >= 0 AND p.index < n_events AS framed "
        "FROM (SELECT ps.events AS events, length(ps.events) AS n_events, s.prices AS prices, "
        "s.priced_at AS priced_at, "
        f"ps.raw = s.usage AND ps.rows = length(s.prices) AND ps.check = {nonce} AND check = {nonce} AS framed "
        f"FROM {source} ARRAY JOIN parsed AS ps, sources AS s) ARRAY JOIN prices AS p"
    )


def _select(rows: str, now_us: int) -> str:
    """`SELECT` of usage_events rows (store.USAGE_COLUMNS) from `rows` (e, p, priced_at, framed);
    raises in ClickHouse on the first row that fails a check."""
    # The guard rides on the first column: as a WHERE, ClickHouse moves it where it costs ~15x.
    guard = (
        f"throwIf(NOT (framed AND {_valid(now_us)}), "
        "'a usage.priced row failed the sink''s checks: it goes the per-row path')"
    )
    first, *rest = _COLUMNS
    assert first == "toUUID(e.event_id)"
    columns = [f"toUUID(if({guard} = 0, e.event_id, ''))", *rest]
    return f"SELECT {', '.join(columns)} FROM ({rows})"


class NativeRows:
    """The fast path's Native blocks (decoded in Rust) and the SQL that turns them into usage_events
    rows. Only where `NATIVE_ROWS` (the native module is built)."""

    FORMAT = "Native"
    STRUCTURE = NATIVE_STRUCTURE

    def __init__(self, codec: Codec) -> None:
        if priced_native is None or priced_rows is None:
            raise RuntimeError("NativeRows needs the native module (./dev setup builds it where cargo is)")
        self._rows, self._encode = priced_rows, priced_native
        self._fingerprints = tuple(codec.fingerprint(s) for s in ("PricedBatch", "UsageBatch", "UsageEvent"))

    def record(self, value: bytes) -> tuple[bytes, int] | None:
        """(the message, its rows) for a PricedBatch message the fast path takes, else None."""
        rows = self._rows(value, *self._fingerprints)
        return None if rows is None else (value, rows)

    def container(self, records: list[bytes]) -> bytes:
        """A Native file of the messages' rows: one block, not one per message (ClickHouse runs the
        SQL once per block: measured at ~2x the history writer's CPU at 5,000 events/s in messages
        of ~15 events), and no bytes without rows (a block of 0 rows ends ClickHouse's reading)."""
        encoded = self._encode(records, *self._fingerprints)
        if encoded is None:  # record() took each of them: not expected; the per-row path stores them
            raise ValueError("the native module refused a message it had taken")
        return encoded[0]  # type: ignore[no-any-return]

    def select(self, source: str, now_us: int) -> str:
        return _select(f"SELECT e, p, priced_at, true AS framed FROM {source}", now_us)

    def valid(self, source: str, now_us: int) -> str:
        """`SELECT` of one 0/1 per row of `source`: whether `select` would take it (for tests)."""
        return f"SELECT {_valid(now_us)} FROM {source}"


class AvroRows:
    """Builds the fast path's Avro records and the SQL that turns them into usage_events rows."""

    FORMAT = "Avro"
    STRUCTURE = STRUCTURE

    def __init__(self, codec: Codec) -> None:
        self._priced_batch = codec.fingerprint("PricedBatch")
        batch, single = codec.fingerprint("UsageBatch"), codec.fingerprint("UsageEvent")
        self._batch, self._single = MAGIC + batch, MAGIC + single
        self._nonce = os.urandom(8)  # a writer of usage.priced cannot know it: see the module doc
        schemas = contract_dir("schemas")
        event = json.loads((schemas / "dev.spendstream.UsageEvent.avsc").read_text())
        priced = json.loads((schemas / "dev.spendstream.PricedBatch.avsc").read_text())
        [source] = [f["type"]["items"] for f in priced["fields"] if f["name"] == "sources"]
        check = {"type": "fixed", "name": "Check", "size": 8}
        parsed = {
            "type": "record",
            "name": "SourceEvents",
            "fields": [
                {"name": "raw", "type": "bytes"},
                {"name": "rows", "type": "long"},
                {"name": "events", "type": {"type": "array", "items": event}},
                {"name": "check", "type": check},
            ],
        }
        schema = {
            "type": "record",
            "name": "SinkRow",
            "namespace": "dev.spendstream",
            "fields": [
                {"name": "parsed", "type": {"type": "array", "items": parsed}},
                {"name": "sources", "type": {"type": "array", "items": source}},
                {"name": "check", "type": "Check"},
            ],
        }
        self._header = self._container_header(json.dumps(schema, separators=(",", ":")).encode())

    @staticmethod
    def _container_header(schema: bytes) -> bytes:
        out = io.BytesIO()
        out.write(b"Obj\x01")
        meta = {b"avro.schema": schema, b"avro.codec": b"null"}
        out.write(avro_long(len(meta)))
        for key, value in meta.items():
            out.write(avro_long(len(key)) + key + avro_long(len(value)) + value)
        out.write(b"\x00")
        return out.getvalue()

    def record(self, value: bytes) -> tuple[bytes, int] | None:
        """(SinkRow record, rows) for a PricedBatch message the fast path takes, else None.

        The record is a guess ClickHouse verifies (see the module docstring): a foreign message
        that fools the search fails there and is stored by the per-row path."""
        if len(value) <= _HEADER or value[2:_HEADER] != self._priced_batch or value[:2] != MAGIC:
            return None
        if value[_HEADER] != 0:  # `events` not empty: whole PricedUsage records
            return None
        parts: list[bytes] = []
        total = sources = 0
        find, batch, single = value.find, self._batch, self._single
        pos = _HEADER + 1
        try:
            # The sources array's first block count: a meter writes one block, so every source.
            # A source the search below does not find (usage written with an older schema) makes
            # the counts differ: such a message goes the per-row path.
            expected, _ = _varint(value, pos)
            while True:
                at_batch, at_single = find(batch, pos), find(single, pos)
                start = (
                    min(at_batch, at_single) if at_batch >= 0 and at_single >= 0 else max(at_batch, at_single)
                )
                if start < 0:
                    break
                length_at = start - 1  # the varint of the usage bytes' length ends just before them
                while length_at > pos and value[length_at - 1] & 0x80:
                    length_at -= 1
                length, after = _varint(value, length_at)
                if after != start or length <= _HEADER:
                    return None
                end = start + length
                _, prices_at = _varint(value, end)  # priced_at
                rows, _ = _varint(value, prices_at)  # the prices array's first block count
                if rows < 0:  # a block written with its byte size: not what a meter writes
                    return None
                raw = value[start:end]
                body = raw[_HEADER:] if start == at_batch else b"\x02" + raw[_HEADER:] + b"\x00"
                parts += (avro_long(len(raw)), raw, avro_long(rows), body, self._nonce)
                total += rows
                sources += 1
                pos = end
        except (IndexError, ValueError):
            return None
        if sources != expected:
            return None
        head = avro_long(sources) if sources else b""
        return b"".join((head, *parts, b"\x00", value[_HEADER + 1 :], self._nonce)), total

    def container(self, records: list[bytes]) -> bytes:
        """An Avro Object Container File of `records` (one block, no compression)."""
        sync = os.urandom(16)
        body = b"".join(records)
        return b"".join((self._header, sync, avro_long(len(records)), avro_long(len(body)), body, sync))

    def select(self, source: str, now_us: int) -> str:
        """`SELECT` of usage_events rows (store.USAGE_COLUMNS) from `source` (a table function over a
        container with STRUCTURE); raises in ClickHouse on the first row that fails a check."""
        return _select(_rows(source, f"unhex('{self._nonce.hex()}')"), now_us)

    def valid(self, source: str, now_us: int) -> str:
        """`SELECT` of one 0/1 per row of `source`: whether `select` would take it (for tests)."""
        return f"SELECT {_valid(now_us)} FROM ({_rows(source, 'check')})"
