"""The sink's fast paths (ClickHouse builds the rows from Native blocks decoded in Rust, or from the
PricedBatch framed as Avro) against its per-row path, on the real broker and the real engine
(embedded chDB): the same messages give the same rows, column for column; every kind of bad row
ends as the per-row path ends it (a dead letter with its reason, its neighbours stored); the SQL
checks never accept a row `priced_problem` refuses; and the Native blocks are, byte for byte,
what ClickHouse writes for the rows it parses from the Avro. The native cases fail, not skip,
where the native module is not built."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_case
from hypothesis import strategies as st

from producers import build_event
from spendstream.topics import Topics, ensure_topics
from spendstream.usage import MAX_COUNT, MAX_EVENT_PICO, MAX_FUTURE_US, MIN_EVENT_TIME_US, priced_problem
from spendstream.wire import default_codec
from stream_processors.avro_rows import STRUCTURE, AvroRows, NativeRows, _rows
from stream_processors.feeds import publish
from stream_processors.sink import Sink
from stream_processors.store import ClickHouseStore, sql_literal

pytestmark = pytest.mark.integration

CODEC = default_codec()
# chDB admits one engine (one path) per process: the one test_store uses.
_CHDB = Path(__file__).resolve().parent.parent / ".spendstream" / "test-chdb"
NOW_US = time.time_ns() // 1000


@pytest.fixture
def stores() -> Iterator[tuple[ClickHouseStore, ClickHouseStore]]:
    """(fast, per_row): two fresh databases of the same engine."""
    pair = []
    for kind in ("fast", "slow"):
        store = ClickHouseStore(f"chdb://{_CHDB}", f"{kind}_{uuid.uuid4().hex[:12]}")
        store.migrate()
        pair.append(store)
    yield pair[0], pair[1]
    for store in pair:
        store.close()


def _shm_or_tmp() -> str:
    return "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()


def event(i: int, **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "service": "svc",
        "project": "p1",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 100 + i,
        "output_tokens": 20,
        "reasoning_tokens": 5,
        "team": "t1" if i % 2 else None,
        "user": f"u{i}",
        "tags": {"env": "test", "i": str(i)} if i % 3 else {},
    }
    return build_event(**{**fields, **kw})


def price(index: int, **kw: Any) -> dict[str, Any]:
    return {
        "index": index,
        "cost_pico_usd": 1_234_567 * (index + 1),
        "price_card": "openai",
        "pricing_status": "priced",
        "card_version": "2026-11-01",
        "itemised": {"input": 1_000_000 * (index + 1), "output": 234_567 * (index + 1)},
        "unpriced_reason": "",
        "saved_pico_usd": 0,
        **kw,
    }


def source(
    events: list[dict[str, Any]], prices: list[dict[str, Any]], single: bool = False
) -> dict[str, Any]:
    usage = (
        CODEC.encode("UsageEvent", events[0]) if single else CODEC.encode("UsageBatch", {"events": events})
    )
    return {"usage": usage, "priced_at": NOW_US - 1_000_000, "prices": prices}


def batch(*sources: dict[str, Any]) -> bytes:
    return CODEC.encode("PricedBatch", {"sources": list(sources)})


def varied_messages() -> list[bytes]:
    """PricedBatch v5 messages covering every column's shapes, plus one v4-style `events` message."""
    rich = [
        event(0),
        event(
            1,
            audio_seconds="12.345678",
            model="whisper-1",
            input_tokens=0,
            output_tokens=0,
            reasoning_tokens=0,
        ),
        event(
            2, image_size="1024x1024", image_quality="hd", images=3, service_tier="batch", region="data_zone"
        ),
        event(3, usage_source="missing", input_tokens=0, output_tokens=0, reasoning_tokens=0),
        event(4, usage_source="cache", cached_input_tokens=7, cache_write_tokens=8, cache_write_1h_tokens=9),
        event(5, characters=4096, requests=2, input_audio_tokens=11, output_audio_tokens=12, user="ünï ☃"),
        event(6, event_time=None),
    ]
    rich[6]["event_id"] = rich[6]["event_id"].upper()
    prices = [
        price(0),
        price(1, cost_pico_usd=None, pricing_status="unpriced", itemised={}, unpriced_reason="no card"),
        price(2, pricing_status="fallback", cost_pico_usd=MAX_EVENT_PICO),
        price(3, cost_pico_usd=0, itemised={}),
        price(4, cost_pico_usd=0, saved_pico_usd=987_654_321_012),
        # event 5 not priced here (a copy, or forwarded): the index skips it
        price(6, cost_pico_usd=1),
    ]
    single = source([event(7, project="p2")], [price(0)], single=True)
    legacy = {
        "usage": event(8),
        "priced_at": NOW_US,
        **{k: v for k, v in price(0).items() if k != "index"},
    }
    return [
        batch(source(rich, prices), single),
        batch(single, source([event(9), event(10)], [price(0), price(1)])),
        CODEC.encode("PricedBatch", {"events": [legacy]}),
        batch(),
    ]


