"""Feeds: compacted topics every worker reads whole, from the beginning, then follows.

    prices   (PriceCard, key = card id)  -> PriceFeed  -> the pricing catalogue
    budgets  (BudgetSpec, key = scope)   -> BudgetFeed -> model filters for the meter, `budget list`

No consumer group, nothing committed: each worker builds the full view. A record that does not
validate is logged and dead-lettered on `usage.dlq` with the reason; the old view stays. With verify
keys, a budgets record that is unsigned, badly signed, signed by an unknown key, a tombstone or a
replay (older `updated_at` than the scope's last accepted spec) is ignored and counted in
`rejections`; the budget agent, which reads each record once, dead-letters it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from mode import Service

from spendstream.errors import ConfigError, DecodeError
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.signing import REPLAYED, Verifier
from spendstream.topics import partitions_of
from spendstream.wire import Codec
from stream_processors.budgets import Spec
from stream_processors.pricing import Catalogue, PriceCard, card_from_mapping

__all__ = ["BudgetFeed", "PriceFeed", "budget_rejection", "cards_of", "publish", "read_compacted"]

log = logging.getLogger(__name__)

DeadLetterFn = Callable[[str, str, int, int, bytes | None, bytes], Awaitable[None]]


class _Feed(Service):
    """Reads one topic from the beginning; `caught_up` is set once the start-time end is reached."""

    schema = ""
    reject_reason = ""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        codec: Codec,
        dead_letter: DeadLetterFn,
        kafka_auth: KafkaAuth = PLAINTEXT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._bootstrap = bootstrap
        self._kafka_auth = kafka_auth
        self.topic = topic
        self._codec = codec
        self._dead_letter = dead_letter
        self._consumer: AIOKafkaConsumer | None = None
        self.caught_up = asyncio.Event()
        self.applied = 0
        self.rejected = 0
        self.rejections: Counter[str] = Counter()  # reason -> well-formed records not applied

    def apply(self, key: bytes | None, record: dict[str, Any] | None) -> str:
        """Apply one record (None = tombstone); return a short description for the log."""
        raise NotImplementedError

    def rejection(self, key: bytes | None, value: bytes | None, record: dict[str, Any] | None) -> str | None:
        """Why a well-formed record is not to be applied (None: apply it)."""
        return None

    async def on_start(self) -> None:
        partitions = await partitions_of(self._bootstrap, self.topic, self._kafka_auth)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            **self._kafka_auth.client_kwargs(),
        )
        await self._consumer.start()
        self._consumer.assign([TopicPartition(self.topic, p) for p in partitions])
        await self._consumer.seek_to_beginning()

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    @Service.task
    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        end = await consumer.end_offsets(list(consumer.assignment()))
        started = time.monotonic()
        while not self.should_stop:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, messages in batch.items():
                for msg in messages:
                    await self._handle(tp.partition, msg.offset, msg.key, msg.value)
            if not self.caught_up.is_set() and all(
                [await consumer.position(tp) >= off for tp, off in end.items()]
            ):
                self.caught_up.set()
                log.info(
                    "%s caught up: %d applied, %d rejected (%.1f s)",
                    self.topic,
                    self.applied,
                    self.rejected,
                    time.monotonic() - started,
                )

    async def _handle(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        try:
            record = None
            if value:
                name, record = self._codec.decode(value)
                if name != self.schema:
                    raise DecodeError(f"{self.topic} takes {self.schema} records, not {name}")
            why = self.rejection(key, value, record)
            if why is not None:
                self.rejections[why] += 1
                log.warning(
                    "ignored a %s %s record at [%d]@%d (key %r)", why, self.topic, partition, offset, key
                )
                return
            what = self.apply(key, record)
        except (DecodeError, ConfigError, KeyError, ValueError) as exc:
            self.rejected += 1
            log.error("rejected %s record at [%d]@%d: %s", self.topic, partition, offset, exc)
            await self._dead_letter(self.reject_reason, str(exc), partition, offset, key, value or b"")
            return
        self.applied += 1
        log.info("%s: %s", self.topic, what)


class PriceFeed(_Feed):
    schema = "PriceCard"
    reject_reason = "invalid_price_card"

    def __init__(self, *, catalogue: Catalogue, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.catalogue = catalogue

    def apply(self, key: bytes | None, record: dict[str, Any] | None) -> str:
        if record is None:  # cards are replaced, never deleted, so history stays priceable
            return "tombstone ignored"
        card = card_from_mapping(record)
        self.catalogue.add(card)
        return f"price card {card.id} applied (catalogue version {self.catalogue.version})"


def budget_rejection(
    verifier: Verifier,
    key: bytes | None,
    value: bytes | None,
    record: dict[str, Any] | None,
    last_updated_at: int | None,
) -> str | None:
    """Why a budgets record is not accepted (None: accepted): a signature the verifier refuses, or,
    with keys, a spec older than `last_updated_at`, the scope's last accepted one (a replay)."""
    why = verifier.check(key, value, record)
    fresh = record is None or last_updated_at is None or record["updated_at"] >= last_updated_at
    return REPLAYED if why is None and verifier.enforcing and not fresh else why


