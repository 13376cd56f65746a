"""Dedupe benchmark: what counting each event_id once costs the meter, in CPU, memory and restart time.

    .venv/bin/python bench/dedupe.py [--ids N]

Measured in one run (see bench/README.md):

1. Meter CPU: `MeterStage.process_many` over UsageBatch messages of 500 events, as the worker calls
   it, with N ids already counted in the partition's memory, against the same stage without the
   dedupe (every event taken as a first copy: no key, no lookup; the baseline). Reported: events/s
   of both and the ratio.
2. Memory: bytes the counted ids take, per million.
3. Restart: N ids written to a `usage.seen` topic as the meter writes them (SeenIds of 500 ids),
   then re-loaded by `reload_seen` (what a meter starting a partition does), against a raw
   `getmany` loop reading the same topic without decoding (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import BOOTSTRAP, bench_broker, create_topics, new_run_id, partitions, say, write_result
from producers import build_event
from spendstream.wire import default_codec
from stream_processors.dedupe import SeenIds, reload_seen
from stream_processors.meter import MeterStage
from stream_processors.pricing import Catalogue

HOUR_US = 3_600_000_000
CODEC = default_codec()


class _NoDedupe(MeterStage):
    """The meter as it was before the dedupe: every event is a first copy."""

    def _dedupe(self, owned: list[Any], now_us: int) -> list[int | None]:
        return [0] * len(owned)


def meter_seconds(stage: MeterStage, messages: list[tuple[int, bytes | None, bytes]], now_us: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(messages), 20):  # the worker hands the stage what it took together
        stage.process_many(messages[i : i + 20], now_us)
    return time.perf_counter() - started


def cpu(n_ids: int) -> dict[str, float]:
    now = time.time_ns() // 1_000
    at = datetime.fromtimestamp(now / 1e6 - 60, UTC)
    messages: list[tuple[int, bytes | None, bytes]] = []
    for m in range(200):
        events = [
            build_event(
                service="bench",
                project=f"p{m % 8}",
                provider="openai",
                model="gpt-4o",
                input_tokens=1000,
                output_tokens=100,
                event_time=at,
            )
            for _ in range(500)
        ]
        messages.append((0, f"p{m % 8}".encode(), CODEC.encode("UsageBatch", {"events": events})))
    with_dedupe = MeterStage(Catalogue.load(), CODEC)
    counted = np.unique(np.random.default_rng(3).integers(0, 2**63, n_ids, dtype=np.uint64))
    baseline = _NoDedupe(Catalogue.load(), CODEC)
    base_s, dedupe_s = [], []
    for _ in range(5):  # alternated, best of each: the machine is shared and noisy
        base_s.append(meter_seconds(baseline, messages, now))
        with_dedupe.seen = {}  # each pass meets N counted ids and 100,000 new ones
        with_dedupe.seen_ids(0).add(counted, now)
        dedupe_s.append(meter_seconds(with_dedupe, messages, now))
    base, dedupe = 500 * len(messages) / min(base_s), 500 * len(messages) / min(dedupe_s)
    return {"baseline_events_per_s": base, "dedupe_events_per_s": dedupe, "ratio": dedupe / base}


async def restart(run_id: str, n_ids: int) -> dict[str, float]:
    [topics] = await create_topics([f"{run_id}."], 1)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    rng = np.random.default_rng(5)
    for first in range(0, n_ids, 500):
        record = {
            "source_partition": 0,
            "offsets": np.full(500, first // 500, dtype="<i8").tobytes(),
            "ids": rng.integers(0, 2**63, 500, dtype=np.uint64).astype("<u8").tobytes(),
        }
        await producer.send(topics.usage_seen, CODEC.encode("SeenIds", record), key=b"0", partition=0)
    await producer.flush()
    await producer.stop()

    started = time.perf_counter()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, fetch_max_bytes=64 << 20
    )
    await consumer.start()
    [tp] = await partitions(topics.usage_seen)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    end = (await consumer.end_offsets([tp]))[tp]
    raw_bytes = 0
    while await consumer.position(tp) < end:
        for msg in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
            raw_bytes += len(msg.value or b"")
    await consumer.stop()
    base = time.perf_counter() - started

    seen = SeenIds(6 * HOUR_US)
    started = time.perf_counter()
    loaded = await reload_seen(BOOTSTRAP, topics.usage_seen, 0, 2**62, seen, CODEC)
    took = time.perf_counter() - started
    assert loaded == n_ids, (loaded, n_ids)
    return {
        "ids": n_ids,
        "topic_mb": raw_bytes / 1e6,
        "raw_read_s": base,
        "reload_s": took,
        "ratio": base / took,
        "memory_mb_per_million_ids": seen.nbytes / 1e6 / (n_ids / 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="ids counted within the horizon")
    args = parser.parse_args()
    run_id = new_run_id("dedupe")
    say(f"meter CPU with {args.ids:,} ids counted, 100,000 new events ...")
    meter = cpu(args.ids)
    say(
        f"  MeterStage without the dedupe (baseline) {meter['baseline_events_per_s']:>9,.0f} events/s\n"
        f"  MeterStage with the dedupe               {meter['dedupe_events_per_s']:>9,.0f} events/s"
        f"   {meter['ratio']:.2f}x"
    )
    with bench_broker(run_id):
        reload = asyncio.run(restart(run_id, args.ids))
    say(
        f"restart: {reload['ids']:,} ids ({reload['topic_mb']:.1f} MB on usage.seen)\n"
        f"  raw getmany read (baseline) {reload['raw_read_s']:.2f} s\n"
        f"  reload_seen                 {reload['reload_s']:.2f} s   {reload['ratio']:.2f}x\n"
        f"memory: {reload['memory_mb_per_million_ids']:.1f} MB per million ids"
    )
    path = write_result("dedupe", {"meter": meter, "restart": reload})
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
