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
3. ClickHouse building the rows alone, each fast path: the same messages framed by `AvroRows`
   (Avro records, parsed by ClickHouse), then made Native blocks by `NativeRows` (decoded in Rust),
   inserted with `ClickHouseStore.insert_file`, in chunks of the sink's batch size.
4. The sink's per-row path (`Sink(avro_inserts=False)`: decode, `priced_problem`, tuples, insert;
   what the sink did before the fast path), its Avro fast path (`native=False`: what it does
   without the native module), then the sink as the history process runs it (Native blocks),
   each on a fresh database of the same chDB engine and its own consumer group, from the first
   fetched message to all N rows written (and, for reference, from `start()`: the group join).

Elapsed seconds and this process's CPU seconds (chDB runs in it: its threads count too) for each;
ClickHouse's row count, distinct event ids and sum(cost_usd) are checked against the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from typing import Any

from bench._common import (
    BOOTSTRAP,
    bench_broker,
    create_topics,
    new_run_id,
    percentiles_us,
    say,
    usage_calls,
    write_result,
)
from producers import build_event
from spendstream.priced import priced_events
from spendstream.settings import Settings
from spendstream.wire import default_codec
from stream_processors.avro_rows import AvroRows, NativeRows
from stream_processors.meter import MeterBatch, MeterStage
from stream_processors.pricing import Catalogue, pico_to_usd
from stream_processors.sink import Sink, usage_row
from stream_processors.store import USAGE_COLUMNS, ClickHouseStore

PARTITIONS = 4
BATCH_EVENTS = 500
TAKE = 20  # usage.raw messages the meter prices together (as under a backlog)
TARGET = 150_000  # rows/s (issue 14)


