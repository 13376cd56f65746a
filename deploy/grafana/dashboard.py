"""The spendstream Grafana dashboard, as code (grafana-foundation-sdk, pinned in the dev extra).

    python deploy/grafana/dashboard.py     # writes deploy/grafana/dashboards/spendstream.json

Spend panels query ClickHouse (data source `grafana-clickhouse-datasource`, uid
`spendstream-clickhouse`); operations panels query Prometheus (uid `spendstream-prometheus`),
which scrapes the worker's and the gateway's /metrics. tests/test_grafana.py runs every ClickHouse
panel's SQL, with Grafana's macros expanded, against the embedded ClickHouse and checks the columns
listed here; it also checks that the committed JSON is what this file generates.

Money: the SQL sums exact Decimal(38, 12) values; Grafana displays them as numbers (rounded to the
cent by the `currencyUSD` unit). The exact figures are `spendstream report` and `spendstream ui`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

CLICKHOUSE = DataSourceRef(type_val="grafana-clickhouse-datasource", uid="spendstream-clickhouse")
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="spendstream-prometheus")
OUT = Path(__file__).parent / "dashboards" / "spendstream.json"
# Every spend panel: the selected time range and projects, each event once (FINAL).
WHERE = "$__timeFilter(event_time) AND $__conditionalAll(project IN (${project:singlequote}), $project)"
PROJECTS_SQL = "SELECT DISTINCT project FROM usage_events ORDER BY project"
FROM = "usage_events FINAL"  # the data source's default database: spendstream


@dataclass(frozen=True)
class SqlPanel:
    """A ClickHouse panel: its SQL and the columns it must return (checked by the tests)."""

    title: str
    kind: str  # stat | timeseries | table
    sql: str
    columns: tuple[str, ...]
    unit: str = "currencyUSD"
    width: int = 6
    height: int = 8
    description: str = ""


SQL_PANELS = (
    SqlPanel(
        "Spend",
        "stat",
        f"SELECT sum(cost_usd) AS spend_usd FROM {FROM} WHERE {WHERE}",
        ("spend_usd",),
        description="sum(cost_usd) over the range: priced and fallback-priced events (unpriced ones have no cost).",
    ),
    SqlPanel(
        "Events", "stat", f"SELECT count() AS events FROM {FROM} WHERE {WHERE}", ("events",), unit="short"
    ),
    SqlPanel(
        "Unpriced events",
        "stat",
        f"SELECT countIf(pricing_status = 'unpriced') AS unpriced FROM {FROM} WHERE {WHERE}",
        ("unpriced",),
        unit="short",
        description="Events whose model has no price card: their cost is unknown (see the pricing gaps table).",
    ),
    SqlPanel(
        "Fallback-priced share",
        "stat",
        f"SELECT if(count() = 0, 0, countIf(pricing_status = 'fallback') / count()) AS fallback_share "
        f"FROM {FROM} WHERE {WHERE}",
        ("fallback_share",),
        unit="percentunit",
    ),
    SqlPanel(
        "Spend by project",
        "timeseries",
        f"SELECT $__timeInterval(event_time) AS time, project, sum(cost_usd) AS spend_usd FROM {FROM} "
        f"WHERE {WHERE} GROUP BY time, project ORDER BY time",
        ("time", "project", "spend_usd"),
        width=12,
        height=9,
    ),
    SqlPanel(
        "Spend by model",
        "timeseries",
        f"SELECT $__timeInterval(event_time) AS time, model, sum(cost_usd) AS spend_usd FROM {FROM} "
        f"WHERE {WHERE} GROUP BY time, model ORDER BY time",
        ("time", "model", "spend_usd"),
        width=12,
        height=9,
    ),
    SqlPanel(
        "Chargeback by team",
        "table",
        f"SELECT ifNull(team, '(none)') AS team, count() AS events, sum(cost_usd) AS spend_usd, "
        f"countIf(pricing_status = 'unpriced') AS unpriced FROM {FROM} WHERE {WHERE} "
        "GROUP BY team ORDER BY spend_usd DESC",
        ("team", "events", "spend_usd", "unpriced"),
        width=8,
        height=9,
    ),
    SqlPanel(
        "Top users",
        "table",
        f"SELECT ifNull(user, '(none)') AS user, project, count() AS events, sum(cost_usd) AS spend_usd "
        f"FROM {FROM} WHERE {WHERE} GROUP BY user, project ORDER BY spend_usd DESC LIMIT 20",
        ("user", "project", "events", "spend_usd"),
        width=8,
        height=9,
    ),
    SqlPanel(
        "Pricing gaps (models to add)",
        "table",
        f"SELECT pricing_status, provider, model, count() AS events, sum(cost_usd) AS charged_usd FROM {FROM} "
        f"WHERE {WHERE} AND pricing_status != 'priced' GROUP BY pricing_status, provider, model ORDER BY events DESC",
        ("pricing_status", "provider", "model", "events", "charged_usd"),
        width=8,
        height=9,
    ),
    SqlPanel(
        "Dead letters by reason",
        "table",
        "SELECT reason, count() AS messages, max(failed_at) AS last_failed_at FROM dead_letters FINAL "
        "WHERE $__timeFilter(failed_at) GROUP BY reason ORDER BY messages DESC",
        ("reason", "messages", "last_failed_at"),
        unit="short",
        width=12,
        height=7,
    ),
)


@dataclass(frozen=True)
class PromPanel:
    title: str
    expr: str
    legend: str
    unit: str = "short"


PROM_PANELS = (
    PromPanel(
        "Events priced per second",
        "sum by (pricing_status) (rate(spendstream_events_total[5m]))",
        "{{pricing_status}}",
        "ops",
    ),
    PromPanel("Budget signals", "sum by (state) (increase(spendstream_signals_total[5m]))", "{{state}}"),
    PromPanel(
        "Dead letters per second",
        "sum by (reason) (rate(spendstream_dead_letters_total[5m]))",
        "{{reason}}",
        "ops",
    ),
    PromPanel("Scrape targets up (worker, gateway)", "up", "{{job}}"),
)


class ClickHouseQuery(Dataquery):
    """A query of grafana-clickhouse-datasource (v4): raw SQL; format 0 time series, 1 table."""

    def __init__(self, sql: str, time_series: bool) -> None:
        self.sql = sql
        self.time_series = time_series

    def to_json(self) -> dict[str, object]:
        return {
            "refId": "A",
            "datasource": {"type": CLICKHOUSE.type_val, "uid": CLICKHOUSE.uid},
            "editorType": "sql",
            "queryType": "timeseries" if self.time_series else "table",
            "format": 0 if self.time_series else 1,
            "rawSql": self.sql,
        }


class ClickHouseQueryBuilder:
    """What a panel's `with_target` takes: something with `build()`."""

    def __init__(self, sql: str, time_series: bool) -> None:
        self._query = ClickHouseQuery(sql, time_series)

    def build(self) -> ClickHouseQuery:
        return self._query


