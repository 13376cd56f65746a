"""Budget windows and the crossing rule, as pure functions.

Windows are calendar periods in UTC decided by the event's own time (never the wall clock), so a
replayed or late event counts where it belongs. A window is identified by a string such as
`day:2026-11-27` or `month:2026-11`; spend tables key on `<scope>|<window id>`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from spendstream.errors import ConfigError

__all__ = [
    "PERIODS",
    "Budget",
    "BudgetBook",
    "Period",
    "Window",
    "crossed",
    "utc_from_micros",
    "window_for",
]

Period = Literal["daily", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "monthly")
_MICROS_PER_DAY = 86_400 * 1_000_000
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class Window:
    id: str  # day:YYYY-MM-DD or month:YYYY-MM
    start_us: int  # inclusive, microseconds since the epoch (UTC)
    end_us: int  # exclusive


def _micros(d: date) -> int:
    return (d - _EPOCH).days * _MICROS_PER_DAY


@lru_cache(maxsize=4096)
def _windows_of_day(day_index: int) -> tuple[Window, Window]:
    day = _EPOCH + timedelta(days=day_index)
    daily = Window(f"day:{day.isoformat()}", _micros(day), _micros(day + timedelta(days=1)))
    first = day.replace(day=1)
    after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    monthly = Window(f"month:{first:%Y-%m}", _micros(first), _micros(after))
    return daily, monthly


def window_for(period: Period, event_time_us: int) -> Window:
    """The UTC calendar window of `period` that contains the instant `event_time_us`."""
    daily, monthly = _windows_of_day(event_time_us // _MICROS_PER_DAY)
    return daily if period == "daily" else monthly


def crossed(spend_before: int, spend_after: int, limit: int) -> bool:
    """True exactly once per crossing: when spend goes from below the limit to at or above it."""
    return spend_before < limit <= spend_after


@dataclass(frozen=True)
class Budget:
    scope: str  # e.g. project:checkout
    period: Period
    limit_pico_usd: int


def _amount_to_pico(where: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ConfigError(f'{where}: amount must be a number of USD such as "50.00", got {raw!r}')
    try:
        usd = Decimal(str(raw))
    except InvalidOperation:
        raise ConfigError(f"{where}: {raw!r} is not a decimal amount of USD") from None
    if usd <= 0 or usd.as_tuple().exponent < -12:  # type: ignore[operator]
        raise ConfigError(f"{where}: {raw!r} must be positive with at most 12 decimals")
    return int(usd.scaleb(12))


class BudgetBook:
    """The budgets in force, by scope. Loaded from a YAML or TOML file:

    ```yaml
    budgets:
      project:checkout: {daily: "50.00", monthly: "1000"}
      project:search:   {monthly: "200"}
    ```
    """

    def __init__(self, budgets: list[Budget]) -> None:
        self._by_scope: dict[str, list[Budget]] = {}
        for budget in budgets:
            self._by_scope.setdefault(budget.scope, []).append(budget)

    def for_scope(self, scope: str) -> list[Budget]:
        return self._by_scope.get(scope, [])

    def __iter__(self) -> Any:
        return (b for budgets in self._by_scope.values() for b in budgets)

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_scope.values())

    @classmethod
    def from_mapping(cls, data: Any, source: str = "budgets") -> BudgetBook:
        if data is None:
            return cls([])
        if not isinstance(data, dict) or not isinstance(data.get("budgets", {}), dict):
            raise ConfigError(f"{source}: expected a top-level 'budgets' mapping of scope -> limits")
        budgets = []
        for scope, limits in (data.get("budgets") or {}).items():
            if not isinstance(scope, str) or not scope.startswith("project:") or scope == "project:":
                raise ConfigError(f"{source}: scope {scope!r} must look like project:<id>")
            if not isinstance(limits, dict) or not limits:
                raise ConfigError(f'{source}: {scope} needs limits such as {{monthly: "100"}}')
            for period, amount in limits.items():
                if period not in PERIODS:
                    raise ConfigError(f"{source}: {scope}: period {period!r} is not one of {PERIODS}")
                pico = _amount_to_pico(f"{source}: {scope}.{period}", amount)
                budgets.append(Budget(scope, period, pico))
        return cls(budgets)

    @classmethod
    def load(cls, path: Path | None) -> BudgetBook:
        if path is None:
            return cls([])
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read budgets file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"budgets file {path} is not valid: {exc}") from None
        return cls.from_mapping(data, str(path))


def utc_from_micros(us: int) -> datetime:
    """Exact conversion of epoch microseconds to an aware UTC datetime (for display)."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
