"""Emitters: what services call to publish usage events.

The caller's path only validates the event and appends it to a bounded in-memory buffer (or, when
that is full and a `spool_dir` is set, to the on-disk spool, see producers/_spool.py). A background
task groups buffered events by project, encodes each group as one Avro `UsageBatch` (single-object
encoding) and sends it to `usage.raw` with key = project through an idempotent Kafka producer.

Delivery guarantee, for every event emit() accepted (it returned an event_id):
1. It stays in the emitter (memory or spool) until Kafka has acknowledged it (`acks=all`).
2. A failed delivery, whatever the error (a timeout, `OutOfOrderSequenceNumber` after an outage,
   any fatal producer state), is not a loss: the producer is discarded, a new one is connected
   (retrying with capped backoff for as long as the process lives) and every unacknowledged batch
   is sent again, in the order first sent. So delivery is at least once; `event_id` lets every later
   stage drop the duplicates a re-send can make.
3. When memory and spool are both full, emit() waits up to `block_timeout` and then raises
   BufferFull: the new event is refused, never an accepted one dropped.
4. close() delivers what it can within its timeout; the rest goes to the spool (sent by the next
   emitter started on the same spool_dir) or, without a spool, close() raises DeliveryTimeout
   saying how many events were dropped: the only way an accepted event is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypedDict

from aiokafka import AIOKafkaProducer

from producers._spool import Segment, Spool, read_segment
from spendstream.errors import BufferFull, DecodeError, DeliveryTimeout, EmitterClosed, InvalidUsage
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth

if TYPE_CHECKING:
    from producers.instrument._protocols import GuardLike
from spendstream.usage import encode_seconds, usage_problem
from spendstream.wire import Codec, default_codec

__all__ = ["Emitter", "EmitterStats", "SyncEmitter"]

_STALLED_SECONDS = 5.0  # oldest batch unacknowledged this long: Kafka is unreachable (one log line)
_REQUEST_TIMEOUT_MS = 15_000  # a batch aiokafka cannot deliver fails after this; we re-send it
_BACKOFF_SECONDS = (0.2, 5.0)  # reconnect attempts: first wait, cap (doubling in between)
_MAX_BATCH_BYTES = 2 << 20  # a UsageBatch message at most (the producer's request limit is 8 MiB)
_SPOOL_SEGMENTS_IN_FLIGHT = 2  # spool segments read into memory and being sent at once

log = logging.getLogger(__name__)


class EmitterStats(TypedDict):
    """Counters of one emitter (`stats()`); all since it was created."""

    accepted: int  # events emit() accepted
    sent: int  # events Kafka acknowledged (a re-sent batch counts once; includes spool replays)
    buffered: int  # events in memory, not yet acknowledged
    spooled: int  # events written to the spool (memory full, or not delivered by close())
    spool_bytes: int  # bytes in the spool directory now
    buffer_full_refusals: int  # emit() calls refused with BufferFull (memory and spool full)
    reconnects: int  # producers discarded after a failed delivery and replaced by a new one
    resent_batches: int  # batches sent again on a new producer
    suppressed_log_lines: int  # repeated aiokafka warning/error lines dropped (process-wide)


class _RepeatLimiter(logging.Filter):
    """aiokafka logs every failed connection attempt and retry: the issue counted 501,066 lines
    (50 MB) for a 65 s outage. Installed on aiokafka's loggers by the first emitter started, this
    lets each WARNING/ERROR line template through once per `period` seconds and drops (counts) the
    repeats in between. DEBUG and INFO pass untouched. Process-wide: aiokafka's loggers cannot tell
    whose connection a line is about."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period = period
        self.dropped = 0
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.CRITICAL:
            return True
        key, now = (record.name, record.msg), time.monotonic()
        if now - self._last.get(key, -self.period) < self.period:
            self.dropped += 1
            return False
        self._last[key] = now
        return True

    def install(self) -> None:
        """On every aiokafka logger (a logger's filters do not apply to its children's records)."""
        for name in list(logging.root.manager.loggerDict):
            if name == "aiokafka" or name.startswith("aiokafka."):
                logger = logging.getLogger(name)
                if self not in logger.filters:
                    logger.addFilter(self)


