"""`spendstream report`: the chargeback of a period, per team, project, user, model or tag.

Totals are exact (`Decimal`, to the pico-USD): the grand total is `sum(cost_usd)` over
`usage_events FINAL` in the same half-open UTC range, to the last unit. Unpriced events have no
cost (NULL, never zero): they are counted and shown as a share, so a bill with gaps says so.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from html import escape
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from spendstream.cli.console import console, err
from spendstream.cli.dashboard import data
from spendstream.cli.dashboard.svg import money
from spendstream.cli.reads import query
from spendstream.errors import ConfigError, SpendstreamError
from spendstream.settings import Settings
from stream_processors.pricing import pico_to_usd

__all__ = ["Chargeback", "chargeback", "register", "render_csv", "render_html", "render_json"]

FORMATS = ("table", "csv", "json", "html")


@dataclass(frozen=True)
class Line:
    """One group's bill: exact spend, events, unpriced events, and its monthly budget if it has one."""

    label: str
    usd: Decimal
    events: int
    unpriced: int
    fallback: int
    budget_usd: Decimal | None  # the scope's monthly limit (a one-month report only)

    @property
    def unpriced_share(self) -> Decimal:
        return Decimal(self.unpriced) / self.events if self.events else Decimal(0)

    @property
    def spend(self) -> str:
        """Money to the cent; "unknown" when none of the events has a price (NULL, never $0)."""
        return "unknown" if self.events and self.unpriced == self.events else money(self.usd)

    @property
    def budget_use(self) -> Decimal | None:
        return self.usd / self.budget_usd if self.budget_usd else None


@dataclass(frozen=True)
class Chargeback:
    period: data.Period
    by: data.Grouping
    lines: list[Line]

    @property
    def total_usd(self) -> Decimal:
        return sum((line.usd for line in self.lines), Decimal(0))

    @property
    def events(self) -> int:
        return sum(line.events for line in self.lines)

    @property
    def unpriced(self) -> int:
        return sum(line.unpriced for line in self.lines)


def _one_month(period: data.Period) -> bool:
    start, end = period.start, period.end
    return (
        start.day == 1
        and start.time() == end.time() == datetime.min.time()
        and ((end.year * 12 + end.month) - (start.year * 12 + start.month) == 1 and end.day == 1)
    )


def chargeback(
    run: data.Query, period: data.Period, by: data.Grouping, monthly_limits: dict[str, Decimal]
) -> Chargeback:
    """The period's spend per group; `monthly_limits` (scope -> USD) gives the budget use of a
    one-month report for project, team and user groups."""
    month = _one_month(period)
    lines = [
        Line(
            t.label,
            t.usd,
            t.events,
            t.unpriced,
            t.fallback,
            monthly_limits.get(f"{by.kind}:{t.label}") if month else None,
        )
        for t in data.totals(run, by, period)
    ]
    return Chargeback(period, by, lines)


def _percent(share: Decimal | None) -> str:
    return "" if share is None else f"{share * 100:.1f}%"


def render_json(report: Chargeback) -> str:
    """Money as exact decimal strings, shares as decimal fractions."""
    return json.dumps(
        {
            "period": {
                "name": report.period.name,
                "from": report.period.start.isoformat(),
                "to": report.period.end.isoformat(),
            },
            "by": report.by.name,
            "rows": [
                {
                    report.by.kind: line.label,
                    "cost_usd": f"{line.usd:f}",
                    "events": line.events,
                    "unpriced_events": line.unpriced,
                    "fallback_events": line.fallback,
                    "unpriced_share": f"{line.unpriced_share:.6f}",
                    "budget_usd": None if line.budget_usd is None else f"{line.budget_usd:f}",
                    "budget_use": None if line.budget_use is None else f"{line.budget_use:.6f}",
                }
                for line in report.lines
            ],
            "total": {
                "cost_usd": f"{report.total_usd:f}",
                "events": report.events,
                "unpriced_events": report.unpriced,
            },
        },
        indent=2,
    )


def render_csv(report: Chargeback) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            report.by.kind,
            "cost_usd",
            "events",
            "unpriced_events",
            "fallback_events",
            "unpriced_share",
            "budget_usd",
            "budget_use",
        ]
    )
    for line in report.lines:
        writer.writerow(
            [
                line.label,
                f"{line.usd:f}",
                line.events,
                line.unpriced,
                line.fallback,
                f"{line.unpriced_share:.6f}",
                "" if line.budget_usd is None else f"{line.budget_usd:f}",
                "" if line.budget_use is None else f"{line.budget_use:.6f}",
            ]
        )
    writer.writerow(["TOTAL", f"{report.total_usd:f}", report.events, report.unpriced, "", "", "", ""])
    return buf.getvalue().rstrip("\n")


def render_table(report: Chargeback) -> Table:
    table = Table(
        report.by.name,
        "spend",
        "events",
        "unpriced",
        "budget",
        "use",
        title=f"Chargeback {report.period.label}",
    )
    for line in report.lines:
        table.add_row(
            line.label,
            line.spend,
            f"{line.events:,}",
            _percent(line.unpriced_share) if line.unpriced else "",
            money(line.budget_usd) if line.budget_usd is not None else "",
            _percent(line.budget_use),
        )
    table.add_section()
    table.add_row("total", money(report.total_usd), f"{report.events:,}", f"{report.unpriced:,}", "", "")
    return table


