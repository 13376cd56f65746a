"""The dashboard's and the report's arithmetic without a broker: money formatting, periods as
half-open UTC ranges, groupings that cannot carry SQL, budget use, cache savings on embedded
ClickHouse."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producers import build_event
from spendstream.cli.dashboard import data
from spendstream.cli.dashboard.svg import money
from spendstream.cli.report import chargeback, render_csv
from spendstream.errors import ConfigError
from stream_processors.sink import usage_row
from stream_processors.store import USAGE_COLUMNS, ClickHouseStore, QueryResult
from tests.conftest import REPO


@given(st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("1e9"), places=12, allow_nan=False))
def test_money_is_the_amount_to_the_cent_or_its_own_digits_below_a_cent(amount: Decimal) -> None:
    text = money(amount)
    value = Decimal(text.replace("$", "").replace(",", ""))
    if abs(amount) >= Decimal("0.005") or amount == 0:
        assert value == amount.quantize(Decimal("0.01"))
    else:
        assert value == amount  # never $0.00 for a non-zero amount


def test_periods_are_half_open_utc_ranges() -> None:
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert data.period("2026-11").start == datetime(2026, 11, 1, tzinfo=UTC)
    assert data.period("2026-11").end == datetime(2026, 12, 1, tzinfo=UTC)
    assert data.period("2026-12").end == datetime(2027, 1, 1, tzinfo=UTC)
    assert data.period("last-month", now).start == datetime(2026, 11, 1, tzinfo=UTC)
    assert len(data.period("today", now).buckets()) == 24
    assert len(data.period("7d", now).buckets()) == 7
    assert data.period("7d", now).end == datetime(2027, 1, 1, tzinfo=UTC)
    r = data.date_range(date(2026, 11, 3), date(2026, 11, 3))
    assert (r.start, r.end) == (datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC))
    for bad in ("2026-13", "yesterday", "2026-1"):
        with pytest.raises(ConfigError):
            data.period(bad)
    with pytest.raises(ConfigError, match="before"):
        data.date_range(date(2026, 11, 3), date(2026, 11, 2))


def test_groupings_take_no_sql() -> None:
    assert data.grouping("tag:feature").expr == "if(mapContains(tags, 'feature'), tags['feature'], '(none)')"
    for bad in ("tag:a' OR 1=1 --", "tag:", "cost_usd", "project; DROP"):
        with pytest.raises(ConfigError, match="tag:KEY"):
            data.grouping(bad)
    assert data.grouping("project").filter("o'brien") == "project = 'o\\'brien'"


def test_chargeback_totals_shares_and_budget_use() -> None:
    rows: list[list[Any]] = [["web", "61.712600600000", 9, 0, 0], ["research", None, 1, 1, 0]]
    queries: list[str] = []

    def run(sql: str) -> QueryResult:
        queries.append(sql)
        return QueryResult(["label", "usd", "events", "unpriced", "fallback"], rows)

    report = chargeback(run, data.period("2026-11"), data.grouping("team"), {"team:web": Decimal(100)})
    assert "usage_events FINAL" in queries[0]
    assert report.total_usd == Decimal("61.7126006")
    assert report.lines[0].budget_use == Decimal("0.617126006")
    assert report.lines[1].unpriced_share == 1
    assert render_csv(report).splitlines()[-1] == "TOTAL,61.712600600000,10,1,,,,"
    other = chargeback(
        run,
        data.date_range(date(2026, 11, 1), date(2026, 11, 10)),
        data.grouping("team"),
        {"team:web": Decimal(100)},
    )
    assert other.lines[0].budget_use is None  # budget use only for a calendar month


def test_cache_savings_sum_what_the_hits_would_have_cost() -> None:
    store = ClickHouseStore(f"chdb://{REPO / '.spendstream' / 'test-chdb'}", f"s_{uuid.uuid4().hex[:12]}")
    try:
        store.migrate()
        when = data.period("2026-12")
        hits = [usage_row({**_priced("alpha", 0), "saved_pico_usd": 123}) for _ in range(2)]
        store.insert("usage_events", [usage_row(_priced("alpha", 10**12)), *hits], USAGE_COLUMNS)
        assert data.cache_savings(store.user_query, when) == [("alpha", Decimal("0.000000000246"), 2)]
    finally:
        store.close()


def _priced(project: str, pico: int) -> dict[str, Any]:
    usage = build_event(
        service="svc",
        project=project,
        provider="openai",
        model="gpt-4o",
        input_tokens=1,
        output_tokens=0,
        event_time=datetime(2026, 12, 2, 10, 0, tzinfo=UTC),
    )
    return {
        "usage": usage,
        "cost_pico_usd": pico,
        "price_card": "c",
        "priced_at": 1_796_220_000_000_000,
        "pricing_status": "priced",
        "card_version": "v",
        "itemised": {},
        "unpriced_reason": "",
        "saved_pico_usd": 0,
    }
