"""The meter stage: `usage.raw` messages in; priced events, spend deltas and dead letters out.

Pure logic (no Kafka, no tables) so it is unit-tested directly; `app.py` wires it into the Faust
meter agent. Per Kafka message, not per event, is where the Faust overhead goes, so the agent takes
the messages waiting for it together and `MeterBatch` coalesces their output: one `PricedBatch`
per project and one `SpendDeltaBatch` per owning partition, however many messages came in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from aiokafka.partitioner import murmur2

from spendstream.errors import DecodeError
from spendstream.usage import usage_problem
from spendstream.wire import Codec
from stream_processors.budgets import MINUTE_US, scopes_for_event
from stream_processors.pricing import Catalogue

__all__ = ["DeadLetter", "MeterBatch", "MeterResult", "MeterStage", "partition_for"]

PRICED_BATCH_EVENTS = 2_000  # events per PricedBatch message (well under the 8 MiB request size)


@lru_cache(maxsize=65536)
def partition_for(key: str, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), so scope-keyed records from any producer co-partition."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class DeadLetter:
    reason: str  # undecodable | wrong_schema | invalid_event
    detail: str
    payload: bytes


@dataclass
class MeterResult:
    project: str | None = None  # the project of every priced event (= the message key)
    priced: list[dict[str, Any]] = field(default_factory=list)  # PricedUsage records
    # (scope, event minute) -> pico-USD and event count: what this message adds to each budget scope
    spend: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    rekey: list[tuple[str, bytes]] = field(default_factory=list)  # (project, UsageEvent message)
    statuses: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # priced/fallback/unpriced


class MeterStage:
    def __init__(
        self,
        catalogue: Catalogue,
        codec: Codec,
        model_globs: dict[str, list[str]] | None = None,
        budgeted: Container[str] = (),
    ) -> None:
        self.catalogue = catalogue
        self.codec = codec
        self.model_globs = model_globs if model_globs is not None else {}  # project -> model-filter budgets
        # Scopes with a budget: org and project spend is always kept; team and user spend only for
        # budgeted scopes (fanning out to every user of every message would cost more than pricing).
        self.budgeted = budgeted

    def process(self, key: bytes | None, value: bytes, now_us: int) -> MeterResult:
        result = MeterResult()
        try:
            name, record = self.codec.decode(value)
        except DecodeError as exc:
            result.dead.append(DeadLetter("undecodable", str(exc), value))
            return result
        if name == "UsageEvent":
            events = [record]
        elif name == "UsageBatch":
            events = record["events"]
        else:
            result.dead.append(
                DeadLetter("wrong_schema", f"usage.raw takes UsageEvent or UsageBatch, not {name}", value)
            )
            return result
        message_project = key.decode("utf-8", "replace") if key is not None else None
        for event in events:
            self._price_one(event, message_project, now_us, result)
        return result

    def _price_one(
        self, event: dict[str, Any], message_project: str | None, now_us: int, result: MeterResult
    ) -> None:
        problem = usage_problem(event)
        if problem is not None:
            result.dead.append(DeadLetter("invalid_event", problem, self._single(event)))
            return
        project = event["project"]
        if project != message_project:
            # Spend is owned by the partition of key = project. An event sent under another key (or
            # none) is forwarded with the right key instead of being counted by the wrong owner.
            result.rekey.append((project, self._single(event)))
            return
        priced = self.catalogue.price(event)
        card = priced.card
        result.project = project
        result.statuses[priced.status] += 1
        result.priced.append(
            {
                "usage": event,
                "cost_pico_usd": priced.cost_pico,
                "price_card": card.id if card else "",
                "priced_at": now_us,
                "pricing_status": priced.status,
                "card_version": card.version if card else "",
                "itemised": priced.itemised,
                "unpriced_reason": priced.reason,
            }
        )
        if priced.cost_pico:  # unpriced (None) moves no budget, but is counted and stored
            minute = event["event_time"] // MINUTE_US
            globs = self.model_globs.get(project, ())
            team, user = event["team"], event["user"]
            team = team if team and f"team:{team}" in self.budgeted else None
            user = user if user and f"user:{user}" in self.budgeted else None
            for scope in scopes_for_event(project, team, user, event["model"], globs):
                slot = result.spend.get((scope, minute))
                if slot is None:
                    result.spend[(scope, minute)] = [priced.cost_pico, 1]
                else:
                    slot[0] += priced.cost_pico
                    slot[1] += 1

    def _single(self, event: dict[str, Any]) -> bytes:
        return self.codec.encode("UsageEvent", event)


class MeterBatch:
    """The output of the usage.raw messages the meter took together, coalesced per destination.

    Spend deltas keep the usage.raw message they came from (source partition and offset): after a
    crash the meter re-reads from its last commit and forms different batches, and the budget
    agent can still apply each usage.raw message to each scope exactly once.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.priced: dict[str, list[dict[str, Any]]] = defaultdict(list)  # project -> PricedUsage
        self.deltas: dict[int, list[dict[str, Any]]] = defaultdict(list)  # spend.deltas partition -> deltas

    def add(self, result: MeterResult, source_partition: int, source_offset: int) -> None:
        if result.project is not None:
            self.priced[result.project].extend(result.priced)
        for (scope, minute), (pico, count) in result.spend.items():
            self.deltas[partition_for(scope, self.partitions)].append(
                {
                    "scope": scope,
                    "minute": minute,
                    "pico_usd": pico,
                    "events": count,
                    "source_partition": source_partition,
                    "source_offset": source_offset,
                }
            )

    def priced_batches(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """(project, PricedUsage records) per message, at most PRICED_BATCH_EVENTS each."""
        return [
            (project, events[i : i + PRICED_BATCH_EVENTS])
            for project, events in self.priced.items()
            for i in range(0, len(events), PRICED_BATCH_EVENTS)
        ]
