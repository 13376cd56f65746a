"""The pricing engine: exact, effective-dated, and never silently zero.

Prices live in price cards (the seed catalogue in `catalogue/*.toml`, plus cards published at
run time on the `prices` topic). A card prices one provider's models for one deployment scope and
service tier, from `effective_from` (inclusive) to `effective_to` (exclusive, open if absent).
Prices are decimal strings; the engine turns each into integer pico-USD (USD x 10^12) per unit of
its meter, so pricing is integer arithmetic: exact, fast, and equal to ClickHouse's decimal sums
and to any re-computation. A price that is not a whole number of pico-USD per unit is refused at
load, never rounded.

Model matching is by exact id. A fine-tuned id (`ft:<base>:...`, Azure `<base>.ft-...`) uses the
card whose `fine_tune_of` is the base. Nothing is matched by prefix: an unknown id is unknown.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import cached_property
from importlib import resources
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, NamedTuple

from spendstream.errors import ConfigError, UnknownModel

__all__ = [
    "PER_MILLION_METERS",
    "PER_UNIT_METERS",
    "PICO_PER_USD",
    "Catalogue",
    "PriceCard",
    "PriceFields",
    "Priced",
    "audio_micros",
    "card_from_mapping",
    "parse_instant",
    "pico_to_usd",
    "usd_to_pico",
]

PICO_PER_USD = 10**12
# Meter name in a card -> UsageEvent field. Prices quoted in USD per 1,000,000 units.
PER_MILLION_METERS: Mapping[str, str] = {
    "input": "input_tokens",
    "cached_input": "cached_input_tokens",
    "cache_write": "cache_write_tokens",
    "cache_write_1h": "cache_write_1h_tokens",
    "output": "output_tokens",
    "input_audio": "input_audio_tokens",
    "output_audio": "output_audio_tokens",
    "characters": "characters",
}
# Prices quoted in USD per single unit. audio_seconds is counted in microseconds internally.
PER_UNIT_METERS: Mapping[str, str] = {
    "audio_seconds": "audio_seconds",
    "images": "images",
    "requests": "requests",
}
TIERS = ("standard", "batch", "flex", "priority")
Status = Literal["priced", "fallback", "unpriced"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def usd_to_pico(amount: Decimal | str | int) -> int:
    """Exact USD -> pico-USD; refuses amounts finer than one pico-USD."""
    value = Decimal(amount) * PICO_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"{amount} USD is not a whole number of pico-USD")
    return int(value)


def pico_to_usd(pico: int) -> Decimal:
    """Exact pico-USD -> Decimal USD (12 decimal places)."""
    return Decimal(pico).scaleb(-12)


def audio_micros(value: bytes | str | Decimal | int | None) -> int:
    """UsageEvent.audio_seconds (Avro decimal, scale 6) as integer microseconds."""
    if value is None or value == b"":
        return 0
    if isinstance(value, str):  # fastavro hands schema defaults for bytes back as str
        value = value.encode("latin-1")
    if isinstance(value, bytes):
        return int.from_bytes(value, "big", signed=True)
    micros = Decimal(value).scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(f"audio_seconds {value} has more than 6 decimals")
    return int(micros)


def parse_instant(value: str | date | datetime) -> int:
    """A card date ("2025-06-10", "2025-06-10T17:00:00Z", TOML date/datetime) as epoch micros (UTC)."""
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        value = datetime.fromisoformat(text) if "T" in text else date.fromisoformat(text)
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    if value.tzinfo is None:
        raise ConfigError(f"{value} needs a time zone (use Z for UTC)")
    return (value - _EPOCH) // _MICRO


_MICRO = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH


def _iso(us: int) -> str:
    dt = _EPOCH + us * _MICRO
    return (
        dt.date().isoformat() if dt.time() == datetime.min.time() else dt.isoformat().replace("+00:00", "Z")
    )


def _pico_rate(card: str, meter: str, price: Any, scale: int) -> int:
    if not isinstance(price, str):
        raise ConfigError(
            f'price card {card}: {meter} must be a decimal string such as "2.50", not {price!r}'
        )
    try:
        value = Decimal(price) * scale
    except InvalidOperation:
        raise ConfigError(f"price card {card}: {meter}={price!r} is not a decimal") from None
    if value < 0 or value != value.to_integral_value():
        raise ConfigError(f"price card {card}: {meter}={price} is not a whole number of pico-USD per unit")
    return int(value)


def _rates(
    card: str, per_million: Mapping[str, Any], per_unit: Mapping[str, Any]
) -> tuple[tuple[str, str, int], ...]:
    """(meter, UsageEvent field, pico-USD per unit) for every priced meter."""
    unknown = (set(per_million) - set(PER_MILLION_METERS)) | (set(per_unit) - set(PER_UNIT_METERS))
    if unknown:
        raise ConfigError(
            f"price card {card}: unknown meters {sorted(unknown)}; per_million takes "
            f"{sorted(PER_MILLION_METERS)}, per_unit takes {sorted(PER_UNIT_METERS)}"
        )
    rates = [(m, PER_MILLION_METERS[m], _pico_rate(card, m, p, 10**6)) for m, p in per_million.items()]
    for meter, price in per_unit.items():
        # audio_seconds arrive in microseconds: pico-USD per microsecond = USD per second x 10^6
        scale = 10**6 if meter == "audio_seconds" else PICO_PER_USD
        rates.append((meter, PER_UNIT_METERS[meter], _pico_rate(card, meter, price, scale)))
    return tuple(rates)


PriceFields = tuple[Status, int | None, "PriceCard | None", dict[str, int], str]  # Priced's, in order


class Priced(NamedTuple):
    """One event's price (a tuple: the meter builds one per event, and unpacks it)."""

    status: Status
    cost_pico: int | None  # None only when unpriced
    card: PriceCard | None
    itemised: dict[str, int]
    reason: str = ""


