"""Budgets, windows and the decision rule, as pure functions (no Kafka, no Faust).

Scopes: `org`, `team:<id>`, `project:<id>`, `user:<id>`, `key:<id>` (a gateway key) and
`project:<id>/model:<glob>`. An event counts against every scope it matches. A template (`user:*`,
`team:*`, `key:*`, `project:*`) is the budget of every member of its kind without one of its own. Windows are decided by event time: calendar `daily`,
`weekly` (ISO weeks, Monday) and `monthly` in the budget's IANA time zone (a Berlin day is not a
UTC day; DST days have 23 or 25 hours), and `rolling:<n>m|h|d` over minute buckets.

The state of one scope is a `BudgetState` (stored as one JSON value in the worker's `scopes`
table, so a single changelog record updates spend, dedup offsets and the last signal together).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from spendstream.errors import ConfigError
from spendstream.usage import MAX_FUTURE_US, MIN_EVENT_TIME_US, scopes_for_event

__all__ = [
    "LONG_MAX",
    "MAX_LIMIT_USD",
    "MAX_REASON_CHARS",
    "MAX_ROLLING_MINUTES",
    "MAX_RUNAWAY_MULTIPLIER",
    "SEVERITY",
    "TEMPLATES",
    "TEMPLATE_KINDS",
    "BudgetState",
    "Decision",
    "Limit",
    "Spec",
    "Window",
    "apply_deltas",
    "burn_per_minute",
    "calendar_window",
    "decide",
    "deltas_problem",
    "dump_state",
    "forecast_crossing",
    "late_in_windows_like",
    "load_specs",
    "load_state",
    "make_limit",
    "new_state",
    "parse_scope",
    "read_budgets_file",
    "runaway_pico_checked",
    "scopes_for_event",
    "template_of",
    "usd_to_pico_checked",
    "utc_from_micros",
    "window_end_us",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
MINUTE_US = 60_000_000
_SCOPE = re.compile(r"^(org|(team|project|user|key):[^/\s]+|project:[^/\s]+/model:\S+)$")
# A template: every member of the kind gets the spec as its own budget, unless it has one.
TEMPLATE_KINDS = ("user", "team", "key", "project")
TEMPLATES = tuple(f"{kind}:*" for kind in TEMPLATE_KINDS)
_ROLLING = re.compile(r"^rolling:(\d{1,6})(m|h|d)$")
_UNIT_MINUTES = {"m": 1, "h": 60, "d": 1440}
RUNAWAY_MINUTES = 5  # the recent rate is the spend of the last 5 minutes ...
BASELINE_MINUTES = 60  # ... compared with the 5-minute average of the hour before
FORECAST_MIN_HISTORY = 10  # minutes of spend needed before a forecast is made
# Bounds of every budget value, from the CLI, a budgets file or the `budgets` topic (any client):
# A ControlSignal carries limit and spend as pico-USD in an Avro long (at most ~9.22 million USD).
MAX_LIMIT_USD = Decimal(9_000_000)
MAX_ROLLING_MINUTES = 31 * 1440  # a rolling window keeps one bucket per minute per scope
MAX_RUNAWAY_MULTIPLIER = 1_000
MAX_REASON_CHARS = 500  # a manual block's reason, shown to every caller refused
SEVERITY = {"ok": 0, "warn": 1, "blocked": 2}
_REASON_RANK = {
    "manual": 5,
    "runaway": 4,
    "budget_exceeded": 3,
    "threshold": 2,
    "forecast": 1,
    "within_budget": 0,
}


def utc_from_micros(us: int) -> datetime:
    """Exact conversion of epoch microseconds to an aware UTC datetime (for display)."""
    return _EPOCH + us * _US


def _micros(dt: datetime) -> int:
    return (dt - _EPOCH) // _US


def parse_scope(scope: str) -> str:
    if not _SCOPE.match(scope):
        raise ConfigError(
            f"scope {scope!r} must be org, team:<id>, project:<id>, user:<id>, key:<id>, "
            "project:<id>/model:<glob>, or a template: user:*, team:*, key:*, project:*"
        )
    if "*" in scope.partition("/model:")[0] and scope not in TEMPLATES:
        raise ConfigError(
            f"scope {scope!r}: '*' stands alone, as a template giving every member its own budget: "
            f"{', '.join(TEMPLATES)} (a model filter takes globs: project:<id>/model:gpt-4o*)"
        )
    return scope


def template_of(scope: str) -> str | None:
    """The template a member scope falls back to (`user:alice` -> `user:*`), None for org, model
    filters and templates themselves."""
    kind, sep, member = scope.partition(":")
    if not sep or member == "*" or "/model:" in member or kind not in TEMPLATE_KINDS:
        return None
    return f"{kind}:*"


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"time zone {tz!r} is not an IANA name such as Europe/Berlin or UTC") from None


@dataclass(frozen=True)
class Window:
    id: str  # e.g. day:2026-11-27@Europe/Berlin, week:2026-W48@UTC, month:2026-11@UTC, rolling:60m
    start_us: int  # inclusive
    end_us: int  # exclusive


@lru_cache(maxsize=65536)
def calendar_window(period: str, tz: str, minute: int) -> Window:
    """The calendar window of `period` in time zone `tz` containing the given epoch minute."""
    zone = _zone(tz)
    local = utc_from_micros(minute * MINUTE_US).astimezone(zone)
    day = local.date()
    if period == "daily":
        first, after, label = day, day + timedelta(days=1), f"day:{day.isoformat()}"
    elif period == "weekly":
        first = day - timedelta(days=day.weekday())
        after = first + timedelta(days=7)
        iso = first.isocalendar()
        label = f"week:{iso.year}-W{iso.week:02d}"
    elif period == "monthly":
        first = day.replace(day=1)
        after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
        label = f"month:{first:%Y-%m}"
    else:
        raise ConfigError(f"window {period!r} is not daily, weekly, monthly or rolling:<n>m|h|d")

    def start(d: date) -> int:  # local midnight (a DST gap at midnight resolves forward)
        return _micros(datetime(d.year, d.month, d.day, tzinfo=zone))

    return Window(f"{label}@{tz}", start(first), start(after))


@dataclass(frozen=True)
class Limit:
    window: str  # daily | weekly | monthly | rolling:<n>m|h|d
    tz: str
    limit_pico: int
    warn: tuple[int, ...] = (50, 80)
    mode: Literal["hard", "soft"] = "hard"

    @property
    def rolling_minutes(self) -> int | None:
        m = _ROLLING.match(self.window)
        return int(m.group(1)) * _UNIT_MINUTES[m.group(2)] if m else None

    def current(self, now_us: int) -> Window:
        minutes = self.rolling_minutes
        if minutes is not None:
            now_min = now_us // MINUTE_US
            return Window(self.window, (now_min - minutes + 1) * MINUTE_US, (now_min + 1) * MINUTE_US)
        return calendar_window(self.window, self.tz, now_us // MINUTE_US)


class _ExactLoader(yaml.SafeLoader):
    """YAML with decimals read from their text (`daily: 12.5` is Decimal("12.5")), never a float."""


def _exact_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    return Decimal(str(loader.construct_scalar(node)))


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _exact_decimal)


def usd_to_pico_checked(where: str, raw: Any, maximum: Decimal = MAX_LIMIT_USD) -> int:
    """A USD amount (decimal string, int or Decimal: never a float) as positive pico-USD, at most
    `maximum` USD."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | Decimal):
        raise ConfigError(f'{where}: amount must be USD such as "50.00", got {raw!r}')
    try:
        usd = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{where}: {raw!r} is not a decimal amount of USD") from None
    if not usd.is_finite() or usd <= 0 or usd.as_tuple().exponent < -12:  # type: ignore[operator]
        raise ConfigError(f"{where}: {raw!r} must be positive with at most 12 decimals")
    if usd > maximum:
        raise ConfigError(
            f"{where}: {raw!r} is more than the maximum of {maximum:,} USD "
            "(limits travel as pico-USD in 64-bit integers)"
        )
    return int(usd.scaleb(12))


