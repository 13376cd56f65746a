"""History writer benchmark: rows/s the sink stores into embedded ClickHouse, against a bare insert
of the same rows in the same run.

    PYTHONPATH=. .venv/bin/python -m bench.history [--events 200000] [--projects 8]

1. N usage events (the pipeline bench's workload: 500 per UsageBatch, 8 projects) are priced by
   `MeterStage` and written to a fresh 4-partition `usage.priced` exactly as the meter writes them
   (PricedBatch v5: the usage.raw message plus prices, one message per project and take of 20
   messages), before any clock starts.
2. Baseline: the same rows, already built as Python tuples (`sink.usage_row`), inserted with
   `ClickHouseStore.insert` in chunks of the sink's batch size into a fresh chDB database: what
   storing them costs when nothing has to be read or decoded.
3. ClickHouse parsing the Avro alone: the same messages framed by `AvroRows` (the sink's fast
   path) and inserted with `ClickHouseStore.insert_avro`, in chunks of the sink's batch size.
4. The sink's per-row path (`Sink(avro_inserts=False)`: decode, `priced_problem`, tuples, insert;
   what the sink did before the fast path), then the sink as the history process runs it (the fast
   path), each on a fresh database of the same chDB engine and its own consumer group, from the
   first fetched message to all N rows written (and, for reference, from `start()`: the group join).

Elapsed seconds and this process's CPU seconds (chDB runs in it: its threads count too) for each;
ClickHouse's row count, distinct event ids and sum(cost_usd) are checked against the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from decimal import Decimal
from functools import partial
from typing import Any

from bench._common import (
    BOOTSTRAP,
    bench_broker,
    create_topics,
    new_run_id,
    say,
    usage_calls,
    write_result,
)
from producers import build_event
from spendstream.priced import priced_events
from spendstream.settings import Settings
from spendstream.wire import default_codec
from stream_processors.avro_rows import STRUCTURE, AvroRows
from stream_processors.meter import MeterBatch, MeterStage
from stream_processors.pricing import Catalogue, pico_to_usd
from stream_processors.sink import Sink, usage_row
from stream_processors.store import USAGE_COLUMNS, ClickHouseStore

PARTITIONS = 4
BATCH_EVENTS = 500
TAKE = 20  # usage.raw messages the meter prices together (as under a backlog)
TARGET = 150_000  # rows/s (issue 14)


def priced_messages(n: int, projects: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """(key, PricedBatch) messages as the meter writes them for n events; and their total pico-USD."""
    codec, stage = default_codec(), MeterStage(Catalogue.load(), default_codec())
    now_us = time.time_ns() // 1000
    by_project: dict[str, list[dict[str, Any]]] = {}
    for call in usage_calls(n, projects):
        event = build_event(service="bench", **call)
        by_project.setdefault(event["project"], []).append(event)
    raw = [
        (0, project.encode(), codec.encode("UsageBatch", {"events": events[i : i + BATCH_EVENTS]}))
        for project, events in by_project.items()
        for i in range(0, len(events), BATCH_EVENTS)
    ]
    out, cost = [], 0
    for start in range(0, len(raw), TAKE):
        take = raw[start : start + TAKE]
        batch = MeterBatch(PARTITIONS)
        for offset, result in enumerate(stage.process_many(take, now_us), start):
            batch.add(result, 0, offset)
            cost += sum(p["cost_pico_usd"] or 0 for p in result.priced)
        for project, sources in batch.priced_batches():
            out.append((project.encode(), codec.encode("PricedBatch", {"sources": sources})))
    return out, cost


async def produce(topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, max_request_size=8 << 20, linger_ms=5)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value, key=key) for key, value in messages])
    finally:
        await producer.stop()


def totals(store: ClickHouseStore) -> tuple[int, int, Decimal]:
    [[count, unique, cost]] = store.query(
        f"SELECT count(), uniqExact(event_id), sum(cost_usd) FROM {store.database}.usage_events"
    ).rows
    return int(count), int(unique), Decimal(str(cost))


async def run_sink(
    settings: Settings, store: ClickHouseStore, n: int, max_rows: int, *, avro: bool
) -> tuple[float, float, float]:
    """(seconds from the first fetched message, CPU seconds, seconds from start()) to n rows written."""
    sink = Sink(
        bootstrap=BOOTSTRAP,
        topics=settings.topics,
        group_id=f"{settings.worker_id}-{store.database}",
        store=store,
        codec=default_codec(),
        max_rows=max_rows,
        max_seconds=settings.sink_max_seconds,
        avro_inserts=avro,
    )
    started, cpu = time.perf_counter(), time.process_time()
    first = None
    await sink.start()
    try:
        while sink.rows_written < n:
            if first is None and sink._offsets:  # the first fetch is buffered
                first = time.perf_counter()
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"the sink wrote {sink.rows_written:,} of {n:,} rows in 600 s")
            await asyncio.sleep(0.005)
        end = time.perf_counter()
        return end - (first or started), time.process_time() - cpu, end - started
    finally:
        await sink.stop()


def figures(n: int, seconds: float, cpu: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 3),
        "rows_per_s": round(n / seconds),
        "cpu_s_per_million_rows": round(cpu * 1e6 / n, 2),
        "rows_per_cpu_s": round(n / cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--projects", type=int, default=8)
    args = parser.parse_args()
    n = args.events
    run_id = new_run_id("history")
    settings = Settings(topic_prefix=f"{run_id}.", worker_id=run_id)
    max_rows = settings.sink_max_rows

    say(f"pricing {n:,} events as the meter does...")
    messages, cost_pico = priced_messages(n, args.projects)
    codec = default_codec()
    rows = [usage_row(p) for _, value in messages for p in priced_events(codec.decode(value)[1], codec)]
    assert len(rows) == n, (len(rows), n)
    expected = (n, n, pico_to_usd(cost_pico))

    with tempfile.TemporaryDirectory(prefix="spendstream-bench-history-") as home:
        dsn = f"chdb://{home}/chdb"
        bare = ClickHouseStore(dsn, "bare")
        bare.migrate()
        say(f"baseline: store.insert of {n:,} ready rows, {max_rows:,} per insert...")
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, n, max_rows):
            bare.insert("usage_events", rows[i : i + max_rows], USAGE_COLUMNS)
        base_s, base_cpu = time.perf_counter() - started, time.process_time() - cpu
        assert totals(bare) == expected, (totals(bare), expected)
        say(f"  {base_s:.2f} s ({n / base_s:,.0f} rows/s), CPU {base_cpu:.2f} s")

        say(
            f"ClickHouse parsing the Avro alone: {len(messages):,} messages framed, {max_rows:,} rows per insert..."
        )
        avro, alone = AvroRows(codec), ClickHouseStore(dsn, "avro_alone")
        alone.migrate()
        started, cpu = time.perf_counter(), time.process_time()
        framed = [avro.record(value) for _, value in messages]
        chunks: list[list[bytes]] = [[]]
        rows_in_chunk = 0
        for record in framed:
            assert record is not None
            if rows_in_chunk >= max_rows:
                chunks.append([])
                rows_in_chunk = 0
            chunks[-1].append(record[0])
            rows_in_chunk += record[1]
        for chunk in chunks:
            select = partial(avro.select, now_us=time.time_ns() // 1000)
            alone.insert_avro("usage_events", USAGE_COLUMNS, select, STRUCTURE, avro.container(chunk))
        alone_s, alone_cpu = time.perf_counter() - started, time.process_time() - cpu
        assert totals(alone) == expected, (totals(alone), expected)
        alone.close()
        say(f"  {alone_s:.2f} s ({n / alone_s:,.0f} rows/s), CPU {alone_cpu:.2f} s")

        sinks: dict[str, tuple[float, float, float, tuple[int, int, Decimal]]] = {}
        with bench_broker(run_id):
            asyncio.run(create_topics([settings.topics.prefix], PARTITIONS))
            asyncio.run(produce(settings.topics.usage_priced, messages))
            for name, fast in (("per_row", False), ("sink", True)):
                say(f"{name}: {len(messages):,} PricedBatch messages on usage.priced -> ClickHouse...")
                store = ClickHouseStore(dsn, name)
                store.migrate()
                sink_s, sink_cpu, from_start = asyncio.run(run_sink(settings, store, n, max_rows, avro=fast))
                sinks[name] = (sink_s, sink_cpu, from_start, totals(store))
                store.close()
                say(
                    f"  {sink_s:.2f} s ({n / sink_s:,.0f} rows/s; {from_start:.2f} s from start), CPU {sink_cpu:.2f} s"
                )

    sink_s, sink_cpu, _, stored = sinks["sink"]
    slow_s, slow_cpu, _, slow_stored = sinks["per_row"]
    result: dict[str, Any] = {
        "events": n,
        "priced_messages": len(messages),
        "rows_per_insert": max_rows,
        "sink_max_seconds": settings.sink_max_seconds,
        "baseline_bare_insert": figures(n, base_s, base_cpu),
        "clickhouse_parsing_avro_alone": figures(n, alone_s, alone_cpu),
        "sink_per_row_path": {
            **figures(n, slow_s, slow_cpu),
            "seconds_from_start": round(sinks["per_row"][2], 3),
        },
        "sink": {**figures(n, sink_s, sink_cpu), "seconds_from_start": round(sinks["sink"][2], 3)},
        "ratio_sink_to_bare_insert": round(base_s / sink_s, 3),
        "ratio_sink_to_bare_insert_by_cpu": round(base_cpu / sink_cpu, 3),
        "ratio_sink_to_per_row_path": round(slow_s / sink_s, 3),
        "ratio_sink_to_per_row_path_by_cpu": round(slow_cpu / sink_cpu, 3),
        "clickhouse": {"rows": stored[0], "unique_event_ids": stored[1], "cost_usd": str(stored[2])},
        "clickhouse_matches_workload": stored == expected and slow_stored == expected,
        "target_rows_per_s": TARGET,
    }
    per_million = 1e6 / n
    say(
        f"history writer: {n / sink_s:,.0f} rows/s ({result['ratio_sink_to_bare_insert']:.2f}x a bare insert "
        f"of the same rows: {n / base_s:,.0f} rows/s; {result['ratio_sink_to_per_row_path']:.2f}x the per-row "
        f"path: {n / slow_s:,.0f} rows/s); CPU {sink_cpu * per_million:.1f} s per million rows (bare insert "
        f"{base_cpu * per_million:.1f}, per-row path {slow_cpu * per_million:.1f}, ClickHouse parsing the Avro "
        f"alone {alone_cpu * per_million:.1f}); target {TARGET:,} rows/s: {n / sink_s / TARGET:.2f}x; ClickHouse "
        f"holds {stored[0]:,} rows, {stored[1]:,} ids, ${stored[2]} (as expected: {result['clickhouse_matches_workload']})"
    )
    say(f"results: {write_result('history', result)}")


if __name__ == "__main__":
    main()