async def run_sink(
    kafka: str, topics: Topics, store: ClickHouseStore, *, avro: bool, native: bool, rows: int, dead: int
) -> Sink:
    """A Sink on `topics` until `store` holds `rows` usage rows and `dead` dead letters."""
    sink = Sink(
        bootstrap=kafka,
        topics=topics,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        store=store,
        codec=CODEC,
        max_rows=50_000,
        max_seconds=0.1,
        avro_inserts=avro,
        native=native,
    )
    await sink.start()
    try:
        deadline = time.monotonic() + 60
        while (count(store, "usage_events"), count(store, "dead_letters")) < (rows, dead):
            assert time.monotonic() < deadline, (
                f"the sink stored {count(store, 'usage_events')} of {rows} rows"
            )
            await asyncio.sleep(0.1)
    finally:
        await sink.stop()
    return sink


def count(store: ClickHouseStore, table: str) -> int:
    return int(store.query(f"SELECT count() FROM {store.database}.{table} FINAL").rows[0][0])


def usage_rows(store: ClickHouseStore) -> list[list[Any]]:
    return store.query(
        f"SELECT * EXCEPT inserted_at FROM {store.database}.usage_events FINAL ORDER BY event_id"
    ).rows


def dead_rows(store: ClickHouseStore) -> list[list[Any]]:
    return store.query(
        "SELECT reason, detail, source_topic, source_partition, source_offset, key, payload "
        f"FROM {store.database}.dead_letters FINAL ORDER BY source_offset, detail"
    ).rows


def sink_both(
    kafka: str,
    stores: tuple[ClickHouseStore, ClickHouseStore],
    messages: list[bytes],
    rows: int,
    dead: int,
    native: bool,
) -> tuple[Sink, Sink]:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(kafka, topics, 1, 1))
    asyncio.run(publish(kafka, topics.usage_priced, [(b"p1", m) for m in messages]))
    fast = asyncio.run(run_sink(kafka, topics, stores[0], avro=True, native=native, rows=rows, dead=dead))
    slow = asyncio.run(run_sink(kafka, topics, stores[1], avro=False, native=native, rows=rows, dead=dead))
    return fast, slow


