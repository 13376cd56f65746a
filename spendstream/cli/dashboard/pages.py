"""The dashboard's HTML, rendered on the server (no template engine, no script from elsewhere).

Every amount is shown by `usd()`: money to the cent, the exact Decimal in `title` and `data-usd`
(what the browser tests compare with SQL)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from typing import Any
from urllib.parse import urlencode

from spendstream.cli.dashboard import data
from spendstream.cli.dashboard.svg import budget_bar, money, stacked_bars

__all__ = [
    "budgets_section",
    "change_item",
    "control_page",
    "control_row",
    "health_page",
    "overview_page",
    "scope_page",
    "spend_page",
    "state_badge",
    "usd",
]

NAV = (("/", "Overview"), ("/spend", "Spend"), ("/control", "Kill switch"), ("/numbers", "Health"))
_PERIOD_NAMES = {
    "today": "Today",
    "24h": "Last 24 h",
    "7d": "Last 7 days",
    "30d": "Last 30 days",
    "month": "This month",
    "last-month": "Last month",
}


def usd(amount: Decimal, cls: str = "usd") -> str:
    return f'<span class="{cls}" data-usd="{amount:f}" title="${amount:f}">{money(amount)}</span>'


def _when(moment: Any) -> str:
    """A time for people, in UTC: from epoch micros, an ISO string or a datetime (naive = UTC, as
    ClickHouse's DateTime64(6, 'UTC') columns arrive)."""
    if not moment:
        return "—"
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment / 1e6, UTC)
    elif not isinstance(moment, datetime):
        moment = datetime.fromisoformat(str(moment))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _epoch_ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def layout(title: str, active: str, body: str, error: str = "") -> str:
    nav = "".join(
        f'<a href="{href}"{" class=active" if href == active else ""}>{name}</a>' for href, name in NAV
    )
    banner = f'<div class="error" role="alert">{escape(error)}</div>' if error else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · spendstream</title>"
        '<link rel="stylesheet" href="/static/dashboard.css"></head><body>'
        f'<header><span class="brand">spendstream</span><nav>{nav}</nav>'
        '<span id="feed" class="feed" title="live feed of spend.control">● live</span></header>'
        f"<main><h1>{escape(title)}</h1>{banner}{body}</main>"
        '<script src="/static/live.js"></script></body></html>'
    )


def state_badge(state: str, reason: str = "") -> str:
    label = escape(state) + (
        f" <small>{escape(reason)}</small>" if reason and reason != "within_budget" else ""
    )
    return f'<span class="badge {escape(state)}">{label}</span>'


def scope_link(scope: str) -> str:
    """A budget scope (`project:x`, `team:x`, `user:x`, `project:x/model:*`, `org`) to its drill-down."""
    head = scope.split("/", 1)[0]
    kind, _, value = head.partition(":")
    if kind in ("project", "team", "user") and value:
        href = "/scope?" + urlencode({"by": kind, "id": value, "period": "month"})
    else:
        href = "/spend?" + urlencode({"period": "month", "by": "project"})
    return f'<a href="{escape(href)}">{escape(scope)}</a>'


def control_row(s: Mapping[str, Any]) -> str:
    """One scope's latest ControlSignal (also sent, rendered, on the event stream)."""
    what = s["reason"] + (f" {s['level']}%" if s["reason"] == "threshold" and s.get("level") else "")
    spend = ""
    if Decimal(s["limit_usd"]):
        spend = f"{usd(Decimal(s['spend_usd']))} of {usd(Decimal(s['limit_usd']))}"
    return (
        f'<tr data-scope="{escape(s["scope"])}" data-state="{escape(s["state"])}" data-seq="{s["sequence"]}" '
        f'data-decided="{_epoch_ms(s["decided_at"])}">'
        f"<td>{state_badge(s['state'])}</td><td>{scope_link(s['scope'])}</td><td>{escape(what)}</td>"
        f'<td class="num">{spend}</td><td class="opt">{escape(s.get("window") or "")}</td>'
        f'<td class="when">{_when(s["decided_at"])}</td><td class="num opt">{s["sequence"]}</td></tr>'
    )


def _control_table(current: Iterable[Mapping[str, Any]], only_active: bool) -> str:
    rows = sorted(current, key=lambda s: ({"blocked": 0, "warn": 1}.get(s["state"], 2), s["scope"]))
    body = "".join(s["row_html"] for s in rows if not only_active or s["state"] != "ok")
    return (
        '<table id="killswitch" class="wide"><thead><tr><th>state</th><th>scope</th><th>why</th>'
        '<th class="num">spend</th><th class="opt">window</th><th>decided</th><th class="num opt">seq</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
        '<p class="hint" id="killswitch-empty">The state of every scope on <code>spend.control</code>, '
        "live: changes appear here without a reload.</p>"
    )


