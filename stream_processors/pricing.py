"""Exact pricing of usage events.

Prices are read from `prices.toml` as decimal strings (USD per million units) and turned into
integer pico-USD (USD x 10^12) per unit, so pricing is integer arithmetic: exact, fast, and the
stream's totals, ClickHouse's sums and any re-computation agree to the last unit. A price with
more than six decimals per million would not be an integer number of pico-USD per token; loading
refuses it rather than round.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from spendstream.errors import ConfigError, UnknownModel

__all__ = ["METERS", "PICO_PER_USD", "PriceCard", "PriceTable", "pico_to_usd", "usd_to_pico"]

PICO_PER_USD = 10**12
_PICO_PER_USD_PER_MILLION = 10**6  # pico-USD per unit, for a price quoted in USD per million
# Meter name in prices.toml -> field of UsageEvent.
METERS: Mapping[str, str] = {
    "input": "input_tokens",
    "cached_input": "cached_input_tokens",
    "cache_write": "cache_write_tokens",
    "output": "output_tokens",
}
_PROMPT_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens")


def usd_to_pico(amount: Decimal | str | int) -> int:
    """Exact USD -> pico-USD; refuses amounts finer than one pico-USD."""
    value = Decimal(amount) * PICO_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"{amount} USD is not a whole number of pico-USD")
    return int(value)


def pico_to_usd(pico: int) -> Decimal:
    """Exact pico-USD -> Decimal USD (12 decimal places)."""
    return Decimal(pico).scaleb(-12)


def _rates(card_id: str, per_million: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    unknown = set(per_million) - set(METERS)
    if unknown:
        raise ConfigError(f"price card {card_id}: unknown meters {sorted(unknown)}")
    rates = []
    for meter, price in per_million.items():
        if not isinstance(price, str):
            raise ConfigError(f"price card {card_id}: {meter} must be a decimal string, not {price!r}")
        pico = Decimal(price) * _PICO_PER_USD_PER_MILLION
        if pico != pico.to_integral_value() or pico < 0:
            raise ConfigError(f"price card {card_id}: {meter}={price} is not exact in pico-USD/unit")
        rates.append((METERS[meter], int(pico)))
    return tuple(rates)


@dataclass(frozen=True)
class PriceCard:
    """One model's prices: integer pico-USD per unit for each meter."""

    id: str
    provider: str
    models: tuple[str, ...]
    source: str
    rates: tuple[tuple[str, int], ...]  # (UsageEvent field, pico-USD per unit)
    long_context_above: int | None = None
    long_context_rates: tuple[tuple[str, int], ...] = ()

    def cost_pico(self, usage: Mapping[str, Any]) -> int:
        """Exact cost of one event in pico-USD."""
        rates = self.rates
        if self.long_context_above is not None:
            prompt = sum(usage[f] for f in _PROMPT_FIELDS)
            if prompt > self.long_context_above:
                rates = self.long_context_rates
        return sum(usage[field] * rate for field, rate in rates)


class PriceTable:
    """Exact-id lookup of price cards by (provider, model)."""

    def __init__(self, cards: Iterable[PriceCard]) -> None:
        self._cards: dict[tuple[str, str], PriceCard] = {}
        for card in cards:
            for model in card.models:
                key = (card.provider, model)
                if key in self._cards:
                    raise ConfigError(f"{card.provider}/{model} is priced by two cards")
                self._cards[key] = card

    def __len__(self) -> int:
        return len(self._cards)

    def card(self, provider: str, model: str) -> PriceCard:
        try:
            return self._cards[(provider, model)]
        except KeyError:
            raise UnknownModel(provider, model) from None

    @classmethod
    def from_toml(cls, text: str) -> PriceTable:
        cards = []
        for raw in tomllib.loads(text).get("card", []):
            long_context = raw.get("long_context")
            cards.append(
                PriceCard(
                    id=raw["id"],
                    provider=raw["provider"],
                    models=tuple(raw["models"]),
                    source=raw["source"],
                    rates=_rates(raw["id"], raw["per_million"]),
                    long_context_above=long_context["above_tokens"] if long_context else None,
                    long_context_rates=(
                        _rates(raw["id"], long_context["per_million"]) if long_context else ()
                    ),
                )
            )
        return cls(cards)

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """The given TOML file, or the shipped `prices.toml`."""
        if path is not None:
            return cls.from_toml(path.read_text())
        return cls.from_toml(resources.files(__package__).joinpath("prices.toml").read_text())