@pytest.mark.parametrize("native", [True, False], ids=["native", "avro"])
def test_clickhouse_building_the_rows_stores_exactly_the_per_row_paths_rows(
    kafka: str, stores: tuple[ClickHouseStore, ClickHouseStore], native: bool
) -> None:
    fast_store, slow_store = stores
    # what a history process killed during an insert left behind (its pid no longer runs)
    stale = Path(tempfile.mkdtemp(prefix="spendstream-sink-999999999-", dir=_shm_or_tmp()))
    (stale / "left.avro").write_bytes(b"users' data")
    fast, slow = sink_both(kafka, stores, varied_messages(), rows=10, dead=0, native=native)
    assert not stale.exists()
    assert fast_store._files_dir is not None
    assert list(Path(fast_store._files_dir).iterdir()) == []  # each insert's file is gone with it
    fast_rows, slow_rows = usage_rows(fast_store), usage_rows(slow_store)
    print(
        f"sent 11 priced rows (10 events) in 4 messages; fast path stored {len(fast_rows)}, per-row {len(slow_rows)}"
    )
    assert len(fast_rows) == len(slow_rows) == 10
    assert fast_rows == slow_rows  # every column of every row
    assert fast.rows_written == slow.rows_written == 11  # event 7 twice: one row after FINAL
    assert (fast.rows_parsed, slow.rows_parsed) == (10, 0)  # all but the v4-style message's row
    db = fast_store.database
    costs = [r[0] for r in fast_store.query(f"SELECT cost_usd FROM {db}.usage_events FINAL").rows]
    assert Decimal(MAX_EVENT_PICO).scaleb(-12) in costs
    assert None in costs
    [[audio, saved]] = fast_store.query(
        f"SELECT sum(audio_seconds), sum(saved_usd) FROM {db}.usage_events FINAL"
    ).rows
    assert (audio, saved) == (Decimal("12.345678"), Decimal("0.987654321012"))


def test_messages_the_fast_path_cannot_frame_go_the_per_row_path_from_the_start() -> None:
    """v4-style `events`, usage written with a schema other than the current one and other messages
    are not framed (so no flush fails and falls back for them)."""
    avro = AvroRows(CODEC)
    good = source([event(0), event(1)], [price(0), price(1)])
    assert avro.record(batch(good, source([event(2)], [price(0)], single=True))) is not None
    old = dict(good, usage=good["usage"][:2] + bytes(8) + good["usage"][10:])  # another fingerprint
    assert avro.record(batch(good, old)) is None
    assert avro.record(batch(old)) is None
    legacy = {"usage": event(3), "priced_at": NOW_US, **{k: v for k, v in price(0).items() if k != "index"}}
    assert avro.record(CODEC.encode("PricedBatch", {"events": [legacy]})) is None
    assert avro.record(CODEC.encode("UsageBatch", {"events": [event(4)]})) is None


def test_messages_the_native_path_cannot_decode_exactly_go_the_per_row_path_from_the_start() -> None:
    """What AvroRows refuses, and what it frames for ClickHouse to refuse (a price for an event its
    source lacks, a byte after a source's usage); every prefix of a good message. Messages without
    rows add no bytes (a block of 0 rows would end ClickHouse's reading of the blocks after it)."""
    native = NativeRows(CODEC)
    good = source([event(0), event(1)], [price(0), price(1)])
    value = batch(good, source([event(2)], [price(0)], single=True))
    assert native.record(value) == (value, 3)
    old = dict(good, usage=good["usage"][:2] + bytes(8) + good["usage"][10:])
    legacy = {"usage": event(3), "priced_at": NOW_US, **{k: v for k, v in price(0).items() if k != "index"}}
    trailing = source([event(5)], [price(0)], single=True)
    trailing["usage"] += b"\x00"
    refused = [
        batch(good, old),
        batch(old),
        CODEC.encode("PricedBatch", {"events": [legacy]}),
        CODEC.encode("UsageBatch", {"events": [event(4)]}),
        batch(source([event(6)], [price(0), price(1)])),  # index 1 of a source of one event
        batch(source([event(6)], [price(-1)])),
        batch(trailing),
        value + b"\x00",
    ]
    assert [native.record(v) for v in refused] == [None] * len(refused)
    assert all(native.record(value[:cut]) is None for cut in range(len(value)))
    empty = [batch(), batch(source([event(7)], []))]
    assert [native.record(v) for v in empty] == [(v, 0) for v in empty]
    assert native.container(empty) == b""
    with pytest.raises(ValueError, match="refused a message"):
        native.container([value, refused[0]])


