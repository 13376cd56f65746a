"""Fleet-wide rate limits: requests and tokens per minute per scope, over Kafka only.

Every gateway instance keeps, per scope (`key:<id>`, `project:<p>`), a sliding window of the
last `window_s` seconds in `buckets` time buckets (default 60 s in 60 one-second buckets), holding
the requests and tokens of the whole fleet as far as this instance knows them:

    admit()          counts local admissions at once (no I/O on this path)
      | every sync_interval_s (default 50 ms), one message of this instance's increments
      v  (key: this process's nonce, so its messages stay in order on one partition)
    gateway.rates    JSON {"v":1,"i":instance,"n":nonce,"s":seq,"t":sent_at,"m":monotonic,
      |                    "a":{peer nonce: its last seq applied here},"e":[[scope,bucket,requests,tokens],...]}
      | every instance reads every partition and adds the others' increments to its buckets,
      v  and acknowledges them ("a") in its next message; its own messages are its health probe
    buckets          admission: fleet count in the window + this request <= limit

Guarantees and their limits, stated where they are made:

1. One instance never admits more than the limit in any `window_s` window of its own view: a
   request is counted for between `window_s` and `window_s + bucket` seconds (the oldest bucket
   still counts until it has entirely left the window), so the window is conservative by at most one
   bucket. Tested by a property test.
2. Across instances, an instance spends at most its share of the headroom before every other live
   instance has its increments: with `n` live instances (heard within `health_timeout_s`), what it
   admitted that not every live peer has acknowledged ("unconfirmed") stays within
   (limit - everything else it knows) // n, except that an instance with nothing unconfirmed may
   always admit one request that fits its view (or a request larger than a share could never pass).
   A burst on every instance at once therefore lands at the limit, not at n times it. What remains
   is a race at the tail: instances admitting their one request at the same moment (at most n - 1
   requests, or n - 1 requests' tokens, over), and an instance joining unseen. Measured: 3
   instances hammering 60 per window: 60-62 in any window (tests/test_gateway_limits.py,
   bench/gateway_limits.py, docs/gateway-limits.md).
3. Token corrections (`record_tokens`, real minus estimated) are counted fleet-wide too. A negative
   correction is taken from the bucket of the admission (`admitted_at`) or, without it, from the
   oldest buckets first, never below zero: both only ever count a token for longer, not shorter.
4. Degraded mode: while this instance cannot publish to and read back from the topic for
   `health_timeout_s`, `healthy` is False and limits hold per instance (each admits up to the full
   limit against what it knows, i.e. the fleet up to n times it), like the Guard failing open. Its
   increments are kept (those still inside the window) and published on recovery, so the instances
   converge on the fleet's real count.
5. Bucket numbers come from each host's wall clock: run NTP; a skew of s seconds shifts that host's
   counts by s in the others' windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.topics import partitions_of

__all__ = ["FleetLimiter", "LimiterStats", "Rule", "Verdict", "go_duration", "rate_headers"]

log = logging.getLogger(__name__)

_FORMAT = 1
_Kind = Literal["requests", "tokens"]
_Batch = dict[str, dict[int, list[int]]]  # scope -> bucket -> [requests, tokens]
_SWEEP_CHUNK = 2_000
_MAX_ENTRIES_PER_MESSAGE = 5_000  # ~250 KB of JSON: well under the broker's 1 MB message limit


@dataclass(frozen=True)
class Rule:
    """A limit on one scope ("key:<id>" or "project:<p>"): requests and/or tokens per window
    (per minute with the default window); None = no limit of that kind."""

    scope: str
    rpm: int | None
    tpm: int | None


@dataclass(frozen=True)
class Verdict:
    """The answer for one (rule, kind). `remaining`: what is left in the window after this request
    (if allowed); `reset_s`: seconds until the window holds none of what it counts now (the
    OpenAI meaning: back to the full limit); `retry_after_s`: seconds until this request would fit
    (0 when allowed). A request larger than the limit itself never fits: `retry_after_s` is the
    window then, and `limit` < the request's tokens tells the caller so."""

    allowed: bool
    scope: str
    what: Literal["requests", "tokens"]
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float