def _sql_panel(p: SqlPanel) -> object:
    target = ClickHouseQueryBuilder(p.sql, p.kind == "timeseries")
    if p.kind == "stat":
        panel = stat.Panel().reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]))
    elif p.kind == "timeseries":
        panel = (
            timeseries.Panel()
            .draw_style(common.GraphDrawStyle.BARS)
            .fill_opacity(80)
            .stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL))
        )
    else:
        panel = table.Panel()
    panel = panel.title(p.title).datasource(CLICKHOUSE).unit(p.unit).with_target(target)  # type: ignore[arg-type]
    if p.description:
        panel = panel.description(p.description)
    return panel.span(p.width).height(p.height)


def build() -> dict[str, object]:
    """The dashboard's JSON model."""
    project = (
        dashboard.QueryVariable("project")
        .label("Project")
        .datasource(CLICKHOUSE)
        .query(PROJECTS_SQL)
        .multi(True)
        .include_all(True)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    board = (
        dashboard.Dashboard("spendstream: LLM spend")
        .uid("spendstream-spend")
        .tags(["spendstream", "llm", "cost"])
        .description(
            "Spend, chargeback and the health of the numbers from ClickHouse; the pipeline from Prometheus."
        )
        .time("now-7d", "now")
        .timezone("utc")
        .refresh("1m")
        .with_variable(project)
        .with_row(dashboard.Row("Spend (ClickHouse)"))
    )
    for p in SQL_PANELS:
        board = board.with_panel(_sql_panel(p))  # type: ignore[arg-type]
    board = board.with_row(dashboard.Row("Pipeline (Prometheus: worker and gateway /metrics)"))
    for q in PROM_PANELS:
        board = board.with_panel(
            timeseries.Panel()
            .title(q.title)
            .datasource(PROMETHEUS)
            .unit(q.unit)
            .with_target(prometheus.Dataquery().expr(q.expr).legend_format(q.legend).datasource(PROMETHEUS))
            .span(6)
            .height(7)
        )
    model: dict[str, object] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for number, panel in enumerate(model["panels"], start=1):  # type: ignore[arg-type]
        panel["id"] = number  # unique ids: Grafana links and edits panels by id
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
