"""UTC calendar windows by event time, the once-per-crossing rule, and the budget file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.errors import ConfigError
from stream_processors.budgets import PERIODS, BudgetBook, Period, crossed, utc_from_micros, window_for


def us(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> int:
    dt = datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def test_day_boundary() -> None:
    assert window_for("daily", us(2026, 11, 27, 23, 59, 59, 999_999)).id == "day:2026-11-27"
    assert window_for("daily", us(2026, 11, 28)).id == "day:2026-11-28"


def test_event_exactly_at_midnight_belongs_to_the_new_day_and_month() -> None:
    midnight = us(2026, 12, 1)
    day, month = window_for("daily", midnight), window_for("monthly", midnight)
    assert (day.id, month.id) == ("day:2026-12-01", "month:2026-12")
    assert day.start_us == month.start_us == midnight
    assert window_for("monthly", midnight - 1).id == "month:2026-11"
    assert window_for("monthly", midnight - 1).end_us == midnight


def test_month_and_year_boundaries_and_leap_february() -> None:
    dec = window_for("monthly", us(2026, 12, 31, 12))
    assert dec.id == "month:2026-12"
    assert dec.end_us == us(2027, 1, 1)
    feb = window_for("monthly", us(2028, 2, 29, 23))
    assert (feb.id, feb.start_us, feb.end_us) == ("month:2028-02", us(2028, 2, 1), us(2028, 3, 1))


instants = st.integers(min_value=us(2000, 1, 1), max_value=us(2100, 1, 1))


@settings(max_examples=500)
@given(t=instants, period=st.sampled_from(PERIODS))
def test_window_contains_the_instant_and_windows_tile(t: int, period: Period) -> None:
    w = window_for(period, t)
    assert w.start_us <= t < w.end_us
    assert window_for(period, w.end_us).start_us == w.end_us  # the next window starts where this ends
    assert window_for(period, w.start_us - 1).end_us == w.start_us
    start = utc_from_micros(w.start_us)
    assert (start.hour, start.minute, start.second, start.microsecond) == (0, 0, 0, 0)
    if period == "monthly":
        assert start.day == 1
        assert w.id == f"month:{start:%Y-%m}"
    else:
        assert w.end_us - w.start_us == 86_400 * 10**6
        assert w.id == f"day:{start:%Y-%m-%d}"


@settings(max_examples=500)
@given(
    deltas=st.lists(st.integers(min_value=0, max_value=10**9), max_size=60),
    limit=st.integers(min_value=1, max_value=10**10),
)
def test_exactly_one_crossing_when_spend_reaches_the_limit(deltas: list[int], limit: int) -> None:
    spend, crossings = 0, 0
    for d in deltas:
        crossings += crossed(spend, spend + d, limit)
        spend += d
    assert crossings == (1 if spend >= limit else 0)


def test_crossing_is_at_or_above_the_limit() -> None:
    assert crossed(99, 100, 100)
    assert not crossed(100, 150, 100)  # already over: not a new crossing
    assert not crossed(98, 99, 100)


def test_budget_file_yaml_and_toml(tmp_path: Path) -> None:
    y = tmp_path / "b.yaml"
    y.write_text('budgets:\n  project:checkout: {daily: "50.25", monthly: 1000}\n')
    book = BudgetBook.load(y)
    assert sorted((b.period, b.limit_pico_usd) for b in book.for_scope("project:checkout")) == [
        ("daily", 50_250_000_000_000),
        ("monthly", 1_000_000_000_000_000),
    ]
    t = tmp_path / "b.toml"
    t.write_text('[budgets."project:search"]\nmonthly = "0.01"\n')
    assert [b.limit_pico_usd for b in BudgetBook.load(t).for_scope("project:search")] == [10_000_000_000]
    assert BudgetBook.load(None).for_scope("project:x") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("budgets: [1, 2]", "top-level 'budgets' mapping"),
        ("budgets:\n  checkout: {daily: 1}", "must look like project:<id>"),
        ("budgets:\n  project:a: {weekly: 1}", "period 'weekly'"),
        ("budgets:\n  project:a: {daily: -5}", "must be positive"),
        ("budgets:\n  project:a: {daily: abc}", "not a decimal amount"),
        ("budgets:\n  project:a: {}", "needs limits"),
        ("budgets: {project:a: [", "is not valid"),
    ],
)
def test_bad_budget_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        BudgetBook.load(path)


def test_missing_budget_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read budgets file"):
        BudgetBook.load(tmp_path / "nope.yaml")
