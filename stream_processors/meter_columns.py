"""The meter's path for whole messages: the valid events of one usage.raw message priced as columns.

The per-event path (`MeterStage._price_one`) spends ~10 us of Python per event on what is the
same arithmetic for every event of a card: look up the card, multiply each count by its rate,
build a record, write it as Avro, add the cost to each scope's spend. Here a message's events are
turned into numpy columns once (counts, times, price keys), each card's events are priced with one
multiplication per meter, the spend is summed per (scope, minute) with one `np.add.at`, and the
UsagePrice records are written as Avro all at once (`records_avro`). No record is built per
event; `PricedRun` makes them only when asked (a fallback, a test).

This path takes only what it can price exactly as the per-event path would, and hands the
message back (None) for everything else, which the per-event path then prices: a model without a
card (fallback and unpriced), a card changing price within the message, image prices by size,
audio seconds, a sum that might not fit 64 bits, a cost above the maximum, a message spreading
over too many windows. tests/test_meter_columns.py checks that both paths give the same result,
byte for byte, on generated messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, overload

import numpy as np

from spendstream.errors import UnknownModel
from spendstream.usage import MAX_EVENT_PICO
from spendstream.wire import avro_long
from stream_processors.budgets import MINUTE_US
from stream_processors.priced_writer import BytesField, LongField, records_avro
from stream_processors.pricing import Catalogue, PriceCard
from stream_processors.usage_columns import COUNT_COLUMN, UsageColumns

__all__ = ["MIN_COLUMN_EVENTS", "Budgeted", "ColumnPricing", "Owned", "PricedRun", "price_columns"]

MIN_COLUMN_EVENTS = 16  # fewer events per message: the per-event path (numpy's cost per call)
_PRICE_KEY = ("provider", "model", "region", "service_tier")
_IMAGES = COUNT_COLUMN["images"]
_LONG_CONTEXT_INPUT = np.array(
    [
        COUNT_COLUMN[f]
        for f in (
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "cache_write_1h_tokens",
            "input_audio_tokens",
        )
    ]
)
_LIMIT = 2**63
MAX_SUM_PICO = 2**62  # a message's spend at most (one spend delta, see meter.MAX_DELTA_PICO)
_PRICED_STATUS = avro_long(len(b"priced")) + b"priced"


def _text(value: str) -> bytes:
    raw = value.encode()
    return avro_long(len(raw)) + raw


class PricedRun(Sequence[dict[str, Any]]):
    """The prices of one usage.raw message's events, priced together: its UsagePrice records
    written as Avro (`avro`, what the PricedBatch writer sends), and the per-event path's
    records made from the columns when read (`run[i]`, iteration)."""

    def __init__(
        self,
        columns: UsageColumns,
        index: np.ndarray,
        cost: np.ndarray,
        saved: np.ndarray,
        card: np.ndarray,
        cards: list[PriceCard],
        itemised: list[tuple[np.ndarray, np.ndarray]],
        meters: list[str],
        priced_at: int,
        avro: bytes,
    ) -> None:
        self.columns, self.positions, self.cost, self.saved = columns, index, cost, saved
        self.card, self.cards, self.itemised, self.meters = card, cards, itemised, meters
        self.priced_at, self.avro = priced_at, avro

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        card = self.cards[int(self.card[i])]
        return {
            "index": int(self.positions[i]),
            "usage": self.columns.events[i],
            "cost_pico_usd": int(self.cost[i]),
            "price_card": card.id,
            "priced_at": self.priced_at,
            "pricing_status": "priced",
            "card_version": card.version,
            "itemised": {self.meters[m[i]]: int(v[i]) for m, v in self.itemised if m[i] >= 0},
            "unpriced_reason": "",
            "saved_pico_usd": int(self.saved[i]),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


@dataclass
class ColumnPricing:
    """What `price_columns` found for a message: its prices, spend, and counted ids."""

    run: PricedRun
    spend: dict[tuple[str, int], list[int]]  # (scope, minute) -> [pico-USD, events]
    seen: list[int]  # dedupe keys of the events counted, in order
    duplicates: int
    unbudgeted: int


# One message's valid events of its key: project, the events as columns, their positions in the
# message, their dedupe keys (None: a copy already counted; -1: older than the dedupe horizon).
Owned = tuple[str, UsageColumns, Sequence[int], list[int | None]]


@dataclass(frozen=True)
class Budgeted:
    """What of an event decides its budget scopes beyond its project (see MeterStage.budgeted)."""

    member: Callable[[str, str], bool]  # (kind, id): does a team, user or key have a budget?
    model_globs: Callable[[str], bool]  # project: does it have model-filtered budgets?
    scopes: Callable[[tuple[Any, ...]], list[str]]  # (project, team, user, key, model) -> scopes


def price_columns(
    catalogue: Catalogue,
    budgeted: Budgeted,
    messages: list[Owned],
    now_us: int,
    max_windows: int,
) -> list[ColumnPricing | None]:
    """Price the events of several messages at once; per message its pricing, or None where the
    per-event path must price it (see the module doc), as for one whose spend spreads over more
    than `max_windows` (scope, minute) pairs."""
    out: list[ColumnPricing | None] = [None] * len(messages)
    parts: list[UsageColumns] = []
    keys: list[int | None] = []
    positions: list[Sequence[int]] = []
    taken: list[int] = []  # the messages priced here, in order
    duplicates: list[int] = []
    for m, (_, columns, indexes, message_keys) in enumerate(messages):
        kept = [i for i, key in enumerate(message_keys) if key is not None]
        if not kept:
            continue
        if len(kept) < len(message_keys):
            columns = columns.rows(np.array(kept))
            message_keys = [message_keys[i] for i in kept]
            indexes = [indexes[i] for i in kept]
        parts.append(columns)
        keys += message_keys
        positions.append(indexes)
        taken.append(m)
        duplicates.append(len(messages[m][3]) - len(kept))
    if not parts:
        return out
    c = UsageColumns.joined(parts)
    n = len(c)
    starts = np.cumsum([0, *map(len, parts)])
    message_of = np.repeat(np.arange(len(parts)), list(map(len, parts)))
    index = np.fromiter(chain.from_iterable(positions), np.int64, n)
    # An event this path cannot price sends its whole message down the per-event path.
    bad = c.audio != 0
    counts = c.counts

    cost = np.zeros(n, dtype=np.int64)
    cards: list[PriceCard] = []
    card = np.zeros(n, dtype=np.int64)
    meter_code: dict[str, int] = {}
    priced_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # rows, their meters, costs
    for key, rows in _groups(c, _PRICE_KEY):
        at = c.times[rows]
        try:
            found = catalogue.card_in_force(key, int(at.min()))
        except UnknownModel:  # fallback cards and unpriced events: the per-event path
            bad[rows] = True
            continue
        if not found.covers(int(at.max())):  # a price change among these events
            bad[rows] = True
            continue
        if found.image_rates:  # priced by size and quality
            bad[rows[counts[rows, _IMAGES] > 0]] = True
        card[rows] = len(cards)
        cards.append(found)
        tables = [(rows, found.rates)]
        if found.long_context_above is not None:
            long = counts[np.ix_(rows, _LONG_CONTEXT_INPUT)].sum(axis=1) > found.long_context_above
            tables = [(rows[~long], found.rates), (rows[long], found.long_context_rates)]
        for part, rates in tables:
            priced = [(m, COUNT_COLUMN[f], r) for m, f, r in rates if f in COUNT_COLUMN]
            if not len(part) or not priced:
                continue
            quantities = counts[np.ix_(part, np.array([col for _, col, _ in priced]))]
            top = sum(int(q) * r for q, (_, _, r) in zip(quantities.max(axis=0), priced, strict=True))
            if top >= _LIMIT:  # might overflow int64: the per-event path has Python's integers
                bad[part] = True
                continue
            costs = quantities * np.array([r for _, _, r in priced], dtype=np.int64)
            cost[part] = costs.sum(axis=1)
            ids = np.array([meter_code.setdefault(m, len(meter_code)) for m, _, _ in priced], dtype=np.int64)
            priced_parts.append((part, np.where(quantities != 0, ids, -1), costs))
    source_codes, sources = c.texts["usage_source"]
    cache = np.array([s == "cache" for s in sources], dtype=bool)[source_codes]
    saved = np.where(cache, cost, 0)  # a replay from the gateway's cache is free: what it saved
    cost = np.where(cache, 0, cost)
    bad |= cost > MAX_EVENT_PICO  # dead letters: the per-event path writes them

    # The itemised map of each event: its non-zero meters in its card's order, as slots 0, 1, ...
    width = max((int((m >= 0).sum(axis=1).max()) for _, m, _ in priced_parts if len(m)), default=0)
    slot_meter = np.full((n, width), -1, dtype=np.int64)
    slot_cost = np.zeros((n, width), dtype=np.int64)
    for part, which, costs in priced_parts:
        present = (which >= 0) & ~cache[part][:, None]
        slot = np.cumsum(present, axis=1) - 1
        r, col = np.nonzero(present)
        slot_meter[part[r], slot[r, col]] = which[r, col]
        slot_cost[part[r], slot[r, col]] = costs[r, col]
    items = (slot_meter >= 0).sum(axis=1)

    good = np.logical_or.reduceat(bad, starts[:-1]) == 0
    counted = np.fromiter(map((-1).__ne__, keys), bool, n) & (cost > 0)  # what moves a budget
    # A message whose spend might not fit a spend delta: the per-event path splits it.
    top = np.maximum.reduceat(np.where(counted, cost, 0), starts[:-1]).tolist()
    number = np.add.reduceat(counted.astype(np.int64), starts[:-1]).tolist()
    good &= np.array([t * k < MAX_SUM_PICO for t, k in zip(top, number, strict=True)])
    if not good.any():
        return out
    projects = [messages[m][0] for m in taken]
    spends = _spend(budgeted, projects, c, message_of, cost, counted & good[message_of])
    meters = list(meter_code)
    avro, ends = _avro(index, cost, saved, card, cards, items, slot_meter, slot_cost, meters)
    itemised = [(slot_meter[:, s], slot_cost[:, s]) for s in range(width)]
    for t, m in enumerate(taken):
        spend = spends.get(t, {})
        if not good[t] or len(spend) > max_windows:
            continue
        first, last = int(starts[t]), int(starts[t + 1])
        here = slice(first, last)
        run = PricedRun(
            parts[t],
            index[here],
            cost[here],
            saved[here],
            card[here],
            cards,
            [(meter[here], pico[here]) for meter, pico in itemised],
            meters,
            now_us,
            avro[ends[first - 1] if first else 0 : ends[last - 1]],
        )
        seen = [key for key in keys[here] if key is not None and key >= 0]
        out[m] = ColumnPricing(run, spend, seen, duplicates[t], last - first - len(seen))
    return out


def _groups(c: UsageColumns, fields: Sequence[str]) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
    """(values of `fields`, the rows that have them) for each distinct combination in `c`."""
    group = _group_codes([c.texts[f][0] for f in fields])
    order = np.argsort(group, kind="stable")
    bounds = np.cumsum(np.bincount(group))
    for g, end in enumerate(bounds.tolist()):
        rows = order[bounds[g - 1] if g else 0 : end]
        first = int(rows[0])
        yield tuple(c.texts[f][1][c.texts[f][0][first]] for f in fields), rows


def _group_codes(codes: Sequence[np.ndarray]) -> np.ndarray:
    """0, 1, ... per distinct combination of `codes` (non-negative int64 columns) per row."""
    group = codes[0]
    for more in codes[1:]:
        _, group = np.unique(group * (int(more.max()) + 1) + more, return_inverse=True)
    if len(codes) == 1:
        _, group = np.unique(group, return_inverse=True)
    return group


def _spend(
    budgeted: Budgeted,
    projects: list[str],
    c: UsageColumns,
    message_of: np.ndarray,
    cost: np.ndarray,
    counted: np.ndarray,
) -> dict[int, dict[tuple[str, int], list[int]]]:
    """Per message (by position in `projects`): (scope, minute) -> [pico-USD, events] of its
    `counted` events. A team, user, key or model that decides no scope is left out first, so the
    events are summed per distinct (scopes, minute): Python runs per group, not per event."""
    rows = np.flatnonzero(counted)
    spends: dict[int, dict[tuple[str, int], list[int]]] = {}
    if not len(rows):
        return spends
    deciding: list[np.ndarray] = [message_of[rows]]
    values: list[list[Any]] = []
    for kind, field in (("team", "team"), ("user", "user"), ("key", "key")):
        codes, distinct = c.texts[field]
        keep = [v if v and budgeted.member(kind, v) else None for v in distinct]
        values.append([*keep, None])
        deciding.append(
            np.array([i if v is not None else len(keep) for i, v in enumerate(keep)])[codes[rows]]
        )
    codes, distinct = c.texts["model"]
    with_globs = np.array([budgeted.model_globs(p) for p in projects], dtype=bool)[message_of[rows]]
    values.append([*distinct, None])
    deciding.append(np.where(with_globs, codes[rows], len(distinct)))
    minutes, minute_of = np.unique(c.times[rows] // MINUTE_US, return_inverse=True)
    group = _group_codes([*deciding, minute_of])
    sums = np.zeros(int(group.max()) + 1, dtype=np.int64)
    np.add.at(sums, group, cost[rows])
    numbers = np.bincount(group).tolist()
    _, first = np.unique(group, return_index=True)
    for g, at in enumerate(first.tolist()):
        message = int(deciding[0][at])
        team, user, key, model = (v[int(d[at])] for v, d in zip(values, deciding[1:], strict=True))
        minute = int(minutes[minute_of[at]])
        spend = spends.setdefault(message, {})
        pico, number = int(sums[g]), numbers[g]
        for scope in budgeted.scopes((projects[message], team, user, key, model or "")):
            slot = spend.get((scope, minute))
            if slot is None:
                spend[(scope, minute)] = [pico, number]
            else:
                slot[0] += pico
                slot[1] += number
    return spends


def _avro(
    index: np.ndarray,
    cost: np.ndarray,
    saved: np.ndarray,
    card: np.ndarray,
    cards: list[PriceCard],
    items: np.ndarray,
    slot_meter: np.ndarray,
    slot_cost: np.ndarray,
    meters: list[str],
) -> tuple[bytes, list[int]]:
    """The UsagePrice records, Avro: index, cost (a non-null union), card, status, version, the
    itemised map (its count, then meter and cost per slot), the end of the map and the (empty)
    reason, the saving."""
    width = slot_meter.shape[1]
    # (card, number of items) -> the card's strings and the map's count
    heads = [
        _text(c.id) + _PRICED_STATUS + _text(c.version) + avro_long(k)
        for c in cards
        for k in range(width + 1)
    ]
    fields: list[LongField | BytesField] = [
        (index, None),
        ([b"\x02"], np.zeros(len(index), dtype=np.int64)),
        (cost, None),
        (heads, card * (width + 1) + items),
    ]
    names = [*map(_text, meters), b""]  # no meter in this slot (-1): the last, empty
    for s in range(width):
        present = slot_meter[:, s] >= 0
        fields += [(names, np.where(present, slot_meter[:, s], len(meters))), (slot_cost[:, s], present)]
    fields += [([b"\x00", b"\x00\x00"], (items > 0).astype(np.int64)), (saved, None)]
    return records_avro(len(index), fields)