class _Window:
    """The counts of one scope: buckets [bucket, requests, tokens] in bucket order (a list: at most
    `buckets` + 1 of them, and ~400 bytes for a scope with one), their totals, and how much of them
    this instance admitted that not every live peer has acknowledged yet."""

    __slots__ = ("buckets", "requests", "tokens", "unconfirmed_requests", "unconfirmed_tokens")

    def __init__(self) -> None:
        self.buckets: list[list[int]] = []
        self.requests = 0
        self.tokens = 0
        self.unconfirmed_requests = 0
        self.unconfirmed_tokens = 0

    def expire(self, oldest: int) -> None:
        """Drop the buckets before `oldest` (the first bucket still in the window)."""
        buckets = self.buckets
        gone = 0
        for bucket, requests, tokens in buckets:
            if bucket >= oldest:
                break
            self.requests -= requests
            self.tokens -= tokens
            gone += 1
        if gone:
            del buckets[:gone]

    def add(self, bucket: int, requests: int, tokens: int) -> int:
        """Add to `bucket` (created in order if missing); a bucket's tokens never go below zero.
        Returns the tokens actually added (a negative amount may be clamped)."""
        buckets = self.buckets
        i = len(buckets)
        while i and buckets[i - 1][0] > bucket:  # late increments land near the end: a short walk
            i -= 1
        if i and buckets[i - 1][0] == bucket:
            entry = buckets[i - 1]
        else:
            entry = [bucket, 0, 0]
            buckets.insert(i, entry)
        tokens = max(tokens, -entry[2])
        entry[1] += requests
        entry[2] += tokens
        self.requests += requests
        self.tokens += tokens
        return tokens

    def take_oldest_first(self, tokens: int) -> list[tuple[int, int]]:
        """Remove up to `tokens` (> 0) tokens from the oldest buckets first; returns (bucket, -taken)."""
        taken: list[tuple[int, int]] = []
        for entry in self.buckets:
            if tokens <= 0:
                break
            part = min(tokens, entry[2])
            if part > 0:
                entry[2] -= part
                self.tokens -= part
                tokens -= part
                taken.append((entry[0], -part))
        return taken

    def count(self, what: str) -> int:
        return self.requests if what == "requests" else self.tokens

    def unconfirmed(self, what: str) -> int:
        return self.unconfirmed_requests if what == "requests" else self.unconfirmed_tokens


@dataclass
class _Peer:
    instance_id: str
    heard_at: float  # wall clock: when it sent its newest message we read
    seq: int = 0  # its newest message we applied (we acknowledge it in ours)
    acked: int = 0  # our newest message it has applied (it acknowledged it in its)


@dataclass
class LimiterStats:
    """Counters of one FleetLimiter (for /metrics and the bench)."""

    admitted: int = 0
    refused: int = 0
    messages_sent: int = 0
    messages_applied: int = 0
    send_failures: int = 0
    entries_dropped_expired: int = 0
    sync_lag_s: float = 0.0  # last send-to-read-back time of this instance's own message
    sync_lag_max_s: float = 0.0


