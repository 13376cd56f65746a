"""Guard: obey the kill switch without a network call on the check path.

A Guard reads the compacted `spend.control` topic from the beginning (so it learns the current
state of every scope), follows it, and keeps the latest signal per scope in memory. `check()`
looks the call's scopes up in that dict and raises `BudgetExceeded` when one is blocked.

If the control topic cannot be read (not caught up yet, broker unreachable), `check()` fails open
by default (calls go through, and it logs loudly), or fails closed with `fail_open=False`.

With `verify_keys` (the worker's Ed25519 public keys, base64) a Guard obeys only signals the worker
signed: an unsigned, badly signed, unknown-key, undecodable or replayed (sequence not above the
last accepted one of its scope) record changes nothing and is counted in `rejected` by reason. A
forger cannot jump the sequence, because it cannot sign. Without keys it obeys any signal, as any
Kafka client can write one, and logs that once (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition

from spendstream.errors import BudgetExceeded, DecodeError
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.signing import REPLAYED, Verifier, warn_unauthenticated
from spendstream.topics import partitions_of
from spendstream.usage import scopes_for_event
from spendstream.wire import default_codec

__all__ = ["Guard", "ScopeState", "SyncGuard"]

log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ScopeState:
    """The latest ControlSignal of one scope."""

    scope: str
    state: str  # ok | warn | blocked
    reason: str
    spend_pico_usd: int
    limit_pico_usd: int
    window: str
    window_end_us: int
    sequence: int
    decided_at_us: int

    def blocks(self, now_us: int) -> bool:
        # A block ends with its window even if no `ok` signal has arrived yet (window_end 0 = no end).
        return self.state == "blocked" and (self.window_end_us == 0 or now_us < self.window_end_us)

    def error(self) -> BudgetExceeded:
        end = _EPOCH + timedelta(microseconds=self.window_end_us) if self.window_end_us else None
        return BudgetExceeded(
            self.scope,
            self.reason,
            Decimal(self.spend_pico_usd).scaleb(-12),
            Decimal(self.limit_pico_usd).scaleb(-12),
            end,
        )


class Guard:
    """Async Guard. `async with Guard(bootstrap_servers=...) as guard: guard.check(project=...)`."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str = "spend.control",
        fail_open: bool = True,
        ready_timeout: float = 30.0,
        on_signal: Callable[[ScopeState], object] | None = None,
        verify_keys: Sequence[str] = (),
        kafka_auth: KafkaAuth = PLAINTEXT,
    ) -> None:
        """`on_signal`, if given, is called with every newer signal as the Guard applies it (in
        the Guard's event loop; SyncGuard: its thread), e.g. to alert or to drain a queue. An
        exception it raises is logged and does not stop the Guard. `verify_keys`: the base64
        Ed25519 public keys whose signed signals are obeyed (SPENDSTREAM_VERIFY_KEYS); none: every
        signal is obeyed. `kafka_auth`: SASL/TLS for the connection (spendstream.kafka_auth)."""
        self.topic = topic
        self.on_signal = on_signal
        self.fail_open = fail_open
        self._bootstrap = bootstrap_servers
        self._kafka_auth = kafka_auth
        self._ready_timeout = ready_timeout
        self._states: dict[str, ScopeState] = {}
        self._model_globs: dict[str, list[str]] = {}  # project -> globs of its model-filter scopes
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._healthy = False
        self._last_warning = 0.0
        self._verifier = Verifier(verify_keys)
        self._read_upto: dict[int, int] = {}  # partition -> last offset applied (re-reads are skipped)
        self.signals_seen = 0
        self.rejected: Counter[str] = Counter()  # reason -> records ignored

    # -- the check path: no I/O ---------------------------------------------------------------
    def check(
        self,
        *,
        project: str,
        team: str | None = None,
        user: str | None = None,
        model: str | None = None,
        key: str | None = None,
    ) -> None:
        """Raise BudgetExceeded if any scope this call counts against is blocked (`key`: the
        public id of the gateway key the call is made with, scope `key:<id>`)."""
        if not self._healthy:
            self._unavailable(project)
            return
        now = time.time_ns() // 1000
        states = self._states
        globs = self._model_globs.get(project, ()) if model is not None else ()
        for scope in scopes_for_event(project, team, user, model or "", globs, key):
            s = states.get(scope)
            if s is not None and s.blocks(now):
                raise s.error()

    def state(self, scope: str) -> ScopeState | None:
        return self._states.get(scope)

    @property
    def healthy(self) -> bool:
        return self._healthy

    def _unavailable(self, project: str) -> None:
        if self.fail_open:
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.error(
                    "Guard cannot read %s: failing OPEN (calls are not checked against budgets)", self.topic
                )
            return
        raise BudgetExceeded(f"project:{project}", "control_unavailable", Decimal(0), Decimal(0), None)

    # -- following the topic ------------------------------------------------------------------
    def _apply(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        if offset <= self._read_upto.get(partition, -1):
            return  # read again after a reconnect: applied (or rejected) the first time
        self._read_upto[partition] = offset
        if value is None:
            return
        try:
            name, s = default_codec().decode(value)
        except DecodeError:
            self.rejected["undecodable"] += 1
            return
        if name != "ControlSignal":
            self.rejected["wrong_record"] += 1
            return
        why = self._verifier.check(key, value, s)
        if why is None:
            seen = self._states.get(s["scope"])
            if seen is not None and s["sequence"] <= seen.sequence:
                why = REPLAYED  # stale or repeated
        if why is not None:
            self.rejected[why] += 1
            log.debug("Guard ignored a %s signal for %s at [%d]@%d", why, s["scope"], partition, offset)
            return
        state = ScopeState(
            s["scope"],
            s["state"],
            s["reason"],
            s["spend_pico_usd"],
            s["limit_pico_usd"],
            s["window"],
            s["window_end"],
            s["sequence"],
            s["decided_at"],
        )
        self._states[state.scope] = state
        self.signals_seen += 1
        if "/model:" in state.scope and state.scope.startswith("project:"):
            project, glob = state.scope[len("project:") :].split("/model:", 1)
            globs = self._model_globs.setdefault(project, [])
            if glob not in globs:
                globs.append(glob)
        if self.on_signal is not None:
            try:
                self.on_signal(state)
            except Exception:
                log.exception("Guard on_signal callback failed for %s", state.scope)

    async def start(self) -> None:
        if not self._verifier.enforcing:
            warn_unauthenticated(log, "the Guard")
        self._task = asyncio.create_task(self._follow(), name="spendstream-guard")
        try:
            await asyncio.wait_for(self._caught_up.wait(), self._ready_timeout)
        except TimeoutError:
            log.error("Guard not caught up with %s after %.0f s", self.topic, self._ready_timeout)

    async def _follow(self) -> None:
        while True:
            try:
                partitions = [
                    TopicPartition(self.topic, p)
                    for p in await partitions_of(self._bootstrap, self.topic, self._kafka_auth)
                ]
                self._consumer = AIOKafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    client_id=f"spendstream-guard-{uuid.uuid4().hex[:8]}",
                    fetch_max_wait_ms=20,
                    **self._kafka_auth.client_kwargs(),
                )
                await self._consumer.start()
                self._consumer.assign(partitions)
                await self._consumer.seek_to_beginning()
                end = await self._consumer.end_offsets(partitions)
                while True:
                    batch = await self._consumer.getmany(timeout_ms=200)
                    for messages in batch.values():
                        for msg in messages:
                            self._apply(msg.partition, msg.offset, msg.key, msg.value)
                    if not self._caught_up.is_set():
                        positions = [await self._consumer.position(tp) for tp in partitions]
                        if all(pos >= end[tp] for pos, tp in zip(positions, partitions, strict=True)):
                            self._caught_up.set()
                            self._healthy = True
                            log.info("Guard caught up with %s: %d scopes", self.topic, len(self._states))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: report unhealthy, retry
                self._healthy = False
                why = await self._kafka_auth.refusal(self._bootstrap) or exc
                log.error("Guard lost %s (%s); retrying in 1 s", self.topic, why)
                await asyncio.sleep(1)
            finally:
                if self._consumer is not None:
                    await self._consumer.stop()
                    self._consumer = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._healthy = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SyncGuard:
    """Guard for non-async code: follows the topic in a daemon thread; `check()` is the same."""

    def __init__(self, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="spendstream-guard", daemon=True)
        self._thread.start()
        self._guard = Guard(**kwargs)
        fut: ThreadFuture[None] = asyncio.run_coroutine_threadsafe(self._guard.start(), self._loop)
        fut.result()

    def check(
        self,
        *,
        project: str,
        team: str | None = None,
        user: str | None = None,
        model: str | None = None,
        key: str | None = None,
    ) -> None:
        self._guard.check(project=project, team=team, user=user, model=model, key=key)

    def state(self, scope: str) -> ScopeState | None:
        return self._guard.state(scope)

    @property
    def healthy(self) -> bool:
        return self._guard.healthy

    @property
    def rejected(self) -> Counter[str]:
        """Signals ignored, by reason (see Guard)."""
        return self._guard.rejected

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._guard.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
