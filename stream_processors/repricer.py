"""Re-pricing history: recompute costs from the raw usage stored in ClickHouse.

`reprice()` reads the events of a time range (optionally one model) with every meter, prices each
with the current catalogue at the event's own time, and writes the results to `usage_repriced`
under a new pricing version. `usage_events` is never modified: the price charged when the event
streamed through stays on record. Events that were unpriced or charged at a fallback get their
real price once a card exists. Calls served from the gateway's cache cost nothing at any price and
are left out. The report gives the delta per project and model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from spendstream.usage import COUNT_FIELDS
from stream_processors.pricing import Catalogue, pico_to_usd, usd_to_pico
from stream_processors.store import ClickHouseStore

__all__ = ["RepriceReport", "reprice"]

log = logging.getLogger(__name__)

_METER_COLUMNS = COUNT_FIELDS  # every meter column, in UsageEvent order
_REPRICED_COLUMNS = (
    "pricing_version",
    "event_id",
    "event_time",
    "project",
    "provider",
    "model",
    "cost_usd",
    "previous_cost_usd",
    "price_card",
    "card_version",
    "pricing_status",
    "itemised",
)
_BATCH = 50_000


@dataclass
class Delta:
    events: int = 0
    previous_pico: int = 0
    new_pico: int = 0
    previously_unknown: int = 0  # events that were unpriced or at a fallback before
    still_unknown: int = 0  # events without their own price now


@dataclass
class RepriceReport:
    pricing_version: int
    events: int
    by_project_model: dict[tuple[str, str], Delta] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (project, model), d in sorted(self.by_project_model.items()):
            out.append(
                {
                    "project": project,
                    "model": model,
                    "events": d.events,
                    "previous_usd": str(pico_to_usd(d.previous_pico)),
                    "new_usd": str(pico_to_usd(d.new_pico)),
                    "delta_usd": str(pico_to_usd(d.new_pico - d.previous_pico)),
                    "newly_priced": d.previously_unknown - d.still_unknown if d.previously_unknown else 0,
                    "still_without_price": d.still_unknown,
                }
            )
        return out


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def reprice(
    store: ClickHouseStore,
    catalogue: Catalogue,
    start_us: int,
    end_us: int,
    model: str | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> RepriceReport:
    """Re-price events with start_us <= event_time < end_us; returns the per project/model delta."""
    db = store.database
    version_rows = store.query(f"SELECT max(pricing_version) FROM {db}.pricing_runs").rows
    version = max(1, int(version_rows[0][0] or 0)) + 1
    where = (
        f"e.event_time >= fromUnixTimestamp64Micro({start_us}, 'UTC') "
        f"AND e.event_time < fromUnixTimestamp64Micro({end_us}, 'UTC')"
    )
    if model:
        where += f" AND e.model = {_quote(model)}"
    where += " AND e.usage_source != 'cache'"  # a cache hit costs nothing at any price
    meters = ", ".join(f"e.{c}" for c in _METER_COLUMNS)
    sql = (
        f"SELECT toString(e.event_id), toUnixTimestamp64Micro(e.event_time), e.project, e.provider, e.model, "
        f"{meters}, e.audio_seconds, e.image_size, e.image_quality, e.service_tier, e.region, "
        f"l.cost_usd, l.pricing_status "
        f"FROM {db}.usage_events AS e FINAL "
        f"LEFT JOIN {db}.usage_cost_latest AS l ON e.event_id = l.event_id "
        f"WHERE {where} ORDER BY e.event_time"
    )
    rows = store.query(sql).rows
    report = RepriceReport(version, len(rows))
    batch: list[tuple[Any, ...]] = []
    previous_total = new_total = 0
    for i, row in enumerate(rows, 1):
        event_id, event_time, project, provider, model_id = row[:5]
        event: dict[str, Any] = dict(zip(_METER_COLUMNS, row[5:16], strict=True))
        event.update(
            event_time=event_time,
            provider=provider,
            model=model_id,
            audio_seconds=Decimal(row[16]),
            image_size=row[17],
            image_quality=row[18],
            service_tier=row[19],
            region=row[20],
        )
        previous_cost, previous_status = row[21], row[22]
        priced = catalogue.price(event)
        delta = report.by_project_model.setdefault((project, model_id), Delta())
        delta.events += 1
        previous_pico = usd_to_pico(previous_cost) if previous_cost is not None else 0
        delta.previous_pico += previous_pico
        delta.new_pico += priced.cost_pico or 0
        previous_total += previous_pico
        new_total += priced.cost_pico or 0
        delta.previously_unknown += previous_status != "priced"
        delta.still_unknown += priced.status != "priced"
        card = priced.card
        batch.append(
            (
                version,
                event_id,
                event_time,
                project,
                provider,
                model_id,
                None if priced.cost_pico is None else pico_to_usd(priced.cost_pico),
                previous_cost,
                card.id if card else "",
                card.version if card else "",
                priced.status,
                {m: pico_to_usd(v) for m, v in priced.itemised.items()},
            )
        )
        if len(batch) >= _BATCH:
            store.insert("usage_repriced", batch, _REPRICED_COLUMNS)
            batch = []
            progress(i)
    if batch:
        store.insert("usage_repriced", batch, _REPRICED_COLUMNS)
    progress(len(rows))
    store.insert(
        "pricing_runs",
        [
            (
                version,
                time.time_ns() // 1000,
                start_us,
                end_us,
                model or "",
                len(catalogue),
                len(rows),
                pico_to_usd(previous_total),
                pico_to_usd(new_total),
            )
        ],
        (
            "pricing_version",
            "started_at",
            "range_from",
            "range_to",
            "model_filter",
            "catalogue_cards",
            "events",
            "previous_total_usd",
            "new_total_usd",
        ),
    )
    log.info("re-priced %d events as pricing version %d", len(rows), version)
    return report