def priced_messages(
    n: int, projects: int, batch_events: int = BATCH_EVENTS, take: int = TAKE
) -> tuple[list[tuple[bytes, bytes]], int]:
    """(key, PricedBatch) messages as the meter writes them for n events (UsageBatch messages of
    `batch_events`, priced `take` at a time); and their total pico-USD."""
    codec, stage = default_codec(), MeterStage(Catalogue.load(), default_codec())
    now_us = time.time_ns() // 1000
    by_project: dict[str, list[dict[str, Any]]] = {}
    for call in usage_calls(n, projects):
        event = build_event(service="bench", **call)
        by_project.setdefault(event["project"], []).append(event)
    raw = [
        (0, project.encode(), codec.encode("UsageBatch", {"events": events[i : i + batch_events]}))
        for project, events in by_project.items()
        for i in range(0, len(events), batch_events)
    ]
    out, cost = [], 0
    for start in range(0, len(raw), take):
        batch = MeterBatch(PARTITIONS)
        for offset, result in enumerate(stage.process_many(raw[start : start + take], now_us), start):
            batch.add(result, 0, offset)
            cost += sum(p["cost_pico_usd"] or 0 for p in result.prices)
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
    settings: Settings, store: ClickHouseStore, n: int, max_rows: int, *, avro: bool, native: bool
) -> tuple[float, float, float, dict[str, int]]:
    """(seconds from the first fetched message, CPU seconds, seconds from start()) to n rows written,
    and how: inserts from files (the fast path) and of Python rows, rows ClickHouse built from files."""
    inserts = {"file_inserts": 0, "row_inserts": 0}

    def counted(kind: str, insert: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            inserts[kind] += 1
            insert(*args)

        return run

    store.insert_file = counted("file_inserts", store.insert_file)  # type: ignore[method-assign]
    store.insert = counted("row_inserts", store.insert)  # type: ignore[method-assign]
    sink = Sink(
        bootstrap=BOOTSTRAP,
        topics=settings.topics,
        group_id=f"{settings.worker_id}-{store.database}",
        store=store,
        codec=default_codec(),
        max_rows=max_rows,
        max_seconds=settings.sink_max_seconds,
        avro_inserts=avro,
        native=native,
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
        how = inserts | {"rows_parsed_by_clickhouse": sink.rows_parsed}
        return end - (first or started), time.process_time() - cpu, end - started, how
    finally:
        await sink.stop()


async def queryable_latency(
    settings: Settings, store: ClickHouseStore, messages: list[tuple[bytes, bytes]], rate: int
) -> dict[str, Any]:
    """Messages sent to usage.priced at `rate` events/s while the sink runs: from send to the
    `inserted_at` ClickHouse gives each event's row (the history writer's share of event -> queryable)."""
    from aiokafka import AIOKafkaProducer

    codec = default_codec()
    ids = [[p["usage"]["event_id"] for p in priced_events(codec.decode(v)[1], codec)] for _, v in messages]
    total = sum(len(i) for i in ids)
    sink = Sink(
        bootstrap=BOOTSTRAP,
        topics=settings.topics,
        group_id=f"{settings.worker_id}-{store.database}",
        store=store,
        codec=codec,
        max_rows=settings.sink_max_rows,
        max_seconds=settings.sink_max_seconds,
    )
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, max_request_size=8 << 20, linger_ms=5)
    await producer.start()
    await sink.start()
    sent: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 120
        while sink._consumer is None or not sink._consumer.assignment():  # joined its group
            if time.monotonic() > deadline:
                raise RuntimeError("the sink did not join its consumer group in 120 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        started = time.perf_counter()
        before = 0  # events sent so far
        for (key, value), message_ids in zip(messages, ids, strict=True):
            await asyncio.sleep(max(0.0, started + before / rate - time.perf_counter()))
            at = time.time_ns()
            await producer.send(settings.topics.usage_priced, value, key=key)
            sent.update(dict.fromkeys(message_ids, at))
            before += len(message_ids)
        await producer.flush()
        sending = time.perf_counter() - started
        deadline = time.monotonic() + 600
        while sink.rows_written < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink wrote {sink.rows_written:,} of {total:,} rows in 600 s")
            await asyncio.sleep(0.05)
    finally:
        await sink.stop()
        await producer.stop()
    db = store.database
    rows = store.query(
        f"SELECT toString(event_id), toUnixTimestamp64Micro(inserted_at) FROM {db}.usage_events"
    ).rows
    [[parts, active]] = store.query(
        f"SELECT count(), countIf(active) FROM system.parts WHERE database = '{db}' AND table = 'usage_events'"
    ).rows
    return {
        "events": total,
        "messages": len(messages),
        "rate_reached_events_per_s": round(total / sending),
        "send_to_queryable_us": percentiles_us([at * 1000 - sent[event_id] for event_id, at in rows]),
        "parts_written_and_merged": int(parts),
        "parts_active_at_end": int(active),
    }


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
    parser.add_argument("--rate", type=int, default=5_000, help="events/s of the latency phase")
    parser.add_argument("--latency-events", type=int, default=60_000)
    args = parser.parse_args()
    n = args.events
    run_id = new_run_id("history")
    settings = Settings(topic_prefix=f"{run_id}.", worker_id=run_id)
    max_rows = settings.sink_max_rows

    say(f"pricing {n:,} events as the meter does...")
    messages, cost_pico = priced_messages(n, args.projects)
    # The latency phase: small messages as the meter writes them at a steady rate (25 events each,
    # one usage.raw message per PricedBatch).
    trickle, _ = priced_messages(args.latency_events, args.projects, batch_events=25, take=1)
    latency_settings = Settings(topic_prefix=f"{run_id}-latency.", worker_id=run_id)
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

        alone: dict[str, tuple[float, float]] = {}
        for rows_class in (AvroRows, NativeRows):
            fmt = rows_class.FORMAT
            say(
                f"ClickHouse building the rows alone from {fmt}: {len(messages):,} messages, {max_rows:,} rows per insert..."
            )
            fast_path, store = rows_class(codec), ClickHouseStore(dsn, f"alone_{fmt.lower()}")
            store.migrate()
            started, cpu = time.perf_counter(), time.process_time()
            framed = [fast_path.record(value) for _, value in messages]
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
                select = partial(fast_path.select, now_us=time.time_ns() // 1000)
                store.insert_file(
                    "usage_events",
                    USAGE_COLUMNS,
                    select,
                    fmt,
                    rows_class.STRUCTURE,
                    fast_path.container(chunk),
                )
            alone[fmt] = (time.perf_counter() - started, time.process_time() - cpu)
            assert totals(store) == expected, (totals(store), expected)
            store.close()
            say(f"  {alone[fmt][0]:.2f} s ({n / alone[fmt][0]:,.0f} rows/s), CPU {alone[fmt][1]:.2f} s")

        sinks: dict[str, tuple[float, float, float, tuple[int, int, Decimal]]] = {}
        how: dict[str, dict[str, int]] = {}
        with bench_broker(run_id):
            asyncio.run(create_topics([settings.topics.prefix], PARTITIONS))
            asyncio.run(produce(settings.topics.usage_priced, messages))
            for name, fast, native in (
                ("per_row", False, False),
                ("sink_avro", True, False),
                ("sink", True, True),
            ):
                say(f"{name}: {len(messages):,} PricedBatch messages on usage.priced -> ClickHouse...")
                store = ClickHouseStore(dsn, name)
                store.migrate()
                sink_s, sink_cpu, from_start, how[name] = asyncio.run(
                    run_sink(settings, store, n, max_rows, avro=fast, native=native)
                )
                sinks[name] = (sink_s, sink_cpu, from_start, totals(store))
                store.close()
                say(
                    f"  {sink_s:.2f} s ({n / sink_s:,.0f} rows/s; {from_start:.2f} s from start), CPU {sink_cpu:.2f} s; "
                    f"{how[name]['file_inserts']} inserts from files, {how[name]['row_inserts']} row inserts, "
                    f"{how[name]['rows_parsed_by_clickhouse']:,} rows built by ClickHouse"
                )
            say(
                f"send -> queryable: {args.latency_events:,} events at {args.rate:,} events/s through the sink..."
            )
            asyncio.run(create_topics([latency_settings.topics.prefix], PARTITIONS))
            store = ClickHouseStore(dsn, "latency")
            store.migrate()
            latency = asyncio.run(queryable_latency(latency_settings, store, trickle, args.rate))
            store.close()
            lat = latency["send_to_queryable_us"]
            say(
                f"  p50 {lat['p50'] / 1000:.0f} ms, p99 {lat['p99'] / 1000:.0f} ms, max {lat['max'] / 1000:.0f} ms "
                f"at {latency['rate_reached_events_per_s']:,} events/s; {latency['parts_active_at_end']} parts "
                f"active of {latency['parts_written_and_merged']} written and merged"
            )

    sink_s, sink_cpu, _, stored = sinks["sink"]
    slow_s, slow_cpu, _, slow_stored = sinks["per_row"]
    avro_s, avro_cpu, _, avro_stored = sinks["sink_avro"]
    alone_s, alone_cpu = alone["Native"]
    result: dict[str, Any] = {
        "events": n,
        "priced_messages": len(messages),
        "rows_per_insert": max_rows,
        "sink_max_seconds": settings.sink_max_seconds,
        "baseline_bare_insert": figures(n, base_s, base_cpu),
        "clickhouse_parsing_avro_alone": figures(n, *alone["Avro"]),
        "clickhouse_reading_native_alone": figures(n, alone_s, alone_cpu),
        "sink_per_row_path": {
            **figures(n, slow_s, slow_cpu),
            "seconds_from_start": round(sinks["per_row"][2], 3),
        },
        "sink_avro_fast_path": {
            **figures(n, avro_s, avro_cpu),
            "seconds_from_start": round(sinks["sink_avro"][2], 3),
        }
        | how["sink_avro"],
        "sink": {**figures(n, sink_s, sink_cpu), "seconds_from_start": round(sinks["sink"][2], 3)}
        | how["sink"],
        "ratio_sink_to_avro_fast_path": round(avro_s / sink_s, 3),
        "ratio_sink_to_avro_fast_path_by_cpu": round(avro_cpu / sink_cpu, 3),
        "ratio_sink_to_bare_insert": round(base_s / sink_s, 3),
        "ratio_sink_to_bare_insert_by_cpu": round(base_cpu / sink_cpu, 3),
        "ratio_sink_to_per_row_path": round(slow_s / sink_s, 3),
        "ratio_sink_to_per_row_path_by_cpu": round(slow_cpu / sink_cpu, 3),
        "clickhouse": {"rows": stored[0], "unique_event_ids": stored[1], "cost_usd": str(stored[2])},
        "clickhouse_matches_workload": stored == expected == slow_stored == avro_stored,
        "target_rows_per_s": TARGET,
        "send_to_queryable": latency,
    }
    per_million = 1e6 / n
    say(
        f"history writer: {n / sink_s:,.0f} rows/s ({result['ratio_sink_to_bare_insert']:.2f}x a bare insert "
        f"of the same rows: {n / base_s:,.0f} rows/s; {result['ratio_sink_to_per_row_path']:.2f}x the per-row "
        f"path: {n / slow_s:,.0f} rows/s; {result['ratio_sink_to_avro_fast_path']:.2f}x the Avro fast path: "
        f"{n / avro_s:,.0f} rows/s); CPU {sink_cpu * per_million:.1f} s per million rows (bare insert "
        f"{base_cpu * per_million:.1f}, per-row path {slow_cpu * per_million:.1f}, Avro fast path "
        f"{avro_cpu * per_million:.1f}, ClickHouse building the rows alone from Native "
        f"{alone_cpu * per_million:.1f}, from Avro {alone['Avro'][1] * per_million:.1f}); target {TARGET:,} rows/s: {n / sink_s / TARGET:.2f}x; ClickHouse "
        f"holds {stored[0]:,} rows, {stored[1]:,} ids, ${stored[2]} (as expected: {result['clickhouse_matches_workload']}); "
        f"send -> queryable at {latency['rate_reached_events_per_s']:,} events/s: p50 {lat['p50'] / 1000:.0f} ms, "
        f"p99 {lat['p99'] / 1000:.0f} ms (sink_max_seconds {settings.sink_max_seconds:g})"
    )
    say(f"results: {write_result('history', result)}")


if __name__ == "__main__":
    main()