def _tiles(items: list[tuple[str, str, str]]) -> str:
    return (
        '<div class="tiles">'
        + "".join(
            f'<div class="tile" id="{i}"><div class="label">{label}</div>{value}</div>'
            for i, label, value in items
        )
        + "</div>"
    )


def _window_state(b: Mapping[str, Any], signal: Mapping[str, Any] | None) -> tuple[str, str]:
    """The state shown for one budget window. The worker decides one state per scope (its most
    severe window): that window's row, and every row of a scope blocked by hand or for runaway,
    show it; the scope's other windows show where their own spend stands against their marks."""
    if signal is None:
        return b["state"], b["reason"]
    if signal["window"] == b["window"] or signal["reason"] in ("manual", "runaway"):
        return signal["state"], signal["reason"]
    percent = Decimal(str(b["percent"]))
    if percent >= 100:
        return ("blocked", "budget_exceeded") if b["mode"] == "hard" else ("warn", "threshold")
    if any(percent >= level for level in b.get("warn_percent") or ()):
        return "warn", "threshold"
    return "ok", ""


def budgets_section(budgets: list[dict[str, Any]] | None, control: Mapping[str, Mapping[str, Any]]) -> str:
    """The budgets table (`control`: scope -> its latest signal); the overview refreshes it from
    /fragments/budgets on every signal, so bars and states move together."""
    if budgets is None:
        return '<p class="hint">No worker answers: budgets and spend-to-date come from the worker.</p>'
    rows = []
    for b in budgets:
        if not b["limit_usd"]:
            continue
        spend, limit = Decimal(b["spend_usd"]), Decimal(b["limit_usd"])
        state, reason = _window_state(b, control.get(b["scope"]))
        burn = Decimal(b.get("burn_usd_per_hour") or 0)
        forecast = _when(b["projected_at"]) if b.get("projected_at") else "—"
        rows.append(
            f'<tr data-scope="{escape(b["scope"])}" data-window="{escape(b["window"])}">'
            f"<td>{scope_link(b['scope'])}<br><small>{escape(b['window'])} · {escape(b['mode'])}</small></td>"
            f'<td class="barcell">{budget_bar(spend, limit, state, list(b.get("warn_percent") or [50, 80]))}'
            f"<small>{usd(spend)} of {usd(limit)} · {b['percent']:.1f}%</small></td>"
            f'<td class="state">{state_badge(state, reason)}</td>'
            f'<td class="num">{usd(burn)}/h</td><td>{forecast}</td><td class="opt">{_when(b["window_end"])}</td></tr>'
        )
    if not rows:
        return '<p class="hint">No budgets yet: <code>spendstream budget set project:NAME 500</code>.</p>'
    return (
        '<table id="budgets" class="wide"><thead><tr><th>scope</th><th>spend vs limit</th>'
        "<th>state</th><th class=num>burn</th><th>forecast</th><th class=opt>until</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="hint">Marks at the warn levels and at 100% of the limit. Burn: the last hour\'s rate; '
        "forecast: when the limit is reached at that rate (within the window).</p>"
    )


def _spend_of(amount: Decimal, events: int, unpriced: int) -> str:
    """The group's spend; "unknown" when none of its events has a price (NULL, never $0)."""
    if events and unpriced == events:
        return '<span class="usd" data-usd="0" title="no event has a price: cost unknown">unknown</span>'
    return usd(amount)


def _totals_table(rows: list[data.GroupTotal], by: data.Grouping, period: str, table_id: str) -> str:
    if not rows:
        return '<p class="hint">No events in this period.</p>'
    body = "".join(
        f'<tr data-label="{escape(r.label)}"><td><a href="/scope?{escape(urlencode({"by": by.name, "id": r.label, "period": period}))}">'
        f"{escape(r.label)}</a></td><td class=num>{r.events:,}</td>"
        f'<td class="num total">{_spend_of(r.usd, r.events, r.unpriced)}</td><td class=num>{r.unpriced:,}</td></tr>'
        for r in rows
    )
    grand = sum((r.usd for r in rows), Decimal(0))
    return (
        f'<table id="{table_id}" class="wide"><thead><tr><th>{escape(by.name)}</th><th class=num>events</th>'
        f"<th class=num>spend</th><th class=num>unpriced</th></tr></thead><tbody>{body}</tbody>"
        f"<tfoot><tr><th>total</th><th class=num>{sum(r.events for r in rows):,}</th>"
        f'<th class="num grand">{usd(grand)}</th><th class=num>{sum(r.unpriced for r in rows):,}</th></tr></tfoot></table>'
    )


