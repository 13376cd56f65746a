"""The meter, in a process of its own beside the worker's budget agent.

    usage.raw --MeterInput--> MeterStage --> usage.priced, usage.dlq, usage.seen, spend.deltas

The meter prices usage.raw by the take (~25 ms of CPU per take at 5,000 events/s). In the
worker's process, every take held the interpreter while the deltas it had just sent, and the
crossings in them, waited for the budget agent behind it; and the meter's takes waited behind
Faust's consumer thread, the budget agent and the table changelogs. Here the two run on two
cores: measured in bench/enforcement.py (bench/README.md, twelfth pass).

`MeterProcess` is the worker's handle: it spawns the child (fresh interpreter: no fork of a
process with threads and sockets), reads what the child reports over a pipe every
REPORT_SECONDS and before each commit of usage.raw offsets (its counters, GC pauses,
partitions, feeds and catalogue) for the worker's /health and /metrics, and keeps the counts of
a child that exited, so that counters never go back and count every event a commit covers. The
child stops when the worker dies, even by `kill -9` (SIGTERM: it finishes its take, commits
what Kafka acknowledged and leaves the consumer group); the worker restarts a child that died
alone (stream_processors/app.py). What a dead child had read but not committed is read
again and skipped by the dedupe (stream_processors/meter_input.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord

from spendstream.settings import Settings
from spendstream.wire import Codec, default_codec
from stream_processors.dedupe import SeenIds, reload_seen
from stream_processors.feeds import BudgetFeed, PriceFeed
from stream_processors.gc_pauses import WORKER_GC_THRESHOLDS, GcPauses
from stream_processors.meter import MeterBatch, MeterStage, dead_letter_record, parts_by_size
from stream_processors.meter_input import MeterInput, meter_group
from stream_processors.priced_writer import PricedBatchWriter
from stream_processors.pricing import Catalogue
from stream_processors.usage_columns import NATIVE

__all__ = ["PROCESS_NAME", "MeterProcess"]

log = logging.getLogger(__name__)

MAX_PRICED_BATCH_BYTES = 4 << 20  # a PricedBatch message at most (the request limit is 8 MiB)
METER_TAKE = 1_000  # usage.raw messages the meter prices together at most
# Seconds the meter waits for more messages before pricing what it has (adds at most this latency).
# Each take's output is a PricedBatch per project, a SpendDeltaBatch and a SeenIds per partition:
# at 5,000 ev/s in messages of ~12 events, 15 ms instead of 5 ms made takes larger and fewer, and
# the worker used 14% less CPU (16.8 against 19.6 CPU s per 26 s, 5 interleaved runs each) for
# +8 ms at p50 and no worse a p99 (bench/README.md, eighth pass).
METER_WAIT = 0.015
METER_PART_BYTES = 1 << 20  # usage.raw bytes priced between two yields (~7,000 events, ~0.1-0.2 s of CPU)
METER_FETCH_WAIT_MS = 20  # longest broker long-poll of the meter's consumer (as the budget agent's)
PROCESS_NAME = b"spendstream-mtr"  # the child's name for the OS (15 bytes at most)
REPORT_SECONDS = 0.1  # how often the child tells the worker its counters
STOP_SECONDS = 60.0  # a stopping child finishes its take and commits within this, or is killed


def _now_us() -> int:
    return time.time_ns() // 1_000


class MeterProcess:
    """The worker's handle on its meter child: `start()` spawns it (and returns at once),
    `report()` is what it said last, counters summed over every child of this worker."""

    def __init__(self, settings: Settings, loglevel: str = "info") -> None:
        self._settings, self._loglevel = settings, loglevel
        self._process: BaseProcess | None = None
        self._lock = threading.Lock()
        self._last: dict[str, Any] = {}  # the current child's last report
        self._exited: Counter[str] = Counter()  # the counters of the children that exited
        self._exited_gc = [0.0, 0.0, 0.0]
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_main,
            args=(self._settings, self._loglevel, os.getpid(), child),
            name="spendstream-meter",
            daemon=False,
        )
        process.start()
        child.close()
        self._process = process
        self._reader = threading.Thread(target=self._read, args=(parent,), name="meter-reports", daemon=True)
        self._reader.start()

    def _read(self, conn: Connection) -> None:
        """Keep the child's reports until it closes the pipe (it exited); then fold its counters
        into those of the children before it (its successor may have reported already)."""
        mine: dict[str, Any] = {}
        with conn:
            while True:
                try:
                    report = conn.recv()
                except (EOFError, OSError):
                    break
                with self._lock:
                    self._last = mine = report
        with self._lock:
            self._exited.update(mine.get("metrics", {}))
            self._exited_gc = [
                a + b for a, b in zip(self._exited_gc, mine.get("gc_seconds", [0.0] * 3), strict=True)
            ]
            if self._last is mine:
                self._last = {}

    @property
    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def metrics(self) -> Counter[str]:
        with self._lock:
            return self._exited + Counter(self._last.get("metrics", {}))

    def gc_seconds(self) -> list[float]:
        with self._lock:
            return [
                a + b for a, b in zip(self._exited_gc, self._last.get("gc_seconds", [0.0] * 3), strict=True)
            ]

    def report(self) -> dict[str, Any]:
        """The child's partitions, feeds_caught_up, price_cards, catalogue_version (as last reported)."""
        with self._lock:
            return dict(self._last)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM (the child finishes its take and commits), then SIGKILL after `timeout` seconds."""
        process = self._process
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(timeout)
            if process.is_alive():
                log.error("the meter process did not stop in %.0f s; killing it", timeout)
                process.kill()
                process.join()
        if self._reader is not None:
            self._reader.join(5)


def _main(settings: Settings, loglevel: str, parent_pid: int, conn: Connection) -> None:
    """Entry point of the child process (spawned: a fresh interpreter)."""
    with contextlib.suppress(OSError, AttributeError):  # Linux
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the worker dies
        libc.prctl(15, PROCESS_NAME)  # PR_SET_NAME: what top, ps -o comm and /proc/<pid>/comm show
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker stops us
    logging.basicConfig(
        level=loglevel.upper(),
        format="[%(asctime)s] [meter %(process)d] [%(levelname)s] %(message)s",
        force=True,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    if not NATIVE:
        log.warning(
            "the meter's native decoder is not built: decoding usage.raw with fastavro (same "
            "results, ~3x the meter's CPU per event); build it with ./dev setup (needs cargo), "
            "see stream_processors/native/README.md"
        )
    asyncio.run(_run(settings, parent_pid, conn))


async def _run(settings: Settings, parent_pid: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reports = _Reports(conn)
    meter = _Meter(
        settings,
        default_codec(),
        Catalogue.load(fallback=settings.unpriced_fallback),
        stop.is_set,
        reports.send,
    )
    # What exists now (aiokafka, the catalogue, the schemas) lives as long as the process: frozen,
    # the collector stops rescanning it; and it runs after 50,000 allocations, not 700.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
    await meter.start()
    try:
        while not stop.is_set() and os.getppid() == parent_pid:  # the worker is gone: stop too
            reports.send(meter.report())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_SECONDS)
    finally:
        stop.set()
        await meter.stop()
        with contextlib.suppress(OSError):
            reports.send(meter.report())
            conn.close()


class _Reports:
    """The child's end of the pipe: a report goes to the worker when it differs from the last."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._last: dict[str, Any] = {}

    def send(self, report: dict[str, Any]) -> None:
        if report != self._last:
            self._conn.send(report)
            self._last = report


