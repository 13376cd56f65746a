"""Emitter benchmark: events/s into Kafka as a ratio to a raw aiokafka producer, and caller cost.

    .venv/bin/python bench/emitter.py [--events N] [--projects P] [--repeat R] [--profile]

Measured in one run, against the bench broker this script starts (see bench/README.md):

- raw (same bytes): an AIOKafkaProducer with the emitter's producer config sends UsageBatch
  messages encoded before the clock starts: the emitter's own grouping (per project, up to 500
  events per message). The baseline the emitter is held to (target: emitter >= 0.8x).
- raw (per event): the same producer sends one pre-encoded UsageEvent per message: what a naive
  per-event emitter would cost at best.
- Emitter: `await emit()` per event (it backs off while the buffer is full), then `flush()`.
  The clock covers what a service pays: validation, event id, buffering, Avro encoding, sending,
  acknowledgement, and stops when the emitter counts every event acknowledged (`sent_events`),
  which can be after `flush()` returns (both are recorded). Producer start-up is outside the
  clock, as for the raw producer.
- Emitter, yielding caller: the same, but the caller yields to the event loop every 100 events,
  as a service that does other work does. Shows the batching the emitter achieves then.
- emit_nowait() caller path: p50/p99 of one call (perf_counter_ns) while the sender runs.
- SyncEmitter: events/s and p50/p99 of one emit() from a plain thread.
- Delivery: every emitter topic is read back and its events counted; and one run uses the
  emitter as documented (`async with`: emit, `await flush()`, close) and counts what arrived.
Each throughput figure is the best of --repeat runs (interleaved), each into a fresh topic.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import (
    BOOTSTRAP,
    bench_broker,
    create_topics,
    end_offsets,
    gc_pauses,
    new_run_id,
    partitions,
    percentiles_us,
    print_profile,
    profile_rows,
    read_topic,
    say,
    usage_calls,
    write_result,
)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from producers import Emitter, SyncEmitter, build_event
from spendstream.errors import BufferFull
from spendstream.topics import Topics
from spendstream.wire import default_codec

BATCH_EVENTS = 500  # the Emitter's default batch_events
PARTITIONS = 4
PRODUCER_CONFIG: dict[str, Any] = {  # what Emitter.start() gives its AIOKafkaProducer
    "enable_idempotence": True,
    "acks": "all",
    "linger_ms": 5,
    "max_batch_size": 1 << 20,
    "max_request_size": 8 << 20,
}
TARGET_RATIO = 0.8
RUNS = ("raw-same-bytes", "emitter", "raw-per-event")  # interleaved, --repeat times


class Bench:
    """A fresh usage.raw topic (4 partitions) for every measurement, all created up front."""

    def __init__(self, run_id: str, labels: list[str]) -> None:
        self._prefixes = {label: f"{run_id}.{label}." for label in labels}

    async def create(self) -> None:
        await create_topics(list(self._prefixes.values()), PARTITIONS)

    def topic(self, label: str) -> str:
        return Topics(self._prefixes[label]).usage_raw


def encode_like_emitter(calls: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    """(key, UsageBatch) messages grouped as the emitter does: per project, up to 500 events."""
    codec = default_codec()
    by_project: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        event = build_event(service="bench", **call)
        by_project.setdefault(event["project"], []).append(event)
    messages = []
    for project, events in by_project.items():
        for i in range(0, len(events), BATCH_EVENTS):
            chunk = events[i : i + BATCH_EVENTS]
            messages.append((project.encode(), codec.encode("UsageBatch", {"events": chunk})))
    return messages


def cpu_floor(calls: list[dict[str, Any]]) -> float:
    """Seconds of the work any Avro emitter must do, without Kafka: build_event() + encode."""
    started = time.perf_counter()
    encode_like_emitter(calls)
    return time.perf_counter() - started


def encode_per_event(calls: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    codec = default_codec()
    out = []
    for call in calls:
        event = build_event(service="bench", **call)
        out.append((event["project"].encode(), codec.encode("UsageEvent", event)))
    return out


async def raw_send(topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    """Seconds to send pre-encoded messages and have every one acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, client_id="bench-raw", **PRODUCER_CONFIG)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


@dataclass(frozen=True)
class EmitterRun:
    seconds: float  # first emit() -> every event acknowledged (sent_events == N)
    flush_returned_s: float  # first emit() -> flush() returned
    unacknowledged_at_flush: int  # events not yet acknowledged when flush() returned


async def until_acknowledged(sent: Callable[[], int], n: int, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    """Wait until the emitter counts `n` events acknowledged by the broker."""
    deadline = time.monotonic() + timeout
    while sent() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sent():,} of {n:,} events acknowledged after {timeout:.0f} s")
        await asyncio.sleep(0.001)