class FleetLimiter:
    """Sliding-window rate limits shared by every gateway instance through `topic` (gateway.rates).

    `admit()` and `record_tokens()` do no I/O: a background task publishes this instance's
    increments every `sync_interval_s` and applies everyone else's. `window_s` (default 60: per
    minute) and `buckets` exist for tests and the bench; `health_timeout_s` is how long the topic may
    be silent for this instance before it calls itself unhealthy (see the module docstring, 4.)."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        instance_id: str,
        kafka_auth: KafkaAuth = PLAINTEXT,
        sync_interval_s: float = 0.05,
        window_s: float = 60.0,
        buckets: int = 60,
        health_timeout_s: float = 2.0,
        ready_timeout_s: float = 10.0,
    ) -> None:
        if window_s <= 0 or buckets < 1 or sync_interval_s <= 0:
            raise ValueError("window_s and sync_interval_s must be > 0 and buckets >= 1")
        self.topic = topic
        self.instance_id = instance_id
        self.window_s = window_s
        self.sync_interval_s = sync_interval_s
        self.health_timeout_s = health_timeout_s
        self.stats = LimiterStats()
        self._bootstrap = bootstrap_servers
        self._kafka_auth = kafka_auth
        self._ready_timeout_s = ready_timeout_s
        self._nonce = uuid.uuid4().hex  # this process: a restarted instance re-reads its old counts
        self._n_buckets = buckets
        self._bucket_s = window_s / buckets
        self._heartbeat_s = min(health_timeout_s / 4, 0.5)
        self._scopes: dict[str, _Window] = {}
        self._pending: _Batch = {}  # counted here, not yet sent
        self._peers: dict[str, _Peer] = {}  # nonce -> peer
        self._seq = 0
        # sent, not yet applied by every live peer: (seq, sent at, batch)
        self._unacked: deque[tuple[int, float, _Batch]] = deque()
        self._producer: AIOKafkaProducer | None = None
        self._acks_to_send = False
        self._last_sent = 0.0
        self._last_read_back = -math.inf  # monotonic time our own newest message was sent, once read back
        self._last_sweep = 0.0
        self._to_sweep: list[str] = []  # scopes the current sweep has still to look at
        self._caught_up = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the admission path: no I/O ------------------------------------------------------------
    def admit(self, rules: Sequence[Rule], tokens: int, now: float | None = None) -> list[Verdict]:
        """One Verdict per (rule, kind) the rule limits. If all allow, counts 1 request and `tokens`
        (the estimate) against every rule's scope; if any refuses, counts nothing."""
        now = time.time() if now is None else now
        bucket = int(now // self._bucket_s)
        oldest = bucket - self._n_buckets
        instances = self.instances if self.healthy else 1
        verdicts: list[Verdict] = []
        allowed = True
        for rule in rules:
            window = self._scopes.get(rule.scope)
            if window is not None:
                window.expire(oldest)
            kinds: tuple[tuple[_Kind, int | None, int], ...] = (
                ("requests", rule.rpm, 1),
                ("tokens", rule.tpm, tokens),
            )
            for what, limit, need in kinds:
                if limit is None:
                    continue
                verdict = self._verdict(rule.scope, what, limit, need, window, instances, bucket, now)
                allowed &= verdict.allowed
                verdicts.append(verdict)
        if allowed:
            self.stats.admitted += 1
            for rule in rules:
                self._count(rule.scope, bucket, 1, tokens)
        else:
            self.stats.refused += 1
        return verdicts

    def record_tokens(
        self, scopes: Sequence[str], tokens: int, now: float | None = None, admitted_at: float | None = None
    ) -> None:
        """Count `tokens` more (real minus estimated; may be negative) against `scopes`, fleet-wide.
        A positive amount is counted now; a negative one is taken from the bucket of `admitted_at`
        (the `now` of the admit() call) if still in the window, else from the oldest buckets first;
        a bucket never goes below zero (see the module docstring, 3.)."""
        if tokens == 0:
            return
        now = time.time() if now is None else now
        bucket = int(now // self._bucket_s)
        oldest = bucket - self._n_buckets
        for scope in scopes:
            if tokens > 0:
                self._count(scope, bucket, 0, tokens)
                continue
            window = self._scopes.get(scope)
            if window is None:
                continue
            window.expire(oldest)
            if admitted_at is not None:
                at = int(admitted_at // self._bucket_s)
                if at >= oldest:
                    self._unconfirmed(scope, at, 0, window.add(at, 0, tokens))
            else:
                for at, part in window.take_oldest_first(-tokens):
                    self._unconfirmed(scope, at, 0, part)

    def count(self, scope: str, what: Literal["requests", "tokens"], now: float | None = None) -> int:
        """The fleet's requests or tokens in `scope`'s window, as this instance knows them."""
        now = time.time() if now is None else now
        window = self._scopes.get(scope)
        if window is None:
            return 0
        window.expire(int(now // self._bucket_s) - self._n_buckets)
        return window.count(what)

    @property
    def healthy(self) -> bool:
        """True while this instance's own increments come back from the topic within
        `health_timeout_s` (it publishes at least every health_timeout_s / 4); False: limits hold
        per instance."""
        return self._caught_up.is_set() and time.monotonic() - self._last_read_back < self.health_timeout_s

    @property
    def instances(self) -> int:
        """Live gateway instances (this one and those heard within `health_timeout_s`)."""
        return 1 + len(self._live_peers())

    def _live_peers(self) -> list[_Peer]:
        cutoff = time.time() - self.health_timeout_s
        return [p for p in self._peers.values() if p.heard_at >= cutoff]

    def _verdict(
        self,
        scope: str,
        what: Literal["requests", "tokens"],
        limit: int,
        need: int,
        window: _Window | None,
        instances: int,
        bucket: int,
        now: float,
    ) -> Verdict:
        counted = window.count(what) if window is not None else 0
        if need > limit:  # never fits: the caller should say the request is too large
            return Verdict(
                False,
                scope,
                what,
                limit,
                max(limit - counted, 0),
                self._reset(window, what, now),
                self.window_s,
            )
        fits = counted + need <= limit
        if fits and window is not None and instances > 1:
            unconfirmed = window.unconfirmed(what)
            share = (limit - (counted - unconfirmed)) // instances
            if unconfirmed > 0 and unconfirmed + need > share:  # own share spent until the broker acks
                return Verdict(
                    False, scope, what, limit, 0, self._reset(window, what, now), 2 * self.sync_interval_s
                )
        if fits:
            reset = self._expiry(bucket, now) if need > 0 else self._reset(window, what, now)
            return Verdict(True, scope, what, limit, limit - counted - need, reset, 0.0)
        assert window is not None  # with nothing counted, a request within the limit fits
        return Verdict(
            False,
            scope,
            what,
            limit,
            max(limit - counted, 0),
            self._reset(window, what, now),
            self._retry_after(window, what, limit, need, now),
        )

    def _expiry(self, bucket: int, now: float) -> float:
        """Seconds until `bucket` has left the window."""
        return max((bucket + self._n_buckets + 1) * self._bucket_s - now, 0.0)

    def _reset(self, window: _Window | None, what: str, now: float) -> float:
        if window is None:
            return 0.0
        column = 1 if what == "requests" else 2
        for entry in reversed(window.buckets):
            if entry[column] > 0:
                return self._expiry(entry[0], now)
        return 0.0

    def _retry_after(self, window: _Window, what: str, limit: int, need: int, now: float) -> float:
        column = 1 if what == "requests" else 2
        excess = window.count(what) + need - limit
        for entry in window.buckets:
            excess -= entry[column]
            if excess <= 0:
                return self._expiry(entry[0], now)
        return self.window_s  # not reached: the buckets hold the whole count

    def _count(self, scope: str, bucket: int, requests: int, tokens: int) -> None:
        window = self._scopes.get(scope)
        if window is None:
            window = self._scopes[scope] = _Window()
        self._unconfirmed(scope, bucket, requests, window.add(bucket, requests, tokens))

    def _unconfirmed(self, scope: str, bucket: int, requests: int, tokens: int) -> None:
        window = self._scopes[scope]
        window.unconfirmed_requests += requests
        window.unconfirmed_tokens += tokens
        entry = self._pending.setdefault(scope, {}).setdefault(bucket, [0, 0])
        entry[0] += requests
        entry[1] += tokens

    # -- the sync: Kafka ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start following the topic; returns once this instance has read the last window of the
        fleet's increments and read back its own first message, or after `ready_timeout_s` (then
        limits hold per instance until it has, and an error is logged)."""
        self._task = asyncio.create_task(self._run(), name=f"spendstream-limits-{self.instance_id}")
        try:
            await asyncio.wait_for(self._ready.wait(), self._ready_timeout_s)
        except TimeoutError:
            log.error(
                "rate limits: not in sync with %s after %.0f s; limits hold per instance meanwhile",
                self.topic,
                self._ready_timeout_s,
            )

    async def stop(self) -> None:
        """Publish what is pending (for at most a second: if the broker is down, the others count
        this instance's last increments less) and stop syncing."""
        if self._producer is not None and self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._send(self._producer), 1.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._caught_up.clear()

    async def _run(self) -> None:
        while True:
            consumer: AIOKafkaConsumer | None = None
            publisher: asyncio.Task[None] | None = None
            try:
                partitions = [
                    TopicPartition(self.topic, p)
                    for p in await partitions_of(self._bootstrap, self.topic, self._kafka_auth)
                ]
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    client_id=f"spendstream-limits-{self.instance_id}",
                    fetch_max_wait_ms=int(self.sync_interval_s * 1000),
                    **self._kafka_auth.client_kwargs(),
                )
                await consumer.start()
                consumer.assign(partitions)
                await self._seek_to_window(consumer, partitions)
                end = await consumer.end_offsets(partitions)
                publisher = asyncio.create_task(self._publish(), name="spendstream-limits-publish")
                while True:
                    batch = await consumer.getmany(timeout_ms=int(self.sync_interval_s * 1000))
                    for messages in batch.values():
                        for message in messages:
                            self._apply(message.value)
                    if not self._caught_up.is_set():
                        positions = {tp: await consumer.position(tp) for tp in partitions}
                        if all(positions[tp] >= end[tp] for tp in partitions):
                            self._caught_up.set()
                            log.info(
                                "rate limits: read the last %.0f s of %s: %d scopes, %d other instances",
                                self.window_s,
                                self.topic,
                                len(self._scopes),
                                len(self._peers),
                            )
                    if self.healthy:
                        self._ready.set()
                    if publisher.done():
                        publisher.result()  # re-raise what stopped it
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away at start, or the topic is missing: retry
                why = await self._kafka_auth.refusal(self._bootstrap) or exc
                log.error(
                    "rate limits lost %s (%s); limits hold per instance; retrying in 1 s", self.topic, why
                )
                self._sweep()
                await asyncio.sleep(1)
            finally:
                if publisher is not None:
                    publisher.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await publisher
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await consumer.stop()

    async def _seek_to_window(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Position every partition at the first message of the last window (+ a bucket)."""
        since_ms = int((time.time() - self.window_s - self._bucket_s) * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
        end = await consumer.end_offsets(partitions)
        for tp in partitions:
            offset = found.get(tp)
            consumer.seek(tp, offset.offset if offset is not None else end[tp])

    async def _publish(self) -> None:
        """Every sync_interval_s: send what this instance counted since the last send and the
        acknowledgements it owes (at least a heartbeat every health_timeout_s / 4). A producer
        whose send failed is discarded and a new one connected: after a broker outage, an
        idempotent producer's next sends can fail for good (OutOfOrderSequenceNumber) while the
        broker is back, which would leave this instance unhealthy until it restarts."""
        failed_starts = 0  # in a row: the first is logged, then one a minute (an outage is long)
        while True:
            # acks=all: a message the leader alone held can vanish when it fails, and the
            # peers' acknowledgement of a later seq would then confirm the lost increments.
            # Idempotent: a retried send is not counted twice.
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=f"spendstream-limits-{self.instance_id}",
                acks="all",
                enable_idempotence=True,
                linger_ms=0,
                request_timeout_ms=int(max(self.health_timeout_s * 2, 5) * 1000),
                **self._kafka_auth.client_kwargs(),
            )
            try:
                await producer.start()
                if failed_starts:
                    log.warning(
                        "rate limits: producer for %s connected after %d tries", self.topic, failed_starts
                    )
                    failed_starts = 0
                self._producer = producer
                while True:
                    await asyncio.sleep(self.sync_interval_s)
                    self._sweep()
                    self._release()
                    due = time.monotonic() - self._last_sent >= self._heartbeat_s
                    if (self._pending or self._acks_to_send or due) and not await self._send(producer):
                        break
            except KafkaError as exc:
                failed_starts += 1
                if failed_starts % 60 == 1:
                    log.warning(
                        "rate limits: no producer for %s (%s, %d tries); retrying every second",
                        self.topic,
                        exc,
                        failed_starts,
                    )
                await asyncio.sleep(1)
            finally:
                self._producer = None
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _send(self, producer: AIOKafkaProducer) -> bool:
        """Send the pending increments; on failure (False) they are kept for the next try (still
        unconfirmed); on success they wait in `_unacked` for the peers' acknowledgements."""
        batch, self._pending, self._acks_to_send = self._pending, {}, False
        entries = [[scope, bucket, c[0], c[1]] for scope, by in batch.items() for bucket, c in by.items()]
        try:
            for start in range(0, max(len(entries), 1), _MAX_ENTRIES_PER_MESSAGE):
                self._seq += 1
                value = {
                    "v": _FORMAT,
                    "i": self.instance_id,
                    "n": self._nonce,
                    "s": self._seq,
                    "t": time.time(),
                    "m": time.monotonic(),
                    "a": {nonce: peer.seq for nonce, peer in self._peers.items()},
                    "e": entries[start : start + _MAX_ENTRIES_PER_MESSAGE],
                }
                await producer.send_and_wait(
                    self.topic, json.dumps(value, separators=(",", ":")).encode(), key=self._nonce.encode()
                )
                self.stats.messages_sent += 1
        except KafkaError as exc:  # a part already sent is sent again: counted twice, never less
            self.stats.send_failures += 1
            self._requeue(batch)
            log.warning("rate limits: could not publish to %s (%s); kept for the next try", self.topic, exc)
            return False
        self._last_sent = time.monotonic()
        if batch:
            self._unacked.append((self._seq, time.time(), batch))
            self._release()
        return True

    def _release(self) -> None:
        """Confirm the sent batches every live peer has applied (acknowledged in its own messages):
        only then do they stop counting against this instance's share (module docstring, 2.)."""
        live = self._live_peers()
        outdated = time.time() - self.window_s - self._bucket_s  # sent before: nothing of it counts now
        while self._unacked and (
            self._unacked[0][1] < outdated or all(p.acked >= self._unacked[0][0] for p in live)
        ):
            _, _, batch = self._unacked.popleft()
            for scope, by in batch.items():
                window = self._scopes.get(scope)
                if window is not None:
                    window.unconfirmed_requests -= sum(c[0] for c in by.values())
                    window.unconfirmed_tokens -= sum(c[1] for c in by.values())

    def _requeue(self, batch: _Batch) -> None:
        """Merge `batch` (one that failed to send, or the pending ones themselves) into the pending
        increments, still unconfirmed; buckets that have left the window are dropped."""
        oldest = int(time.time() // self._bucket_s) - self._n_buckets
        for scope, by in batch.items():
            into = self._pending.setdefault(scope, {})
            for bucket, counts in by.items():
                if bucket < oldest:
                    self.stats.entries_dropped_expired += 1
                    window = self._scopes.get(scope)
                    if window is not None:
                        window.unconfirmed_requests -= counts[0]
                        window.unconfirmed_tokens -= counts[1]
                    continue
                entry = into.setdefault(bucket, [0, 0])
                entry[0] += counts[0]
                entry[1] += counts[1]
            if not into:
                del self._pending[scope]

    def _apply(self, raw: bytes | None) -> None:
        try:
            value: dict[str, Any] = json.loads(raw or b"")
            nonce = value["n"]
            if value.get("v") != _FORMAT:
                raise ValueError(f"format {value.get('v')!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("rate limits: ignored a record on %s that is not ours (%s)", self.topic, exc)
            return
        if nonce == self._nonce:  # our own: proof that the topic takes and serves our increments
            self._last_read_back = value["m"]
            lag = time.monotonic() - value["m"]
            self.stats.sync_lag_s = lag
            self.stats.sync_lag_max_s = max(self.stats.sync_lag_max_s, lag)
            return
        sent_at = min(value["t"], time.time())  # an old record read at start is not a live peer
        peer = self._peers.get(nonce)
        if peer is None:
            peer = self._peers[nonce] = _Peer(value["i"], sent_at)
        peer.heard_at = max(peer.heard_at, sent_at)
        peer.seq = value["s"]
        peer.acked = max(peer.acked, value.get("a", {}).get(self._nonce, 0))
        if value["e"]:
            self._acks_to_send = True  # it waits for our acknowledgement (heartbeats need none)
        oldest = int(time.time() // self._bucket_s) - self._n_buckets
        scopes = self._scopes
        for scope, bucket, requests, tokens in value["e"]:
            if bucket < oldest:
                self.stats.entries_dropped_expired += 1
                continue
            window = scopes.get(scope)
            if window is None:
                window = scopes[scope] = _Window()
            window.expire(oldest)
            window.add(bucket, requests, tokens)
        self.stats.messages_applied += 1
        self._release()

    def _sweep(self) -> None:
        """Every window / 6: forget pending increments, scopes and peers that no longer matter. The
        scopes are looked at _SWEEP_CHUNK per call (one call per sync interval), so a sweep of
        100,000 scopes never holds the event loop for more than a few milliseconds."""
        now = time.monotonic()
        if not self._to_sweep:
            if now - self._last_sweep < self.window_s / 6:
                return
            self._last_sweep = now
            pending, self._pending = self._pending, {}
            self._requeue(pending)  # keeps what is still inside the window
            gone = time.time() - max(self.window_s, self.health_timeout_s * 10)
            for nonce in [n for n, p in self._peers.items() if p.heard_at < gone]:
                del self._peers[nonce]
            self._to_sweep = list(self._scopes)
        oldest = int(time.time() // self._bucket_s) - self._n_buckets
        chunk = self._to_sweep[-_SWEEP_CHUNK:]
        del self._to_sweep[-_SWEEP_CHUNK:]
        for scope in chunk:
            window = self._scopes.get(scope)
            if window is None:
                continue
            window.expire(oldest)
            if not window.buckets and scope not in self._pending and not window.unconfirmed_requests:
                del self._scopes[scope]


def rate_headers(verdicts: Sequence[Verdict]) -> dict[str, str]:
    """OpenAI-style headers from the tightest verdict of each kind (a refusal first, else the least
    remaining): x-ratelimit-{limit,remaining,reset}-{requests,tokens}, and when one refuses,
    `retry-after` (whole seconds, rounded up) and `retry-after-ms` (which the OpenAI SDKs prefer)."""
    headers: dict[str, str] = {}
    for what in ("requests", "tokens"):
        mine = [v for v in verdicts if v.what == what]
        if not mine:
            continue
        tightest = min(mine, key=lambda v: (v.allowed, v.remaining, v.limit))
        headers[f"x-ratelimit-limit-{what}"] = str(tightest.limit)
        headers[f"x-ratelimit-remaining-{what}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{what}"] = go_duration(tightest.reset_s)
    refused = [v.retry_after_s for v in verdicts if not v.allowed]
    if refused:
        wait = max(refused)
        headers["retry-after"] = str(max(math.ceil(wait), 1))
        headers["retry-after-ms"] = str(max(math.ceil(wait * 1000), 1))
    return headers


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it (Go's format, to the millisecond): 120ms, 1s, 59.5s, 6m0s, 1h2m3s."""
    ms = max(math.ceil(seconds * 1000 - 1e-6), 0)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs
