"""`spendstream price`, `spendstream prices show|set|import` and `spendstream reprice`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from producers import build_event
from spendstream.cli.console import console, err
from spendstream.errors import ConfigError, InvalidUsage, SpendstreamError
from spendstream.settings import Settings
from spendstream.wire import default_codec
from stream_processors.feeds import cards_of, publish, read_compacted
from stream_processors.pricing import (
    PER_MILLION_METERS,
    PER_UNIT_METERS,
    Catalogue,
    PriceCard,
    card_from_mapping,
    parse_instant,
    pico_to_usd,
)

_SHORT = {
    "cached_input": "cached",
    "cache_write": "write 5m",
    "cache_write_1h": "write 1h",
    "input_audio": "audio in",
    "output_audio": "audio out",
    "audio_seconds": "per s",
    "characters": "chars",
}
prices_app = typer.Typer(no_args_is_help=True, help="The price catalogue: show, set and import price cards.")


def _catalogue(settings: Settings, *, online: bool, fallback: str = "none") -> tuple[Catalogue, int]:
    """Seed catalogue plus the cards published on the prices topic (if the broker answers)."""
    cat = Catalogue.load(fallback=fallback)
    published: list[PriceCard] = []
    if online:
        try:
            records = asyncio.run(
                asyncio.wait_for(
                    read_compacted(
                        settings.bootstrap,
                        settings.topics.prices,
                        default_codec(),
                        kafka_auth=settings.kafka_auth,
                    ),
                    20,
                )
            )
            published = cards_of(records)
        except Exception as exc:  # any broker failure: say so and go on with the seed catalogue
            err.print(
                f"[yellow]warning[/yellow]: prices topic not read ({type(exc).__name__}); seed catalogue only"
            )
    for card in published:
        cat.add(card)
    return cat, len(published)


def _event_from_json(text: str) -> dict[str, Any]:
    """A UsageEvent from `--json`; InvalidUsage in one line for anything that is not one."""
    try:
        raw = json.loads(text, parse_float=Decimal)  # a float count is refused as such, never rounded
    except json.JSONDecodeError as exc:
        raise InvalidUsage(f"--json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidUsage("--json must be one UsageEvent object")
    missing = [k for k in ("provider", "model") if k not in raw]
    if missing:
        raise InvalidUsage(f"--json needs provider, model and at least one meter; missing {missing}")
    when = raw.pop("event_time", None)
    try:
        if isinstance(when, str):
            raw["event_time"] = datetime.fromisoformat(when.replace("Z", "+00:00"))
        elif isinstance(when, int) and not isinstance(when, bool):
            raw["event_time"] = datetime.fromtimestamp(when / 1_000_000, UTC)
        elif when is not None:
            raise ValueError
    except (ValueError, OverflowError, OSError):
        raise InvalidUsage(
            f"--json: event_time must be an ISO 8601 time or epoch microseconds, got {when!r}"
        ) from None
    tags = raw.get("tags")
    if tags is not None and (
        not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values())
    ):
        raise InvalidUsage(
            f'--json: tags must be an object of strings such as {{"team": "data"}}, got {tags!r}'
        )
    for drop in ("event_id",):
        raw.pop(drop, None)
    raw.setdefault("service", "cli")
    raw.setdefault("project", "cli")
    try:
        return build_event(**raw)
    except TypeError as exc:
        raise InvalidUsage(f"--json: {exc}".replace("build_event() ", "")) from None


def register(app: typer.Typer) -> None:
    app.add_typer(prices_app, name="prices")

    @app.command()
    def price(
        ctx: typer.Context,
        json_event: Annotated[
            str, typer.Option("--json", help="One UsageEvent as JSON (event_time ISO or omitted = now).")
        ],
        format: Annotated[str, typer.Option("--format", "-f", help="text or json")] = "text",
        online: Annotated[bool, typer.Option(help="Also read cards published on the prices topic.")] = False,
    ) -> None:
        """Price one event without Kafka: exact total, the card used, and the cost per meter."""
        event = _event_from_json(json_event)
        cat, _ = _catalogue(ctx.obj, online=online)
        priced = cat.price(event)
        if priced.card is None or priced.cost_pico is None:
            raise SpendstreamError(
                f"no price for model {event['model']!r} (provider {event['provider']}): {priced.reason}. "
                "See `spendstream prices show <model>`; add one with `spendstream prices set`."
            )
        card = priced.card
        result = {
            "total_usd": str(pico_to_usd(priced.cost_pico).normalize() if priced.cost_pico else Decimal("0")),
            "card": {"id": card.id, "version": card.version, "source": card.source, "checked": card.checked},
            "itemised": {m: str(pico_to_usd(v).normalize()) for m, v in priced.itemised.items()},
            "provider": event["provider"],
            "model": event["model"],
            "service_tier": event["service_tier"],
            "region": event["region"],
        }
        if format == "json":
            print(json.dumps(result))
            return
        console.print(
            f"[bold]${result['total_usd']}[/bold]  {event['provider']}/{event['model']} "
            f"({event['service_tier']}, {event['region']})"
        )
        console.print(f"card {card.id}  source {card.source} (checked {card.checked})")
        for meter, usd in result["itemised"].items():
            console.print(f"  {meter:16} ${usd}")

    @app.command()
    def reprice(
        ctx: typer.Context,
        from_: Annotated[str, typer.Option("--from", help="Start (inclusive), e.g. 2026-11-01")],
        to: Annotated[str, typer.Option("--to", help="End (exclusive), e.g. 2026-12-01")],
        model: Annotated[str | None, typer.Option(help="Only this model id.")] = None,
    ) -> None:
        """Recompute costs in a time range with the current catalogue, as a new pricing version."""
        settings: Settings = ctx.obj
        start, end = parse_instant(from_), parse_instant(to)
        if end <= start:
            raise ConfigError("--to must be after --from")
        body = {"from_us": start, "to_us": end, "model": model}
        try:
            response = httpx.post(f"http://127.0.0.1:{settings.web_port}/reprice", json=body, timeout=3600)
            report = response.json()
            if response.status_code != 200:
                raise SpendstreamError(report.get("error", response.text))
        except httpx.TransportError:
            from stream_processors.repricer import reprice as run
            from stream_processors.store import ClickHouseStore

            store = ClickHouseStore(settings.dsn, settings.clickhouse_database)
            try:
                store.migrate()
                cat, _ = _catalogue(
                    settings,
                    online=not settings.local_kafka or _broker_up(settings),
                    fallback=settings.unpriced_fallback,
                )
                result = run(store, cat, start, end, model)
                report = {
                    "pricing_version": result.pricing_version,
                    "events": result.events,
                    "rows": result.rows(),
                }
            finally:
                store.close()
        _print_report(report)

    @prices_app.command("show")
    def show(
        ctx: typer.Context,
        model: Annotated[str, typer.Argument(help="Model id, e.g. gpt-4o")],
        online: Annotated[bool, typer.Option(help="Include cards published on the prices topic.")] = True,
    ) -> None:
        """Every card for a model, with its history (seed catalogue + published cards)."""
        cat, published = _catalogue(ctx.obj, online=online)
        cards = [c for c in cat.cards() if model in c.models or c.fine_tune_of == model]
        if not cards:
            raise SpendstreamError(f"no price card for model {model!r}; ids are exact (see docs/pricing.md)")
        cards.sort(key=lambda c: (c.service_tier != "standard", c.service_tier, c.scope, c.effective_from_us))
        meters = [
            m
            for m in (*PER_MILLION_METERS, *PER_UNIT_METERS)
            if any(m in {**c.per_million, **c.per_unit} for c in cards)
        ]
        table = Table(title=f"{model}: USD per 1M tokens (per unit for seconds, images, requests)")
        for name in ("tier", "scope", "from", "to"):
            table.add_column(name, no_wrap=True)
        for m in meters:
            table.add_column(_SHORT.get(m, m), justify="right")
        for c in cards:
            prices = {**c.per_million, **c.per_unit}
            to = "" if c.effective_to_us is None else replace(c, effective_from_us=c.effective_to_us).version
            table.add_row(c.service_tier, c.scope, c.version, to, *(prices.get(m, "") for m in meters))
            if c.long_context_above is not None:
                lc = {**c.per_million, **c.long_context_per_million}
                table.add_row(
                    f"  prompt > {c.long_context_above:,}", "", "", "", *(lc.get(m, "") for m in meters)
                )
        console.print(table)
        for source in sorted({c.source for c in cards}):
            console.print(f"source: {source}")
        console.print(f"{len(cards)} cards ({published} published at run time in the whole catalogue)")

    @prices_app.command("set")
    def set_price(
        ctx: typer.Context,
        provider: Annotated[str, typer.Argument()],
        model: Annotated[str, typer.Argument()],
        source: Annotated[str, typer.Option(help="Where the price is published (URL).")],
        input: Annotated[str | None, typer.Option(help="USD per 1M uncached input tokens")] = None,
        cached_input: Annotated[str | None, typer.Option(help="USD per 1M cache-read tokens")] = None,
        cache_write: Annotated[str | None, typer.Option(help="USD per 1M cache-write tokens (5 min)")] = None,
        cache_write_1h: Annotated[
            str | None, typer.Option(help="USD per 1M 1-hour cache-write tokens")
        ] = None,
        output: Annotated[str | None, typer.Option(help="USD per 1M output tokens")] = None,
        effective_from: Annotated[str | None, typer.Option(help="UTC date or time; default now")] = None,
        tier: Annotated[str, typer.Option(help="standard, batch, flex, priority")] = "standard",
        scope: Annotated[str, typer.Option(help="global, regional, data_zone")] = "global",
    ) -> None:
        """Publish a price for a model; it prices events from `--effective-from` on, without restarts."""
        per_million = {
            k: v
            for k, v in {
                "input": input,
                "cached_input": cached_input,
                "cache_write": cache_write,
                "cache_write_1h": cache_write_1h,
                "output": output,
            }.items()
            if v is not None
        }
        start = effective_from or datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        card = card_from_mapping(
            {
                "provider": provider,
                "models": [model],
                "scope": scope,
                "service_tier": tier,
                "effective_from": start,
                "source": source,
                "checked": datetime.now(UTC).date().isoformat(),
                "per_million": per_million,
            }
        )
        _publish(ctx.obj, [card])

    @prices_app.command("import")
    def import_(
        ctx: typer.Context,
        file: Annotated[Path, typer.Argument(help="TOML file of [[card]] tables (format: docs/pricing.md)")],
    ) -> None:
        """Validate every card in a file and publish them to the prices topic."""
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
        _publish(ctx.obj, Catalogue.from_toml(text, str(file)).cards())


def _broker_up(settings: Settings) -> bool:
    from spendstream.cli.up import local_kafka

    return local_kafka(settings).status().running


def _publish(settings: Settings, cards: list[PriceCard]) -> None:
    from spendstream.topics import ensure_topics, wait_for_broker

    asyncio.run(wait_for_broker(settings.bootstrap, timeout=10, kafka_auth=settings.kafka_auth))
    asyncio.run(
        ensure_topics(
            settings.bootstrap, settings.topics, settings.partitions, kafka_auth=settings.kafka_auth
        )
    )
    cat, _ = _catalogue(settings, online=True)
    for card in cards:  # overlaps and bad prices fail here, before anything is published
        cat.add(card)
    codec = default_codec()
    records: list[tuple[bytes, bytes | None]] = [
        (card.id.encode(), codec.encode("PriceCard", card.to_record())) for card in cards
    ]
    asyncio.run(publish(settings.bootstrap, settings.topics.prices, records, settings.kafka_auth))
    for card in cards:
        console.print(f"published {card.id} to {settings.topics.prices}")


def _print_report(report: dict[str, Any]) -> None:
    table = Table(
        "project",
        "model",
        "events",
        "previous USD",
        "new USD",
        "delta USD",
        "newly priced",
        title=f"pricing version {report['pricing_version']}: {report['events']:,} events re-priced",
    )
    for r in report["rows"]:
        table.add_row(
            r["project"],
            r["model"],
            f"{r['events']:,}",
            r["previous_usd"],
            r["new_usd"],
            r["delta_usd"],
            str(r["newly_priced"]),
        )
    console.print(table)
