"""Emitters: what services call to publish usage events.

The caller's path only validates the event and appends it to a bounded in-memory buffer. A
background task groups buffered events by project, encodes each group as one Avro `UsageBatch`
(single-object encoding) and sends it to `usage.raw` with key = project through an idempotent
Kafka producer. `flush()` returns when every accepted event is acknowledged by the broker.

Delivery guarantee: at least once from emit() to Kafka (the producer retries; idempotence removes
broker-side duplicates of a retry), and `event_id` lets every later stage drop duplicates.
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
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from aiokafka import AIOKafkaProducer

from spendstream.errors import BufferFull, EmitterClosed, InvalidUsage

if TYPE_CHECKING:
    from producers.instrument._protocols import GuardLike
from spendstream.usage import encode_seconds, usage_problem
from spendstream.wire import Codec, default_codec

__all__ = ["Emitter", "SyncEmitter"]

_MAX_ATTEMPTS = 8  # retriable delivery failures (leader changes, timeouts): ~25 s of backoff in all

log = logging.getLogger(__name__)


def _micros(ts: datetime | None) -> int:
    if ts is None:
        return time.time_ns() // 1_000
    if ts.tzinfo is None:
        raise InvalidUsage("event_time must be timezone-aware (e.g. datetime.now(UTC))")
    return int(ts.timestamp()) * 1_000_000 + ts.microsecond


class _Buffer:
    """Thread-safe, bounded: events by project, waiting to be sent."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0  # accepted and not yet acknowledged (or failed): buffered + in flight
        self.unsent = 0  # buffered, not yet handed to the producer
        self._by_project: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.space = threading.Condition(self._lock)

    def put(self, event: dict[str, Any], timeout: float | None) -> None:
        with self._lock:
            if self.size >= self.capacity and not self.space.wait_for(
                lambda: self.size < self.capacity, timeout
            ):
                raise BufferFull(
                    f"{self.size} events are waiting for Kafka (buffer capacity {self.capacity}); "
                    "is the broker reachable? raise max_buffered or slow down"
                )
            self._by_project.setdefault(event["project"], []).append(event)
            self.size += 1
            self.unsent += 1

    def try_put(self, event: dict[str, Any]) -> bool:
        with self._lock:
            if self.size >= self.capacity:
                return False
            self._by_project.setdefault(event["project"], []).append(event)
            self.size += 1
            self.unsent += 1
            return True

    def take_all(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            taken, self._by_project = self._by_project, {}
            self.unsent = 0
            return taken

    def release(self, n: int) -> None:
        with self._lock:
            self.size -= n
            self.space.notify_all()


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
    input_tokens: int,
    output_tokens: int,
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
    `output_tokens` includes reasoning. Token counts have no default: unknown is never zero.
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


class Emitter:
    """Async emitter. Use as `async with Emitter(bootstrap_servers=..., service=...) as em:`."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        service: str,
        topic: str = "usage.raw",
        max_buffered: int = 100_000,
        batch_events: int = 500,
        linger_ms: int = 20,
        codec: Codec | None = None,
        guard: GuardLike | None = None,
    ) -> None:
        if not service:
            raise InvalidUsage("service must name the emitting service, e.g. 'checkout-api'")
        self.service = service
        self.topic = topic
        self.guard = guard
        self._bootstrap = bootstrap_servers
        self._batch_events = batch_events
        self._linger = linger_ms / 1000
        self._codec = codec or default_codec()
        self._buffer = _Buffer(max_buffered)
        self._producer: AIOKafkaProducer | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._failure: BaseException | None = None
        self._send_lock = asyncio.Lock()
        self._stopping = False
        self._closed = False
        self.sent_events = 0
        self.failed_events = 0

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=1 << 20,
            max_request_size=8 << 20,
            client_id=f"spendstream-emitter-{self.service}",
        )
        await self._producer.start()
        self._wake = asyncio.Event()
        self._sender = asyncio.create_task(self._send_loop(), name="spendstream-emitter")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _accept(self, event: dict[str, Any]) -> None:
        if not self._buffer.try_put(event):
            raise BufferFull(f"emitter buffer full ({self._buffer.capacity} events waiting for Kafka)")
        if self._buffer.unsent >= self._batch_events and self._wake is not None:
            self._wake.set()

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
        """Validate and buffer one event; returns its event_id. Waits only while the buffer is full."""
        if self._closed:
            raise EmitterClosed("emit() after close()")
        event = build_event(service=self.service, project=project, provider=provider, model=model, **usage)
        while not self._buffer.try_put(event):
            if self._failure is not None:
                raise self._failure
            await asyncio.sleep(self._linger)
        if self._buffer.unsent >= self._batch_events and self._wake is not None:
            self._wake.set()
        return str(event["event_id"])

    def emit_nowait(self, *, project: str, provider: str, model: str, **usage: Any) -> str:
        """Like emit() but never waits: raises BufferFull when the buffer is full."""
        if self._closed:
            raise EmitterClosed("emit_nowait() after close()")
        event = build_event(service=self.service, project=project, provider=provider, model=model, **usage)
        self._accept(event)
        return str(event["event_id"])

    async def _send_buffered(self) -> None:
        # One sender at a time (the linger loop, flush, close): events taken from the buffer are
        # handed to the producer before anyone can conclude that nothing is left to send.
        async with self._send_lock:
            for project, events in self._buffer.take_all().items():
                key = project.encode()
                for i in range(0, len(events), self._batch_events):
                    chunk = events[i : i + self._batch_events]
                    await self._send(key, self._codec.encode("UsageBatch", {"events": chunk}), len(chunk), 0)

    async def _send(self, key: bytes, value: bytes, n: int, attempt: int) -> None:
        assert self._producer is not None
        try:
            fut = await self._producer.send(self.topic, value, key=key)
        except Exception as exc:  # e.g. no metadata while the broker is away: same policy as a failed ack
            self._failed(exc, key=key, value=value, n=n, attempt=attempt)
            return
        self._pending.add(fut)
        fut.add_done_callback(functools.partial(self._delivered, key=key, value=value, n=n, attempt=attempt))

    def _delivered(self, fut: asyncio.Future[Any], *, key: bytes, value: bytes, n: int, attempt: int) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            self._failed(
                EmitterClosed("delivery cancelled"), key=key, value=value, n=n, attempt=_MAX_ATTEMPTS
            )
            return
        error = fut.exception()
        if error is None:
            self._buffer.release(n)
            self.sent_events += n
            return
        self._failed(error, key=key, value=value, n=n, attempt=attempt)

    def _failed(self, error: BaseException, *, key: bytes, value: bytes, n: int, attempt: int) -> None:
        if getattr(error, "retriable", False) and attempt < _MAX_ATTEMPTS:
            # e.g. a leader election: the batch is still ours, send it again (event_id keeps it idempotent)
            log.warning("usage batch of %d events not delivered (%s); retry %d", n, error, attempt + 1)
            retry = asyncio.ensure_future(self._retry(key, value, n, attempt + 1))
            self._pending.add(retry)
            retry.add_done_callback(self._pending.discard)
            return
        self._buffer.release(n)
        self.failed_events += n
        self._failure = error
        log.error("lost %d usage events: Kafka delivery failed after %d attempts: %s", n, attempt + 1, error)

    async def _retry(self, key: bytes, value: bytes, n: int, attempt: int) -> None:
        await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        await self._send(key, value, n, attempt)

    async def _send_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._linger)
            self._wake.clear()
            await self._send_buffered()

    async def flush(self) -> None:
        """Send everything accepted so far and wait until Kafka has acknowledged it (retries
        included); raises the delivery error if some events could not be delivered."""
        await self._send_buffered()
        while self._buffer.size > self._buffer.unsent or self._pending:
            if self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)
            else:
                await asyncio.sleep(0.001)  # handed to the producer by the loop a moment ago
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def close(self) -> None:
        """Deliver everything accepted, then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        try:
            if self._wake is not None:
                self._wake.set()
            if self._sender is not None:
                await self._sender  # the loop finishes its current send and exits
            if self._producer is not None:
                await self.flush()
        finally:
            if self._producer is not None:
                await self._producer.stop()


class SyncEmitter:
    """Emitter for non-async code: same arguments, runs its own event loop in a daemon thread.

    `emit()` validates in the caller's thread (errors raise there) and buffers; when the buffer is
    full it blocks up to `block_timeout` seconds, then raises BufferFull.
    """

    def __init__(self, *, block_timeout: float = 5.0, **kwargs: Any) -> None:
        self._block_timeout = block_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="spendstream-emitter", daemon=True
        )
        self._thread.start()
        self._emitter = Emitter(**kwargs)
        self._closed = False
        try:
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

    def check(
        self, *, project: str, team: str | None = None, user: str | None = None, model: str | None = None
    ) -> None:
        """See Emitter.check: refuse a call before it costs money when its scope is blocked."""
        self._emitter.check(project=project, team=team, user=user, model=model)

    def flush(self) -> None:
        self._call(self._emitter.flush())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._emitter.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
