"""The price feed: the compacted `prices` topic -> the worker's in-memory catalogue.

Read from the beginning at start (no consumer group, nothing committed), then followed: a card
published with `spendstream prices set|import` prices every later event in its validity interval
without a restart. A card that does not validate (bad decimal, overlap) is logged and
dead-lettered on `usage.dlq` with reason `invalid_price_card`; the catalogue keeps its old prices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from mode import Service

from spendstream.errors import ConfigError, DecodeError
from spendstream.topics import partitions_of
from spendstream.wire import Codec
from stream_processors.pricing import Catalogue, PriceCard, card_from_mapping

__all__ = ["PriceFeed", "publish_cards", "published_cards"]

log = logging.getLogger(__name__)

DeadLetterFn = Callable[[str, str, int, int, bytes | None, bytes], Awaitable[None]]


class PriceFeed(Service):
    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        catalogue: Catalogue,
        codec: Codec,
        dead_letter: DeadLetterFn,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._bootstrap = bootstrap
        self._topic = topic
        self._catalogue = catalogue
        self._codec = codec
        self._dead_letter = dead_letter
        self._consumer: AIOKafkaConsumer | None = None
        self.caught_up = asyncio.Event()
        self.cards_applied = 0
        self.cards_rejected = 0

    async def on_start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        partitions = await partitions_of(self._bootstrap, self._topic)
        await self._consumer.start()
        self._consumer.assign([TopicPartition(self._topic, p) for p in partitions])
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
                    await self._apply(tp.partition, msg.offset, msg.key, msg.value)
            if not self.caught_up.is_set() and all(
                await asyncio.gather(*(self._reached(tp, off) for tp, off in end.items()))
            ):
                self.caught_up.set()
                log.info(
                    "price feed caught up: %d cards applied, %d rejected, catalogue has %d cards (%.1f s)",
                    self.cards_applied,
                    self.cards_rejected,
                    len(self._catalogue),
                    time.monotonic() - started,
                )

    async def _reached(self, tp: Any, end: int) -> bool:
        assert self._consumer is not None
        return bool(await self._consumer.position(tp) >= end)

    async def _apply(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        if value is None:  # a tombstone: cards are replaced, never deleted, so history stays priceable
            return
        try:
            name, record = self._codec.decode(value)
            if name != "PriceCard":
                raise DecodeError(f"the prices topic takes PriceCard records, not {name}")
            card = card_from_mapping(record)
            self._catalogue.add(card)
        except (DecodeError, ConfigError) as exc:
            self.cards_rejected += 1
            log.error("rejected price card at %s[%d]@%d: %s", self._topic, partition, offset, exc)
            await self._dead_letter("invalid_price_card", str(exc), partition, offset, key, value)
            return
        self.cards_applied += 1
        log.info("price card %s applied (catalogue version %d)", card.id, self._catalogue.version)


async def publish_cards(bootstrap: str, topic: str, cards: list[PriceCard], codec: Codec) -> None:
    """Publish cards to the `prices` topic (key = card id) and wait until Kafka has them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, codec.encode("PriceCard", card.to_record()), key=card.id.encode())
            for card in cards
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def published_cards(bootstrap: str, topic: str, codec: Codec) -> list[PriceCard]:
    """Every valid card on the `prices` topic, in publication order (read to the current end)."""
    try:
        partitions = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    except ConfigError:
        return []  # no topic yet: nothing was published
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning()
        end = await consumer.end_offsets(partitions)
        found: list[tuple[int, PriceCard]] = []
        while [tp for tp, off in end.items() if await consumer.position(tp) < off]:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for msg in messages:
                    try:
                        name, record = codec.decode(msg.value)
                        if name == "PriceCard":
                            found.append((msg.timestamp, card_from_mapping(record)))
                    except (DecodeError, ConfigError):
                        continue
        return [card for _, card in sorted(found, key=lambda x: x[0])]
    finally:
        await consumer.stop()