def render_html(report: Chargeback, generated: datetime | None = None) -> str:
    """One self-contained file (styles inline, bars as inline SVG, no script, nothing fetched)."""
    generated = generated or datetime.now(UTC)
    css = files("spendstream.cli.dashboard").joinpath("static", "dashboard.css").read_text()
    top = max((line.usd for line in report.lines), default=Decimal(0))
    rows = []
    for line in report.lines:
        width = float(line.usd / top * 100) if top > 0 else 0.0
        rows.append(
            f"<tr><td>{escape(line.label)}</td>"
            f'<td class="barcell"><svg class="bar" viewBox="0 0 100 14" preserveAspectRatio="none">'
            f'<rect x="0" y="2" width="{width:.2f}" height="10" class="fill"/></svg></td>'
            f'<td class="num" title="${line.usd:f}">{line.spend}</td><td class="num">{line.events:,}</td>'
            f'<td class="num">{_percent(line.unpriced_share) if line.unpriced else ""}</td>'
            f'<td class="num">{money(line.budget_usd) if line.budget_usd is not None else ""}</td>'
            f'<td class="num">{_percent(line.budget_use)}</td></tr>'
        )
    gaps = (
        f'<p class="hint">{report.unpriced:,} of {report.events:,} events have no price (cost unknown, not in the '
        "totals): add their models to the catalogue and re-price.</p>"
        if report.unpriced
        else ""
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Chargeback {escape(report.period.label)}</title><style>{css}</style></head><body><main>"
        f"<h1>Chargeback by {escape(report.by.name)}</h1>"
        f'<p class="hint">{escape(report.period.label)} · generated {generated:%Y-%m-%d %H:%M} UTC by spendstream · '
        "exact totals from usage_events (each event once)</p>"
        '<div class="tiles"><div class="tile"><div class="label">Total</div>'
        f'<span class="big" title="${report.total_usd:f}">{money(report.total_usd)}</span>'
        f"<small>{report.events:,} events</small></div></div>"
        f'<section><table class="wide"><thead><tr><th>{escape(report.by.name)}</th><th></th><th class=num>spend</th>'
        "<th class=num>events</th><th class=num>unpriced</th><th class=num>monthly budget</th><th class=num>use</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody>"
        f'<tfoot><tr><th>total</th><th></th><th class=num title="${report.total_usd:f}">{money(report.total_usd)}</th>'
        f"<th class=num>{report.events:,}</th><th class=num>{report.unpriced:,}</th><th></th><th></th></tr></tfoot>"
        f"</table>{gaps}</section></main></body></html>"
    )


def _monthly_limits(settings: Settings) -> dict[str, Decimal]:
    """scope -> monthly limit (USD), from the budgets topic; none if Kafka cannot be read."""
    from spendstream.cli.budgets import current_specs

    try:
        specs = current_specs(settings)
    except (SpendstreamError, OSError) as exc:
        err.print(f"[yellow]warning[/yellow]: budgets not read ({exc}); the report has no budget use")
        return {}
    return {
        scope: pico_to_usd(lim.limit_pico)
        for scope, spec in specs.items()
        for lim in spec.limits
        if lim.window == "monthly"
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        ctx: typer.Context,
        period: Annotated[
            str | None, typer.Option(help="A month (2026-11), or today, 7d, 30d, month, last-month.")
        ] = None,
        from_: Annotated[
            str | None, typer.Option("--from", help="First day (YYYY-MM-DD, UTC), with --to.")
        ] = None,
        to: Annotated[str | None, typer.Option(help="Last day, included (YYYY-MM-DD, UTC).")] = None,
        by: Annotated[str, typer.Option(help="team, project, user, model or tag:KEY")] = "team",
        format: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or html")] = "table",
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
        budgets: Annotated[bool, typer.Option(help="Read the budgets topic for budget use.")] = True,
    ) -> None:
        """Chargeback: exact spend per team/project/user/model/tag over a period, with event counts,
        unpriced share and budget use. The total equals sum(cost_usd) over the same range."""
        settings: Settings = ctx.obj
        if format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
        if (from_ is None) != (to is None) or (from_ and period):
            raise ConfigError("give --period, or --from and --to (both days included), not both")
        if from_ and to:
            try:
                when = data.date_range(date.fromisoformat(from_), date.fromisoformat(to))
            except ValueError as exc:
                raise ConfigError(f"--from/--to are days such as 2026-11-01: {exc}") from None
        else:
            when = data.period(period or "month")
        grouping = data.grouping(by)
        limits = _monthly_limits(settings) if budgets and grouping.kind in ("project", "team", "user") else {}
        result = chargeback(lambda sql: query(settings, sql), when, grouping, limits)
        out: str | Table
        if format == "table":
            out = render_table(result)
        else:
            out = {"csv": render_csv, "json": render_json, "html": render_html}[format](result)
        if output is not None:
            if isinstance(out, Table):
                with output.open("w") as f:
                    Console(file=f, width=120).print(out)
            else:
                output.write_text(out + "\n")
            err.print(f"wrote {output}")
        elif isinstance(out, Table):
            console.print(out)
        else:
            print(out)