_quiet = _RepeatLimiter(period=10.0)


def _micros(ts: datetime | None) -> int:
    if ts is None:
        return time.time_ns() // 1_000
    if ts.tzinfo is None:
        raise InvalidUsage("event_time must be timezone-aware (e.g. datetime.now(UTC))")
    return int(ts.timestamp()) * 1_000_000 + ts.microsecond


_ZERO_SECONDS = b"\x00"


def _uuid4() -> str:
    """A random (version 4) UUID string; ~4x faster than str(uuid.uuid4())."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def build_event(
    *,
    service: str,
    project: str,
    provider: str,
    model: str,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    reasoning_tokens: int = 0,
    input_audio_tokens: int = 0,
    output_audio_tokens: int = 0,
    audio_seconds: Decimal | str | int = 0,
    characters: int = 0,
    images: int = 0,
    image_size: str = "",
    image_quality: str = "",
    requests: int = 0,
    service_tier: str = "standard",
    region: str = "global",
    usage_source: str = "reported",
    team: str | None = None,
    user: str | None = None,
    tags: Mapping[str, str] | None = None,
    event_time: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A validated UsageEvent record; raises InvalidUsage saying what is wrong.

    Meters do not overlap (docs/event-format.md): `input_tokens` excludes cache reads and writes,
    `output_tokens` includes reasoning. Every meter defaults to 0 (a whisper call sets only
    `audio_seconds`, a TTS call `characters`), but a reported event needs one that is not 0: unknown
    is never zero, so a call whose usage is unknown is sent with `usage_source="missing"`.
    """
    try:
        seconds = _ZERO_SECONDS if audio_seconds == 0 else encode_seconds(audio_seconds)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise InvalidUsage(str(exc)) from None
    event = {
        "event_id": event_id or _uuid4(),
        "event_time": _micros(event_time),
        "project": project,
        "team": team,
        "user": user,
        "service": service,
        "provider": provider,
        "model": model,
        "input_tokens": input_tokens,
        "cached_input_tokens": cached_input_tokens,
        "cache_write_tokens": cache_write_tokens,
        "output_tokens": output_tokens,
        "reasoning_tokens": reasoning_tokens,
        "tags": dict(tags) if tags else {},
        "cache_write_1h_tokens": cache_write_1h_tokens,
        "input_audio_tokens": input_audio_tokens,
        "output_audio_tokens": output_audio_tokens,
        "audio_seconds": seconds,
        "characters": characters,
        "images": images,
        "image_size": image_size,
        "image_quality": image_quality,
        "requests": requests,
        "service_tier": service_tier,
        "region": region,
        "usage_source": usage_source,
    }
    # an id and a time this function made itself are valid by construction: check only the caller's
    problem = usage_problem(event, check_identity=event_id is not None or event_time is not None)
    if problem is not None:
        raise InvalidUsage(problem)
    return event