def test_the_native_block_is_what_clickhouse_writes_for_the_avro_rows(
    check_store: tuple[ClickHouseStore, Path],
) -> None:
    """Byte for byte: one block of all the messages' rows against ClickHouse's own Native output of
    the rows it parses from the same messages framed as Avro (so both paths feed the same SQL the
    same values), for each message alone and for all of them in one file."""
    store, directory = check_store
    avro, native = AvroRows(CODEC), NativeRows(CODEC)
    messages = [v for v in varied_messages() if native.record(v) is not None]
    assert len(messages) == 3  # the v4-style message is neither path's

    def clickhouse_native(values: list[bytes]) -> bytes:
        framed = [avro.record(v) for v in values]
        path, out = directory / "m.avro", directory / "m.native"
        path.write_bytes(avro.container([f[0] for f in framed if f is not None]))
        source_ = f"file({sql_literal(str(path))}, 'Avro', {sql_literal(STRUCTURE)})"
        store._client.command(  # query() would add a FORMAT of its own
            f"SELECT e, p, priced_at FROM ({_rows(source_, 'check')}) "
            f"INTO OUTFILE {sql_literal(str(out))} TRUNCATE FORMAT Native"
        )
        return out.read_bytes()

    for group in ([messages[0]], [messages[1]], messages):
        block = native.container(group)
        assert block == clickhouse_native(group)
        assert len(block) > 1000
    assert native.container([messages[2]]) == b""  # the empty batch()


# One bad row of each kind, next to good ones; (field of the event or the price, value).
BAD = [
    ("price", "cost_pico_usd", MAX_EVENT_PICO + 1),
    ("price", "cost_pico_usd", -1),
    ("price", "pricing_status", "bogus"),
    ("price", "itemised", {"input": -5}),
    # 11.6 days beyond the limit: NOW_US is taken when the suite is collected, and the sink checks
    # against its own clock, which may run half an hour later in a full suite
    ("price", "priced_at", NOW_US + MAX_FUTURE_US + 10**12),
    ("event", "reasoning_tokens", 10**6),
    ("event", "input_tokens", -3),
    ("event", "images", MAX_COUNT["images"] + 1),
    ("event", "project", "\u00a0"),
    ("event", "provider", "OpenAI"),
    ("event", "service_tier", "gold"),
    ("event", "usage_source", "guessed"),
    ("event", "event_time", MIN_EVENT_TIME_US - 1),
    ("event", "event_id", "not-a-uuid"),
    ("event", "audio_seconds", b"\xff"),
    ("event", "tags", {f"k{i}": "v" for i in range(65)}),
    ("event", "model", "m" * 257),
]


@pytest.mark.parametrize("native", [True, False], ids=["native", "avro"])
def test_every_bad_row_through_the_fast_path_ends_as_the_per_row_path_ends_it(
    kafka: str, stores: tuple[ClickHouseStore, ClickHouseStore], native: bool
) -> None:
    messages = []
    for i, (where, field, value) in enumerate(BAD):
        events = [event(3 * i), event(3 * i + 1), event(3 * i + 2)]
        prices = [price(0), price(1), price(2)]
        if where == "event":
            events[1][field] = value
        elif field == "priced_at":
            prices = prices[1:2]  # priced_at is the source's: one priced row, the bad one
        else:
            prices[1][field] = value
        src = source(events, prices)
        if field == "priced_at":
            src["priced_at"] = value
        messages.append(batch(src, source([event(1000 + i)], [price(0)], single=True)))
    # Framing a per-row decode refuses: a price for an event the source lacks (the whole message
    # is dead-lettered), and a single UsageEvent with a byte after its body.
    messages.append(batch(source([event(2000)], [price(0), price(1)])))
    trailing = source([event(2001)], [price(0)], single=True)
    trailing["usage"] += b"\x00"
    messages.append(batch(trailing))
    # two good rows beside each bad one (none beside a bad priced_at), and each message's neighbour
    good = sum(0 if field == "priced_at" else 2 for _, field, _ in BAD) + len(BAD)
    dead = len(BAD) + 2
    fast_store, slow_store = stores
    fast, _ = sink_both(kafka, stores, messages, rows=good, dead=dead, native=native)
    assert fast.rows_parsed == 0  # every message holds a bad row: each flush fell back
    fast_rows, slow_rows = usage_rows(fast_store), usage_rows(slow_store)
    fast_dead, slow_dead = dead_rows(fast_store), dead_rows(slow_store)
    print(
        f"sent {len(BAD)} bad rows + 2 bad framings with {good} good neighbours; fast path stored "
        f"{len(fast_rows)}, dead-lettered {len(fast_dead)}; per-row stored {len(slow_rows)}, "
        f"dead-lettered {len(slow_dead)}"
    )
    assert len(fast_rows) == len(slow_rows) == good
    assert fast_rows == slow_rows
    assert fast_dead == slow_dead
    assert len(fast_dead) == dead
    assert sorted({r[0] for r in fast_dead}) == ["sink_invalid_row", "sink_undecodable"]


