"""The meter stage: `usage.raw` messages in; priced events, spend deltas and dead letters out.

Pure logic (no Kafka, no tables) so it is unit-tested directly; `app.py` wires it into the Faust
meter agent. Per Kafka message, not per event, is where the Faust overhead goes, so the agent takes
the messages waiting for it together and `MeterBatch` coalesces their output: one `PricedBatch`
per project and one `SpendDeltaBatch` per owning partition, however many messages came in.

Each event is decoded once and never re-encoded: a `PricedBatch` (v5) carries every usage.raw
message as it arrived, next to one small `UsagePrice` per priced event (`sources`), instead of
every event re-encoded inside a `PricedUsage` (measured in bench/README.md: the re-encoding was a
third of the meter's CPU). `spendstream.priced.priced_events` turns either form back into records.

A message of at least MIN_COLUMN_EVENTS valid events of its key is priced as columns with the
others of its take (meter_columns.py): straight from the native decoder's columns where it is
built (stream_processors/native: no record is made at all), else from the decoded records. Any
message the columns cannot price exactly goes the per-event path below, which stays the reference
(tests/test_meter_columns.py compares the two on every kind of message).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
from aiokafka.partitioner import murmur2

from spendstream.errors import DecodeError
from spendstream.topics import DEDUPE_HORIZON_S
from spendstream.usage import KEY_TAG, MAX_EVENT_PICO, DecodedUsageCheck
from spendstream.wire import MAGIC, Codec
from stream_processors.budgets import MINUTE_US, scopes_for_event
from stream_processors.dedupe import SeenIds, event_keys
from stream_processors.gc_pauses import cyclic_gc_paused
from stream_processors.meter_columns import MIN_COLUMN_EVENTS, Budgeted, PricedRun, price_columns
from stream_processors.pricing import Catalogue
from stream_processors.usage_columns import NATIVE, UsageColumns

__all__ = [
    "MAX_DEAD_LETTER_PAYLOAD",
    "DeadLetter",
    "MeterBatch",
    "MeterResult",
    "MeterStage",
    "dead_letter_record",
    "partition_for",
    "parts_by_size",
]

PRICED_BATCH_EVENTS = 2_000  # events per PricedBatch message (well under the 8 MiB request size)
MAX_DELTA_PICO = 2**62  # a spend delta is an Avro long: one message's spend per scope is split above
# (scope, minute) pairs one usage.raw message may move: its deltas must fit one spend.deltas message
# (~45 bytes each), since a scope applies all deltas of a source message together.
MAX_DELTAS_PER_MESSAGE = 50_000
T = TypeVar("T")
log = logging.getLogger(__name__)
_PROJECT, _EVENT_ID, _EVENT_TIME = itemgetter("project"), itemgetter("event_id"), itemgetter("event_time")
# (result, usage.raw partition, positions in the message, events): a message's valid events of its key
_Owned = tuple["MeterResult", int, Sequence[int], "list[dict[str, Any]] | UsageColumns"]


def parts_by_size(items: Sequence[T], size: Callable[[T], int], limit: int) -> list[list[T]]:
    """`items` in order, cut into parts of at most `limit` total size (an item larger than the
    limit is a part of its own); no part is empty."""
    parts: list[list[T]] = []
    part: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if part and total + n > limit:
            parts.append(part)
            part, total = [], 0
        part.append(item)
        total += n
    if part:
        parts.append(part)
    return parts


@lru_cache(maxsize=65536)
def partition_for(key: str, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), so scope-keyed records from any producer co-partition."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


MAX_DEAD_LETTER_PAYLOAD = 1 << 20


def dead_letter_record(
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    payload: bytes,
    failed_at_us: int,
) -> dict[str, Any]:
    """A DeadLetter record of what could not be handled, and where it came from (partition and
    offset -1: not read from Kafka); a payload over MAX_DEAD_LETTER_PAYLOAD is cut, and the
    detail says so, so the letter fits a Kafka message too."""
    if len(payload) > MAX_DEAD_LETTER_PAYLOAD:
        detail += f" (payload cut to its first {MAX_DEAD_LETTER_PAYLOAD} of {len(payload)} bytes)"
        payload = payload[:MAX_DEAD_LETTER_PAYLOAD]
    return {
        "reason": reason,
        "detail": detail[:4000],
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key[:1000] if key else key,
        "payload": payload,
        "failed_at": failed_at_us,
    }


@dataclass(frozen=True)
class DeadLetter:
    reason: str  # undecodable | wrong_schema | invalid_event | cost_out_of_bounds | processing_error
    detail: str
    payload: bytes


@dataclass
class MeterResult:
    project: str | None = None  # the project of every priced event (= the message key)
    # PricedUsage records plus "index" (the event's position in the message): written as UsagePrice
    # records next to the message itself (PricedSource), which leaves out "usage" and "priced_at".
    priced: list[dict[str, Any]] = field(default_factory=list)
    usage: bytes = b""  # the usage.raw message value the priced events are in
    priced_at: int = 0
    # (scope, event minute) -> pico-USD and event count: what this message adds to each budget scope
    spend: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    # (scope, minute, pico-USD, events): spend that filled a delta up to MAX_DELTA_PICO
    full_deltas: list[tuple[str, int, int, int]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    rekey: list[tuple[str, bytes]] = field(default_factory=list)  # (project, UsageEvent message)
    # priced/fallback/unpriced, and duplicate (a copy of an event already counted: skipped)
    statuses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unbudgeted: int = 0  # events older than the dedupe horizon: priced and stored, no budget moved
    seen: list[int] = field(default_factory=list)  # dedupe keys of the events this message counted
    run: PricedRun | None = None  # the prices, when the events were priced as columns (not `priced`)

    @property
    def prices(self) -> Sequence[dict[str, Any]]:
        """The priced events' records, whichever path priced them."""
        return self.priced if self.run is None else self.run