def runaway_pico_checked(where: str, raw: Any) -> int:
    """A runaway ceiling in USD per minute: its 5-minute total must fit a ControlSignal too."""
    return usd_to_pico_checked(where, raw, MAX_LIMIT_USD / RUNAWAY_MINUTES)


def make_limit(
    scope: str, window: str, amount: Any, tz: str = "UTC", warn: Iterable[int] = (50, 80), mode: str = "hard"
) -> Limit:
    where = f"budget {scope} {window}"
    rolling = _ROLLING.match(window)
    if window not in ("daily", "weekly", "monthly") and not rolling:
        raise ConfigError(
            f"{where}: window must be daily, weekly, monthly or rolling:<n>m|h|d (e.g. rolling:60m)"
        )
    if rolling and not 1 <= int(rolling.group(1)) * _UNIT_MINUTES[rolling.group(2)] <= MAX_ROLLING_MINUTES:
        raise ConfigError(f"{where}: a rolling window is 1 minute to 31 days long (e.g. rolling:60m)")
    _zone(tz)
    try:
        levels = tuple(sorted({int(w) for w in warn}))
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: warn levels are whole percentages such as [50, 80], got {warn!r}"
        ) from None
    if any(not 0 < w < 100 for w in levels):
        raise ConfigError(f"{where}: warn levels are percentages between 1 and 99, got {list(levels)}")
    if mode not in ("hard", "soft"):
        raise ConfigError(f"{where}: mode must be hard (block at the limit) or soft (warn only)")
    return Limit(window, tz, usd_to_pico_checked(where, amount), levels, mode)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Spec:
    """Every budget of one scope, plus its manual block and runaway rule."""

    scope: str
    limits: tuple[Limit, ...] = ()
    manual_block: bool = False
    manual_reason: str = ""
    runaway_multiplier: int = 0
    runaway_pico_per_minute: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.runaway_multiplier <= MAX_RUNAWAY_MULTIPLIER:
            raise ConfigError(
                f"budget {self.scope} runaway: multiplier must be 0 (off) to {MAX_RUNAWAY_MULTIPLIER:,}, "
                f"not {self.runaway_multiplier}"
            )
        if len(self.manual_reason) > MAX_REASON_CHARS:
            raise ConfigError(
                f"{self.scope}: a block reason has at most {MAX_REASON_CHARS} characters, "
                f"not {len(self.manual_reason):,}"
            )

    def to_record(self, now_us: int) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "limits": [
                {
                    "window": lim.window,
                    "tz": lim.tz,
                    "limit_usd": str(Decimal(lim.limit_pico).scaleb(-12).normalize()),
                    "warn_percent": list(lim.warn),
                    "mode": lim.mode,
                }
                for lim in self.limits
            ],
            "manual_block": self.manual_block,
            "manual_reason": self.manual_reason,
            "runaway_multiplier": self.runaway_multiplier,
            "runaway_usd_per_minute": ""
            if self.runaway_pico_per_minute is None
            else str(Decimal(self.runaway_pico_per_minute).scaleb(-12).normalize()),
            "updated_at": now_us,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Spec:
        scope = parse_scope(r["scope"])
        limits = tuple(
            make_limit(
                scope,
                lim["window"],
                lim["limit_usd"],
                lim.get("tz", "UTC"),
                lim.get("warn_percent", (50, 80)),
                lim.get("mode", "hard"),
            )
            for lim in r.get("limits", ())
        )
        per_min = r.get("runaway_usd_per_minute") or ""
        return cls(
            scope,
            limits,
            bool(r.get("manual_block")),
            r.get("manual_reason", ""),
            int(r.get("runaway_multiplier") or 0),
            runaway_pico_checked(f"budget {scope} runaway", per_min) if per_min else None,
        )