def overview_page(
    today: tuple[Decimal, int],
    month: tuple[Decimal, int],
    by_project: list[data.GroupTotal],
    budgets: list[dict[str, Any]] | None,
    control: Iterable[Mapping[str, Any]],
    error: str = "",
) -> str:
    control = list(control)
    blocked = sum(1 for s in control if s["state"] == "blocked")
    tiles = _tiles(
        [
            ("today", "Spend today (UTC)", f"{usd(today[0], 'usd big')}<small>{today[1]:,} events</small>"),
            ("month", "Spend this month", f"{usd(month[0], 'usd big')}<small>{month[1]:,} events</small>"),
            (
                "blocked",
                "Scopes blocked now",
                f'<span class="big" id="blocked-count">{blocked}</span><small>live</small>',
            ),
        ]
    )
    body = (
        tiles
        + f'<section><h2>Budgets</h2><div id="budgets-live">{budgets_section(budgets, {s["scope"]: s for s in control})}</div></section>'
        + f"<section><h2>Kill switch <small>(blocked and warned scopes, live)</small></h2>{_control_table(control, True)}</section>"
        + "<section><h2>This month by project</h2>"
        + _totals_table(by_project, data.grouping("project"), "month", "projects")
        + "</section>"
    )
    return layout("Overview", "/", body, error)


def _selectors(action: str, period: str, by: str | None, extra: Mapping[str, str] | None = None) -> str:
    """The period selector, and the grouping one unless `by` is None; changing one reloads the page."""
    periods = "".join(
        f'<option value="{p}"{" selected" if p == period else ""}>{_PERIOD_NAMES[p]}</option>'
        for p in data.PERIODS
    )
    if period not in data.PERIODS:
        periods += f'<option value="{escape(period)}" selected>{escape(period)}</option>'
    hidden = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in (extra or {}).items()
    )
    grouping = ""
    if by is not None:
        tag = by[4:] if by.startswith("tag:") else ""
        options = "".join(
            f'<option value="{g}"{" selected" if g == by else ""}>{g}</option>' for g in data.GROUPINGS[:4]
        )
        options += f'<option value="tag"{" selected" if tag else ""}>tag…</option>'
        grouping = (
            f'<label>group by <select name="by" id="by">{options}</select></label>'
            f'<label class="tagkey">tag key <input name="tag" id="tag" value="{escape(tag)}" size="10"></label>'
        )
    return (
        f'<form class="selectors" method="get" action="{action}">{hidden}'
        f'<label>period <select name="period" id="period">{periods}</select></label>{grouping}'
        "<button type=submit>show</button></form>"
    )


def spend_page(
    when: data.Period, by: data.Grouping, series: data.Series, rows: list[data.GroupTotal], error: str = ""
) -> str:
    body = (
        _selectors("/spend", when.name, by.name)
        + f'<p class="hint">{escape(when.label)}, by {escape(by.name)}, stacked per {when.bucket} '
        "(largest 8 groups; the rest as other).</p>"
        + f'<div class="chartbox" id="chart">{stacked_bars(series.buckets, series.values, when.bucket == "hour")}</div>'
        + _totals_table(rows, by, when.name, "totals")
    )
    return layout("Spend over time", "/spend", body, error)


def scope_page(
    by: data.Grouping,
    value: str,
    when: data.Period,
    spent: tuple[Decimal, int],
    series: data.Series,
    models: list[data.GroupTotal],
    breakdown: list[data.GroupTotal],
    breakdown_by: data.Grouping,
    budgets: list[dict[str, Any]],
    control: Iterable[Mapping[str, Any]],
    error: str = "",
) -> str:
    tiles = _tiles(
        [
            (
                "scope-total",
                f"Spend ({escape(when.label)})",
                f"{usd(spent[0], 'usd big')}<small>{spent[1]:,} events</small>",
            ),
        ]
    )
    control_html = _control_table(control, False) if control else ""
    body = (
        _selectors("/scope", when.name, None, {"id": value, "by": by.name})
        + tiles
        + (
            f"<section><h2>Budgets</h2>{budgets_section(budgets, {s['scope']: s for s in control})}</section>"
            if budgets
            else ""
        )
        + (f"<section><h2>Kill switch</h2>{control_html}</section>" if control_html else "")
        + f'<section><h2>By model</h2><div class="chartbox" id="chart">'
        f"{stacked_bars(series.buckets, series.values, when.bucket == 'hour')}</div>"
        + _totals_table(models, data.grouping("model"), when.name, "models")
        + f"</section><section><h2>By {escape(breakdown_by.name)}</h2>"
        + _totals_table(breakdown, breakdown_by, when.name, "breakdown")
        + "</section>"
    )
    return layout(f"{by.name} {value}", "", body, error)