@dataclass(frozen=True)
class PriceCard:
    """One price, for a set of model ids, a scope and a tier, over a validity interval."""

    provider: str
    models: tuple[str, ...]
    scope: str
    service_tier: str
    effective_from_us: int
    effective_to_us: int | None
    source: str
    checked: str
    per_million: Mapping[str, str]
    per_unit: Mapping[str, str] = field(default_factory=dict)
    per_image: Mapping[str, str] = field(default_factory=dict)
    long_context_above: int | None = None
    long_context_per_million: Mapping[str, str] = field(default_factory=dict)
    fine_tune_of: str | None = None
    note: str = ""
    rates: tuple[tuple[str, str, int], ...] = ()
    long_context_rates: tuple[tuple[str, str, int], ...] = ()
    image_rates: Mapping[str, int] = field(default_factory=dict)

    @cached_property
    def version(self) -> str:
        return _iso(self.effective_from_us)

    @cached_property
    def id(self) -> str:
        model = self.models[0] if self.models else f"ft:{self.fine_tune_of}"
        qualifiers = "".join(
            f"[{q}]" for q in (self.service_tier, self.scope) if q not in ("standard", "global")
        )
        return f"{self.provider}/{model}{qualifiers}@{self.version}"

    def covers(self, at_us: int) -> bool:
        return self.effective_from_us <= at_us and (
            self.effective_to_us is None or at_us < self.effective_to_us
        )

    def price(self, event: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
        """(total pico-USD, pico-USD per meter) for one event."""
        rates = self.rates
        get = event.get
        if (
            self.long_context_above is not None
            and (
                get("input_tokens", 0)
                + get("cached_input_tokens", 0)
                + get("cache_write_tokens", 0)
                + get("cache_write_1h_tokens", 0)
                + get("input_audio_tokens", 0)
            )
            > self.long_context_above
        ):  # a cliff: exactly at the threshold stays base
            rates = self.long_context_rates
        itemised: dict[str, int] = {}
        for meter, fld, rate in rates:
            quantity = get(fld, 0)
            if quantity:
                if meter == "audio_seconds":
                    quantity = audio_micros(quantity)
                    if not quantity:
                        continue
                itemised[meter] = quantity * rate
        total = sum(itemised.values())
        images = event.get("images", 0)
        if images and self.image_rates:
            variant = f"{event.get('image_size', '')}/{event.get('image_quality', '')}"
            image_rate = self.image_rates.get(variant)
            if image_rate is None:
                raise UnknownModel(
                    self.provider,
                    event.get("model", ""),
                    f"no price for images {variant!r} on card {self.id}",
                )
            itemised["images"] = images * image_rate
            total += images * image_rate
        return total, itemised

    def to_record(self) -> dict[str, Any]:
        """As a PriceCard Avro record (the `prices` topic)."""
        return {
            "provider": self.provider,
            "models": list(self.models),
            "fine_tune_of": self.fine_tune_of,
            "scope": self.scope,
            "service_tier": self.service_tier,
            "effective_from": self.effective_from_us,
            "effective_to": self.effective_to_us,
            "source": self.source,
            "checked": self.checked,
            "note": self.note,
            "per_million": dict(self.per_million),
            "per_unit": dict(self.per_unit),
            "per_image": dict(self.per_image),
            "long_context_above": self.long_context_above,
            "long_context_per_million": dict(self.long_context_per_million),
        }


def card_from_mapping(raw: Mapping[str, Any]) -> PriceCard:
    """Build and validate a card from a TOML table or a PriceCard Avro record."""
    provider = raw.get("provider")
    models = tuple(raw.get("models") or ())
    fine_tune_of = raw.get("fine_tune_of") or None
    label = f"{provider}/{models[0] if models else fine_tune_of}"
    if not provider or provider != str(provider).lower():
        raise ConfigError(f"price card {label}: provider must be a lowercase id such as openai")
    if not models and not fine_tune_of:
        raise ConfigError(f"price card {label}: needs models = [...] or fine_tune_of")
    tier = raw.get("service_tier", "standard")
    if tier not in TIERS:
        raise ConfigError(f"price card {label}: service_tier {tier!r} is not one of {TIERS}")
    start = raw.get("effective_from")
    if start is None:
        raise ConfigError(f"price card {label}: effective_from is required")
    start_us = start if isinstance(start, int) else parse_instant(start)
    end = raw.get("effective_to")
    end_us = None if end is None else end if isinstance(end, int) else parse_instant(end)
    if end_us is not None and end_us <= start_us:
        raise ConfigError(f"price card {label}: effective_to must be after effective_from")
    if not raw.get("source"):
        raise ConfigError(f"price card {label}: source (where the price is published) is required")
    per_million = dict(raw.get("per_million") or {})
    per_unit = dict(raw.get("per_unit") or {})
    per_image = dict(raw.get("per_image") or {})
    long_context = raw.get("long_context") or {}
    lc_above = raw.get("long_context_above", long_context.get("above_tokens"))
    lc_per_million = dict(raw.get("long_context_per_million") or long_context.get("per_million") or {})
    if not (per_million or per_unit or per_image):
        raise ConfigError(f"price card {label}: has no prices")
    rates = _rates(label, per_million, per_unit)
    lc_rates: tuple[tuple[str, str, int], ...] = ()
    if lc_above is not None:
        # Meters the long-context table does not list keep their base rate.
        lc_rates = _rates(label, {**per_million, **lc_per_million}, per_unit)
    image_rates = {
        variant: _pico_rate(label, f"image {variant}", p, PICO_PER_USD) for variant, p in per_image.items()
    }
    return PriceCard(
        provider=provider,
        models=models,
        scope=raw.get("scope", "global"),
        service_tier=tier,
        effective_from_us=start_us,
        effective_to_us=end_us,
        source=raw["source"],
        checked=str(raw.get("checked", "")),
        per_million=per_million,
        per_unit=per_unit,
        per_image=per_image,
        long_context_above=lc_above,
        long_context_per_million=lc_per_million,
        fine_tune_of=fine_tune_of,
        note=raw.get("note", "") or "",
        rates=rates,
        long_context_rates=lc_rates,
        image_rates=image_rates,
    )


def _base_of_fine_tune(model: str) -> str | None:
    if model.startswith("ft:"):
        parts = model.split(":")
        return parts[1] if len(parts) > 1 and parts[1] else None
    if ".ft-" in model:  # Azure OpenAI: gpt-4o-mini-2024-07-18.ft-<id>
        return model.split(".ft-", 1)[0]
    return None


_Key = tuple[str, str, str, str]  # provider, model (or "ft:" + base), scope, tier
_PRICE_KEY = itemgetter("provider", "model", "region", "service_tier")
MAX_CARDS_IN_FORCE = 65_536  # remembered card lookups at most (forgotten all at once beyond)


class Catalogue:
    """All price cards, indexed for exact, effective-dated lookup. Cards can be added at run time."""

    def __init__(self, cards: Iterable[PriceCard] = (), fallback: str = "max") -> None:
        self._index: dict[_Key, list[PriceCard]] = {}
        self._fallbacks: dict[tuple[str, str], list[PriceCard]] = {}
        # (provider, model, region, service_tier) of events -> the card card_for() found for them
        # last: still the answer at any instant it covers (a key's cards never overlap), until a
        # card is added.
        self._in_force: dict[tuple[Any, ...], PriceCard] = {}
        self.version = 0
        self.fallback = fallback
        for card in cards:
            self.add(card)

    def __len__(self) -> int:
        return len({id(c) for cards in self._index.values() for c in cards})

    def cards(self) -> list[PriceCard]:
        unique = {id(c): c for cards in self._index.values() for c in cards}
        return sorted(unique.values(), key=lambda c: (c.provider, c.id))

    def add(self, card: PriceCard) -> None:
        """Add a card; a card with the same model, scope, tier and effective_from replaces the old one.

        Validity intervals must not overlap, except that a new open-ended card closes the open card
        it follows (a price change published at run time).
        """
        keys = [(card.provider, m, card.scope, card.service_tier) for m in card.models]
        if card.fine_tune_of:
            keys.append((card.provider, f"ft:{card.fine_tune_of}", card.scope, card.service_tier))
        for key in keys:
            existing = [c for c in self._index.get(key, []) if c.effective_from_us != card.effective_from_us]
            for i, other in enumerate(existing):
                if other.effective_to_us is None and card.effective_to_us is None:
                    if other.effective_from_us < card.effective_from_us:  # the new price supersedes
                        existing[i] = _closed(other, card.effective_from_us)
                        continue
                    raise ConfigError(f"price card {card.id} starts before open card {other.id} for {key[1]}")
                if _overlap(existing[i], card):
                    raise ConfigError(f"price cards {existing[i].id} and {card.id} overlap for {key[1]}")
            existing.append(card)
            existing.sort(key=lambda c: c.effective_from_us)
            self._index[key] = existing
        self.version += 1
        self._fallbacks = {}
        self._in_force = {}

    def card_for(self, provider: str, model: str, scope: str, tier: str, at_us: int) -> PriceCard:
        """The card in force for this model at `at_us`; UnknownModel says why there is none."""
        cards = self._index.get((provider, model, scope, tier))
        if cards is None:
            base = _base_of_fine_tune(model)
            if base is not None:
                cards = self._index.get((provider, f"ft:{base}", scope, tier))
        if cards is None and scope == "global":
            # An event that names no scope takes the model's only one (e.g. Bedrock's `us.` profiles
            # are regional by id); a model priced in several scopes needs the event to say which.
            scopes = {k[2] for k in self._index if k[0] == provider and k[1] == model and k[3] == tier}
            if len(scopes) == 1:
                cards = self._index[(provider, model, scopes.pop(), tier)]
        if cards is None:
            if any(k[0] == provider and k[1] == model for k in self._index):
                raise UnknownModel(provider, model, f"no {tier} price for scope {scope!r}")
            raise UnknownModel(provider, model)
        for card in reversed(cards):
            if card.covers(at_us):
                return card
        raise UnknownModel(provider, model, f"no price in force at {_iso(at_us)}")

    def card_in_force(self, given: tuple[Any, ...], at_us: int) -> PriceCard:
        """`card_for` the (provider, model, region, service_tier) of an event (region and tier may
        be None: global, standard), remembered per key while it covers the instants asked for."""
        card = self._in_force.get(given)
        if card is None or not (
            card.effective_from_us <= at_us and (card.effective_to_us is None or at_us < card.effective_to_us)
        ):
            card = self.card_for(given[0], given[1], given[2] or "global", given[3] or "standard", at_us)
            if len(self._in_force) >= MAX_CARDS_IN_FORCE:
                self._in_force.clear()
            self._in_force[given] = card
        return card

    def price(self, event: Mapping[str, Any]) -> Priced:
        """Price one UsageEvent record. Unknown models are never zero: fallback or unpriced."""
        return Priced(*self.price_fields(event))

    def price_fields(self, event: Mapping[str, Any]) -> PriceFields:
        """`price(event)` as a plain tuple: what the meter unpacks per event (making a Priced costs
        it 0.4 us more)."""
        try:
            given = _PRICE_KEY(event)
        except KeyError:  # a record with fields left out (the codec's have every one)
            given = (event["provider"], event["model"], event.get("region"), event.get("service_tier"))
        at = event["event_time"]
        try:
            card = self.card_in_force(given, at)
            cost, itemised = card.price(event)
            return "priced", cost, card, itemised, ""
        except UnknownModel as exc:
            reason = exc.reason
        tier = given[3] or "standard"
        fallback = self._fallback_card(event["provider"], tier, at)
        if fallback is None:
            return "unpriced", None, None, {}, reason
        try:
            cost, itemised = fallback.price(event)
        except UnknownModel:
            return "unpriced", None, None, {}, reason
        return "fallback", cost, fallback, itemised, reason

    def _fallback_card(self, provider: str, tier: str, at_us: int) -> PriceCard | None:
        """`max`: the provider's most expensive card in force (conservative); `none`; or a card id."""
        if self.fallback == "none":
            return None
        if self.fallback != "max":
            return next((c for c in self.cards() if c.id == self.fallback and c.covers(at_us)), None)
        candidates = self._fallbacks.get((provider, tier))
        if candidates is None:
            candidates = [
                c for c in self.cards() if c.provider == provider and c.service_tier == tier and c.rates
            ]
            candidates.sort(key=lambda c: -sum(r for m, _, r in c.rates if m in ("input", "output")))
            self._fallbacks[(provider, tier)] = candidates
        return next((c for c in candidates if c.covers(at_us)), None)

    @classmethod
    def from_toml(cls, text: str, source: str = "catalogue", fallback: str = "max") -> Catalogue:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls([card_from_mapping(raw) for raw in data.get("card", [])], fallback=fallback)

    @classmethod
    def load(cls, paths: Iterable[Path] = (), fallback: str = "max") -> Catalogue:
        """The shipped seed catalogue, plus the given TOML files (later files add or replace cards)."""
        cat = cls(fallback=fallback)
        seed = resources.files(__package__).joinpath("catalogue")
        texts = [
            (f.name, f.read_text())
            for f in sorted(seed.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".toml")
        ]
        texts += [(str(p), p.read_text()) for p in paths]
        for name, text in texts:
            for card in cls.from_toml(text, name).cards():
                cat.add(card)
        return cat


def _overlap(a: PriceCard, b: PriceCard) -> bool:
    a_end = a.effective_to_us if a.effective_to_us is not None else 2**63
    b_end = b.effective_to_us if b.effective_to_us is not None else 2**63
    return a.effective_from_us < b_end and b.effective_from_us < a_end


def _closed(card: PriceCard, end_us: int) -> PriceCard:
    return replace(card, effective_to_us=end_us)