# -- the SQL checks never accept what priced_problem refuses ---------------------------------------

_ROWS, _NATIVE = AvroRows(CODEC), NativeRows(CODEC)
_TEXT = st.sampled_from(["openai", "a", "x" * 256, "é" * 256, "ü ß", "\u3000x", "☃"])
_EDGE_TEXT = st.one_of(
    st.sampled_from([" ", "\u00a0", "\u2028", "", "x" * 257, "é" * 257, "\t", "A", "ß", "ﬁ"]),
    st.text(max_size=5),
)
_TIMES = [MIN_EVENT_TIME_US - 1, MIN_EVENT_TIME_US, NOW_US + MAX_FUTURE_US, NOW_US + MAX_FUTURE_US + 1, 0, -1]
_PICOS = [0, 1, MAX_EVENT_PICO, MAX_EVENT_PICO + 1, -1, 2**63 - 1]
# (field, edge values): applied to a valid row, a few at a time, so that both outcomes are common.
_EDGES: list[tuple[str, st.SearchStrategy[Any]]] = [
    *(
        (f, _EDGE_TEXT)
        for f in ("project", "service", "model", "provider", "image_size", "image_quality", "region")
    ),
    *((f, st.one_of(st.none(), _EDGE_TEXT)) for f in ("team", "user")),
    ("tags", st.dictionaries(_EDGE_TEXT, _EDGE_TEXT, max_size=3)),
    ("tags", st.just({f"k{i}": "v" for i in range(65)})),
    *((f, st.sampled_from([0, -1, cap, cap + 1, 2**63 - 1])) for f, cap in MAX_COUNT.items()),
    (
        "audio_seconds",
        st.sampled_from(
            [b"", b"\x00", b"\x80", b"\x00" * 9, (10**12).to_bytes(8, "big"), (10**12 + 1).to_bytes(8, "big")]
        ),
    ),
    ("service_tier", st.sampled_from(["flex", "gold", ""])),
    ("usage_source", st.sampled_from(["missing", "estimated", "cache", "x"])),
    ("event_id", st.sampled_from([str(uuid.uuid4()).upper(), uuid.uuid4().hex, "x", ""])),
    ("event_time", st.sampled_from(_TIMES)),
    ("priced_at", st.sampled_from(_TIMES)),
    ("cost_pico_usd", st.one_of(st.none(), st.sampled_from(_PICOS))),
    (
        "itemised",
        st.dictionaries(st.sampled_from(["input", "output", "é"]), st.sampled_from(_PICOS), max_size=2),
    ),
    ("itemised", st.just({f"m{i}": 1 for i in range(65)})),
    ("pricing_status", st.sampled_from(["fallback", "unpriced", "other"])),
]
_PRICE_FIELDS = ("priced_at", "cost_pico_usd", "itemised", "pricing_status")