def change_item(s: Mapping[str, Any]) -> str:
    """One line of the kill switch's latest changes (also sent, rendered, on the event stream)."""
    return (
        f"<li>{state_badge(s['state'])} {escape(s['scope'])} — {escape(s['reason'])} "
        f"<small>{_when(s['decided_at'])}, seq {s['sequence']}</small></li>"
    )


def control_page(
    control: Iterable[Mapping[str, Any]], recent: Iterable[Mapping[str, Any]], feed_error: str
) -> str:
    changes = "".join(change_item(s) for s in recent)
    body = (
        f"<section>{_control_table(control, False)}</section>"
        f'<section><h2>Latest changes</h2><ul id="changes" class="changes">{changes}</ul></section>'
    )
    return layout("Kill switch", "/control", body, feed_error)


def health_page(
    when: data.Period,
    gaps: list[data.PricingGap],
    dead: list[data.DeadLetters],
    late: list[tuple[str, Decimal]],
    savings: list[tuple[str, Decimal, int]],
    error: str = "",
) -> str:
    gap_rows = "".join(
        f'<tr><td><span class="badge {escape(g.status)}">{escape(g.status)}</span></td>'
        f"<td>{escape(g.provider)}</td><td><code>{escape(g.model)}</code></td><td class=num>{g.events:,}</td>"
        f"<td class=num>{usd(g.usd) if g.status == 'fallback' else 'unknown'}</td><td>{escape(g.reason)}</td></tr>"
        for g in gaps
    )
    gaps_html = (
        '<table id="gaps" class="wide"><thead><tr><th>status</th><th>provider</th><th>model to add</th>'
        f"<th class=num>events</th><th class=num>charged</th><th>why</th></tr></thead><tbody>{gap_rows}</tbody></table>"
        '<p class="hint">Add each model to the price catalogue (<code>spendstream prices</code>), then '
        "<code>spendstream prices reprice</code> the range.</p>"
        if gaps
        else '<p class="hint ok">Every event in the period was priced by its own model card.</p>'
    )
    dead_html = (
        '<table id="dead" class="wide"><thead><tr><th>reason</th><th class=num>messages</th><th>last</th>'
        "<th>example</th></tr></thead><tbody>"
        + "".join(
            f"<tr><td>{escape(d.reason)}</td><td class=num>{d.count:,}</td><td class=when>{_when(d.last)}</td>"
            f"<td><small>{escape(d.detail)}</small></td></tr>"
            for d in dead
        )
        + "</tbody></table>"
        if dead
        else '<p class="hint ok">No dead letters in the period.</p>'
    )
    late_html = (
        '<table id="late" class="wide"><thead><tr><th>scope</th><th class=num>late spend</th></tr></thead><tbody>'
        + "".join(f"<tr><td>{scope_link(s)}</td><td class=num>{usd(v)}</td></tr>" for s, v in late)
        + "</tbody></table>"
        + '<p class="hint">Spend that arrived after its window had closed (counted in history, not in the closed window).</p>'
        if late
        else '<p class="hint ok">No late spend in the current windows.</p>'
    )
    if savings:
        savings_html = (
            '<table id="savings" class="wide"><thead><tr><th>project</th><th class=num>saved</th><th class=num>cache hits</th></tr></thead><tbody>'
            + "".join(
                f"<tr><td>{escape(p)}</td><td class=num>{usd(v)}</td><td class=num>{n:,}</td></tr>"
                for p, v, n in savings
            )
            + "</tbody></table>"
        )
    else:
        savings_html = '<p class="hint">No cache savings recorded in the period.</p>'
    body = (
        _selectors("/numbers", when.name, None)
        + f"<section><h2>Unpriced and fallback-priced events</h2>{gaps_html}</section>"
        + f"<section><h2>Dead letters by reason</h2>{dead_html}</section>"
        + f"<section><h2>Late events</h2>{late_html}</section>"
        + f"<section><h2>Cache savings</h2>{savings_html}</section>"
    )
    return layout("Health of the numbers", "/numbers", body, error)