class BudgetFeed(_Feed):
    schema = "BudgetSpec"
    reject_reason = "invalid_budget"

    def __init__(self, *, verifier: Verifier, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verifier = verifier
        self.specs: dict[str, Spec] = {}
        self.updated_at: dict[str, int] = {}  # scope -> updated_at of its last accepted spec
        self.model_globs: dict[str, list[str]] = {}  # project -> globs of its model-filtered budgets

    def rejection(self, key: bytes | None, value: bytes | None, record: dict[str, Any] | None) -> str | None:
        scope = key.decode() if key else (record or {}).get("scope", "")
        return budget_rejection(self.verifier, key, value, record, self.updated_at.get(scope))

    def apply(self, key: bytes | None, record: dict[str, Any] | None) -> str:
        scope = key.decode() if key else (record or {}).get("scope", "")
        if record is None or record["removed"]:
            self.specs.pop(scope, None)
        else:
            self.specs[scope] = Spec.from_record(record)
        if record is not None:
            self.updated_at[scope] = record["updated_at"]
        globs: dict[str, list[str]] = {}
        for s in self.specs:
            if "/model:" in s:
                project, glob = s.removeprefix("project:").split("/model:", 1)
                globs.setdefault(project, []).append(glob)
        self.model_globs = globs
        return f"budget {scope} {'removed' if scope not in self.specs else 'set'}"


async def publish(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None]],
    kafka_auth: KafkaAuth = PLAINTEXT,
) -> None:
    """Publish (key, value) records and wait until Kafka has them all."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", **kafka_auth.client_kwargs()
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


Admit = Callable[[bytes, bytes | None, dict[str, Any] | None, dict[str, Any] | None], bool]


async def read_compacted(
    bootstrap: str, topic: str, codec: Codec, admit: Admit | None = None, kafka_auth: KafkaAuth = PLAINTEXT
) -> dict[bytes, dict[str, Any] | None]:
    """The latest record per key on `topic` (read to its current end); {} if the topic is missing.

    `admit(key, value, record, kept)`, if given, decides whether a record replaces `kept`, the
    latest admitted one of its key (None if none yet): e.g. only verified budgets."""
    try:
        partitions = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic, kafka_auth)]
    except ConfigError:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **kafka_auth.client_kwargs()
    )
    await consumer.start()
    latest: dict[bytes, dict[str, Any] | None] = {}
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning()
        end = await consumer.end_offsets(partitions)
        while [tp for tp, off in end.items() if await consumer.position(tp) < off]:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for msg in messages:
                    if msg.key is None:
                        continue
                    try:
                        record = codec.decode(msg.value)[1] if msg.value else None
                    except DecodeError:
                        continue
                    if admit is None or admit(msg.key, msg.value, record, latest.get(msg.key)):
                        latest[msg.key] = record
    finally:
        await consumer.stop()
    return latest


def cards_of(records: dict[bytes, dict[str, Any] | None]) -> list[PriceCard]:
    cards = []
    for record in records.values():
        if record is not None:
            try:
                cards.append(card_from_mapping(record))
            except ConfigError:
                continue
    return sorted(cards, key=lambda c: c.effective_from_us)