def _spec_from_file_entry(scope: str, entry: Any, source: str) -> Spec:
    parse_scope(scope)
    if not isinstance(entry, dict) or not entry:
        raise ConfigError(f'{source}: {scope} needs limits such as {{monthly: "100"}}')
    limits = []
    for key, value in entry.items():
        if key in ("daily", "weekly", "monthly") or str(key).startswith("rolling:"):
            limits.append(make_limit(scope, key, value))
    for lim in entry.get("limits", []):
        if not isinstance(lim, dict) or "window" not in lim or "limit" not in lim:
            raise ConfigError(f"{source}: {scope}: each of limits needs window and limit")
        limits.append(
            make_limit(
                scope,
                lim["window"],
                lim["limit"],
                lim.get("tz", "UTC"),
                lim.get("warn", (50, 80)),
                lim.get("mode", "hard"),
            )
        )
    runaway = entry.get("runaway") or {}
    unknown = (
        set(entry)
        - {"daily", "weekly", "monthly", "limits", "runaway"}
        - {k for k in entry if str(k).startswith("rolling:")}
    )
    if unknown:
        raise ConfigError(
            f"{source}: {scope}: unknown keys {sorted(unknown)} (windows are daily, weekly, monthly, rolling:<n>m)"
        )
    per_min = runaway.get("usd_per_minute")
    try:
        multiplier = int(runaway.get("multiplier", 0))
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {scope} runaway: multiplier must be a whole number") from None
    return Spec(
        scope,
        tuple(limits),
        runaway_multiplier=multiplier,
        runaway_pico_per_minute=runaway_pico_checked(f"{source}: {scope} runaway", per_min)
        if per_min
        else None,
    )


