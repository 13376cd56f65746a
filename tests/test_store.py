"""The ClickHouse contract on the real engine (embedded chDB): DDL, exact decimals, dedup, read-only."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from producers import build_event
from spendstream.errors import QueryError
from stream_processors.sink import usage_row
from stream_processors.store import USAGE_COLUMNS, ClickHouseStore, QueryLimits

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
        "saved_pico_usd": 0,
    }


def test_migrations_apply_once(store: ClickHouseStore) -> None:
    assert store.migrate() == [
        "001_usage_events.sql",
        "002_dead_letters.sql",
        "003_pricing_engine.sql",
        "004_usage_source.sql",
        "005_cache_savings.sql",
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
    ("sql", "refused"),
    [  # each refused by ClickHouse: its parser (statement kind) or its readonly guard
        ("DROP TABLE usage_events", "parsed it as DropQuery"),
        ("INSERT INTO usage_events SELECT * FROM usage_events", "parsed it as InsertQuery"),
        ("CREATE TABLE x (a UInt8) ENGINE = Memory", "parsed it as CreateQuery"),
        ("ALTER TABLE usage_events DELETE WHERE 1", "parsed it as AlterQuery"),
        ("SET readonly = 0", "parsed it as Set"),
        ("SYSTEM STOP MERGES", "Syntax error"),  # SYSTEM takes no FORMAT: never reaches a session
        ("KILL QUERY WHERE 1", "parsed it as KillQueryQuery"),  # readonly allows KILL: the sink's inserts
        ("USE system", "parsed it as UseQuery"),  # readonly allows USE
        ("SELECT 1; DROP TABLE usage_events", "Multi-statements are not allowed"),
        ("SELECT * FROM file('/etc/hostname', 'LineAsString')", "Cannot execute query in readonly mode"),
        (
            "SELECT * FROM url('http://127.0.0.1:9/', 'CSV', 'a String')",
            "Cannot execute query in readonly mode",
        ),
        ("SELECT 1 SETTINGS max_execution_time = 1000", "Cannot modify 'max_execution_time'"),
        ("SELECT 1 SETTINGS readonly = 0", "Cannot modify 'readonly'"),
        ("SELECT * FROM Python(store)", "allow_python_table_function"),
    ],
)
def test_user_queries_are_read_only(store: ClickHouseStore, sql: str, refused: str) -> None:
    store.migrate()
    store.insert("usage_events", [usage_row(priced("a", 1))], USAGE_COLUMNS)
    with pytest.raises(QueryError, match=re.escape(refused)):
        store.user_query(sql)
    assert store.user_query("SELECT count() FROM usage_events").rows == [[1]]  # nothing changed
    assert len(store.user_query("SHOW TABLES").rows) == 6


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'x' INTO OUTFILE '{f}' APPEND",
        "SELECT 'x' INTO OUTFILE '{f}' TRUNCATE COMPRESSION 'gzip'",
        "SELECT 'x' INTO OUTFILE '{f}' AND STDOUT",
        "SHOW TABLES INTO OUTFILE '{f}'",
        "DESCRIBE TABLE usage_events INTO OUTFILE '{f}'",
        "EXPLAIN SELECT 1 INTO OUTFILE '{f}'",
        "  select 'x'  into   outfile '{f}' ;",
    ],
)
def test_into_outfile_writes_no_file(
    store: ClickHouseStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sql: str
) -> None:
    """Embedded chDB writes INTO OUTFILE itself, even under readonly=1 (measured: the file appears);
    ClickHouse's parser finds the clause first. Relative paths resolve in the process's cwd."""
    store.migrate()
    monkeypatch.chdir(tmp_path)
    for target in ("f.txt", str(tmp_path / "abs.txt")):
        with pytest.raises(QueryError, match="INTO OUTFILE is not allowed"):
            store.user_query(sql.format(f=target))
    assert list(tmp_path.iterdir()) == []


def test_read_only_statements_answer(store: ClickHouseStore) -> None:
    store.migrate()
    assert store.user_query("SELECT 'INTO OUTFILE x' AS s;").rows == [
        ["INTO OUTFILE x"]
    ]  # text, not a clause
    assert store.user_query("WITH 2 AS x SELECT x * 3").rows == [[6]]
    assert store.user_query("EXISTS TABLE usage_events").rows == [[1]]
    assert store.user_query("DESCRIBE usage_events").rows[0][:2] == ["event_id", "UUID"]
    assert store.user_query("EXPLAIN SELECT 1").rows != []
    assert store.user_query("SELECT getSetting('readonly'), getSetting('max_result_rows')").rows == [
        [1, 100_000]
    ]


def test_limits_stop_queries_and_no_settings_clause_lifts_them(store: ClickHouseStore) -> None:
    limited = ClickHouseStore(f"chdb://{_PATH}", store.database, QueryLimits(2, 1_000, 256 << 20))
    heavy = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 1000 = 7"
    try:
        started = time.monotonic()
        with pytest.raises(QueryError, match=r"ran past 2 s .*max_execution_time.*TIMEOUT_EXCEEDED"):
            limited.user_query(heavy)
        assert 1.9 < time.monotonic() - started < 10
        # A subquery's SETTINGS clause is not checked by readonly, but does not lift the limits either.
        with pytest.raises(QueryError, match="TIMEOUT_EXCEEDED"):
            limited.user_query(f"SELECT * FROM ({heavy} SETTINGS max_execution_time = 0)")
        with pytest.raises(QueryError, match=r"more than 1,000 rows .*max_result_rows"):
            limited.user_query("SELECT * FROM (SELECT * FROM numbers(5000) SETTINGS max_result_rows = 0)")
        with pytest.raises(QueryError, match=r"max_memory_usage.*MEMORY_LIMIT_EXCEEDED"):
            limited.user_query(
                "SELECT length(a) FROM (SELECT groupArray(number) AS a FROM numbers(200000000) "
                "SETTINGS max_memory_usage = 0)"
            )
        assert limited.user_query("SELECT count() FROM numbers(1000)").rows == [[1000]]
    finally:
        limited.close()


def test_a_query_stopped_at_its_limit_never_held_back_inserts(store: ClickHouseStore) -> None:
    """The sink's inserts and users' queries run on separate ClickHouse sessions (and threads)."""
    store.migrate()
    limited = ClickHouseStore(f"chdb://{_PATH}", store.database, QueryLimits(timeout_seconds=4))
    errors: list[str] = []

    def long_query() -> None:
        try:
            limited.user_query("SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 1000 = 7")
        except QueryError as exc:
            errors.append(str(exc))

    try:
        query = threading.Thread(target=long_query)
        query.start()
        inserts = 0
        while query.is_alive():
            store.insert("usage_events", [usage_row(priced("held", 1))], USAGE_COLUMNS)
            inserts += 1
            time.sleep(0.05)
        query.join()
    finally:
        limited.close()
    assert len(errors) == 1
    assert "max_execution_time" in errors[0]
    assert inserts >= 20  # ~4 s at one insert per 50 ms plus its own time; a held writer manages 1
    assert store.query("SELECT count() FROM usage_events WHERE project = 'held'").rows == [[inserts]]


def test_query_errors_are_query_errors(store: ClickHouseStore) -> None:
    with pytest.raises(QueryError, match=r"UNKNOWN_TABLE|Unknown table"):
        store.user_query("SELECT * FROM no_such_table")


def test_a_flush_while_the_sink_decodes_commits_exactly_the_offsets_of_the_rows_it_takes() -> None:
    """`/flush` can run while the sink yields between messages of one fetch."""
    import asyncio
    from typing import Any

    from aiokafka import TopicPartition

    from spendstream.topics import Topics
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
        inserts_files = False  # the per-row path: this test is about offsets

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
