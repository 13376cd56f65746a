"""Pipeline benchmark: events/s through one worker, as a ratio to a raw consume + decode loop.

    .venv/bin/python bench/pipeline.py [--events N] [--projects P] [--profile-events M]

Measured in one run, against the bench broker this script starts (see bench/README.md):

1. N usage events are produced before any clock starts, as UsageBatch messages of 500 events of
   one project (key = project), into a fresh 4-partition usage.raw.
2. Baseline: a raw AIOKafkaConsumer `getmany` loop reads that topic and decodes every message
   with `default_codec().decode`. Also, for attribution: the same loop running `MeterStage.process`
   and encoding the PricedBatch (the worker's own logic, without Faust or a producer).
3. One worker (`spendstream up` in a subprocess: the meter in its meter process, the spend tables
   and budget check in Faust, the ClickHouse sink on embedded chDB in its history process; the
   worker's CPU is its two processes') with a budgets file (one project trips its daily budget, so
   the signal path runs). Clock: from the worker answering /health to the meter having processed
   all of usage.raw, which is when usage.priced holds one PricedBatch per usage.raw message (its end
   offsets, polled every 50 ms: accurate to the worker producer's linger and ack, and cheap, so
   the poller takes no CPU from the worker), and, where spend and budgets run in their own agent
   behind spend.deltas, until that agent has also committed every delta the meter wrote (committed
   offsets: within Faust's 1 s commit interval). Committed offsets of the Faust group on usage.raw
   are polled too and reported, but are not the clock: Faust commits only after its producer
   buffer has drained, which can take many seconds while a backlog is processed. Then: until
   ClickHouse holds all N rows (POST /sql).
4. Optionally the same with the worker under cProfile (a fresh prefix, M events), profiled only
   from ready to done; the top functions are printed. cProfile sees the worker's Faust process
   only (the budget agent): the meter's own CPU per event is bench/meter_cpu.py's, and
   `py-spy record --subprocesses` samples both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from _common import (
    BENCH_HOME,
    BOOTSTRAP,
    bench_broker,
    cpu_seconds,
    create_topics,
    end_offsets,
    free_port,
    new_run_id,
    partitions,
    print_profile,
    profile_rows,
    read_topic,
    say,
    usage_calls,
    worker_cpu_seconds,
    write_result,
)
from _profiled_worker import PROFILE_START, PROFILE_STOP
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from producers import build_event
from spendstream.cli.kafka_local import LocalKafka
from spendstream.topics import Topics
from spendstream.wire import default_codec
from stream_processors.meter import MeterBatch, MeterStage
from stream_processors.meter_input import meter_group
from stream_processors.pricing import Catalogue, pico_to_usd

PARTITIONS = 4
BATCH_EVENTS = 500
TARGET, GOAL = 20_000, 50_000  # events/s: the target and the goal
POLL_S = 0.05
# /health costs the worker ~1 ms of CPU (it asks the history process too): polled every 50 ms it
# was ~7% of the worker's CPU in a 37 s run, so the meter's event count is read this often only.
HEALTH_POLL_S = 0.25
DEADLINE_S = 150.0  # default of --deadline


@dataclass
class Workload:
    messages: list[tuple[bytes, bytes]]  # (project, UsageBatch)
    events: int
    cost_pico: int
    spend_by_project: dict[str, int] = field(default_factory=dict)

    def head(self, events: int) -> Workload:
        """The first messages holding at least `events` events (for the profiled run; no costs)."""
        messages = self.messages[: -(-events // BATCH_EVENTS)]
        codec = default_codec()
        return Workload(messages, sum(len(codec.decode(v)[1]["events"]) for _k, v in messages), 0)


def build_workload(n: int, projects: int) -> Workload:
    """N priced-able events, event_time within the last 10 minutes, batched 500 per project."""
    codec, catalogue = default_codec(), Catalogue.load()
    rng = random.Random(3)
    now_us = time.time_ns() // 1000
    by_project: dict[str, list[dict[str, Any]]] = {}
    spend: dict[str, int] = {}
    for call in usage_calls(n, projects):
        event = build_event(service="bench", **call)
        event["event_time"] = now_us - rng.randrange(600_000_000)
        by_project.setdefault(event["project"], []).append(event)
        priced = catalogue.price(event)
        if priced.status != "priced" or priced.cost_pico is None:
            raise RuntimeError(f"{event['provider']}/{event['model']} is {priced.status} in the catalogue")
        cost = priced.cost_pico
        spend[event["project"]] = spend.get(event["project"], 0) + cost
    messages = []
    for project, events in by_project.items():
        for i in range(0, len(events), BATCH_EVENTS):
            chunk = events[i : i + BATCH_EVENTS]
            messages.append((project.encode(), codec.encode("UsageBatch", {"events": chunk})))
    rng.shuffle(messages)  # projects interleaved, as from many services
    return Workload(messages, n, sum(spend.values()), spend)


def write_budgets(path: Path, spend_by_project: dict[str, int]) -> str:
    """Every project gets daily and monthly budgets; the first trips its daily one half-way."""
    lines = ["budgets:"]
    tripping = sorted(spend_by_project)[0]
    for project, pico in sorted(spend_by_project.items()):
        daily = pico // 2 if project == tripping else pico * 100
        lines.append(
            f'  project:{project}: {{daily: "{pico_to_usd(max(daily, 10**6))}", '
            f'monthly: "{pico_to_usd(pico * 1000)}"}}'
        )
    path.write_text("\n".join(lines) + "\n")
    return tripping


async def produce(topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
    )
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def consume(topic: str, messages: int, stage: MeterStage | None) -> tuple[float, int, float]:
    """Read `messages` messages of `topic`: decode each (or run the meter stage);
    (seconds, events, CPU seconds of this process meanwhile)."""
    codec = default_codec()
    try:  # the meter's own PricedBatch writer, where the checkout has one (for --compare runs)
        from stream_processors.priced_writer import PricedBatchWriter

        encode_sources = PricedBatchWriter(codec).write
    except ImportError:

        def encode_sources(sources: list[dict[str, Any]]) -> bytes:
            return codec.encode("PricedBatch", {"sources": sources})

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        seen = events = 0
        started, cpu = time.perf_counter(), time.process_time()
        while seen < messages:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                for msg in batch:
                    assert msg.value is not None
                    if stage is None:
                        events += len(codec.decode(msg.value)[1]["events"])
                    else:
                        result = stage.process(msg.key, msg.value, time.time_ns() // 1000)
                        output = MeterBatch(PARTITIONS)
                        output.add(result, msg.partition, msg.offset)
                        for _, sources in output.priced_batches():
                            encode_sources(sources)
                        events += len(result.prices)
                seen += len(batch)
        return time.perf_counter() - started, events, time.process_time() - cpu
    finally:
        await consumer.stop()


# -- the worker --------------------------------------------------------------------------------


@dataclass
class WorkerRun:
    label: str
    topics: Topics
    worker_id: str
    state_dir: Path
    budgets: Path
    web_port: int
    profile_to: Path | None = None
    deadline_s: float = DEADLINE_S
    role: str = "all"  # `spendstream up --role`
    env: dict[str, str] = field(default_factory=dict)  # more SPENDSTREAM_* settings
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.state_dir / "worker.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
        env |= {
            "SPENDSTREAM_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "SPENDSTREAM_TOPIC_PREFIX": self.topics.prefix,
            "SPENDSTREAM_PARTITIONS": str(PARTITIONS),
            "SPENDSTREAM_STATE_DIR": str(self.state_dir),
            "SPENDSTREAM_WEB_PORT": str(self.web_port),
            "SPENDSTREAM_WORKER_ID": self.worker_id,
            "SPENDSTREAM_BUDGETS_FILE": str(self.budgets),
        } | self.env
        cmd = [sys.executable, "-m", "spendstream"]
        if self.profile_to is not None:
            cmd = [sys.executable, str(Path(__file__).with_name("_profiled_worker.py")), str(self.profile_to)]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, "up", "--role", self.role, "--log-level", "warning"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state_dir,  # `-m` puts the cwd first on sys.path: keep it neutral
            )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> float:
        """SIGTERM, wait (the sink flushes on stop); SIGKILL after 60 s. Returns seconds taken."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            say(f"worker {self.label} ignored SIGTERM for 60 s: killing it")
            self.proc.kill()
            self.proc.wait(timeout=10)
        return time.monotonic() - started

    def failed(self, why: str) -> RuntimeError:
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""
        return RuntimeError(f"worker {self.label}: {why}; log {self.log}:\n{tail}")