def read_budgets_file(path: Path) -> Any:
    """The parsed YAML or TOML budgets file (decimals exact); its `budgets` and `alerts` sections
    are read by `load_specs` and the alerts process."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read budgets file {path}: {exc.strerror}") from None
    try:
        return (
            tomllib.loads(text, parse_float=Decimal)
            if path.suffix == ".toml"
            else yaml.load(text, Loader=_ExactLoader)
        )
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"budgets file {path} is not valid: {exc}") from None


def load_specs(path: Path | None) -> list[Spec]:
    """Budgets from a YAML or TOML file (an import format for the `budgets` topic):

    ```yaml
    budgets:
      project:checkout: {daily: "50", monthly: "1000"}            # UTC calendar windows
      team:data:
        limits: [{window: monthly, tz: Europe/Berlin, limit: "5000", warn: [50, 80], mode: hard}]
        runaway: {multiplier: 10, usd_per_minute: "5"}
    ```
    """
    if path is None:
        return []
    data = read_budgets_file(path)
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("budgets", {}), dict):
        raise ConfigError(f"{path}: expected a top-level 'budgets' mapping of scope -> limits")
    return [
        _spec_from_file_entry(str(scope), entry, str(path))
        for scope, entry in (data.get("budgets") or {}).items()
    ]


# -- applying spend ---------------------------------------------------------------------------


class BudgetState(TypedDict):
    window_spend: dict[str, int]  # calendar window id -> pico-USD
    late_spend: dict[str, int]  # window id -> pico-USD that arrived after the window's grace
    minute_spend: dict[str, int]  # epoch minute -> pico-USD (rolling windows, runaway, forecast)
    applied_offsets: dict[str, int]  # usage.raw partition -> last offset applied (exactly once)
    last_signal: list[Any]  # [state, reason, level, window] of the last ControlSignal
    sequence: int  # of the last ControlSignal
    signed_by: str  # key id that signed the last signal ("" unsigned)


# The keys of states written before BudgetState had full names (read from older changelogs).
_SHORT_KEYS = {
    "w": "window_spend",
    "late": "late_spend",
    "m": "minute_spend",
    "applied": "applied_offsets",
    "sig": "last_signal",
    "seq": "sequence",
    "kid": "signed_by",
}


def new_state() -> BudgetState:
    return {
        "window_spend": {},
        "late_spend": {},
        "minute_spend": {},
        "applied_offsets": {},
        "last_signal": ["ok", "within_budget", 0, ""],
        "sequence": 0,
        "signed_by": "",
    }


_BLANK = new_state()
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def dump_state(state: BudgetState) -> str:
    """A scope's state as the `scopes` table stores it: compact JSON text, the fields still at
    their new_state() value left out. A text value takes a seventh of the memory of the same state
    as Python dicts, which is what 100,000 member scopes cost (bench/members.py)."""
    return _COMPACT.encode({k: v for k, v in state.items() if v != _BLANK[k]})  # type: ignore[literal-required]


def load_state(stored: str | Mapping[str, Any] | None) -> BudgetState:
    """A scope's state as stored in the `scopes` table (None: a new scope): JSON text (dump_state),
    or a mapping, as older changelogs stored it (the oldest with short keys)."""
    state = new_state()
    fields: Mapping[str, Any] = json.loads(stored) if isinstance(stored, str) else stored or {}
    for key, value in fields.items():
        state[_SHORT_KEYS.get(key, key)] = value  # type: ignore[literal-required]
    return state


LONG_MAX = 2**63 - 1
_MIN_MINUTE = MIN_EVENT_TIME_US // MINUTE_US


def deltas_problem(name: str, batch: Mapping[str, Any], now_us: int) -> str | None:
    """Why a spend.deltas message cannot be applied, or None. The meter never writes such a
    message: this guards the budgets against any other writer of the topic (and against bugs)."""
    if name != "SpendDeltaBatch":
        return f"spend.deltas takes SpendDeltaBatch, not {name}"
    last_minute = (now_us + MAX_FUTURE_US) // MINUTE_US
    for d in batch["deltas"]:
        if not _SCOPE.match(d["scope"]):
            return f"scope {d['scope'][:80]!r} is not a budget scope"
        if not 0 <= d["pico_usd"] <= 2**62 or d["events"] < 0:
            return f"{d['scope']}: pico_usd {d['pico_usd']} / events {d['events']} out of range"
        if d["pico_usd"] and not _MIN_MINUTE <= d["minute"] <= last_minute:
            return f"{d['scope']}: minute {d['minute']} is outside the event times the meter accepts"
    return None


def fresh_deltas(
    applied: dict[str, int], deltas: Iterable[dict[str, Any]]
) -> tuple[list[tuple[int, int]], int]:
    """(minute, pico-USD) of the SpendDeltas a scope has not applied yet, and how many it had already.

    `applied` is the scope's last applied usage.raw offset per source partition (updated here).
    The meter handles each partition's messages in offset order, so a delta from an offset at or
    below it was counted before a restart and is skipped. One message may carry several deltas for a scope (one per
    minute of event time): all of them are fresh together. Offset -1: timer ticks (no spend, left
    out) and deltas of v1 batches, which carried no per-delta source (applied as they are).
    """
    prior = dict(applied)
    fresh = []
    duplicates = 0
    for d in deltas:
        offset = d["source_offset"]
        if offset < 0:
            if d["pico_usd"]:
                fresh.append((d["minute"], d["pico_usd"]))
            continue
        source = str(d["source_partition"])
        if offset <= prior.get(source, -1):
            duplicates += 1
            continue
        if offset > applied.get(source, -1):
            applied[source] = offset
        fresh.append((d["minute"], d["pico_usd"]))
    return fresh, duplicates


def apply_deltas(
    state: BudgetState, deltas: Iterable[tuple[int, int]], spec: Spec | None, now_us: int, grace_us: int
) -> int:
    """Add (minute, pico-USD) deltas to a scope's state; returns pico-USD that arrived past the grace.

    Calendar windows: the configured limits' windows plus the UTC day and month (always kept, so
    spend is known before a budget exists). A late event counts in the window it belongs to; one
    later than the grace after its window's end is recorded under "late" and decides nothing.
    """
    limits = spec.limits if spec else ()
    calendars = {(lim.window, lim.tz) for lim in limits if lim.rolling_minutes is None}
    calendars |= {("daily", "UTC"), ("monthly", "UTC")}
    keep_minutes = max([lim.rolling_minutes or 0 for lim in limits] + [RUNAWAY_MINUTES + BASELINE_MINUTES])
    now_min = now_us // MINUTE_US
    late_total = 0
    w, late, m = state["window_spend"], state["late_spend"], state["minute_spend"]
    for minute, pico in deltas:
        if not pico:
            continue
        if minute > now_min - keep_minutes:
            m[str(minute)] = m.get(str(minute), 0) + pico
        is_late = False
        for period, tz in calendars:
            win = calendar_window(period, tz, minute)
            if win.end_us + grace_us <= now_us:
                late[win.id] = late.get(win.id, 0) + pico
                is_late = True
            else:
                w[win.id] = w.get(win.id, 0) + pico
        if is_late:  # once, however many of its windows (day, month, ...) it is late for
            late_total += pico
    for old in [k for k in m if int(k) <= now_min - keep_minutes]:
        del m[old]
    horizon = now_us - 40 * 86_400_000_000  # keep 40 days of closed windows for `budget list`
    for table in (w, late):
        for wid in [k for k in table if _window_end_of(k) < horizon]:
            del table[wid]
    return late_total


_CALENDAR_KINDS = ("day", "week", "month")  # the kinds of calendar window id (`day:2026-12-01@UTC`)


def late_in_windows_like(late_spend: Mapping[str, int], window_id: str) -> int:
    """Late pico-USD of the windows of `window_id`'s kind and zone (`day:...@UTC`: the daily UTC
    windows'); for a rolling window, of the daily UTC windows, where every late delta is recorded
    once. The same dollars are late for their day and their month: summing every window would
    count them twice."""
    kind, _, rest = window_id.partition(":")
    if kind not in _CALENDAR_KINDS:
        kind, rest = "day", "@UTC"
    zone = rest.rpartition("@")[2]
    return sum(v for k, v in late_spend.items() if k.startswith(kind + ":") and k.rpartition("@")[2] == zone)


def window_end_us(window_id: str) -> int:
    """The end of a calendar window id (`day:2026-12-01@UTC`); 0 for a rolling window or none."""
    if window_id.partition(":")[0] not in _CALENDAR_KINDS:
        return 0
    return _window_end_of(window_id)


@lru_cache(maxsize=65536)
def _window_end_of(window_id: str) -> int:
    label, _, tz = window_id.partition("@")
    kind, _, value = label.partition(":")
    if kind == "day":
        d = date.fromisoformat(value)
    elif kind == "week":
        year, week = value.split("-W")
        d = date.fromisocalendar(int(year), int(week), 1)
    else:
        d = date.fromisoformat(value + "-01")
    period = {"day": "daily", "week": "weekly", "month": "monthly"}[kind]
    minute = (
        _micros(datetime(d.year, d.month, d.day, 12, tzinfo=_zone(tz or "UTC"))) // MINUTE_US
    )  # local noon
    return calendar_window(period, tz or "UTC", minute).end_us


# -- deciding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    state: str  # ok | warn | blocked
    reason: str
    level: int = 0
    window: Window = field(default_factory=lambda: Window("", 0, 0))
    spend_pico: int = 0
    limit_pico: int = 0
    mode: str = "hard"
    projected_at_us: int = 0

    @property
    def key(self) -> list[Any]:
        return [self.state, self.reason, self.level, self.window.id]

    def _rank(self) -> tuple[int, int, int]:
        return (SEVERITY[self.state], _REASON_RANK[self.reason], self.level)


def _minutes_sum(m: Mapping[str, int], first: int, last: int) -> int:
    return sum(v for k, v in m.items() if first <= int(k) <= last)


def decide(state: BudgetState, spec: Spec | None, now_us: int) -> Decision:
    """The scope's state now: the most severe of manual block, runaway, limits, warns and forecasts."""
    if spec is None:
        return Decision("ok", "within_budget")
    now_min = now_us // MINUTE_US
    m = state["minute_spend"]
    found: list[Decision] = [Decision("ok", "within_budget")]
    if spec.manual_block:
        found.append(Decision("blocked", "manual"))
    recent = _minutes_sum(m, now_min - RUNAWAY_MINUTES + 1, now_min)
    history = [int(k) for k in m if int(k) <= now_min - RUNAWAY_MINUTES]
    cooldown = Window(
        f"rolling:{RUNAWAY_MINUTES}m",
        (now_min - RUNAWAY_MINUTES + 1) * MINUTE_US,
        (now_min + RUNAWAY_MINUTES) * MINUTE_US,
    )
    if spec.runaway_pico_per_minute is not None and recent > spec.runaway_pico_per_minute * RUNAWAY_MINUTES:
        found.append(
            Decision(
                "blocked", "runaway", 100, cooldown, recent, spec.runaway_pico_per_minute * RUNAWAY_MINUTES
            )
        )
    if spec.runaway_multiplier and history and min(history) <= now_min - BASELINE_MINUTES // 2:
        baseline_total = _minutes_sum(
            m, now_min - RUNAWAY_MINUTES - BASELINE_MINUTES + 1, now_min - RUNAWAY_MINUTES
        )
        baseline = baseline_total * RUNAWAY_MINUTES // BASELINE_MINUTES
        if baseline and recent > spec.runaway_multiplier * baseline:
            found.append(
                Decision("blocked", "runaway", 100, cooldown, recent, spec.runaway_multiplier * baseline)
            )
    for lim in spec.limits:
        win = lim.current(now_us)
        if lim.rolling_minutes is not None:
            spend = _minutes_sum(m, win.start_us // MINUTE_US, now_min)
        else:
            spend = state["window_spend"].get(win.id, 0)
        if spend >= lim.limit_pico:
            hard = lim.mode == "hard"
            found.append(
                Decision(
                    "blocked" if hard else "warn",
                    "budget_exceeded" if hard else "threshold",
                    100,
                    win,
                    spend,
                    lim.limit_pico,
                    lim.mode,
                )
            )
            continue
        levels = [p for p in lim.warn if spend * 100 >= p * lim.limit_pico]
        if levels:
            found.append(Decision("warn", "threshold", max(levels), win, spend, lim.limit_pico, lim.mode))
        elif lim.rolling_minutes is None:
            crossing = forecast_crossing(m, now_us, spend, lim.limit_pico, win.end_us)
            if crossing:
                found.append(Decision("warn", "forecast", 0, win, spend, lim.limit_pico, lim.mode, crossing))
    return max(found, key=Decision._rank)


def burn_per_minute(minute_spend: Mapping[str, int], now_min: int) -> tuple[int, int]:
    """The burn rate as (pico-USD spent in the last hour, minutes observed of it): the span runs from
    the first minute with spend in the hour to now, so a scope that started 5 minutes ago is not
    averaged over 60. (0, 0) when nothing was spent in the hour."""
    recent_hour = [int(k) for k in minute_spend if now_min - 60 < int(k) <= now_min]
    if not recent_hour:
        return 0, 0
    return _minutes_sum(minute_spend, now_min - 59, now_min), now_min - min(recent_hour) + 1


def forecast_crossing(
    minute_spend: Mapping[str, int], now_us: int, spend: int, limit_pico: int, window_end_us: int
) -> int:
    """When the limit is reached at the last hour's burn rate (micros), or 0: no forecast before
    FORECAST_MIN_HISTORY minutes of spend, at a zero rate, past the limit already, or when it falls
    after the window."""
    spent, minutes = burn_per_minute(minute_spend, now_us // MINUTE_US)
    if minutes <= FORECAST_MIN_HISTORY or spent <= 0 or spend >= limit_pico:
        return 0
    crossing = now_us + int((limit_pico - spend) / (spent / minutes) * MINUTE_US)
    return crossing if crossing < window_end_us else 0
