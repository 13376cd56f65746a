"""`spendstream budget set|list|rm|import|runaway` and `spendstream block|unblock`.

Budgets live on the compacted `budgets` topic (key = scope). Every command reads the scope's
current spec from the topic, changes it, and publishes it: the worker applies it at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from gateway.policy import Policy
from spendstream.cli.console import console, err
from spendstream.cli.reads import worker_budgets
from spendstream.errors import ConfigError, SpendstreamError
from spendstream.settings import Settings
from spendstream.wire import default_codec
from stream_processors.budgets import (
    MAX_REASON_CHARS,
    Spec,
    load_specs,
    make_limit,
    parse_scope,
    runaway_pico_checked,
    utc_from_micros,
)
from stream_processors.feeds import budget_rejection, read_compacted

_CENT = Decimal("0.01")
budget_app = typer.Typer(no_args_is_help=True, help="Budgets per scope, managed at run time.")


def ready_topics(settings: Settings) -> None:
    """Wait for the broker and create whichever topic is missing (ConfigError if there is none)."""
    from spendstream.topics import ensure_topics, wait_for_broker

    asyncio.run(wait_for_broker(settings.bootstrap, timeout=10, kafka_auth=settings.kafka_auth))
    asyncio.run(
        ensure_topics(
            settings.bootstrap, settings.topics, settings.partitions, kafka_auth=settings.kafka_auth
        )
    )


def current_specs(settings: Settings) -> dict[str, Spec]:
    """The specs the worker applies: with verify keys, the latest signed one of each scope. A record
    the worker refuses as invalid (it dead-letters it) is skipped with a warning."""
    verifier = settings.verifier()

    def admit(key: bytes, value: bytes | None, record: dict[str, Any] | None, kept: Any) -> bool:
        return budget_rejection(verifier, key, value, record, kept["updated_at"] if kept else None) is None

    records = asyncio.run(
        read_compacted(
            settings.bootstrap, settings.topics.budgets, default_codec(), admit, settings.kafka_auth
        )
    )
    specs = {}
    for key, record in records.items():
        if record is None or record["removed"]:
            continue
        try:
            specs[key.decode()] = Spec.from_record(record)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            _warn(f"skipped the invalid budget record {key!r} on {settings.topics.budgets}: {exc}")
    return specs


def _warn(message: str) -> None:

    err.print(f"[yellow]warning[/yellow]: {escape(message)}", soft_wrap=True)


def _publish(settings: Settings, specs: list[Spec], removed: tuple[str, ...] = ()) -> None:
    from spendstream.cli.up import publish_specs

    asyncio.run(publish_specs(settings, specs, removed))


def _change(settings: Settings, scope: str, **changes: Any) -> Spec:
    parse_scope(scope)
    ready_topics(settings)
    spec = current_specs(settings).get(scope, Spec(scope))
    spec = dataclasses.replace(spec, **changes)
    _publish(settings, [spec])
    return spec


def register(app: typer.Typer) -> None:
    app.add_typer(budget_app, name="budget")

    @budget_app.command("set")
    def set_budget(
        ctx: typer.Context,
        scope: Annotated[
            str, typer.Argument(help="org, team:<id>, project:<id>, user:<id>, project:<id>/model:<glob>")
        ],
        amount: Annotated[str, typer.Argument(help="Limit in USD, e.g. 500 or 12.50")],
        window: Annotated[str, typer.Option(help="daily, weekly, monthly, or rolling:<n>m|h|d")] = "monthly",
        tz: Annotated[str, typer.Option(help="IANA time zone of calendar windows")] = "UTC",
        warn: Annotated[str, typer.Option(help="Warn levels in percent, comma-separated")] = "50,80",
        mode: Annotated[str, typer.Option(help="hard (block at the limit) or soft (warn only)")] = "hard",
    ) -> None:
        """Set (or replace) the budget of a scope for one window; applied at once, no restart."""
        try:
            levels = [int(x) for x in warn.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--warn takes percentages such as 50,80, not {warn!r}") from None
        limit = make_limit(scope, window, amount, tz, levels, mode)
        settings: Settings = ctx.obj
        parse_scope(scope)
        ready_topics(settings)
        spec = current_specs(settings).get(scope, Spec(scope))
        others = tuple(lim for lim in spec.limits if (lim.window, lim.tz) != (window, tz))
        _publish(settings, [dataclasses.replace(spec, limits=(*others, limit))])
        console.print(f"budget {scope}: {window} ({tz}) ${amount} {mode}, warn at {levels}%")

    @budget_app.command("rm")
    def rm_budget(
        ctx: typer.Context,
        scope: Annotated[str, typer.Argument()],
        window: Annotated[str | None, typer.Option(help="Remove only this window's limit")] = None,
    ) -> None:
        """Remove a scope's budgets (or one window's); a blocked scope unblocks at once."""
        settings: Settings = ctx.obj
        ready_topics(settings)
        spec = current_specs(settings).get(parse_scope(scope))
        if spec is None:
            raise SpendstreamError(f"{scope} has no budget (see `spendstream budget list`)")
        if window is None:
            _publish(settings, [], removed=(scope,))  # decided ok at once
            console.print(f"removed every budget of {scope}")
            return
        kept = tuple(lim for lim in spec.limits if lim.window != window)
        if len(kept) == len(spec.limits):
            raise SpendstreamError(f"{scope} has no {window} budget")
        _publish(settings, [dataclasses.replace(spec, limits=kept)])
        console.print(f"removed the {window} budget of {scope}")

    @budget_app.command("runaway")
    def runaway(
        ctx: typer.Context,
        scope: Annotated[str, typer.Argument()],
        multiplier: Annotated[
            int,
            typer.Option(
                help="Block when the last 5 min cost more than N x the hour's 5-min average (0 = off)"
            ),
        ] = 10,
        usd_per_minute: Annotated[
            str | None, typer.Option(help="Block when the last 5 min average more than this per minute")
        ] = None,
    ) -> None:
        """Set the runaway rule of a scope (the weekend backlog script)."""
        per_min = runaway_pico_checked(f"runaway {scope}", usd_per_minute) if usd_per_minute else None
        _change(ctx.obj, scope, runaway_multiplier=multiplier, runaway_pico_per_minute=per_min)
        console.print(
            f"runaway rule for {scope}: multiplier {multiplier}, ceiling ${usd_per_minute or '-'}/min"
        )

    @budget_app.command("import")
    def import_budgets(
        ctx: typer.Context, file: Annotated[Path, typer.Argument(help="YAML or TOML budgets file")]
    ) -> None:
        """Publish every budget of a file (the format of SPENDSTREAM_BUDGETS_FILE). Its gateway policy
        (tiers:, projects:) is checked, not published: gateways read it from SPENDSTREAM_POLICY_FILE."""
        specs = load_specs(file)
        policy = Policy.load(file)
        ready_topics(ctx.obj)
        _publish(ctx.obj, specs)
        console.print(f"imported {len(specs)} scopes from {file}")
        if policy.tiers or policy.project_tiers or policy.project_cache_ttl:
            projects = set(policy.project_tiers) | set(policy.project_cache_ttl)
            console.print(
                f"checked the gateway policy: {len(policy.tiers)} tiers, {len(projects)} projects "
                "(gateways read it from SPENDSTREAM_POLICY_FILE)"
            )

    @budget_app.command("list")
    def list_budgets(ctx: typer.Context) -> None:
        """Every budget with its current window, spend, percentage and state."""
        rows = worker_budgets(ctx.obj)
        table = Table("scope", "window", "spend", "limit", "%", "state", "until (UTC)")
        for r in rows:
            colour = {"blocked": "red", "warn": "yellow"}.get(r["state"], "green")
            try:
                end = f"{utc_from_micros(r['window_end']):%Y-%m-%d %H:%M}" if r["window_end"] else ""
                spend = f"${Decimal(r['spend_usd']).quantize(_CENT):,}" if r["spend_usd"] else ""
                limit = f"${Decimal(r['limit_usd']).quantize(_CENT):,}" if r["limit_usd"] else ""
            except (ArithmeticError, OverflowError, ValueError) as exc:  # one bad row, not the whole list
                _warn(f"skipped {r['scope']} {r['window']}: {exc!r}")
                continue
            table.add_row(
                r["scope"],
                r["window"],
                spend,
                limit,
                f"{r['percent']:.1f}",
                f"[{colour}]{r['state']}[/{colour}] {r['reason']}",
                end,
            )
        console.print(table)

    @app.command()
    def block(
        ctx: typer.Context,
        scope: Annotated[str, typer.Argument()],
        reason: Annotated[str, typer.Option(help="Why (shown to everyone refused)")],
    ) -> None:
        """Operator kill switch: block a scope now, until `spendstream unblock`."""
        if not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise ConfigError(
                f"--reason says why {scope} is blocked (shown to every caller refused): "
                f'1 to {MAX_REASON_CHARS} characters, e.g. --reason "incident 4711"'
            )
        _change(ctx.obj, scope, manual_block=True, manual_reason=reason)
        console.print(f"[red]blocked[/red] {scope}: {reason}")

    @app.command()
    def unblock(ctx: typer.Context, scope: Annotated[str, typer.Argument()]) -> None:
        """Lift a manual block (budgets still apply)."""
        _change(ctx.obj, scope, manual_block=False, manual_reason="")
        console.print(f"[green]unblocked[/green] {scope}")
