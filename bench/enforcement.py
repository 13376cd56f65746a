"""Enforcement latency: from producing the event that crosses a budget to a Guard in another
process seeing `blocked`, under a background load, with one worker.

    .venv/bin/python bench/enforcement.py [--crossings 220] [--load 5000]

- One worker (`spendstream up`), budgets `project:cross-<i>: {daily: "1"}` for every crossing.
- A load process emits `--load` events/s (other projects) for the whole run.
- A guard process (SyncGuard on spend.control) prints the wall-clock time it first sees each
  `project:cross-<i>` blocked.
- This process, every 50 ms, emits one $1.50 event for the next cross-<i> and records the time
  just before `emit()`. Latency = seen - produced (same machine clock).
Baseline in the same run: a raw Kafka hop (aiokafka produce -> a consumer in another process sees
it), the floor any Kafka-carried kill switch pays. Target (issue): p99 < 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from bench._common import (
    BOOTSTRAP,
    REPO,
    bench_broker,
    cpu_seconds,
    free_port,
    new_run_id,
    percentiles_us,
    say,
    write_result,
)
from producers import SyncEmitter
from spendstream.settings import Topics
from spendstream.topics import ensure_topics

GUARD = """
import sys, time
from producers import SyncGuard
bootstrap, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with SyncGuard(bootstrap_servers=bootstrap, topic=topic) as guard:
    print("ready", flush=True)
    pending = {f"project:cross-{i}" for i in range(n)}
    deadline = time.time() + 600
    while pending and time.time() < deadline:
        for scope in list(pending):
            s = guard.state(scope)
            if s is not None and s.state == "blocked":
                print(scope, time.time(), flush=True)
                pending.discard(scope)
        time.sleep(0.0005)
"""

LOAD = """
import sys, time, random
from producers import SyncEmitter
bootstrap, topic, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(3)
sent, start = 0, time.time()
with SyncEmitter(bootstrap_servers=bootstrap, service="load", topic=topic, linger_ms=20, max_buffered=500_000) as em:
    while time.time() - start < seconds:
        due = int((time.time() - start) * rate)
        while sent < due:
            em.emit(project=f"load-{sent % 8}", provider="openai", model="gpt-4o-mini",
                    input_tokens=rng.randrange(2000), output_tokens=rng.randrange(500), user=f"u{sent % 50}")
            sent += 1
        time.sleep(0.005)
print(sent, time.time() - start, flush=True)
"""


HOP_CONSUMER = """
import asyncio, sys, time
from aiokafka import AIOKafkaConsumer
async def main():
    c = AIOKafkaConsumer(sys.argv[2], bootstrap_servers=sys.argv[1], fetch_max_wait_ms=20)
    await c.start()
    print("ready", flush=True)
    n = 0
    while n < int(sys.argv[3]):
        for msgs in (await c.getmany(timeout_ms=100)).values():
            for m in msgs:
                print(m.value.decode(), time.time_ns(), flush=True)
                n += 1
    await c.stop()
