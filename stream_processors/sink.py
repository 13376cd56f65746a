"""The sink stage: `usage.priced` and `usage.dlq` -> ClickHouse `usage_events` and `dead_letters`.

Flush, in order (at least once):
  1. decode the batch's messages into rows (an undecodable message becomes a dead_letters row);
  2. insert the rows into ClickHouse (one insert per table, bounded by rows and seconds);
  3. commit the consumed Kafka offsets.
A crash between 2 and 3 re-inserts the same rows on restart; `usage_events` is a
ReplacingMergeTree keyed by event_id, so the duplicates collapse (query with FINAL).

Fast path (embedded ClickHouse): a v5 PricedBatch is not decoded in Python at all. Step 1 only
makes it a Native block (the native module, in Rust) or frames it as an Avro record (without it;
stream_processors/avro_rows.py), and ClickHouse checks and converts its rows in one
`INSERT ... SELECT`. If that insert fails for any reason (a row failing the
checks, a parse or type error), the same messages go the per-row path below in the same flush: it
dead-letters exactly the rows it cannot store, with their reasons, and stores the rest. Rows the
failed insert had already written are written again, identical, and collapse like any replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from mode import Service

from spendstream.errors import DecodeError
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.priced import priced_events
from spendstream.topics import Topics
from spendstream.usage import priced_problem
from spendstream.wire import Codec
from stream_processors.avro_rows import NATIVE_ROWS, AvroRows, NativeRows
from stream_processors.gc_pauses import cyclic_gc_paused
from stream_processors.pricing import audio_micros, pico_to_usd
from stream_processors.store import DEAD_LETTER_COLUMNS, USAGE_COLUMNS, ClickHouseStore

__all__ = ["Sink"]

log = logging.getLogger(__name__)

FETCH_MIN_BYTES = 1 << 20  # what a fetch waits for on the broker (see Sink.__init__)


def usage_row(priced: dict[str, Any]) -> tuple[Any, ...]:
    u = priced["usage"]
    cost = priced["cost_pico_usd"]
    return (
        u["event_id"],
        u["event_time"],
        u["project"],
        u["team"],
        u["user"],
        u["service"],
        u["provider"],
        u["model"],
        u["input_tokens"],
        u["cached_input_tokens"],
        u["cache_write_tokens"],
        u["output_tokens"],
        u["reasoning_tokens"],
        u["tags"],
        None if cost is None else pico_to_usd(cost),
        priced["price_card"],
        priced["priced_at"],
        u["cache_write_1h_tokens"],
        u["input_audio_tokens"],
        u["output_audio_tokens"],
        Decimal(audio_micros(u["audio_seconds"])).scaleb(-6),
        u["characters"],
        u["images"],
        u["image_size"],
        u["image_quality"],
        u["requests"],
        u["service_tier"],
        u["region"],
        priced["pricing_status"],
        priced["card_version"],
        {meter: pico_to_usd(v) for meter, v in priced["itemised"].items()},
        priced["unpriced_reason"],
        u["usage_source"],
        pico_to_usd(priced["saved_pico_usd"]),
    )


def dead_letter_row(dl: dict[str, Any]) -> tuple[Any, ...]:
    return (
        dl["failed_at"],
        dl["reason"],
        dl["detail"],
        dl["source_topic"],
        dl["source_partition"],
        dl["source_offset"],
        dl["key"].decode("utf-8", "replace") if dl["key"] is not None else None,
        dl["payload"].hex(),
    )


class Sink(Service):
    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Topics,
        group_id: str,
        store: ClickHouseStore,
        codec: Codec,
        max_rows: int,
        max_seconds: float,
        kafka_auth: KafkaAuth = PLAINTEXT,
        avro_inserts: bool = True,
        native: bool = NATIVE_ROWS,
        **kwargs: Any,
    ) -> None:
        """`avro_inserts=False` stores every message through the per-row path (for comparisons);
        the fast path is only taken where the store has it (embedded ClickHouse), with Native
        blocks where `native` (the native module is built), else Avro records."""
        super().__init__(**kwargs)
        self._topics = topics
        self._store = store
        self._codec = codec
        self._max_rows = max_rows
        self._max_seconds = max_seconds
        self._consumer_args: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_partition_fetch_bytes": 8 << 20,
            "fetch_max_bytes": 64 << 20,
            # A fetch returns once FETCH_MIN_BYTES wait or a fifth of max_seconds has passed (at
            # most 100 ms), not at each message the meters write: at 5,000 events/s that is ~10
            # fetches a second instead of ~340, each a request and a response on this process's,
            # the broker's and (on one machine) the meter worker's CPU. The rows wait for the
            # flush (every max_seconds) anyway.
            "fetch_min_bytes": FETCH_MIN_BYTES,
            "fetch_max_wait_ms": max(1, min(100, int(max_seconds * 200))),
            **kafka_auth.client_kwargs(),
        }
        self._consumer: AIOKafkaConsumer | None = None
        self._flushing: asyncio.Future[None] | None = None  # the flush under way, if any
        fast_path = NativeRows if native else AvroRows
        self._fast_path = fast_path(codec) if avro_inserts and store.inserts_files else None
        self._usage: list[tuple[Any, ...]] = []
        self._dead: list[tuple[Any, ...]] = []
        self._fast: list[_Framed] = []  # messages ClickHouse will parse (the fast path)
        self._fast_rows = 0
        self._offsets: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._flush_lock = asyncio.Lock()
        self.rows_written = 0
        self.rows_parsed = 0  # of rows_written, those ClickHouse built from a file (the fast path)

    async def on_start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self._topics.usage_priced, self._topics.usage_dlq, **self._consumer_args
        )
        await self._consumer.start()

    async def on_stop(self) -> None:
        if self._flushing is not None:
            await asyncio.wait({self._flushing})  # the insert under way, then what is left
        if self._consumer is not None:
            await self.flush()
            await self._consumer.stop()

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        last_flush = time.monotonic()
        while not self.should_stop:
            pending = len(self._usage) + len(self._dead) + self._fast_rows
            if pending < 4 * self._max_rows:  # bounded memory while ClickHouse is unavailable
                batches = await self._consumer.getmany(timeout_ms=100, max_records=self._max_rows)
                for tp, messages in batches.items():
                    for msg in messages:
                        with cyclic_gc_paused():  # rows are trees, freed by reference counting
                            self._add(tp, msg)
                        # Decoding is the sink's CPU: yield after each message so the history
                        # process's /health, /sql and /flush never wait behind a whole fetch.
                        await asyncio.sleep(0)
                pending = len(self._usage) + len(self._dead) + self._fast_rows
            flushing = self._flushing is not None and not self._flushing.done()
            due = pending >= self._max_rows or (
                pending and time.monotonic() - last_flush >= self._max_seconds
            )
            if due and not flushing:
                # Flushes start every max_seconds (the insert's own time is not added to the wait).
                # The insert runs while the next rows are read: ClickHouse parses and writes on one
                # core while this process reads and frames on the other.
                last_flush = time.monotonic()
                self._flushing = asyncio.ensure_future(self._flush_or_wait())
            elif flushing and pending >= 4 * self._max_rows:  # full: wait for the insert, not spin
                assert self._flushing is not None
                await asyncio.wait({self._flushing})

    async def _flush_or_wait(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("sink flush failed; the rows are kept and retried in 1 s")
            await asyncio.sleep(1)

    def _add(self, tp: TopicPartition, msg: ConsumerRecord[bytes, bytes]) -> None:
        """Buffer one fetched message's rows and, with them, its offset: a flush (`/flush`) may run
        while `_consume` yields, and it must commit exactly the offsets of the rows it takes."""
        framed = None
        if self._fast_path is not None and tp.topic == self._topics.usage_priced:
            framed = self._fast_path.record(msg.value or b"")
        if framed is not None:
            self._fast.append(_Framed(tp, msg, *framed))
            self._fast_rows += framed[1]
        else:
            self._rows(tp, msg, self._usage, self._dead)
        self._offsets[tp] = msg.offset + 1

    def _rows(
        self,
        tp: TopicPartition,
        msg: ConsumerRecord[bytes, bytes],
        usage: list[tuple[Any, ...]],
        dead: list[tuple[Any, ...]],
    ) -> None:
        """The per-row path: one message's usage_events rows to `usage`, dead letters to `dead`."""
        value = msg.value or b""
        try:
            name, record = self._codec.decode(value)
        except DecodeError as exc:
            record, name = {}, str(exc)
        if tp.topic == self._topics.usage_priced and name == "PricedBatch":
            try:
                events = list(priced_events(record, self._codec))
            except DecodeError as exc:  # a foreign writer's message: kept whole, as a dead letter
                events = []
                dead.append(self._sink_dead_letter(tp, msg, "sink_undecodable", str(exc), value))
            for priced in events:
                problem = priced_problem(priced)  # a foreign writer's row must not stall the inserts
                if problem is None:
                    usage.append(usage_row(priced))
                else:
                    detail = f"event {str(priced['usage'].get('event_id'))[:40]}: {problem}"
                    dead.append(self._sink_dead_letter(tp, msg, "sink_invalid_row", detail, b""))
        elif tp.topic == self._topics.usage_dlq and name == "DeadLetter":
            dead.append(dead_letter_row(record))
        else:  # keep what we could not read: it is a dead letter of the sink itself
            dead.append(self._sink_dead_letter(tp, msg, "sink_undecodable", name, value))

    @staticmethod
    def _sink_dead_letter(
        tp: TopicPartition, msg: ConsumerRecord[bytes, bytes], reason: str, detail: str, payload: bytes
    ) -> tuple[Any, ...]:
        key = msg.key.decode("utf-8", "replace") if msg.key else None
        return (
            time.time_ns() // 1000,
            reason,
            detail,
            tp.topic,
            tp.partition,
            msg.offset,
            key,
            payload.hex(),
        )

    async def flush(self) -> None:
        """Write what is buffered, then commit exactly the offsets of what was written."""
        async with self._flush_lock:
            # Take the buffers before awaiting: rows consumed meanwhile go to the next flush,
            # and their offsets are not committed by this one.
            usage, dead, fast, offsets = self._usage, self._dead, self._fast, self._offsets
            self._usage, self._dead, self._fast, self._offsets = [], [], [], {}
            fast_rows, self._fast_rows = self._fast_rows, 0
            if not usage and not dead and not fast:
                return
            started = time.perf_counter()
            try:
                if fast:  # 1. persist: ClickHouse parses the framed messages (module docstring)
                    try:
                        await asyncio.to_thread(self._insert_framed, fast)
                    except Exception as exc:
                        log.warning(
                            "sink: ClickHouse did not take %d framed messages (%s); "
                            "storing them through the per-row path",
                            len(fast),
                            str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc),
                        )
                        usage, dead = list(usage), list(dead)
                        for framed in fast:
                            with cyclic_gc_paused():
                                self._rows(framed.tp, framed.msg, usage, dead)
                            await asyncio.sleep(0)  # as in _consume: /health and /sql stay answered
                        fast, fast_rows = [], 0
                if usage:
                    await asyncio.to_thread(self._store.insert, "usage_events", usage, USAGE_COLUMNS)
                if dead:
                    await asyncio.to_thread(self._store.insert, "dead_letters", dead, DEAD_LETTER_COLUMNS)
            except BaseException:
                # Not written: put the rows back in front so the next flush retries them.
                self._usage, self._dead = usage + self._usage, dead + self._dead
                self._fast, self._fast_rows = fast + self._fast, fast_rows + self._fast_rows
                self._offsets = {**offsets, **self._offsets}
                raise
            assert self._consumer is not None
            await self._consumer.commit(offsets)  # 2. only then store the offsets
            self.rows_written += len(usage) + fast_rows
            self.rows_parsed += fast_rows
            log.info(
                "sink flush: %d usage rows (%d parsed by ClickHouse), %d dead letters, offsets %s in %.0f ms",
                len(usage) + fast_rows,
                fast_rows,
                len(dead),
                {f"{tp.topic}[{tp.partition}]": o for tp, o in offsets.items()},
                (time.perf_counter() - started) * 1000,
            )

    def _insert_framed(self, fast: list[_Framed]) -> None:
        assert self._fast_path is not None
        rows, now_us = self._fast_path, time.time_ns() // 1000
        self._store.insert_file(
            "usage_events",
            USAGE_COLUMNS,
            lambda source: rows.select(source, now_us),
            rows.FORMAT,
            rows.STRUCTURE,
            rows.container([framed.record for framed in fast]),
        )


@dataclass(frozen=True)
class _Framed:
    """A message on the fast path: kept whole, for the per-row path if ClickHouse refuses it."""

    tp: TopicPartition
    msg: ConsumerRecord[bytes, bytes]
    record: bytes  # its Native block or Avro record
    rows: int
