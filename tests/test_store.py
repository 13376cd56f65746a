"""The ClickHouse contract on the real engine (embedded chDB): DDL, exact decimals, dedup, read-only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from producers import build_event
from spendstream.errors import QueryError
from spendstream.store import USAGE_COLUMNS, ClickHouseStore
from stream_processors.sink import usage_row

# chDB admits one engine (one path) per process: every test here shares this one.
_PATH = Path(__file__).resolve().parent.parent / ".spendstream" / "test-chdb"


@pytest.fixture
def store() -> Iterator[ClickHouseStore]:
    s = ClickHouseStore(f"chdb://{_PATH}", f"t_{uuid.uuid4().hex[:12]}")
    yield s
    s.close()


def priced(project: str, pico: int | None, event_id: str | None = None) -> dict[str, object]:
    usage = build_event(
        service="svc",
        project=project,
        provider="openai",
        model="gpt-4o",
        input_tokens=1,
        output_tokens=2,
        user="u1",
        tags={"k": "v"},
        event_id=event_id,
        audio_seconds="1.5",
        event_time=datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC),
    )
    return {
        "usage": usage,
        "cost_pico_usd": pico,
        "price_card": "c",
        "priced_at": 1_795_780_800_500_000,
        "pricing_status": "priced" if pico is not None else "unpriced",
        "card_version": "2024-10-02",
        "itemised": {"input": pico} if pico else {},
        "unpriced_reason": "",
    }


def test_migrations_apply_once(store: ClickHouseStore) -> None:
    assert store.migrate() == [
        "001_usage_events.sql",
        "002_dead_letters.sql",
        "003_pricing_engine.sql",
        "004_usage_source.sql",
    ]
    assert store.migrate() == []
    tables = store.query("SHOW TABLES").rows
    assert sorted(r[0] for r in tables) == [
        "dead_letters",
        "pricing_runs",
        "schema_migrations",
        "usage_cost_latest",
        "usage_events",
        "usage_repriced",
    ]


def test_costs_sum_exactly_and_duplicates_collapse(store: ClickHouseStore) -> None:
    store.migrate()
    dup = str(uuid.uuid4())
    rows = [usage_row(priced("a", 1)) for _ in range(999)] + [usage_row(priced("a", 3_500_000_000, dup))] * 3
    store.insert("usage_events", rows, USAGE_COLUMNS)
    result = store.query("SELECT count(), sum(cost_usd), toTypeName(sum(cost_usd)) FROM usage_events FINAL")
    assert result.rows == [[1000, Decimal("0.003500000999"), "Nullable(Decimal(38, 12))"]]
    got = store.query(
        "SELECT event_time, user, tags, audio_seconds, itemised FROM usage_events LIMIT 1"
    ).rows[0]
    assert (got[0].isoformat(), got[1], got[2], got[3]) == (
        "2026-11-27T12:00:00.123456",
        "u1",
        {"k": "v"},
        Decimal("1.5"),
    )
    assert got[4] == {"input": Decimal("0.000000000001")}


def test_unpriced_cost_is_null_not_zero(store: ClickHouseStore) -> None:
    store.migrate()
    store.insert("usage_events", [usage_row(priced("a", None)), usage_row(priced("a", 5))], USAGE_COLUMNS)
    rows = store.query("SELECT pricing_status, cost_usd FROM usage_events FINAL ORDER BY pricing_status").rows
    assert rows == [["priced", Decimal("0.000000000005")], ["unpriced", None]]


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE usage_events",
        "INSERT INTO usage_events SELECT * FROM usage_events",
        "SELECT 1; DROP TABLE usage_events",
        "ALTER TABLE usage_events DELETE WHERE 1",
    ],
)
def test_queries_are_read_only(store: ClickHouseStore, sql: str) -> None:
    store.migrate()
    with pytest.raises(QueryError, match="read-only"):
        store.query(sql)


def test_query_errors_are_query_errors(store: ClickHouseStore) -> None:
    with pytest.raises(QueryError, match=r"UNKNOWN_TABLE|Unknown table"):
        store.query("SELECT * FROM no_such_table")


def test_a_flush_while_the_sink_decodes_commits_exactly_the_offsets_of_the_rows_it_takes() -> None:
    """`/flush` can run while the sink yields between messages of one fetch."""
    import asyncio
    from typing import Any

    from aiokafka import TopicPartition

    from spendstream.settings import Topics
    from spendstream.wire import default_codec
    from stream_processors.sink import Sink

    codec = default_codec()
    topics = Topics("t.")
    tp = TopicPartition(topics.usage_priced, 0)

    class Record:
        def __init__(self, offset: int) -> None:
            self.offset, self.key = offset, b"a"
            self.value = codec.encode("PricedBatch", {"events": [priced("a", 1)]})

    class Consumer:  # stands in for aiokafka: one fetch of two messages, then nothing
        def __init__(self) -> None:
            self.fetches = [{tp: [Record(10), Record(11)]}]
            self.commits: list[dict[Any, int]] = []

        async def getmany(self, **_: Any) -> dict[Any, list[Record]]:
            if self.fetches:
                return self.fetches.pop()
            await asyncio.sleep(0.01)
            return {}

        async def commit(self, offsets: dict[Any, int]) -> None:
            self.commits.append(dict(offsets))

    class Store:
        def __init__(self) -> None:
            self.inserted: list[int] = []

        def insert(self, table: str, rows: list[Any], columns: Any) -> None:
            self.inserted.append(len(rows))

    async def run() -> tuple[list[dict[Any, int]], list[int]]:
        store, consumer = Store(), Consumer()
        sink = Sink(
            bootstrap="unused",
            topics=topics,
            group_id="g",
            store=store,  # type: ignore[arg-type]
            codec=codec,
            max_rows=1000,
            max_seconds=60,
        )
        sink._consumer = consumer  # type: ignore[assignment]
        consuming = asyncio.ensure_future(Sink._consume(sink))  # a mode ServiceTask, unstarted
        await asyncio.sleep(0)  # the sink decodes offset 10 and yields before offset 11
        await sink.flush()
        await asyncio.sleep(0.05)
        await sink.flush()
        consuming.cancel()
        return consumer.commits, store.inserted

    commits, inserted = asyncio.run(run())
    assert inserted == [1, 1]
    assert commits == [{tp: 11}, {tp: 12}]
