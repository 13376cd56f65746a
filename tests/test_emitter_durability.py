"""Emitter durability on a real broker: an outage under load, a start while Kafka is down, a spool
carried across a process restart, and the full-buffer policy. Every test counts both sides: the
event_ids the emitter accepted and the event_ids read back from the topic.

The outage tests stop and start a broker of their own (LocalKafka on TEST_KAFKA_PORT + 100/101, in
its own directory) so that the session broker is never disturbed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from producers import Emitter, EmitterStats, SyncEmitter, build_event
from producers._spool import Spool, read_segment
from spendstream.cli.kafka_local import LocalKafka
from spendstream.errors import BufferFull, DeliveryTimeout
from spendstream.topics import Topics, ensure_topics
from spendstream.wire import default_codec
from stream_processors.pricing import Catalogue
from tests.conftest import REPO, Worker, free_port, own_broker, start_history, start_meter, start_worker
from tests.test_pipeline import read_all
from tests.test_scale import all_holding, spend_by_scope

pytestmark = pytest.mark.integration

# One project per usage.raw partition (DefaultPartitioner, 4 partitions: 0, 2, 1, 3), so that
# every meter worker holding a partition has events to meter.
PROJECTS = ("p0", "p1", "p6", "p7")
CALL: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "input_tokens": 900,
    "output_tokens": 120,
}


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    """A broker these tests may stop and start (jars kept between runs, data wiped)."""
    with own_broker("kafka-outage", 100) as own:
        yield own


def fresh_topics(bootstrap: str) -> Topics:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics, 4))
    return topics


def fresh_topic(bootstrap: str) -> str:
    return fresh_topics(bootstrap).usage_raw


def event_ids_on(bootstrap: str, topic: str) -> list[str]:
    """Every event_id in `topic`, in topic order per partition (duplicates included)."""
    codec = default_codec()
    return [
        e["event_id"]
        for _k, v in asyncio.run(read_all(bootstrap, topic))
        for e in codec.decode(v)[1]["events"]
    ]


def tally(accepted: list[str], found: list[str]) -> tuple[int, int, str]:
    counts = Counter(found)
    lost = len(set(accepted) - counts.keys())
    doubled = sum(c - 1 for c in counts.values())
    stray = len(counts.keys() - set(accepted))
    return (
        lost,
        doubled,
        f"accepted {len(accepted):,}, found {len(found):,} ({len(counts):,} distinct), lost {lost:,}, doubled {doubled:,}, stray {stray:,}",
    )


class CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1


def stored_in_clickhouse(worker: Worker, n: int, timeout: float = 60) -> tuple[int, int]:
    """(rows, distinct event_ids) of usage_events FINAL once `n` rows are there (or time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        worker.flush()
        [[rows, distinct]] = worker.sql("SELECT count(), uniqExact(event_id) FROM usage_events FINAL")
        if int(str(rows)) >= n or time.monotonic() > deadline:
            return int(str(rows)), int(str(distinct))
        time.sleep(0.5)


def org_spend(worker: Worker, expected: Decimal, timeout: float = 60) -> Decimal:
    """The org's spend this month in the worker's budget table, once it reaches `expected` (or time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = httpx.get(f"http://127.0.0.1:{worker.port}/budgets", timeout=10).json()["budgets"]
        spend = sum((Decimal(r["spend_usd"]) for r in rows if r["scope"] == "org"), Decimal(0))
        if spend >= expected or time.monotonic() > deadline:
            return spend
        time.sleep(0.5)


def start_load(emitter: SyncEmitter, accepted: list[str], stop: threading.Event) -> threading.Thread:
    """A thread emitting 3 events every 10 ms, on schedule, over PROJECTS in turn, until `stop`;
    the ids the emitter accepted are appended to `accepted`."""

    def load() -> None:
        tick = time.monotonic()
        while not stop.is_set():
            for _ in range(3):
                accepted.append(emitter.emit(project=PROJECTS[len(accepted) % 4], **CALL))
            tick += 0.01
            time.sleep(max(0.0, tick - time.monotonic()))

    loader = threading.Thread(target=load)
    loader.start()
    return loader


def test_a_60_s_outage_under_load_loses_nothing(broker: LocalKafka, tmp_path: Path) -> None:
    """300 events/s keep coming while the broker is stopped for 60 s and started again; then a
    worker (started after the outage) stores every event in ClickHouse once and counts it once in
    the budgets (re-sent batches are copies with the same event_id)."""
    topics = fresh_topics(broker.bootstrap)
    topic = topics.usage_raw
    worker: Worker | None = None
    aiokafka_lines = CountingHandler()
    logging.getLogger("aiokafka").addHandler(aiokafka_lines)
    accepted: list[str] = []
    stop = threading.Event()
    try:
        with SyncEmitter(bootstrap_servers=broker.bootstrap, service="outage", topic=topic) as emitter:
            loader = start_load(emitter, accepted, stop)
            time.sleep(3)
            broker.stop()
            down_at = time.monotonic()
            during = len(accepted)
            time.sleep(60)
            broker.start(timeout=120)
            outage_s = time.monotonic() - down_at
            # the load goes on while the worker starts
            worker = start_worker(
                broker.bootstrap,
                tmp_path,
                'budgets:\n  org: {monthly: "1000000"}\n',
                SPENDSTREAM_TOPIC_PREFIX=topics.prefix,
            )
            stop.set()
            loader.join()
            emitter.flush(timeout=90)
            stats = emitter.stats()
        rows, distinct = stored_in_clickhouse(worker, len(accepted))
        one = Catalogue.load().price(build_event(service="outage", project="p0", **CALL)).cost_pico
        assert one is not None
        truth = Decimal(one * len(accepted)).scaleb(-12)
        budget = org_spend(worker, truth)
    finally:
        stop.set()
        logging.getLogger("aiokafka").removeHandler(aiokafka_lines)
        if worker is not None:
            worker.stop()
    found = event_ids_on(broker.bootstrap, topic)
    lost, doubled, summary = tally(accepted, found)
    print(
        f"\n60 s outage ({outage_s:.0f} s down, {len(accepted) - during:,} accepted meanwhile): {summary}; "
        f"ClickHouse FINAL rows {rows:,} ({distinct:,} distinct); org budget ${budget} (truth ${truth}); {stats}; "
        f"aiokafka lines that got through: {aiokafka_lines.lines:,}"
    )
    assert lost == 0, summary
    assert rows == distinct == len(accepted), (
        f"ClickHouse FINAL holds {rows:,} rows ({distinct:,} distinct); {summary}"
    )
    assert budget == truth, f"org budget ${budget}, truth ${truth} ({len(accepted):,} events); {summary}"
    assert stats["sent"] == stats["accepted"] == len(accepted), (stats, summary)
    assert stats["reconnects"] >= 1, stats  # the producer really broke, and was replaced
    assert doubled <= stats["resent_batches"] * 500, summary  # only re-sent batches can double
    assert aiokafka_lines.lines < 500, f"{aiokafka_lines.lines:,} aiokafka log lines ({stats})"


def test_two_meter_workers_running_through_a_60_s_outage_count_every_event_once(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """A history writer and two meter workers are up, metering 300 events/s over 4 projects, when
    the broker stops for 60 s (ten times the groups' 6 s session: every group is rebuilt after) and
    starts again. Every event the emitter accepted, before, during and after, is stored once, and
    counted once in its project's budget, which one of the two workers owns."""
    budgets = "budgets:\n" + "".join(f'  project:{p}: {{daily: "1000000"}}\n' for p in PROJECTS)
    history = start_history(broker.bootstrap, tmp_path, budgets)
    meters: list[Worker] = []
    accepted: list[str] = []
    stop = threading.Event()
    try:
        meters = [start_meter(history, f"meter-{i}") for i in range(2)]
        all_holding(meters, 4, 60)
        with SyncEmitter(
            bootstrap_servers=broker.bootstrap, service="outage", topic=history.topics.usage_raw
        ) as emitter:
            loader = start_load(emitter, accepted, stop)
            time.sleep(4)
            before = len(accepted)
            broker.stop()
            time.sleep(60)
            during = len(accepted) - before
            broker.start(timeout=120)
            time.sleep(4)
            stop.set()
            loader.join()
            emitter.flush(timeout=120)
            stats = emitter.stats()
        rows, distinct = stored_in_clickhouse(history, len(accepted), timeout=180)
        one = Catalogue.load().price(build_event(service="outage", project="p0", **CALL)).cost_pico
        assert one is not None
        truth = {  # the load's i-th event is of PROJECTS[i % 4]
            f"project:{p}": Decimal(one * len(accepted[i::4])).scaleb(-12) for i, p in enumerate(PROJECTS)
        }
        deadline = time.monotonic() + 180
        while (spend := spend_by_scope(meters)) != {k: [v] for k, v in truth.items()}:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        metrics = [httpx.get(f"http://127.0.0.1:{m.port}/metrics", timeout=10).text for m in meters]
    finally:
        stop.set()
        for worker in (*meters, history):
            worker.stop()
    meter_lines = [
        line for text in metrics for line in text.splitlines() if line.startswith("spendstream_meter_")
    ]
    handled = [
        int(line.split()[-1])
        for text in metrics
        for line in text.splitlines()
        if line.startswith('spendstream_meter_takes_total{outcome="handled"}')
    ]
    print(
        f"\ntwo meter workers through a 60 s outage: {len(accepted):,} accepted ({before:,} before, "
        f"{during:,} during); ClickHouse FINAL rows {rows:,} ({distinct:,} distinct); budgets {spend} "
        f"(truth {truth}); {stats}; {meter_lines}"
    )
    assert len(handled) == 2, f"each meter worker handled takes: {meter_lines}"
    assert min(handled) > 0, f"each meter worker handled takes: {meter_lines}"
    assert during > 0  # the emitter kept accepting while the broker was down
    assert stats["sent"] == stats["accepted"] == len(accepted), stats
    assert rows == distinct == len(accepted), f"ClickHouse FINAL holds {rows:,} rows ({distinct:,} distinct)"
    assert spend == {k: [v] for k, v in truth.items()}, f"budgets {spend}, truth {truth}"  # one owner each
    assert not any('spendstream_meter_takes_total{outcome="failed"}' in text for text in metrics), meter_lines


def test_an_emitter_started_while_kafka_is_down_delivers_when_it_comes(broker: LocalKafka) -> None:
    topic = fresh_topic(broker.bootstrap)
    broker.stop()
    accepted: list[str] = []
    try:
        with SyncEmitter(bootstrap_servers=broker.bootstrap, service="early", topic=topic) as emitter:
            for _ in range(150):  # 1,500 events over ~15 s while the broker is down
                accepted += [emitter.emit(project=f"p{i % 3}", **CALL) for i in range(10)]
                time.sleep(0.1)
            assert emitter.stats()["sent"] == 0
            with pytest.raises(DeliveryTimeout, match="1,500 events in memory"):
                emitter.flush(timeout=0.5)
            broker.start(timeout=120)
            emitter.flush(timeout=60)
            stats = emitter.stats()
    finally:
        broker.start(timeout=120)
    lost, doubled, summary = tally(accepted, event_ids_on(broker.bootstrap, topic))
    print(f"\nstarted while down: {summary}; {stats}")
    assert (lost, doubled) == (0, 0), summary
    assert stats["sent"] == stats["accepted"] == 1_500, stats


CHILD = """
import json, sys
from producers import Emitter, EmitterStats, SyncEmitter
bootstrap, topic, spool, n, out = sys.argv[1:]
ids = []
em = SyncEmitter(bootstrap_servers=bootstrap, service="spooler", topic=topic, spool_dir=spool, max_buffered=500)
for _ in range(int(n)):
    ids.append(em.emit(project="solo", provider="openai", model="gpt-4o-mini", input_tokens=900, output_tokens=120))
stats = em.stats()
em.close(timeout=1)
json.dump({"ids": ids, "before_close": stats, "after_close": em.stats()}, open(out, "w"))
"""


def test_a_spool_carries_events_across_a_process_restart_in_order(broker: LocalKafka, tmp_path: Path) -> None:
    """A process with no broker spools 3,000 events (2,500 beyond its memory, 500 at close) and exits;
    a second emitter on the same spool_dir, with the broker up, delivers them all, in order."""
    topic = fresh_topic(broker.bootstrap)
    spool, out = tmp_path / "spool", tmp_path / "child.json"
    nobody = f"127.0.0.1:{free_port()}"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, nobody, topic, str(spool), "3000", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    first = json.loads(out.read_text())
    accepted: list[str] = first["ids"]
    assert first["before_close"]["spooled"] == 2_500, first
    assert first["after_close"]["spooled"] == 3_000, first  # the 500 in memory, written at close
    on_disk = sum(len(read_segment(p)) for p in spool.glob("*.spool"))
    assert on_disk == 3_000, f"accepted 3,000, {on_disk:,} records in the spool"

    with SyncEmitter(
        bootstrap_servers=broker.bootstrap, service="replayer", topic=topic, spool_dir=spool
    ) as em:
        em.flush(timeout=60)
        stats = em.stats()
    found = event_ids_on(broker.bootstrap, topic)
    lost, doubled, summary = tally(accepted, found)
    print(f"\nspool across a restart: {summary}; {stats}")
    assert (lost, doubled) == (0, 0), summary
    assert found == accepted, "one project, one partition: the topic holds the events in emit order"
    assert stats["sent"] == 3_000, stats
    assert not list(spool.glob("*.spool")), "every segment is deleted once acknowledged"


def test_full_memory_and_spool_refuse_loudly_and_drop_nothing(tmp_path: Path) -> None:
    """No broker: memory holds 100 events, the spool ~20 kB; then BufferFull after block_timeout."""
    spool = tmp_path / "spool"
    nobody = f"127.0.0.1:{free_port()}"
    em = SyncEmitter(
        bootstrap_servers=nobody,
        service="full",
        topic="usage.raw",
        max_buffered=100,
        spool_dir=spool,
        spool_max_bytes=20_000,
        block_timeout=0.5,
    )
    accepted: list[str] = []
    with pytest.raises(BufferFull, match="max_buffered 100") as refused:  # noqa: PT012 (fill, then refuse)
        while len(accepted) < 10_000:
            started = time.monotonic()
            accepted.append(em.emit(project="p", **CALL))
    waited = time.monotonic() - started
    stats = em.stats()
    print(f"\nfull: accepted {len(accepted):,} then {refused.value}; {stats}")
    assert waited >= 0.5, f"BufferFull after {waited:.2f} s, block_timeout is 0.5 s"
    assert stats["buffer_full_refusals"] == 1, stats
    assert stats["accepted"] == len(accepted) == 100 + stats["spooled"], stats
    assert 50 < stats["spooled"] < 200, stats
    em.close(timeout=0.5)
    codec = default_codec()
    kept = [codec.decode(p)[1]["event_id"] for s in sorted(spool.glob("*.spool")) for p in read_segment(s)]
    assert sorted(kept) == sorted(accepted), f"accepted {len(accepted)}, kept in the spool {len(kept)}"


def test_the_async_emitter_refuses_after_block_timeout_and_emit_nowait_at_once() -> None:
    async def fill() -> tuple[float, EmitterStats]:
        em = Emitter(
            bootstrap_servers=f"127.0.0.1:{free_port()}", service="full", max_buffered=10, block_timeout=0.3
        )
        await em.start()
        for _ in range(10):
            await em.emit(project="p", **CALL)
        started = time.monotonic()
        with pytest.raises(BufferFull, match="max_buffered 10"):
            await em.emit(project="p", **CALL)
        waited = time.monotonic() - started
        with pytest.raises(BufferFull):
            em.emit_nowait(project="p", **CALL)
        stats = em.stats()
        with pytest.raises(DeliveryTimeout, match="10 accepted usage events"):
            await em.close(timeout=0.2)
        return waited, stats

    waited, stats = asyncio.run(fill())
    assert waited >= 0.3, f"BufferFull after {waited:.2f} s, block_timeout is 0.3 s"
    assert (stats["accepted"], stats["buffer_full_refusals"], stats["sent"]) == (10, 2, 0), stats


def test_close_without_a_spool_says_how_many_events_it_drops() -> None:
    em = SyncEmitter(bootstrap_servers=f"127.0.0.1:{free_port()}", service="nospool", topic="usage.raw")
    for _ in range(42):
        em.emit(project="p", **CALL)
    with pytest.raises(DeliveryTimeout, match=r"42 accepted usage events .* DROPPED") as dropped:
        em.close(timeout=0.5)
    assert dropped.value.undelivered == 42


def test_spool_records_it_cannot_decode_are_sent_as_they_are_not_dropped(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """A record this version cannot decode (another version wrote it) still reaches usage.raw, where the
    meter dead-letters it with the reason; the events around it are delivered too."""
    topic = fresh_topic(broker.bootstrap)
    codec = default_codec()
    events = [build_event(service="s", project="p", **CALL) for _ in range(2)]
    spool = Spool(tmp_path, 1 << 20)
    garbage = b"\xc3\x01not a known schema"
    for payload in (codec.encode("UsageEvent", events[0]), garbage, codec.encode("UsageEvent", events[1])):
        assert spool.append(payload)
    spool.close()
    with SyncEmitter(bootstrap_servers=broker.bootstrap, service="s", topic=topic, spool_dir=tmp_path) as em:
        em.flush(timeout=30)
        stats = em.stats()
    values = [v for _k, v in asyncio.run(read_all(broker.bootstrap, topic))]
    assert garbage in values, values
    delivered = [e["event_id"] for v in values if v != garbage for e in codec.decode(v)[1]["events"]]
    assert sorted(delivered) == sorted(e["event_id"] for e in events), delivered
    assert stats["sent"] == 3, stats