async def emitter_send(topic: str, calls: list[dict[str, Any]], yield_every: int = 0) -> EmitterRun:
    async with Emitter(bootstrap_servers=BOOTSTRAP, service="bench", topic=topic) as emitter:
        started = time.perf_counter()
        for i, call in enumerate(calls, 1):
            await emitter.emit(**call)
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)
        await emitter.flush()
        flushed = time.perf_counter() - started
        unacknowledged = len(calls) - emitter.sent_events
        await until_acknowledged(lambda: emitter.sent_events, len(calls))
        return EmitterRun(time.perf_counter() - started, flushed, unacknowledged)


async def flush_then_close(topic: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The documented use: emit, `await flush()`, leave `async with`; then count what reached Kafka."""
    async with Emitter(bootstrap_servers=BOOTSTRAP, service="bench", topic=topic) as emitter:
        for call in calls:
            await emitter.emit(**call)
        await emitter.flush()
        unacknowledged = len(calls) - emitter.sent_events
    delivered = (await topic_shape(topic))["events"]
    return {
        "events": len(calls),
        "unacknowledged_when_flush_returned": unacknowledged,
        "delivered": delivered,
        "lost": len(calls) - delivered,
    }


async def topic_shape(topic: str) -> dict[str, Any]:
    """Messages and bytes that landed in `topic`, and events per message."""
    messages = await read_topic(topic)
    codec = default_codec()
    sizes = Counter(len(codec.decode(value)[1]["events"]) for _key, value in messages)
    events = sum(k * v for k, v in sizes.items())
    return {
        "messages": len(messages),
        "bytes": sum(len(v) for _k, v in messages),
        "events": events,
        "events_per_message": round(events / max(len(messages), 1), 1),
        "full_messages": sizes.get(BATCH_EVENTS, 0),
    }


async def message_count(topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    await consumer.start()
    try:
        return sum((await end_offsets(consumer, await partitions(topic))).values())
    finally:
        await consumer.stop()


async def caller_path(bench: Bench, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Time each emit_nowait() while the background sender runs (the caller yields every 100)."""
    topic = bench.topic("caller")
    # For scale: the validation and event-id share of a call, without any emitter.
    bare = []
    for call in calls[:20_000]:
        t0 = time.perf_counter_ns()
        build_event(service="bench", **call)
        bare.append(time.perf_counter_ns() - t0)
    samples, full = [], 0
    async with Emitter(bootstrap_servers=BOOTSTRAP, service="bench", topic=topic) as emitter:
        with gc_pauses() as gc_runs:
            for i, call in enumerate(calls, 1):
                t0 = time.perf_counter_ns()
                try:
                    emitter.emit_nowait(**call)
                except BufferFull:
                    full += 1
                samples.append(time.perf_counter_ns() - t0)
                if i % 100 == 0:
                    await asyncio.sleep(0)
        await emitter.flush()
        await until_acknowledged(lambda: emitter.sent_events, len(calls) - full)
    return {
        "emit_nowait_us": percentiles_us(samples),
        "build_event_only_us": percentiles_us(bare),
        "buffer_full": full,
        "gc_during_calls": gc_runs.summary(),
        "messages": await message_count(topic),
    }


def sync_emitter(topic: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    samples = []
    with SyncEmitter(bootstrap_servers=BOOTSTRAP, service="bench", topic=topic) as emitter:
        started = time.perf_counter()
        with gc_pauses() as gc_runs:
            for call in calls:
                t0 = time.perf_counter_ns()
                emitter.emit(**call)
                samples.append(time.perf_counter_ns() - t0)
        emitter.flush()
        deadline = time.monotonic() + 60
        while emitter.sent_events < len(calls) and time.monotonic() < deadline:
            time.sleep(0.001)
        seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "events_per_s": round(len(calls) / seconds),
        "emit_us": percentiles_us(samples),
        "gc_during_calls": gc_runs.summary(),
    }


def best(seconds: list[float]) -> float:
    return min(seconds)


async def measure(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    calls = usage_calls(args.events, args.projects)
    say(f"encoding {args.events:,} events for the raw baselines...")
    batched = encode_like_emitter(calls)
    per_event = encode_per_event(calls)
    say(
        f"  raw (same bytes): {len(batched):,} UsageBatch messages, {sum(len(v) for _k, v in batched):,} bytes;"
        f" raw (per event): {len(per_event):,} messages, {sum(len(v) for _k, v in per_event):,} bytes"
    )
    runs: dict[str, list[float]] = {name.replace("-", "_"): [] for name in RUNS}
    floor_s = min(cpu_floor(calls) for _ in range(args.repeat))
    emitter_runs: list[EmitterRun] = []
    for r in range(1, args.repeat + 1):
        for name in runs:
            topic = bench.topic(f"{name.replace('_', '-')}-{r}")
            note = ""
            if name == "emitter":
                run = await emitter_send(topic, calls)
                emitter_runs.append(run)
                seconds = run.seconds
                note = f"  (flush() returned at {run.flush_returned_s:.2f} s, {run.unacknowledged_at_flush:,} unacked)"
            else:
                seconds = await raw_send(topic, batched if name == "raw_same_bytes" else per_event)
            runs[name].append(seconds)
            say(f"  run {r} {name:<15} {seconds:6.2f} s  {args.events / seconds:>10,.0f} events/s{note}")
    yielding = await emitter_send(bench.topic("emitter-yielding"), calls, yield_every=100)
    yielding_s = yielding.seconds
    say(
        f"  emitter, caller yields every 100 events: {yielding_s:.2f} s  {args.events / yielding_s:,.0f} events/s"
    )
    say("checking delivery: the documented flush() + close(), then reading every emitter topic back...")
    contract = await flush_then_close(bench.topic("flush-close"), calls)
    yielding_shape = await topic_shape(bench.topic("emitter-yielding"))
    shapes = [await topic_shape(bench.topic(f"emitter-{r}")) for r in range(1, args.repeat + 1)]
    emitter_shape = shapes[-1]

    rate = {name: args.events / best(s) for name, s in runs.items()}
    # An emitter that did the unavoidable CPU work and then the raw send, one after the other.
    serial = args.events / (floor_s + best(runs["raw_same_bytes"]))
    result: dict[str, Any] = {
        "events": args.events,
        "projects": args.projects,
        "repeat": args.repeat,
        "producer_config": PRODUCER_CONFIG,
        "runs_seconds": {k: [round(s, 3) for s in v] for k, v in runs.items()},
        "events_per_s": {k: round(v) for k, v in rate.items()}
        | {"emitter_yielding_caller": round(args.events / yielding_s)},
        "ratio_emitter_to_raw_same_bytes": round(rate["emitter"] / rate["raw_same_bytes"], 3),
        "ratio_emitter_to_raw_per_event": round(rate["emitter"] / rate["raw_per_event"], 3),
        "ratio_yielding_emitter_to_raw_same_bytes": round(
            args.events / yielding_s / rate["raw_same_bytes"], 3
        ),
        "target_ratio": TARGET_RATIO,
        "build_and_encode_only": {
            "seconds": round(floor_s, 3),
            "events_per_s": round(args.events / floor_s),
            "us_per_event": round(floor_s / args.events * 1e6, 2),
        },
        "serial_floor_events_per_s": round(serial),
        "ratio_emitter_to_serial_floor": round(rate["emitter"] / serial, 3),
        "baseline_messages": {"messages": len(batched), "bytes": sum(len(v) for _k, v in batched)},
        "emitter_messages": emitter_shape,
        "emitter_yielding_messages": yielding_shape,
        "emitter_flush_returned_s": [round(r.flush_returned_s, 3) for r in emitter_runs],
        "emitter_unacknowledged_at_flush": [r.unacknowledged_at_flush for r in emitter_runs]
        + [yielding.unacknowledged_at_flush],
        "delivered_events": {
            **{f"emitter_{i}": sh["events"] for i, sh in enumerate(shapes, 1)},
            "emitter_yielding": yielding_shape["events"],
        },
        "flush_then_close": contract,
    }

    say(f"emit_nowait() caller path over {args.caller_calls:,} calls...")
    result["caller_path"] = await caller_path(bench, usage_calls(args.caller_calls, args.projects, seed=11))
    result["delivered_events"]["caller_path"] = (await topic_shape(bench.topic("caller")))["events"]

    if args.profile or result["ratio_emitter_to_raw_same_bytes"] < TARGET_RATIO:
        say("profiling one Emitter run (cProfile)...")
        topic = bench.topic("emitter-profiled")
        profiler = cProfile.Profile()
        profiler.enable()
        profiled_s = (await emitter_send(topic, calls)).seconds
        profiler.disable()
        stats = pstats.Stats(profiler)
        result["profile"] = {
            "seconds_under_cprofile": round(profiled_s, 3),
            "top_tottime": profile_rows(stats, "tottime"),
            "top_cumulative": profile_rows(stats, "cumulative"),
        }
    return result


def report(result: dict[str, Any]) -> None:
    rate = result["events_per_s"]
    say("")
    say(
        f"Emitter throughput, {result['events']:,} events over {result['projects']} projects (best of {result['repeat']}):"
    )
    say(f"  raw producer, same bytes   {rate['raw_same_bytes']:>10,} events/s   1.00x (baseline)")
    say(
        f"  Emitter                    {rate['emitter']:>10,} events/s   "
        f"{result['ratio_emitter_to_raw_same_bytes']:.2f}x   (target >= {TARGET_RATIO}x; "
        f"until every event is acknowledged)"
    )
    say(
        f"  Emitter, yielding caller   {rate['emitter_yielding_caller']:>10,} events/s   "
        f"{result['ratio_yielding_emitter_to_raw_same_bytes']:.2f}x"
    )
    say(
        f"  raw producer, per event    {rate['raw_per_event']:>10,} events/s   "
        f"{rate['raw_per_event'] / rate['raw_same_bytes']:.2f}x   "
        f"(Emitter = {result['ratio_emitter_to_raw_per_event']:.1f}x this)"
    )
    floor = result["build_and_encode_only"]
    say(
        f"  build_event() + Avro encode alone: {floor['us_per_event']} us/event "
        f"({floor['events_per_s']:,} events/s, no Kafka); that work then the raw send, serially: "
        f"{result['serial_floor_events_per_s']:,} events/s (Emitter = "
        f"{result['ratio_emitter_to_serial_floor']:.2f}x this)"
    )
    base, em, ey = (
        result["baseline_messages"],
        result["emitter_messages"],
        result["emitter_yielding_messages"],
    )
    say(
        f"  messages: baseline {base['messages']:,} ({base['bytes']:,} B); Emitter {em['messages']:,} "
        f"({em['bytes']:,} B, {em['events_per_message']} events/msg); yielding caller "
        f"{ey['messages']:,} ({ey['bytes']:,} B, {ey['events_per_message']} events/msg)"
    )
    cp = result["caller_path"]
    e, b = cp["emit_nowait_us"], cp["build_event_only_us"]
    say("Caller path, one emit_nowait() while the sender runs:")
    say(f"  p50 {e['p50']} us  p99 {e['p99']} us  p99.9 {e['p99.9']} us  max {e['max']} us  (n={e['n']:,})")
    say(
        f"  of which build_event() alone: p50 {b['p50']} us  p99 {b['p99']} us; BufferFull {cp['buffer_full']}"
    )
    say(
        f"  {cp['messages']:,} messages for {e['n']:,} events ({e['n'] / max(cp['messages'], 1):.1f} events/msg)"
    )
    s = result["sync_emitter"]
    e, g2 = s["emit_us"], s["gc_during_calls"]["gen2"]
    say(
        f"SyncEmitter: {s['events_per_s']:,} events/s ({s['events_per_s'] / rate['raw_same_bytes']:.2f}x "
        f"raw same bytes, {s['events_per_s'] / rate['emitter']:.2f}x Emitter)"
    )
    say(f"  emit() p50 {e['p50']} us  p99 {e['p99']} us  p99.9 {e['p99.9']} us  max {e['max']} us")
    say(f"  full (gen 2) garbage collections during the calls: {g2['runs']}, longest {g2['max_ms']} ms")
    expected = {"caller_path": cp["emit_nowait_us"]["n"] - cp["buffer_full"]}
    short = {
        k: (expected.get(k, result["events"]), v)
        for k, v in result["delivered_events"].items()
        if v != expected.get(k, result["events"])
    }
    say("Delivery (events read back from each topic; the runs above waited for sent_events == N):")
    say("  every event of every run arrived" if not short else f"  MISSING: {short} (expected, found)")
    fc = result["flush_then_close"]
    say(
        f"  documented use (emit, await flush(), close): flush() returned with "
        f"{fc['unacknowledged_when_flush_returned']:,} of {fc['events']:,} events unacknowledged; "
        f"{fc['lost']:,} never reached Kafka"
    )
    if "profile" in result:
        p = result["profile"]
        say(f"Profile of one Emitter run ({p['seconds_under_cprofile']} s under cProfile):")
        print_profile("top by tottime", p["top_tottime"])
        print_profile("top by cumulative", p["top_cumulative"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--projects", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs per throughput figure (best is kept)")
    parser.add_argument("--caller-calls", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="profile the Emitter even if on target")
    args = parser.parse_args()
    run_id = new_run_id("emitter")
    labels = [f"{name}-{r}" for r in range(1, args.repeat + 1) for name in RUNS]
    extra = ["emitter-yielding", "flush-close", "caller", "emitter-profiled", "sync"]
    bench = Bench(run_id, [*labels, *extra])
    started = time.monotonic()
    with bench_broker(run_id):
        asyncio.run(bench.create())
        result = asyncio.run(measure(args, bench))
        say(f"SyncEmitter over {args.events:,} events...")
        result["sync_emitter"] = sync_emitter(bench.topic("sync"), usage_calls(args.events, args.projects))
        sync_shape = asyncio.run(topic_shape(bench.topic("sync")))
        result["delivered_events"]["sync_emitter"] = sync_shape["events"]
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    report(result)
    say(f"results: {write_result('emitter', result)}")


if __name__ == "__main__":
    main()