class _Buffer:
    """Thread-safe and bounded: accepted events not yet acknowledged, in memory and in the spool.

    Events go to memory while the spool has nothing unread and memory has room, else to the spool
    (so the spool is always the newest part of the queue and order is kept).
    """

    def __init__(self, capacity: int, spool: Spool | None, codec: Codec) -> None:
        self.capacity = capacity
        self.size = 0  # in memory and not yet acknowledged: buffered + in flight
        self.unsent = 0  # in memory, not yet handed to the producer
        self.spool = spool
        self._codec = codec
        self._by_project: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.space = threading.Condition(self._lock)
        self.accepted = 0
        self.spooled = 0
        self.refused = 0
        self.spooling = spool is not None and bool(spool.unread)

    def _try_put(self, event: dict[str, Any]) -> bool:
        spool = self.spool
        if spool is None or not spool.unread:
            if self.size < self.capacity:
                self._by_project.setdefault(event["project"], []).append(event)
                self.size += 1
                self.unsent += 1
                self.accepted += 1
                return True
            if spool is None:
                return False
        if not spool.append(self._codec.encode("UsageEvent", event)):
            return False
        if not self.spooling:
            self.spooling = True
            log.warning(
                "emitter memory buffer full (%d events): spooling to %s", self.capacity, spool.directory
            )
        self.accepted += 1
        self.spooled += 1
        return True

    def _full(self) -> BufferFull:
        self.refused += 1
        where = f" and spool {self.spool.directory} ({self.spool.max_bytes:,} bytes)" if self.spool else ""
        return BufferFull(
            f"{self.size:,} events in memory (max_buffered {self.capacity:,}){where} are waiting for "
            "Kafka: is the broker reachable? Raise max_buffered, set or enlarge spool_dir/"
            "spool_max_bytes, or slow down"
        )

    def put(self, event: dict[str, Any], timeout: float | None) -> None:
        """Accept `event`, waiting up to `timeout` s for room; BufferFull after that."""
        with self._lock:
            if not self.space.wait_for(lambda: self._try_put(event), timeout):
                raise self._full()

    def try_put(self, event: dict[str, Any]) -> bool:
        with self._lock:
            return self._try_put(event)

    def refuse(self) -> BufferFull:
        with self._lock:
            return self._full()

    def take_all(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            taken, self._by_project = self._by_project, {}
            self.unsent = 0
            return taken

    def take_segment(self) -> Segment | None:
        with self._lock:
            return self.spool.take() if self.spool is not None else None

    def release(self, n: int) -> None:
        with self._lock:
            self.size -= n
            self.space.notify_all()

    def remove_segment(self, segment: Segment) -> None:
        with self._lock:
            assert self.spool is not None
            self.spool.remove(segment)
            self.space.notify_all()


@dataclass(slots=True)
class _Batch:
    """One UsageBatch message handed to the producer and not yet acknowledged."""

    key: bytes
    value: bytes
    n: int
    events: list[dict[str, Any]] | None  # memory events (spooled if close() cannot deliver them)
    segment: Segment | None  # or: read from this spool segment (which stays on disk until acked)


class Emitter:
    """Async emitter. Use as `async with Emitter(bootstrap_servers=..., service=...) as em:`.

    `max_buffered` bounds the events held in memory until Kafka acknowledges them. With `spool_dir`,
    events beyond it go to files there (at most `spool_max_bytes`), and what close() cannot deliver
    is kept there for the next emitter started on the same directory, which sends it first. When
    memory and spool are full, `emit()` waits up to `block_timeout` s and raises BufferFull;
    `emit_nowait()` raises at once. `kafka_auth` (SASL/TLS, see spendstream.kafka_auth) is used
    for every connection; wrong credentials are logged as `Kafka unreachable (...)` and the
    events are kept, as for any other broker failure. The module docstring states the delivery guarantee.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        service: str,
        topic: str = "usage.raw",
        max_buffered: int = 100_000,
        batch_events: int = 500,
        linger_ms: int = 20,
        block_timeout: float = 5.0,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 1 << 30,
        codec: Codec | None = None,
        guard: GuardLike | None = None,
        kafka_auth: KafkaAuth = PLAINTEXT,
    ) -> None:
        if not service:
            raise InvalidUsage("service must name the emitting service, e.g. 'checkout-api'")
        self.service = service
        self.topic = topic
        self.guard = guard
        self.block_timeout = block_timeout
        self._bootstrap = bootstrap_servers
        self._kafka_auth = kafka_auth
        self._batch_events = batch_events
        self._linger = linger_ms / 1000
        self._codec = codec or default_codec()
        spool = Spool(spool_dir, spool_max_bytes) if spool_dir is not None else None
        self._buffer = _Buffer(max_buffered, spool, self._codec)
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0  # of the producer; failures reported by a discarded one are ignored
        self._broken: BaseException | None = None  # the current producer failed a delivery
        self._sender: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._acked: asyncio.Event | None = None
        self._unacked: dict[int, _Batch] = {}  # by batch number, in the order first sent
        self._sent_at: dict[int, float] = {}  # batch number -> monotonic time it was (re-)sent
        self._next_batch = 0
        self._segments_in_flight = 0
        self._disconnected_since: float | None = None
        self._closed = False
        self.sent_events = 0
        self._reconnects = 0
        self._resent_batches = 0
        if spool is not None and spool.left_by_previous:
            log.info(
                "spool %s holds %d segments (%d bytes) left by a previous emitter: sending them first",
                spool.directory,
                spool.left_by_previous,
                spool.bytes,
            )

    async def start(self) -> None:
        """Connect to Kafka and start the sender. Never raises because Kafka is unreachable: events
        are accepted and kept, and the sender keeps trying to connect."""
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        _quiet.install()
        try:
            await self._connect_once()
        except Exception as exc:  # any failure to connect means: not connected yet
            self._mark_disconnected(f"cannot connect at start: {await self._why(exc)}")
        self._sender = asyncio.create_task(self._send_loop(), name="spendstream-emitter")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def stats(self) -> EmitterStats:
        """The emitter's counters (see EmitterStats); cheap, safe to call from any thread."""
        b = self._buffer
        return EmitterStats(
            accepted=b.accepted,
            sent=self.sent_events,
            buffered=b.size,
            spooled=b.spooled,
            spool_bytes=b.spool.bytes if b.spool is not None else 0,
            buffer_full_refusals=b.refused,
            reconnects=self._reconnects,
            resent_batches=self._resent_batches,
            suppressed_log_lines=_quiet.dropped,
        )

    def check(
        self, *, project: str, team: str | None = None, user: str | None = None, model: str | None = None
    ) -> None:
        """Ask the emitter's Guard before a call costs money: raises BudgetExceeded when a scope the
        call counts against is blocked (no network call). Without a guard, allows everything.

        Recording spend is never refused: `emit()` reports what was already spent.
        """
        if self.guard is not None:
            self.guard.check(project=project, team=team, user=user, model=model)

    async def emit(self, *, project: str, provider: str, model: str, **usage: Any) -> str:
        """Validate and accept one event; returns its event_id. While memory and spool are full it
        waits up to `block_timeout` s for room, then raises BufferFull (the event is not accepted).

        `usage`: the meters and fields of `build_event`; every meter defaults to 0, and an event
        with none set raises InvalidUsage naming the meters (unknown usage: usage_source="missing").
        `service=` names another service the event is for (a gateway or an HTTP ingest emitting on
        its callers' behalf); default: the emitter's.
        """
        if self._closed:
            raise EmitterClosed("emit() after close()")
        service = usage.pop("service", None) or self.service
        event = build_event(service=service, project=project, provider=provider, model=model, **usage)
        buffer = self._buffer
        if not buffer.try_put(event):
            deadline = time.monotonic() + self.block_timeout
            while not buffer.try_put(event):
                if time.monotonic() >= deadline:
                    raise buffer.refuse()
                await asyncio.sleep(self._linger)
        if buffer.unsent >= self._batch_events and self._wake is not None:
            self._wake.set()
        return str(event["event_id"])

    def emit_nowait(self, *, project: str, provider: str, model: str, **usage: Any) -> str:
        """Like emit() but never waits: raises BufferFull when memory and spool are full."""
        if self._closed:
            raise EmitterClosed("emit_nowait() after close()")
        service = usage.pop("service", None) or self.service
        event = build_event(service=service, project=project, provider=provider, model=model, **usage)
        if not self._buffer.try_put(event):
            raise self._buffer.refuse()
        if self._buffer.unsent >= self._batch_events and self._wake is not None:
            self._wake.set()
        return str(event["event_id"])

    # -- the sender ------------------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=1 << 20,
            max_request_size=8 << 20,
            request_timeout_ms=_REQUEST_TIMEOUT_MS,
            client_id=f"spendstream-emitter-{self.service}",
            **self._kafka_auth.client_kwargs(),
        )

    async def _connect_once(self) -> None:
        producer = self._new_producer()
        try:
            await producer.start()
        except BaseException:
            await _discard(producer)
            raise
        self._producer = producer
        self._generation += 1
        self._broken = None

    async def _reconnect(self) -> None:
        """Replace the producer (after a failed delivery, or none yet) and re-send every
        unacknowledged batch, in the order first sent. Retries until connected."""
        old, self._producer = self._producer, None
        if old is not None:
            self._reconnects += 1
            self._mark_disconnected(f"delivery failed: {self._broken!r}")
            await _discard(old)
        delay = _BACKOFF_SECONDS[0]
        while True:
            try:
                await self._connect_once()
                break
            except Exception as exc:  # unreachable, or any other start failure: retry
                if self._disconnected_since is None:  # logged once per outage
                    self._mark_disconnected(f"cannot connect: {await self._why(exc)}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_SECONDS[1])
        resend = list(self._unacked)
        for number in resend:
            batch = self._unacked.get(number)
            if batch is not None:
                await self._send(number, batch)
        self._resent_batches += len(resend)
        self._mark_connected()

    async def _why(self, exc: Exception) -> str:
        """What to log for a failed connection: a refused login or security protocol in words
        (aiokafka says only "Unable to bootstrap"), else the exception."""
        return str(await self._kafka_auth.refusal(self._bootstrap) or exc)

    def _mark_disconnected(self, reason: str) -> None:
        if self._disconnected_since is not None:
            return
        self._disconnected_since = time.monotonic()
        b = self._buffer
        log.warning(
            "Kafka unreachable (%s): keeping events (%d in memory, %d bytes spooled) and retrying",
            reason,
            b.size,
            b.spool.bytes if b.spool is not None else 0,
        )

    def _mark_connected(self) -> None:
        if self._disconnected_since is None:
            return
        seconds = time.monotonic() - self._disconnected_since
        self._disconnected_since = None
        log.warning(
            "Kafka reachable again after %.1f s (%d reconnects, %d batches re-sent so far, %d aiokafka "
            "log lines suppressed so far)",
            seconds,
            self._reconnects,
            self._resent_batches,
            _quiet.dropped,
        )

    async def _send(self, number: int, batch: _Batch) -> None:
        producer = self._producer
        assert producer is not None
        generation = self._generation
        self._sent_at[number] = time.monotonic()
        try:
            fut = await producer.send(self.topic, batch.value, key=batch.key)
        except Exception as exc:  # e.g. no metadata while the broker is away
            self._failed(exc, generation)
            return
        fut.add_done_callback(functools.partial(self._delivered, number, generation))

    def _delivered(self, number: int, generation: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self._failed(fut.exception() if not fut.cancelled() else EmitterClosed("cancelled"), generation)
            return
        batch = self._unacked.pop(number, None)
        if batch is None:  # acknowledged already (a re-sent batch whose first send arrived too)
            return
        del self._sent_at[number]
        self.sent_events += batch.n
        if batch.segment is None:
            self._buffer.release(batch.n)
        else:
            batch.segment.pending -= 1
            if batch.segment.pending == 0:
                self._segment_done(batch.segment)
        self._mark_connected()
        assert self._acked is not None
        self._acked.set()

    def _failed(self, error: BaseException | None, generation: int) -> None:
        # Whatever the error, the batch is still ours: the sender replaces the producer and re-sends.
        if generation == self._generation and self._broken is None:
            self._broken = error or RuntimeError("delivery failed")
            if self._wake is not None:
                self._wake.set()

    def _segment_done(self, segment: Segment) -> None:
        self._buffer.remove_segment(segment)
        self._segments_in_flight -= 1
        spool = self._buffer.spool
        if spool is not None and not spool.unread and not self._segments_in_flight and self._buffer.spooling:
            self._buffer.spooling = False
            log.warning("spool %s drained: every spooled event is acknowledged", spool.directory)

    async def _send_new(self, batch: _Batch) -> None:
        number, self._next_batch = self._next_batch, self._next_batch + 1
        self._unacked[number] = batch
        await self._send(number, batch)

    def _batches(self, by_project: dict[str, list[dict[str, Any]]]) -> list[tuple[bytes, bytes, list[Any]]]:
        """(key, UsageBatch message, its events): at most `batch_events` events and _MAX_BATCH_BYTES
        each (events with long texts and many tags could otherwise exceed Kafka's request size,
        and such a batch would be refused on every retry)."""
        out = []
        for project, events in by_project.items():
            key = project.encode()
            todo = [events[i : i + self._batch_events] for i in range(0, len(events), self._batch_events)]
            while todo:
                chunk = todo.pop(0)
                value = self._codec.encode("UsageBatch", {"events": chunk})
                if len(value) > _MAX_BATCH_BYTES and len(chunk) > 1:  # one event always fits (usage.py)
                    half = len(chunk) // 2
                    todo[:0] = [chunk[:half], chunk[half:]]
                    continue
                out.append((key, value, chunk))
        return out

    async def _send_grouped(
        self, batches: list[tuple[bytes, bytes, list[Any]]], segment: Segment | None
    ) -> None:
        for key, value, chunk in batches:
            await self._send_new(_Batch(key, value, len(chunk), None if segment else chunk, segment))

    async def _send_spooled(self) -> None:
        """Read the oldest spool segment and send its events (after memory, which is older)."""
        segment = self._buffer.take_segment()
        if segment is None:
            return
        by_project: dict[str, list[dict[str, Any]]] = {}
        undecodable: list[bytes] = []
        for payload in read_segment(segment.path):
            try:
                event = self._codec.decode(payload)[1]
            except DecodeError:
                undecodable.append(payload)
                continue
            by_project.setdefault(event["project"], []).append(event)
        batches = self._batches(by_project)
        segment.pending = len(batches) + len(undecodable)
        self._segments_in_flight += 1
        if segment.pending == 0:
            self._segment_done(segment)
            return
        await self._send_grouped(batches, segment)
        if undecodable:  # e.g. written by another version: the meter decodes or dead-letters them
            log.warning(
                "spool segment %s: %d records this emitter cannot decode; sent as they are",
                segment.path,
                len(undecodable),
            )
        for payload in undecodable:
            await self._send_new(_Batch(b"", payload, 1, None, segment))

    async def _send_loop(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._linger)
            self._wake.clear()
            if self._producer is None or self._broken is not None:
                await self._reconnect()
            if self._buffer.unsent and self._disconnected_since is None:  # else: full batches later
                await self._send_grouped(self._batches(self._buffer.take_all()), None)
            spool = self._buffer.spool
            if (
                spool is not None
                and spool.unread
                and not self._buffer.unsent
                and self._segments_in_flight < _SPOOL_SEGMENTS_IN_FLIGHT
                and self._broken is None
            ):
                await self._send_spooled()
            if self._sent_at and self._disconnected_since is None:
                oldest = min(self._sent_at.values())
                if time.monotonic() - oldest > _STALLED_SECONDS:
                    self._mark_disconnected(f"no acknowledgement for {_STALLED_SECONDS:.0f} s")

    def _idle(self) -> bool:
        spool = self._buffer.spool
        return self._buffer.size == 0 and (
            spool is None or (not spool.unread and not self._segments_in_flight)
        )

    async def _wait_idle(self, timeout: float | None) -> bool:  # noqa: ASYNC109 (the documented API)
        assert self._wake is not None
        assert self._acked is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._idle():
            if self._sender is None:
                return False
            if self._sender.done():  # never on purpose: surface the sender's own failure
                self._sender.result()
                return False
            self._wake.set()
            wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if wait <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), wait)
            self._acked.clear()
        return True

    def _undelivered(self) -> str:
        spool = self._buffer.spool
        spooled = f" and {spool.bytes:,} bytes in spool {spool.directory}" if spool and spool.bytes else ""
        return f"{self._buffer.size:,} events in memory{spooled}"

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the documented API)
        """Return when every accepted event (spooled ones included) is acknowledged by Kafka. With
        Kafka down it waits; after `timeout` s (None: no limit) it raises DeliveryTimeout, and the
        events are kept and still being sent."""
        if self._sender is None:
            raise EmitterClosed("flush() before start()")
        if not await self._wait_idle(timeout):
            raise DeliveryTimeout(
                f"flush(): {self._undelivered()} not acknowledged by Kafka after {timeout} s "
                "(is the broker reachable?); they are kept and still being sent",
                self._buffer.size,
            )

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (the documented API)
        """Deliver everything accepted within `timeout` s, then stop. What is not acknowledged by then
        is written to the spool if there is one; without a spool, close() raises DeliveryTimeout
        saying how many events were dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        delivered = self._sender is None or await self._wait_idle(timeout)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._producer is not None:
            if delivered:
                await self._producer.stop()
            else:
                await _discard(self._producer)
        self._producer = None
        left = [e for b in self._unacked.values() if b.events is not None for e in b.events]
        left += [e for events in self._buffer.take_all().values() for e in events]
        spool = self._buffer.spool
        if spool is None:
            if left:
                raise DeliveryTimeout(
                    f"close(): {len(left):,} accepted usage events were not acknowledged by Kafka "
                    f"within {timeout} s and are DROPPED (no spool_dir); set spool_dir to keep them "
                    "for the next start, or give close() more time",
                    len(left),
                )
            return
        if left:
            spool.write_front([self._codec.encode("UsageEvent", e) for e in left])
            self._buffer.spooled += len(left)
        spool.close()
        if spool.bytes:
            log.warning(
                "emitter closed with %d events not delivered to Kafka: %d bytes kept in spool %s, sent "
                "by the next emitter started with this spool_dir",
                len(left),
                spool.bytes,
                spool.directory,
            )


async def _discard(producer: AIOKafkaProducer) -> None:
    """Drop a producer without waiting for the batches it holds (they are re-sent on a new one).

    aiokafka has no public abort: stop() waits for every batch to be delivered or expire. So its
    sender task is cancelled and its connections closed; the futures of the batches it held are
    left unresolved (the emitter ignores a discarded producer's batches anyway)."""
    sender_task = producer._sender.sender_task
    if sender_task is not None:
        sender_task.cancel()
        await asyncio.wait([sender_task])
    producer._closed = True  # stop() is not called: nothing left to flush
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.client.close(), 5.0)