class MeterStage:
    """Decode, validate, dedupe and price usage.raw messages; one bad event never costs another."""

    def __init__(
        self,
        catalogue: Catalogue,
        codec: Codec,
        model_globs: dict[str, list[str]] | None = None,
        budgeted: Container[str] = (),
        dedupe_horizon_us: int = DEDUPE_HORIZON_S * 1_000_000,
    ) -> None:
        self.catalogue = catalogue
        self.codec = codec
        self.model_globs = model_globs if model_globs is not None else {}  # project -> model-filter budgets
        # Scopes with a budget: org and project spend is always kept; team, user and key spend only
        # for budgeted scopes, or for every member of a kind with a template (`user:*`, `team:*`,
        # `key:*`): fanning out to every user of every message unasked would cost more than pricing.
        self.budgeted = budgeted
        self.dedupe_horizon_us = dedupe_horizon_us
        self.seen: dict[int, SeenIds] = {}  # usage.raw partition -> the event ids it counted
        self._check = DecodedUsageCheck()
        self._usage_batch = MAGIC + codec.fingerprint("UsageBatch")  # the header the native decoder reads

    def seen_ids(self, partition: int) -> SeenIds:
        seen = self.seen.get(partition)
        if seen is None:
            seen = self.seen[partition] = SeenIds(self.dedupe_horizon_us)
        return seen

    def process(self, key: bytes | None, value: bytes, now_us: int, partition: int = 0) -> MeterResult:
        """One usage.raw message (see process_many)."""
        return self.process_many([(partition, key, value)], now_us)[0]

    def process_many(
        self, messages: Sequence[tuple[int, bytes | None, bytes]], now_us: int
    ) -> list[MeterResult]:
        """(partition, key, value) of usage.raw messages in offset order -> one result each.

        Every event is validated on its own; an event that fails in any way (bad bytes, bad
        values, a bug) is dead-lettered with the reason and its neighbours are priced as usual.
        Copies of an event already counted (same project and event_id, within the dedupe horizon)
        are skipped; the ids are checked per partition for all messages together.
        """
        with cyclic_gc_paused():
            return self._process_many(messages, now_us)

    def _process_many(
        self, messages: Sequence[tuple[int, bytes | None, bytes]], now_us: int
    ) -> list[MeterResult]:
        results = [MeterResult(usage=value, priced_at=now_us) for _, _, value in messages]
        owned: list[_Owned] = []
        for result, (partition, key, value) in zip(results, messages, strict=True):
            indexes, events = self._events(key, value, now_us, result)
            if events:
                owned.append((result, partition, indexes, events))
        remembered: dict[tuple[Any, ...], list[str]] = {}

        def scopes(who: tuple[Any, ...]) -> list[str]:
            found = remembered.get(who)
            if found is None:
                found = remembered[who] = self._scopes(*who)
            return found

        dedupe_keys = self._dedupe(owned, now_us)
        by_columns = self._price_columns(owned, dedupe_keys, now_us, scopes)
        for (result, _, indexes, events), keys in zip(owned, dedupe_keys, strict=True):
            if id(result) in by_columns:
                continue
            if isinstance(events, UsageColumns):  # the native decoder's columns: now the records
                events = events.events
            for index, event, dedupe_key in zip(indexes, events, keys, strict=True):
                if dedupe_key is None:
                    result.statuses["duplicate"] += 1
                    continue
                try:
                    self._price_one(event, index, dedupe_key, now_us, result, scopes)
                except Exception as exc:  # a bug must cost this event only, and say so
                    result.dead.append(DeadLetter("processing_error", repr(exc)[:1000], self._single(event)))
        return results

    def _events(
        self, key: bytes | None, value: bytes, now_us: int, result: MeterResult
    ) -> tuple[Sequence[int], list[dict[str, Any]] | UsageColumns]:
        """(positions in the message, events) of the valid events of one message that belong to
        its key, dead letters and re-keys aside; as columns straight from the native decoder when
        it is built and the message is all valid, of its key, and long enough to price so."""
        if NATIVE and key is not None and value[:10] == self._usage_batch:
            columns = UsageColumns.of_message(
                value, now_us, lambda: self.codec.decode(value)[1]["events"], MIN_COLUMN_EVENTS
            )
            if columns is not None and columns.texts["project"][1] == [key.decode("utf-8", "replace")]:
                return range(len(columns)), columns
        try:
            name, record = self.codec.decode(value)
        except DecodeError as exc:
            result.dead.append(DeadLetter("undecodable", str(exc), value))
            return (), []
        if name == "UsageEvent":
            events = [record]
        elif name == "UsageBatch":
            events = record["events"]
        else:
            result.dead.append(
                DeadLetter("wrong_schema", f"usage.raw takes UsageEvent or UsageBatch, not {name}", value)
            )
            return (), []
        message_project = key.decode("utf-8", "replace") if key is not None else None
        all_valid, check = self._check.all_valid(events, now_us), self._check.problem
        if all_valid and set(map(_PROJECT, events)) == {message_project}:  # the common case
            return range(len(events)), events
        indexes, valid = [], []
        for index, event in enumerate(events):
            problem = None
            if not all_valid:  # find the invalid ones
                try:
                    problem = check(event, now_us)
                except Exception as exc:
                    problem = f"cannot be checked: {exc!r}"[:1000]
            if problem is not None:
                result.dead.append(DeadLetter("invalid_event", problem, self._single_or_raw(event, value)))
            elif event["project"] != message_project:
                # Spend is owned by the partition of key = project. An event sent under another key
                # (or none) is forwarded with the right key instead of being counted by the wrong owner.
                result.rekey.append((event["project"], self._single(event)))
            else:
                indexes.append(index)
                valid.append(event)
        return indexes, valid

    def _dedupe(self, owned: list[_Owned], now_us: int) -> list[list[int | None]]:
        """Per owned event (by message): its dedupe key if it is the first copy, None for a copy
        already counted, -1 for an event older than the horizon (it moves no budget, so it cannot
        count twice). The keys of a partition's events are made and looked up all at once."""
        oldest = now_us - self.dedupe_horizon_us
        keys: list[list[int | None]] = []
        # partition -> (keys of a message, the positions of its events within the horizon)
        fresh: dict[int, list[tuple[list[int | None], Sequence[int]]]] = defaultdict(list)
        # partition -> the project and event id of each of those events
        chosen: dict[int, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for _, partition, _, events in owned:  # the events of a message's key: one project
            if isinstance(events, UsageColumns):
                project, ids, times = events.texts["project"][1][0], events.event_ids, events.times
                young: Sequence[int] = (
                    range(len(events)) if times.min() >= oldest else np.flatnonzero(times >= oldest).tolist()
                )
            else:
                project, ids = events[0]["project"], list(map(_EVENT_ID, events))
                at = list(map(_EVENT_TIME, events))
                young = (
                    range(len(events)) if min(at) >= oldest else [i for i, t in enumerate(at) if t >= oldest]
                )
            message_keys: list[int | None] = [-1] * len(events)
            keys.append(message_keys)
            if young:
                fresh[partition].append((message_keys, young))
                projects, chosen_ids = chosen[partition]
                projects += [project] * len(young)
                chosen_ids += ids if len(young) == len(ids) else [ids[i] for i in young]
        for partition, members in fresh.items():
            batch = event_keys(*chosen[partition])
            found = zip(
                batch.tolist(), self.seen_ids(partition).first_seen(batch, now_us).tolist(), strict=True
            )
            for message_keys, young in members:
                for i, (key, first) in zip(young, found):  # noqa: B905 (`found` runs on over messages)
                    message_keys[i] = key if first else None
        return keys

    def _price_columns(
        self,
        owned: list[_Owned],
        dedupe_keys: list[list[int | None]],
        now_us: int,
        scopes: Callable[[tuple[Any, ...]], list[str]],
    ) -> set[int]:
        """Price the messages of at least MIN_COLUMN_EVENTS events as columns, all at once
        (meter_columns.py), into their results; the ids of the results priced (the rest is left
        untouched, for the per-event path)."""
        chosen = [
            (result, (columns.texts["project"][1][0], columns, indexes, keys))
            for (result, _, indexes, events), keys in zip(owned, dedupe_keys, strict=True)
            if len(events) >= MIN_COLUMN_EVENTS  # every owned event has its key's project
            for columns in [events if isinstance(events, UsageColumns) else UsageColumns.of_events(events)]
        ]
        if not chosen:
            return set()
        budgeted = Budgeted(self._member, lambda project: bool(self.model_globs.get(project)), scopes)
        try:
            found = price_columns(
                self.catalogue, budgeted, [message for _, message in chosen], now_us, MAX_DELTAS_PER_MESSAGE
            )
        except Exception:  # a bug here must not cost a single event: the per-event path prices them
            log.exception("pricing %d messages as columns failed; pricing them event by event", len(chosen))
            return set()
        done = set()
        for (result, (project, _, _, _)), pricing in zip(chosen, found, strict=True):
            if pricing is None:
                continue
            result.project = project
            result.run = pricing.run
            result.statuses["priced"] += len(pricing.run)
            if pricing.duplicates:
                result.statuses["duplicate"] += pricing.duplicates
            result.unbudgeted += pricing.unbudgeted
            result.seen = pricing.seen
            result.spend = pricing.spend
            done.add(id(result))
        return done

    def _price_one(
        self,
        event: dict[str, Any],
        index: int,
        dedupe_key: int,
        now_us: int,
        result: MeterResult,
        scopes_of: Callable[[tuple[Any, ...]], list[str]],
    ) -> None:
        """Price one valid event into `result`; `scopes_of` gives the scopes of a (project, team,
        user, key, model), remembered for one process_many call (budgets may change between calls)."""
        status, cost, card, itemised, reason = self.catalogue.price_fields(event)
        saved = 0
        if event.get("usage_source") == "cache":  # replayed from the gateway's cache: free, and what it saved
            saved, cost, itemised = cost or 0, 0, {}
        if cost is not None and cost > MAX_EVENT_PICO:
            result.dead.append(
                DeadLetter(
                    "cost_out_of_bounds",
                    f"cost {cost} pico-USD is above the maximum of {MAX_EVENT_PICO} "
                    "(1,000,000 USD) per event",
                    self._single(event),
                )
            )
            return
        project = event["project"]
        scopes: list[str] = []
        if cost and dedupe_key >= 0:  # unpriced (None) moves no budget, but is stored
            scopes = scopes_of(
                (project, event["team"], event["user"], event["tags"].get(KEY_TAG), event["model"])
            )
            minute = event["event_time"] // MINUTE_US
            if len(result.spend) + len(scopes) > MAX_DELTAS_PER_MESSAGE and any(
                (s, minute) not in result.spend for s in scopes
            ):
                result.dead.append(
                    DeadLetter(
                        "too_many_windows",
                        f"its message already spreads spend over {len(result.spend)} (scope, minute) "
                        f"pairs, the most one message may; send events of far-apart times separately",
                        self._single(event),
                    )
                )
                return
        result.project = project
        result.statuses[status] += 1
        result.priced.append(
            {
                "index": index,
                "usage": event,
                "cost_pico_usd": cost,
                "price_card": card.id if card else "",
                "priced_at": now_us,
                "pricing_status": status,
                "card_version": card.version if card else "",
                "itemised": itemised,
                "unpriced_reason": reason,
                "saved_pico_usd": saved,
            }
        )
        if dedupe_key < 0:
            result.unbudgeted += 1
            return
        result.seen.append(dedupe_key)
        cost = cost or 0  # scopes is empty when unpriced
        spend = result.spend
        for scope in scopes:
            slot = spend.get((scope, minute))
            if slot is None:
                spend[(scope, minute)] = [cost, 1]
            elif slot[0] + cost > MAX_DELTA_PICO:  # a delta is an Avro long
                result.full_deltas.append((scope, minute, slot[0], slot[1]))
                slot[0], slot[1] = cost, 1
            else:
                slot[0] += cost
                slot[1] += 1

    def _scopes(
        self, project: str, team: str | None, user: str | None, key: str | None, model: str
    ) -> list[str]:
        """The budget scopes an event of these counts against (see `budgeted` in __init__)."""
        team = team if team and self._member("team", team) else None
        user = user if user and self._member("user", user) else None
        key = key if key and self._member("key", key) else None
        return scopes_for_event(project, team, user, model, self.model_globs.get(project, ()), key)

    def _member(self, kind: str, member: str) -> bool:
        """Does this team, user or key count spend: a budget of its own or of every member?"""
        return f"{kind}:*" in self.budgeted or f"{kind}:{member}" in self.budgeted

    def _single(self, event: dict[str, Any]) -> bytes:
        return self.codec.encode("UsageEvent", event)

    def _single_or_raw(self, event: dict[str, Any], raw: bytes) -> bytes:
        """The event alone as a UsageEvent message, or the whole message if it cannot be encoded."""
        try:
            return self._single(event)
        except Exception:
            return raw


class MeterBatch:
    """The output of the usage.raw messages the meter took together, coalesced per destination.

    Spend deltas keep the usage.raw message they came from (source partition and offset): after a
    crash the meter re-reads from its last commit and forms different batches, and the budget
    agent can still apply each usage.raw message to each scope exactly once.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.priced: dict[str, list[dict[str, Any]]] = defaultdict(list)  # project -> PricedSource records
        self.deltas: dict[int, list[dict[str, Any]]] = defaultdict(list)  # spend.deltas partition -> deltas
        self._starts: dict[int, list[int]] = defaultdict(list)  # where each source message's deltas start
        # usage.raw partition -> (offsets, dedupe keys) of the events counted: for usage.seen
        self.seen: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))

    def add(self, result: MeterResult, source_partition: int, source_offset: int) -> None:
        if result.project is not None:
            self.priced[result.project].append(
                {"usage": result.usage, "priced_at": result.priced_at, "prices": result.prices}
            )
        if result.seen:
            offsets, keys = self.seen[source_partition]
            offsets.extend([source_offset] * len(result.seen))
            keys.extend(result.seen)
        spend = [(s, m, p, c) for (s, m), (p, c) in result.spend.items()]
        marked: set[int] = set()
        for scope, minute, pico, count in result.full_deltas + spend:
            partition = partition_for(scope, self.partitions)
            if partition not in marked:
                marked.add(partition)
                self._starts[partition].append(len(self.deltas[partition]))
            self.deltas[partition].append(
                {
                    "scope": scope,
                    "minute": minute,
                    "pico_usd": pico,
                    "events": count,
                    "source_partition": source_partition,
                    "source_offset": source_offset,
                }
            )

    def delta_batches(self) -> list[tuple[int, list[dict[str, Any]]]]:
        """(spend.deltas partition, deltas) per message: at most MAX_DELTAS_PER_MESSAGE deltas each,
        cut only between source messages (a scope applies a source message's deltas together)."""
        out = []
        for partition, deltas in self.deltas.items():
            cuts = [*self._starts[partition], len(deltas)]
            first = 0
            for start, end in pairwise(cuts):
                if end - first > MAX_DELTAS_PER_MESSAGE and start > first:
                    out.append((partition, deltas[first:start]))
                    first = start
            out.append((partition, deltas[first:]))
        return out

    def seen_records(self) -> list[tuple[int, dict[str, Any]]]:
        """(usage.raw partition, SeenIds record): the ids counted, for a restarted meter to re-load."""
        return [
            (
                partition,
                {
                    "source_partition": partition,
                    "offsets": np.array(offsets, dtype="<i8").tobytes(),
                    "ids": np.array(keys, dtype="<u8").tobytes(),
                },
            )
            for partition, (offsets, keys) in self.seen.items()
        ]

    def priced_batches(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """(project, PricedSource records) per PricedBatch message: whole sources, cut before a
        source that would take a message past PRICED_BATCH_EVENTS priced events."""
        out = []
        for project, sources in self.priced.items():
            chunk: list[dict[str, Any]] = []
            events = 0
            for source in sources:
                if chunk and events + len(source["prices"]) > PRICED_BATCH_EVENTS:
                    out.append((project, chunk))
                    chunk, events = [], 0
                chunk.append(source)
                events += len(source["prices"])
            out.append((project, chunk))
        return out