@st.composite
def priced_rows(draw: st.DrawFn) -> dict[str, Any]:
    """A valid priced row with 0-3 fields set to edge values (valid or not)."""
    usage: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_time": NOW_US - draw(st.integers(0, 10**12)),
        "project": draw(_TEXT),
        "team": draw(st.one_of(st.none(), _TEXT)),
        "user": draw(st.one_of(st.none(), _TEXT)),
        "service": draw(_TEXT),
        "provider": "openai",
        "model": draw(_TEXT),
        "tags": draw(st.dictionaries(_TEXT, _TEXT, max_size=3)),
        "audio_seconds": draw(st.sampled_from([b"\x00", b"\x01", b"\x0f\x42\x40"])),
        "image_size": "",
        "image_quality": "",
        "service_tier": "standard",
        "region": "global",
        "usage_source": "reported",
        **{f: draw(st.integers(0, min(cap, 10**6))) for f, cap in MAX_COUNT.items()},
    }
    usage["output_tokens"] = max(usage["output_tokens"], usage["reasoning_tokens"], 1)
    priced: dict[str, Any] = {
        "usage": usage,
        "priced_at": NOW_US,
        "cost_pico_usd": draw(st.one_of(st.none(), st.integers(0, MAX_EVENT_PICO))),
        "itemised": {"input": draw(st.integers(0, MAX_EVENT_PICO))},
        "pricing_status": "priced",
        "price_card": "c",
        "card_version": "v",
        "unpriced_reason": "",
        "saved_pico_usd": 0,
    }
    for field, values in draw(st.lists(st.sampled_from(_EDGES), max_size=3)):
        (priced if field in _PRICE_FIELDS else usage)[field] = draw(values)
    return priced


@pytest.fixture(scope="module")
def check_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClickHouseStore, Path]]:
    """A store and a directory for the containers it reads."""
    store = ClickHouseStore(f"chdb://{_CHDB}", f"v_{uuid.uuid4().hex[:12]}")
    yield store, tmp_path_factory.mktemp("avro")
    store.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(priced=priced_rows())
def test_the_sql_checks_accept_a_row_only_if_priced_problem_does(
    check_store: tuple[ClickHouseStore, Path], priced: dict[str, Any]
) -> None:
    usage = priced["usage"]
    prices = {k: v for k, v in priced.items() if k not in ("usage", "priced_at")}
    value = batch(
        {
            "usage": CODEC.encode("UsageEvent", usage),
            "priced_at": priced["priced_at"],
            "prices": [{"index": 0, **prices}],
        }
    )
    framed = _ROWS.record(value)
    assert framed is not None
    assert framed[1] == 1
    store, directory = check_store
    path = directory / "row.avro"
    path.write_bytes(_ROWS.container([framed[0]]))
    source = f"file({sql_literal(str(path))}, 'Avro', {sql_literal(STRUCTURE)})"
    [[sql_ok]] = store.query(_ROWS.valid(source, NOW_US)).rows
    assert _NATIVE.record(value) == (value, 1)  # the same row through the native path: the same answer
    native_path = directory / "row.native"
    native_path.write_bytes(_NATIVE.container([value]))
    native_source = f"file({sql_literal(str(native_path))}, 'Native', {sql_literal(NativeRows.STRUCTURE)})"
    assert store.query(_NATIVE.valid(native_source, NOW_US)).rows == [[sql_ok]]
    problem = priced_problem(priced, now_us=NOW_US)
    note_case(f"priced_problem accepts: {problem is None}, SQL accepts: {bool(sql_ok)}")
    if sql_ok:
        assert problem is None
    plain = (
        all(isinstance(v, str) and v.isascii() and v.isprintable() for v in (usage["provider"],))
        and "-" in usage["event_id"]
    )
    if problem is None and plain:
        assert sql_ok, "the SQL refused a row priced_problem accepts (it would only take the slow path)"