async def follow(
    run: WorkerRun, workload: Workload, kafka: LocalKafka, *, clickhouse: bool, history: WorkerRun | None
) -> dict[str, Any]:
    """Time the worker from /health ready to: all processed, all committed, all in ClickHouse.
    With `history` (a `--role history` writer for a `--role meter` worker), the writer is started
    once the worker has processed everything, and timed on its own from its /health ready."""
    assert run.proc is not None
    raw_messages = len(workload.messages)
    spawned = time.monotonic()
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await consumer.start()
    await admin.start()
    priced_tps, raw_tps = await partitions(run.topics.usage_priced), await partitions(run.topics.usage_raw)
    dlq_tps, control_tps = await partitions(run.topics.usage_dlq), await partitions(run.topics.spend_control)
    # Since the budget agent was split off the meter (spend.deltas), the spend tables and budget
    # checks run after the meter's output; the worker has processed everything when that agent
    # has also consumed every delta the meter wrote.
    deltas = getattr(run.topics, "spend_deltas", None)
    deltas_tps = await partitions(deltas) if deltas else []
    deltas_written: int | None = None
    broker_pid = kafka.status().pid
    marks: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            while True:  # ready: /health answers
                if run.proc.poll() is not None:
                    raise run.failed(f"exited with {run.proc.returncode} before it was ready")
                if time.monotonic() - spawned > 120:
                    raise run.failed("not ready within 120 s")
                try:
                    if (await http.get(f"{run.base}/health", timeout=1)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(POLL_S)
            ready = time.monotonic()
            if run.profile_to is not None:
                run.signal(PROFILE_START)
            cpu0 = worker_cpu_seconds(run.proc.pid)
            history_pid = (await http.get(f"{run.base}/health", timeout=5)).json()["history_pid"]
            history_cpu0 = cpu_seconds(history_pid) if history_pid else 0.0
            writer_cpu0 = 0.0
            broker_cpu0 = cpu_seconds(broker_pid) if broker_pid else 0.0
            priced_at_ready = sum((await end_offsets(consumer, priced_tps)).values())
            cpu: dict[str, float] = {}
            # (seconds since ready, usage.priced messages, usage.raw messages committed by the group)
            timeline: list[tuple[float, int, int]] = []
            priced = done = 0
            health_polled = 0.0
            while not (
                {"processed", "committed"} <= marks.keys() and ("clickhouse" in marks or not clickhouse)
            ):
                now = time.monotonic()
                if now - ready > run.deadline_s:
                    raise run.failed(f"not done within {run.deadline_s:.0f} s of ready: {marks}")
                if run.proc.poll() is not None:
                    raise run.failed(f"exited with {run.proc.returncode} while processing")
                if "meter_done" not in marks:
                    if dead := sum((await end_offsets(consumer, dlq_tps)).values()):
                        raise run.failed(
                            f"{dead} dead letter(s) on {run.topics.usage_dlq}: {await why_dead(run)}"
                        )
                    priced = sum((await end_offsets(consumer, priced_tps)).values())
                    if priced and "first_output" not in marks:
                        marks["first_output"] = now
                    # The meter coalesces its output (one PricedBatch per project per take), so
                    # usage.priced has fewer messages than usage.raw: count metered events instead.
                    if now - health_polled >= HEALTH_POLL_S:
                        health_polled = now
                        health = (await http.get(f"{run.base}/health", timeout=30)).json()
                        if sum(health["events"].values()) >= workload.events:
                            marks["meter_done"] = now
                            if deltas_tps:
                                deltas_written = sum((await end_offsets(consumer, deltas_tps)).values())
                if (
                    deltas_written is not None
                    and "budget_done" not in marks
                    and await committed(admin, run.worker_id, deltas_tps) >= deltas_written
                ):
                    marks["budget_done"] = now
                if (
                    "meter_done" in marks
                    and "processed" not in marks
                    and ("budget_done" in marks or not deltas_tps)
                ):
                    marks["processed"] = now
                    cpu["worker"] = worker_cpu_seconds(run.proc.pid) - cpu0
                    if history_pid:
                        cpu["history_process"] = cpu_seconds(history_pid) - history_cpu0
                    if broker_pid:
                        cpu["broker"] = cpu_seconds(broker_pid) - broker_cpu0
                    if run.profile_to is not None:
                        run.signal(PROFILE_STOP)
                    if history is not None:
                        history.start()
                        marks["history_start"] = now
                if "committed" not in marks:
                    done = await committed(admin, meter_group(run.worker_id), raw_tps)
                    if done and "first_commit" not in marks:
                        marks["first_commit"] = now
                    if done >= raw_messages:
                        marks["committed"] = now
                timeline.append((round(now - ready, 3), priced, done))
                if history is not None and "history_start" in marks and "history_ready" not in marks:
                    assert history.proc is not None
                    if history.proc.poll() is not None:
                        raise history.failed(f"exited with {history.proc.returncode}")
                    if time.monotonic() - marks["history_start"] > 120:
                        raise history.failed("not ready within 120 s")
                    try:
                        if (await http.get(f"{history.base}/health", timeout=1)).status_code == 200:
                            marks["history_ready"] = time.monotonic()
                            writer_cpu0 = cpu_seconds(history.proc.pid)
                    except httpx.TransportError:
                        pass
                if (
                    clickhouse
                    and "processed" in marks
                    and "clickhouse" not in marks
                    and (history is None or "history_ready" in marks)
                ):
                    # distinct ids: a sink that re-reads after a rebalance stores rows twice until
                    # ReplacingMergeTree merges them, and count() would reach N early
                    query = {"query": "SELECT uniqExact(event_id) FROM usage_events"}
                    answer = await http.post(f"{run.base}/sql", json=query)
                    if answer.status_code == 200 and int(answer.json()["rows"][0][0]) >= workload.events:
                        marks["clickhouse"] = time.monotonic()
                        if history is not None and history.proc is not None:
                            cpu["history_writer"] = cpu_seconds(history.proc.pid) - writer_cpu0
                    else:
                        await asyncio.sleep(0.25 - POLL_S)
                await asyncio.sleep(POLL_S)
            processed_at = marks["meter_done"] - ready
            committed_then = max((c for t, _p, c in timeline if t <= processed_at), default=0)
            result: dict[str, Any] = {
                "startup_s": round(ready - spawned, 2),
                "priced_messages_at_ready": priced_at_ready,
                "seconds": {k: round(v - ready, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
                "cpu_seconds_while_processing": {k: round(v, 2) for k, v in cpu.items()},
                "committed_fraction_when_meter_done": round(committed_then / raw_messages, 3),
                "spend_deltas_messages": deltas_written,
                "timeline": {"columns": ["s_since_ready", "priced_messages", "committed_raw_messages"]}
                | {"rows": timeline},
            }
            if clickhouse:
                totals = {
                    "query": "SELECT count(), uniqExact(event_id), sum(cost_usd) FROM usage_events FINAL"
                }
                count, unique, cost = (await http.post(f"{run.base}/sql", json=totals)).json()["rows"][0]
                result["clickhouse"] = {
                    "rows": int(count),
                    "unique_event_ids": int(unique),
                    "cost_usd": str(cost),
                    "cost_matches_expected": Decimal(str(cost)) == pico_to_usd(workload.cost_pico),
                }
            result["usage_dlq_messages"] = sum((await end_offsets(consumer, dlq_tps)).values())
            result["spend_control_signals"] = sum((await end_offsets(consumer, control_tps)).values())
            return result
    finally:
        await consumer.stop()
        await admin.close()


async def why_dead(run: WorkerRun) -> str:
    """The reason of the first dead letter (every event of the workload should be priced)."""
    (_key, value), *_ = await read_topic(run.topics.usage_dlq)
    letter = default_codec().decode(value)[1]
    return f"{letter['reason']}: {letter['detail']}"


async def committed(admin: AIOKafkaAdminClient, group: str, tps: list[TopicPartition]) -> int:
    """Messages of `tps` the consumer group has committed (0 until the group has a coordinator)."""
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    except KafkaError:  # e.g. GroupCoordinatorNotAvailable while __consumer_offsets is created
        return 0
    return sum(max(o.offset, 0) for o in offsets.values())


def run_worker(
    run: WorkerRun,
    workload: Workload,
    kafka: LocalKafka,
    *,
    clickhouse: bool,
    history: WorkerRun | None = None,
) -> dict[str, Any]:
    run.start()
    try:
        result = asyncio.run(follow(run, workload, kafka, clickhouse=clickhouse, history=history))
    finally:
        stopped = run.stop()
        if history is not None:
            history.stop()
    result["stop_s"] = round(stopped, 1)
    return result


# -- main ----------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, run_id: str, kafka: LocalKafka, scratch: Path) -> dict[str, Any]:
    main_topics, profile_topics = Topics(f"{run_id}.main."), Topics(f"{run_id}.profiled.")
    asyncio.run(create_topics([main_topics.prefix, profile_topics.prefix], PARTITIONS))

    say(f"encoding {args.events:,} events ({args.projects} projects, {BATCH_EVENTS} per message)...")
    workload = build_workload(args.events, args.projects)
    budgets = scratch / "budgets.yaml"
    tripping = write_budgets(budgets, workload.spend_by_project)
    seconds = asyncio.run(produce(main_topics.usage_raw, workload.messages))
    size = sum(len(v) for _k, v in workload.messages)
    say(f"  produced {len(workload.messages):,} messages ({size / 1e6:.1f} MB) in {seconds:.2f} s")

    say("baseline: raw getmany loop + decode of every event...")
    base_s, base_events, base_cpu = asyncio.run(consume(main_topics.usage_raw, len(workload.messages), None))
    assert base_events == args.events, (base_events, args.events)
    say(f"  {base_s:.2f} s  {args.events / base_s:,.0f} events/s  CPU {base_cpu:.2f} s")
    say("for attribution: the same loop running MeterStage.process + PricedBatch encode...")
    stage = MeterStage(Catalogue.load(), default_codec())
    stage_s, stage_events, stage_cpu = asyncio.run(
        consume(main_topics.usage_raw, len(workload.messages), stage)
    )
    assert stage_events == args.events, (stage_events, args.events)
    say(f"  {stage_s:.2f} s  {args.events / stage_s:,.0f} events/s  CPU {stage_cpu:.2f} s")

    history: WorkerRun | None = None
    if args.worker_role == "meter":
        say(
            "worker: spendstream up --role meter (its meter process; spend tables and budget check in "
            "Faust); then, once it has processed everything, the history writer (up --role history) on "
            "its own..."
        )
        history_port, token = free_port(), secrets.token_urlsafe(32)
        history = WorkerRun(
            "history",
            main_topics,
            f"{run_id}-history",
            scratch / "history",
            budgets,
            history_port,
            role="history",
            env={"SPENDSTREAM_HISTORY_PORT": str(history_port), "SPENDSTREAM_HISTORY_TOKEN": token},
        )
        env = {
            "SPENDSTREAM_HISTORY_URL": f"http://127.0.0.1:{history_port}",
            "SPENDSTREAM_HISTORY_TOKEN": token,
        }
    else:
        say(
            "worker: spendstream up (its meter process; spend tables and budget check in Faust; ClickHouse sink beside it)..."
        )
        env = {}
    run = WorkerRun(
        "main",
        main_topics,
        f"{run_id}-worker",
        scratch / "worker-main",
        budgets,
        free_port(),
        None,
        args.deadline,
        role=args.worker_role,
        env=env,
    )
    worker = run_worker(run, workload, kafka, clickhouse=True, history=history)
    secs = worker["seconds"]
    rate = args.events / secs["processed"]
    say(
        f"  ready after {worker['startup_s']} s ({worker['priced_messages_at_ready']} of "
        f"{len(workload.messages)} messages already processed); meter done at {secs['meter_done']:.2f} s, "
        f"processed (spend and budgets too) at {secs['processed']:.2f} s "
        f"({rate:,.0f} events/s); usage.raw committed at {secs['committed']:.2f} s; "
        f"all {args.events:,} rows in ClickHouse at {secs['clickhouse']:.2f} s"
    )
    base_rate = args.events / base_s
    per_million = 1e6 / args.events
    worker_cpu = worker["cpu_seconds_while_processing"]["worker"]
    result: dict[str, Any] = {
        "events": args.events,
        "projects": args.projects,
        "events_per_message": BATCH_EVENTS,
        "worker_role": args.worker_role,
        "usage_raw_messages": len(workload.messages),
        "usage_raw_bytes": size,
        "partitions": PARTITIONS,
        "baseline": {
            "seconds": round(base_s, 3),
            "events_per_s": round(base_rate),
            "cpu_s_per_million_events": round(base_cpu * per_million, 2),
        },
        "meter_stage_only": {
            "seconds": round(stage_s, 3),
            "events_per_s": round(args.events / stage_s),
            "cpu_s_per_million_events": round(stage_cpu * per_million, 2),
        },
        "worker": worker
        | {
            "events_per_s": round(rate),
            "meter_only_events_per_s": round(args.events / secs["meter_done"]),
            "events_per_s_from_first_output": round(
                args.events / (secs["processed"] - secs.get("first_output", 0.0))
            ),
            "end_to_end_events_per_s": round(args.events / secs["clickhouse"]),
            "budget_tripping_project": tripping,
        },
        "ratio_worker_to_baseline": round(rate / base_rate, 4),
        # CPU per event of the baseline over the worker's: the ratio where neither waits for the CPU
        # (this machine's 2 cores are shared; elapsed-time ratios move with the load of the moment).
        "worker_cpu_s_per_million_events": round(worker_cpu * per_million, 2),
        "ratio_worker_to_baseline_by_cpu": round(base_cpu / worker_cpu, 4),
        "ratio_worker_to_meter_stage_only": round(rate / (args.events / stage_s), 4),
        "target_events_per_s": TARGET,
        "goal_events_per_s": GOAL,
    }

    if args.profile_events:
        profiled = workload.head(args.profile_events)
        n = profiled.events
        say(f"profiling a second worker under cProfile on {n:,} events (fresh topics)...")
        asyncio.run(produce(profile_topics.usage_raw, profiled.messages))
        prof = scratch / "worker.prof"
        run = WorkerRun(
            "profiled",
            profile_topics,
            f"{run_id}-profiled",
            scratch / "worker-profiled",
            budgets,
            free_port(),
            profile_to=prof,
            deadline_s=args.deadline,
            role=args.worker_role,
        )
        out = run_worker(run, profiled, kafka, clickhouse=False)
        if not prof.exists():
            raise run.failed("no profile written")
        kept = BENCH_HOME / "pipeline-worker.prof"
        shutil.copyfile(prof, kept)
        result["profile"] = {
            "events": n,
            "seconds_under_cprofile": out["seconds"]["processed"],
            "events_per_s_under_cprofile": round(n / out["seconds"]["processed"]),
            "stats_file": str(kept),
            "top_tottime": profile_rows(prof, "tottime"),
            "top_cumulative": profile_rows(prof, "cumulative"),
        }
    return result


def report(result: dict[str, Any]) -> None:
    w, secs = result["worker"], result["worker"]["seconds"]
    base, stage = result["baseline"]["events_per_s"], result["meter_stage_only"]["events_per_s"]
    say("")
    say(
        f"Pipeline, {result['events']:,} events in {result['usage_raw_messages']:,} messages "
        f"({result['events_per_message']} events each), {result['partitions']} partitions:"
    )
    base_cpu, stage_cpu = (result[k]["cpu_s_per_million_events"] for k in ("baseline", "meter_stage_only"))
    say(
        f"  raw getmany + decode (baseline)        {base:>9,} events/s   1.00x   CPU {base_cpu:.1f} s/M events"
    )
    say(
        f"  + MeterStage + PricedBatch encode      {stage:>9,} events/s   {stage / base:.2f}x   "
        f"CPU {stage_cpu:.1f} s/M events ({base_cpu / stage_cpu:.2f}x)"
    )
    alone = result["worker_role"] == "meter"
    label = "worker (up --role meter)          " if alone else "worker + history process (sink)   "
    say(
        f"  {label}     {w['events_per_s']:>9,} events/s   "
        f"{result['ratio_worker_to_baseline']:.3f}x   (from first output: {w['events_per_s_from_first_output']:,})"
    )
    say(
        f"    of which the meter alone               {w['meter_only_events_per_s']:>9,} events/s   "
        f"{w['meter_only_events_per_s'] / base:.3f}x   (all of usage.raw priced at {secs['meter_done']:.2f} s)"
    )
    if alone:
        rows_s = result["events"] / (secs["clickhouse"] - secs["history_ready"])
        say(
            f"  then the history writer alone (up --role history): ready {secs['history_ready'] - secs['history_start']:.2f} s "
            f"after its start, all {result['events']:,} rows in ClickHouse {secs['clickhouse'] - secs['history_ready']:.2f} s "
            f"after that ({rows_s:,.0f} rows/s; CPU {w['cpu_seconds_while_processing']['history_writer']:.2f} s)"
        )
    else:
        say(
            f"  end to end, ready -> all rows in ClickHouse: {secs['clickhouse']:.2f} s "
            f"({w['end_to_end_events_per_s']:,} events/s)"
        )
    say(
        f"  target {result['target_events_per_s']:,} events/s: "
        f"{w['events_per_s'] / result['target_events_per_s']:.2f}x; goal "
        f"{result['goal_events_per_s']:,}: {w['events_per_s'] / result['goal_events_per_s']:.2f}x"
    )
    say(
        f"  worker CPU {result['worker_cpu_s_per_million_events']:.1f} s per million events: "
        f"{result['ratio_worker_to_baseline_by_cpu']:.3f}x the baseline's CPU per event"
    )
    cpu = w["cpu_seconds_while_processing"]
    history_cpu = "" if alone else f"history process {cpu.get('history_process', 0):.2f} s, "
    say(
        f"  CPU while processing ({secs['processed']:.2f} s): worker {cpu.get('worker', 0):.2f} s, "
        f"{history_cpu}broker {cpu.get('broker', 0):.2f} s"
    )
    say(
        f"  committed offsets on usage.raw: first commit at {secs.get('first_commit', float('nan')):.2f} s, "
        f"{w['committed_fraction_when_meter_done']:.0%} committed when the meter was done, "
        f"all at {secs['committed']:.2f} s"
    )
    ch = w["clickhouse"]
    say(
        f"  ClickHouse: {ch['rows']:,} rows, {ch['unique_event_ids']:,} event ids, cost ${ch['cost_usd']} "
        f"(equal to the expected cost: {ch['cost_matches_expected']}); "
        f"{w['spend_control_signals']} control signal(s), {w['usage_dlq_messages']} dead letters"
    )
    if "profile" in result:
        p = result["profile"]
        say(
            f"Profile of the worker's main thread, ready -> processed ({p['events']:,} events, "
            f"{p['events_per_s_under_cprofile']:,} events/s under cProfile; {p['stats_file']}):"
        )
        print_profile("top by tottime", p["top_tottime"])
        print_profile("top by cumulative", p["top_cumulative"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--projects", type=int, default=8)
    parser.add_argument(
        "--profile-events", type=int, default=100_000, help="events for the cProfile'd worker (0: skip)"
    )
    parser.add_argument(
        "--worker-role",
        choices=("meter", "all"),
        default="meter",
        help="meter: the worker alone (`up --role meter`), the history writer started after it, so "
        "neither takes the other's CPU; all: both at once (`up`, the history process beside the worker)",
    )
    parser.add_argument(
        "--deadline", type=float, default=DEADLINE_S, help="seconds a worker may take from ready to done"
    )
    args = parser.parse_args()
    run_id = new_run_id("pipeline")
    scratch = BENCH_HOME / "runs" / run_id
    scratch.mkdir(parents=True)
    started = time.monotonic()
    with bench_broker(run_id) as kafka:
        result = measure(args, run_id, kafka, scratch)
    shutil.rmtree(scratch, ignore_errors=True)  # kept after a failure, for the worker logs
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    report(result)
    say(f"results: {write_result('pipeline', result)}")


if __name__ == "__main__":
    main()