class _Meter:
    """The meter's feeds, consumer, stage and producer, in one event loop."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        catalogue: Catalogue,
        stopping: Callable[[], bool],
        tell: Callable[[dict[str, Any]], None],
    ) -> None:
        self._tell = tell  # sends a report to the worker
        self.metrics: Counter[str] = Counter()
        self.gc_pauses = GcPauses()
        self._codec, self._catalogue, self._topics = codec, catalogue, settings.topics
        auth = settings.kafka_auth
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap,
            # As Faust's producer (the budget agent's): every replica in sync acknowledges; a
            # batch is retried for 20 minutes (a broker outage), not aiokafka's 40 s. Not
            # idempotent: after an outage aiokafka's idempotent producer fails for good
            # (OutOfOrderSequenceNumber); a delta sent twice is counted once anyway (the budget
            # state keeps the usage.raw offsets it applied), a priced row twice is one row.
            acks="all",
            request_timeout_ms=1_200_000,
            linger_ms=1,
            # aiokafka keeps one produce request in flight per broker and, when a partition's
            # batch is full, makes the next send to it wait until that batch has gone out: with
            # 16 KiB batches every PricedBatch (tens of KiB) filled one, and the deltas queued
            # behind it (kill switch p50 1.5 s -> 0.2 s at 5,000 ev/s with 1 MiB).
            max_batch_size=1 << 20,
            max_request_size=8 << 20,
            **auth.client_kwargs(),
        )
        feed_args: dict[str, Any] = {
            "bootstrap": settings.bootstrap,
            "kafka_auth": auth,
            "codec": codec,
            "loop": asyncio.get_running_loop(),
        }
        self._prices = PriceFeed(
            topic=self._topics.prices,
            catalogue=catalogue,
            **feed_args,
            dead_letter=lambda *a: self.dead_letter(a[0], a[1], self._topics.prices, *a[2:]),
        )
        self._budgets = BudgetFeed(
            topic=self._topics.budgets,
            verifier=settings.verifier(),
            **feed_args,
            dead_letter=lambda *a: self.dead_letter(a[0], a[1], self._topics.budgets, *a[2:]),
        )
        self._stage = MeterStage(
            catalogue,
            codec,
            self._budgets.model_globs,
            self._budgets.specs,
            dedupe_horizon_us=settings.dedupe_horizon_seconds * 1_000_000,
        )
        self._priced_writer = PricedBatchWriter(codec)
        self._partitions = settings.partitions
        self._bootstrap, self._auth = settings.bootstrap, auth
        self._next_offset: dict[int, int] = {}  # usage.raw partition -> the offset handled next
        self._input = MeterInput(
            bootstrap=settings.bootstrap,
            topic=self._topics.usage_raw,
            group_id=meter_group(settings.worker_id),
            previous_group=settings.worker_id,  # the Faust group that read usage.raw before
            handle=self._take,
            flush=self._flush,
            stopping=stopping,  # set as the process begins to stop: no take after it
            ready=self._feeds_caught_up,
            take=METER_TAKE,
            wait=METER_WAIT,
            fetch_max_wait_ms=METER_FETCH_WAIT_MS,
            metrics=self.metrics,
            kafka_auth=auth,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        await self._producer.start()
        for service in (self._prices, self._budgets, self._input):
            await service.start()

    async def stop(self) -> None:
        """The take in hand finished and committed (MeterInput.on_stop), then the feeds and the producer."""
        for service in (self._input, self._budgets, self._prices):
            await service.stop()
        await self._producer.stop()  # sends what it holds
        self.gc_pauses.close()

    async def _flush(self) -> None:
        """Before a commit: every record sent so far acknowledged, and the worker told what was
        counted (a child killed after the commit had reported every event the commit covers)."""
        await self._producer.flush()
        self._tell(self.report())

    def report(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics),
            "gc_seconds": list(self.gc_pauses.seconds),
            "partitions": self._input.partitions(),
            "feeds_caught_up": self._prices.caught_up.is_set() and self._budgets.caught_up.is_set(),
            "price_cards": len(self._catalogue),
            "catalogue_version": self._catalogue.version,
        }

    async def _feeds_caught_up(self) -> None:
        """Price nothing before the cards and budgets published at run time are known."""
        await self._prices.caught_up.wait()
        await self._budgets.caught_up.wait()

    async def dead_letter(
        self,
        reason: str,
        detail: str,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        payload: bytes,
    ) -> None:
        self.metrics[f"dead_letters|{reason}"] += 1
        letter = dead_letter_record(reason, detail, topic, partition, offset, key, payload, _now_us())
        await self._producer.send(self._topics.usage_dlq, self._codec.encode("DeadLetter", letter), key=key)

    async def _follow_on(self, partition: int, offset: int) -> None:
        """Before handling a partition from an offset other than the next (start, rebalance, seek):
        re-load the ids counted before it, as whoever handled the partition last wrote them."""
        stage = self._stage
        if self._next_offset.get(partition) != offset:
            stage.seen[partition] = SeenIds(stage.dedupe_horizon_us)
            await reload_seen(
                self._bootstrap,
                self._topics.usage_seen,
                partition,
                offset,
                stage.seen[partition],
                self._codec,
                self._auth,
            )
        self._next_offset[partition] = offset + 1

    async def _take(self, messages: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Price a take of usage.raw messages (MeterInput: up to METER_TAKE, or what arrived
        within METER_WAIT) together, their output coalesced: the per-message cost of a send is
        paid per destination, not per input message.

        A take is priced in parts of at most METER_PART_BYTES of usage.raw, each part's output
        sent before the next is priced: behind a backlog a take can hold 1,000 messages of 500
        events, seconds of CPU; the consumer's heartbeats and the reports run between parts."""
        for msg in messages:
            await self._follow_on(msg.partition, msg.offset)
        for part in parts_by_size(messages, lambda msg: len(msg.value or b""), METER_PART_BYTES):
            await self._part(part)
            await asyncio.sleep(0)

    async def _part(self, messages: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Price usage.raw messages together and send their output, coalesced per destination."""
        topics, codec, send = self._topics, self._codec, self._producer.send
        batch = MeterBatch(self._partitions)
        self._stage.model_globs = self._budgets.model_globs
        results = self._stage.process_many(
            [(msg.partition, msg.key, msg.value or b"") for msg in messages], _now_us()
        )  # a tombstone is undecodable
        for msg, result in zip(messages, results, strict=True):
            for dead in result.dead:
                await self.dead_letter(
                    dead.reason, dead.detail, msg.topic, msg.partition, msg.offset, msg.key, dead.payload
                )
            for project, payload in result.rekey:
                await send(topics.usage_raw, payload, key=project.encode())
            for status, count in result.statuses.items():
                self.metrics[f"events|{status}"] += count
            if result.unbudgeted:
                self.metrics["unbudgeted|beyond_dedupe_horizon"] += result.unbudgeted
            batch.add(result, msg.partition, msg.offset)
        # The deltas first (the budget agent decides on them), with the ids they counted, so a
        # restarted meter knows them; the history after.
        for partition, record in batch.seen_records():
            await send(
                topics.usage_seen,
                codec.encode("SeenIds", record),
                key=str(partition).encode(),
                partition=partition,
            )
        for partition, deltas in batch.delta_batches():
            await send(
                topics.spend_deltas,
                codec.encode("SpendDeltaBatch", {"deltas": deltas}),
                key=deltas[0]["scope"].encode(),
                partition=partition,
            )
        for project, priced in batch.priced_batches():
            await asyncio.sleep(0)
            await self._send_priced(project, priced)

    async def _send_priced(self, project: str, sources: list[dict[str, Any]]) -> None:
        """PricedBatch messages of usage.raw messages and their prices (`sources`), at most
        MAX_PRICED_BATCH_BYTES each (halved until they fit). A single message too large to travel
        with its prices goes as whole PricedUsage records instead (`events`, _send_priced_events)."""
        try:
            value: bytes | None = self._priced_writer.write(sources)
        except Exception:  # a bug: each event is tried alone below, and dead-lettered with the reason
            value = None
        if value is not None and len(value) <= MAX_PRICED_BATCH_BYTES:
            await self._producer.send(self._topics.usage_priced, value, key=project.encode())
        elif len(sources) > 1:
            half = len(sources) // 2
            await self._send_priced(project, sources[:half])
            await self._send_priced(project, sources[half:])
        else:  # the prices carry their event and priced_at: whole PricedUsage records
            await self._send_priced_events(project, sources[0]["prices"])

    async def _send_priced_events(self, project: str, priced: list[dict[str, Any]]) -> None:
        """PricedBatch messages of PricedUsage records (`events`), halved until they fit; an event
        that cannot be encoded at all (a bug) is dead-lettered alone."""
        try:
            value: bytes | None = self._codec.encode("PricedBatch", {"events": priced})
            problem = ""
        except Exception as exc:
            value, problem = None, repr(exc)[:1000]
        if value is not None and (len(value) <= MAX_PRICED_BATCH_BYTES or len(priced) == 1):
            await self._producer.send(self._topics.usage_priced, value, key=project.encode())
        elif len(priced) > 1:
            half = len(priced) // 2
            await self._send_priced_events(project, priced[:half])
            await self._send_priced_events(project, priced[half:])
        else:
            payload = repr(priced[0]["usage"]).encode()
            await self.dead_letter(
                "processing_error", problem, self._topics.usage_priced, -1, -1, project.encode(), payload
            )
