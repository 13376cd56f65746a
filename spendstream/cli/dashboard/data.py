"""The numbers the dashboard and `spendstream report` show, as SQL over the history.

Every total is `sum(cost_usd)` over `usage_events FINAL` (a re-delivered event counts once) in a
half-open UTC range [start, end), returned as an exact `Decimal`: what a person gets by running the
same SQL, to the last pico-USD. Unpriced events (cost_usd NULL) are counted, never summed as zero.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from spendstream.cli.reads import sql_literal
from spendstream.errors import ConfigError
from stream_processors.store import QueryResult

__all__ = [
    "GROUPINGS",
    "NONE_LABEL",
    "PERIODS",
    "DeadLetters",
    "GroupTotal",
    "Grouping",
    "Period",
    "PricingGap",
    "Query",
    "Series",
    "as_usd",
    "cache_savings",
    "date_range",
    "dead_letters",
    "grouping",
    "over_time",
    "period",
    "pricing_gaps",
    "total",
    "totals",
]

Query = Callable[[str], QueryResult]

PERIODS = ("today", "24h", "7d", "30d", "month", "last-month")
GROUPINGS = ("project", "team", "model", "user", "tag:KEY")
_TAG_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")
NONE_LABEL = "(none)"


def _ts(moment: datetime) -> str:
    return f"toDateTime64({sql_literal(moment.strftime('%Y-%m-%d %H:%M:%S.%f'))}, 6, 'UTC')"


def as_usd(value: Any) -> Decimal:
    """A money value from a result row (Decimal from chDB, an exact string through the worker's JSON)."""
    return Decimal(0) if value is None else Decimal(str(value))


@dataclass(frozen=True)
class Period:
    """A half-open UTC range [start, end) and the size of a chart bucket in it."""

    name: str
    start: datetime
    end: datetime
    bucket: str  # "hour" or "day"

    def where(self, column: str = "event_time") -> str:
        return f"{column} >= {_ts(self.start)} AND {column} < {_ts(self.end)}"

    def buckets(self) -> list[datetime]:
        step = timedelta(hours=1) if self.bucket == "hour" else timedelta(days=1)
        first = self.start.replace(minute=0, second=0, microsecond=0)
        if self.bucket == "day":
            first = first.replace(hour=0)
        out = []
        while first < self.end:
            out.append(first)
            first += step
        return out

    @property
    def label(self) -> str:
        last = self.end - timedelta(microseconds=1)
        if self.bucket == "hour":
            return f"{self.start:%Y-%m-%d %H:%M} – {self.end:%Y-%m-%d %H:%M} UTC"
        return f"{self.start:%Y-%m-%d} – {last:%Y-%m-%d} UTC"


def _month(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def period(name: str, now: datetime | None = None) -> Period:
    """`today`, `24h`, `7d`, `30d`, `month` (this calendar month), `last-month`, or `YYYY-MM`;
    calendar periods in UTC."""
    now = now or datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if name == "today":
        return Period(name, today, today + timedelta(days=1), "hour")
    if name == "24h":
        end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return Period(name, end - timedelta(hours=24), end, "hour")
    if name in ("7d", "30d"):
        days = int(name[:-1])
        return Period(name, today - timedelta(days=days - 1), today + timedelta(days=1), "day")
    if name == "month":
        return Period(name, *_month(now.year, now.month), "day")
    if name == "last-month":
        start, _ = _month(now.year, now.month)
        previous = start - timedelta(days=1)
        return Period(name, *_month(previous.year, previous.month), "day")
    match = _MONTH.fullmatch(name)
    if match and 1 <= int(match.group(2)) <= 12:
        return Period(name, *_month(int(match.group(1)), int(match.group(2))), "day")
    raise ConfigError(f"period {name!r}: use one of {', '.join(PERIODS)} or a month such as 2026-11")


def date_range(start: date, end: date) -> Period:
    """The days from `start` to `end`, both included (UTC)."""
    if end < start:
        raise ConfigError(f"--to {end} is before --from {start}")
    first = datetime(start.year, start.month, start.day, tzinfo=UTC)
    last = datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)
    return Period(f"{start}..{end}", first, last, "day")


@dataclass(frozen=True)
class Grouping:
    """What to group spend by: a column of usage_events, or a tag's value."""

    name: str  # project | team | model | user | tag:KEY
    expr: str  # the SQL expression of the group's label ('(none)' where absent)

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    def filter(self, value: str) -> str:
        return f"{self.expr} = {sql_literal(value)}"


def grouping(name: str) -> Grouping:
    none = sql_literal(NONE_LABEL)
    columns = {
        "project": "project",
        "model": "model",
        "team": f"ifNull(team, {none})",
        "user": f"ifNull(user, {none})",
    }
    if name in columns:
        return Grouping(name, columns[name])
    if name.startswith("tag:") and _TAG_KEY.fullmatch(name[4:]):
        key = sql_literal(name[4:])
        return Grouping(name, f"if(mapContains(tags, {key}), tags[{key}], {none})")
    raise ConfigError(
        f"group by {name!r}: use project, team, model, user or tag:KEY "
        "(KEY: letters, digits and _ . : / -, at most 64)"
    )


@dataclass(frozen=True)
class GroupTotal:
    label: str
    usd: Decimal
    events: int
    unpriced: int  # events with no price (cost unknown, not in usd)
    fallback: int  # events charged at the fallback card


def totals(query: Query, by: Grouping, when: Period, where: str = "1") -> list[GroupTotal]:
    """Spend per group in the period, largest first: exact sums, event counts, unpriced counts."""
    result = query(
        f"SELECT {by.expr} AS label, sum(cost_usd) AS usd, count() AS events, "
        "countIf(pricing_status = 'unpriced') AS unpriced, countIf(pricing_status = 'fallback') AS fallback "
        f"FROM usage_events FINAL WHERE {when.where()} AND ({where}) "
        "GROUP BY label ORDER BY usd DESC, label"
    )
    return [GroupTotal(str(r[0]), as_usd(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in result.rows]


def total(query: Query, when: Period, where: str = "1") -> tuple[Decimal, int]:
    """(exact spend, events) in the period."""
    rows = query(
        f"SELECT sum(cost_usd), count() FROM usage_events FINAL WHERE {when.where()} AND ({where})"
    ).rows
    return as_usd(rows[0][0]), int(rows[0][1])


@dataclass(frozen=True)
class Series:
    """Spend per bucket and group: `values[group][i]` is the spend of `buckets[i]` (exact)."""

    buckets: list[datetime]
    values: dict[str, list[Decimal]]


def over_time(query: Query, by: Grouping, when: Period, where: str = "1", top: int = 8) -> Series:
    """Spend per bucket of the period for the `top` groups; the rest summed as 'other'."""
    unit = "hour" if when.bucket == "hour" else "day"
    rows = query(
        f"SELECT toStartOfInterval(event_time, INTERVAL 1 {unit}) AS bucket, {by.expr} AS label, "
        f"sum(cost_usd) AS usd FROM usage_events FINAL WHERE {when.where()} AND ({where}) "
        "GROUP BY bucket, label ORDER BY bucket, label"
    ).rows
    buckets = when.buckets()
    index = {b: i for i, b in enumerate(buckets)}
    per_group: dict[str, Decimal] = {}
    for _, label, usd in rows:
        per_group[str(label)] = per_group.get(str(label), Decimal(0)) + as_usd(usd)
    kept = sorted(per_group, key=lambda g: (-per_group[g], g))[:top]
    values: dict[str, list[Decimal]] = {g: [Decimal(0)] * len(buckets) for g in kept}
    for bucket, label, usd in rows:
        moment = _as_datetime(bucket)
        i = index.get(moment)
        if i is None:
            continue
        group = str(label) if str(label) in values else "other"
        values.setdefault(group, [Decimal(0)] * len(buckets))[i] += as_usd(usd)
    return Series(buckets, values)


def _as_datetime(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class PricingGap:
    status: str  # unpriced | fallback
    provider: str
    model: str
    events: int
    usd: Decimal  # what the fallback card charged (0 for unpriced: unknown)
    reason: str


def pricing_gaps(query: Query, when: Period) -> list[PricingGap]:
    """Events without their model's own price: the models to add to the catalogue."""
    rows = query(
        "SELECT pricing_status, provider, model, count() AS events, sum(cost_usd) AS usd, "
        "any(unpriced_reason) AS reason FROM usage_events FINAL "
        f"WHERE {when.where()} AND pricing_status != 'priced' "
        "GROUP BY pricing_status, provider, model ORDER BY events DESC, model"
    ).rows
    return [PricingGap(str(r[0]), str(r[1]), str(r[2]), int(r[3]), as_usd(r[4]), str(r[5])) for r in rows]


@dataclass(frozen=True)
class DeadLetters:
    reason: str
    count: int
    last: Any  # datetime (chDB) or ISO text (through the worker's JSON), UTC
    detail: str


def dead_letters(query: Query, when: Period) -> list[DeadLetters]:
    rows = query(
        "SELECT reason, count() AS n, max(failed_at) AS last, any(detail) AS detail "
        f"FROM dead_letters FINAL WHERE {when.where('failed_at')} GROUP BY reason ORDER BY n DESC, reason"
    ).rows
    return [DeadLetters(str(r[0]), int(r[1]), r[2], str(r[3])[:200]) for r in rows]


def cache_savings(query: Query, when: Period) -> list[tuple[str, Decimal, int]]:
    """(project, saved, cache hits): what the gateway's cache hits would have cost (`saved_usd`)."""
    rows = query(
        "SELECT project, sum(saved_usd) AS saved, countIf(saved_usd > 0) AS hits FROM usage_events FINAL "
        f"WHERE {when.where()} GROUP BY project HAVING saved > 0 ORDER BY saved DESC, project"
    ).rows
    return [(str(r[0]), as_usd(r[1]), int(r[2])) for r in rows]