class SyncEmitter:
    """Emitter for non-async code: same arguments, runs its own event loop in a daemon thread.

    `emit()` validates in the caller's thread (errors raise there) and buffers; when memory and
    spool are full it blocks up to `block_timeout` seconds, then raises BufferFull.
    """

    def __init__(self, *, block_timeout: float = 5.0, **kwargs: Any) -> None:
        self._block_timeout = block_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="spendstream-emitter", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._emitter = Emitter(block_timeout=block_timeout, **kwargs)
            self._call(self._emitter.start())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def _call(self, coro: Any) -> Any:
        fut: ThreadFuture[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def emit(self, *, project: str, provider: str, model: str, **usage: Any) -> str:
        """See Emitter.emit: meters default to 0, at least one must be set."""
        if self._closed:
            raise EmitterClosed("emit() after close()")
        em = self._emitter
        event = build_event(service=em.service, project=project, provider=provider, model=model, **usage)
        em._buffer.put(event, self._block_timeout)
        if em._buffer.unsent == em._batch_events and em._wake is not None:  # a full batch: send it now
            self._loop.call_soon_threadsafe(em._wake.set)
        return str(event["event_id"])

    @property
    def sent_events(self) -> int:
        return self._emitter.sent_events

    def stats(self) -> EmitterStats:
        """See Emitter.stats."""
        return self._emitter.stats()

    def check(
        self, *, project: str, team: str | None = None, user: str | None = None, model: str | None = None
    ) -> None:
        """See Emitter.check: refuse a call before it costs money when its scope is blocked."""
        self._emitter.check(project=project, team=team, user=user, model=model)

    def flush(self, timeout: float | None = None) -> None:
        """See Emitter.flush: wait until every accepted event is acknowledged (DeliveryTimeout after
        `timeout` s; the events are kept)."""
        self._call(self._emitter.flush(timeout))

    def close(self, timeout: float = 30.0) -> None:
        """See Emitter.close: deliver within `timeout` s, spool the rest or raise DeliveryTimeout."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._emitter.close(timeout))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