asyncio.run(main())
"""


def kafka_hop_baseline(topic: str, samples: int) -> list[int]:
    """Produce timestamped messages; a consumer process reports when it sees each (ns latencies)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()
        await asyncio.sleep(1)

    asyncio.run(create())
    consumer = subprocess.Popen(
        [sys.executable, "-c", HOP_CONSUMER, BOOTSTRAP, topic, str(samples)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert consumer.stdout is not None
    assert consumer.stdout.readline().strip() == "ready"

    async def produce() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=0)
        await producer.start()
        await asyncio.sleep(1.0)
        for _ in range(samples):
            await producer.send_and_wait(topic, str(time.time_ns()).encode())
            await asyncio.sleep(0.01)
        await producer.stop()

    asyncio.run(produce())
    out, _ = consumer.communicate(timeout=60)
    return [int(seen) - int(sent) for sent, seen in (line.split() for line in out.splitlines() if line)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crossings", type=int, default=220)
    parser.add_argument("--load", type=int, default=5000, help="background events per second")
    args = parser.parse_args()
    run_id = new_run_id("enforcement")
    topics = Topics(f"{run_id}.")
    state = REPO / ".spendstream" / "bench" / run_id
    state.mkdir(parents=True, exist_ok=True)
    budgets = state / "budgets.yaml"
    budgets.write_text(
        "budgets:\n" + "".join(f'  project:cross-{i}: {{daily: "1"}}\n' for i in range(args.crossings))
    )
    with bench_broker(run_id):
        asyncio.run(ensure_topics(BOOTSTRAP, topics, 4))
        port = free_port()
        env = {
            **os.environ,
            "SPENDSTREAM_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "SPENDSTREAM_TOPIC_PREFIX": topics.prefix,
            "SPENDSTREAM_STATE_DIR": str(state),
            "SPENDSTREAM_WEB_PORT": str(port),
            "SPENDSTREAM_WORKER_ID": run_id,
            "SPENDSTREAM_BUDGETS_FILE": str(budgets),
        }
        log = (state / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "up", "--log-level", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("feeds_caught_up"):
                        break
                except httpx.TransportError:
                    pass
                assert worker.poll() is None, "the worker exited; see its log"
                assert time.monotonic() < deadline, "the worker did not become ready in 120 s"
                time.sleep(0.3)
            say("worker ready; measuring the raw Kafka hop baseline")
            baseline = kafka_hop_baseline(f"{topics.prefix}hop", 200)
            guard = subprocess.Popen(
                [sys.executable, "-c", GUARD, BOOTSTRAP, topics.spend_control, str(args.crossings)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            assert guard.stdout is not None
            assert guard.stdout.readline().strip() == "ready"
            seconds = args.crossings * 0.05 + 10
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD, BOOTSTRAP, topics.usage_raw, str(args.load), str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            time.sleep(3)  # let the load reach its rate
            cpu0 = cpu_seconds(worker.pid)
            produced: dict[str, float] = {}
            with SyncEmitter(
                bootstrap_servers=BOOTSTRAP, service="bench", topic=topics.usage_raw, linger_ms=1
            ) as em:
                for i in range(args.crossings):
                    scope = f"project:cross-{i}"
                    produced[scope] = time.time()
                    em.emit(
                        project=f"cross-{i}",
                        provider="openai",
                        model="gpt-4o",
                        input_tokens=0,
                        output_tokens=150_000,
                    )  # $1.50 > $1
                    time.sleep(0.05)
            out, _ = guard.communicate(timeout=300)
            load_out, _ = load.communicate(timeout=300)
            load_sent, load_seconds = load_out.split()
            worker_cpu = cpu_seconds(worker.pid) - cpu0
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            log.close()
    seen = {scope: float(t) for scope, t in (line.split() for line in out.splitlines() if line.strip())}
    latencies = [int((seen[s] - produced[s]) * 1e9) for s in produced if s in seen]
    enforcement = percentiles_us(latencies)
    hop = percentiles_us(baseline)
    result: dict[str, Any] = {
        "crossings": args.crossings,
        "crossings_seen": len(latencies),
        "background_load_events_per_s": round(int(load_sent) / float(load_seconds)),
        "enforcement_latency_us": enforcement,
        "kafka_hop_baseline_us": hop,
        "ratio_p50_to_kafka_hop": round(enforcement["p50"] / hop["p50"], 2),
        "ratio_p99_to_kafka_hop": round(enforcement["p99"] / hop["p99"], 2),
        "worker_cpu_seconds_during_crossings": round(worker_cpu, 1),
        "target_p99_ms": 250,
        "target_met": enforcement["p99"] < 250_000,
    }
    path = write_result("enforcement", result)
    say(json.dumps(result, indent=2))
    say(
        f"enforcement p50 {enforcement['p50'] / 1000:.0f} ms, p99 {enforcement['p99'] / 1000:.0f} ms over "
        f"{len(latencies)} crossings with {result['background_load_events_per_s']:,} events/s of load; "
        f"Kafka hop p50 {hop['p50'] / 1000:.1f} ms, p99 {hop['p99'] / 1000:.1f} ms -> {path}"
    )


if __name__ == "__main__":
    main()
