"""The provisioned Grafana dashboard, short of a Grafana server (none can be installed here): the
committed JSON is what deploy/grafana/dashboard.py generates, every ClickHouse panel's SQL runs on
the embedded ClickHouse with Grafana's macros expanded (all projects, and one) and returns the
columns the panel expects, and the provisioning, Prometheus and compose files agree with it."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pytest
import yaml

from producers import build_event
from stream_processors.sink import usage_row
from stream_processors.store import USAGE_COLUMNS, ClickHouseStore
from tests.conftest import REPO

GRAFANA = REPO / "deploy" / "grafana"
_CHDB = REPO / ".spendstream" / "test-chdb"  # one chDB path per process: the one test_store uses
FROM_S, TO_S = 1_796_083_200, 1_796_688_000  # 2026-12-01 .. 2026-12-08 UTC: the dashboard's time range
INTERVAL_S = 3600


@functools.cache
def generator() -> ModuleType:
    """deploy/grafana/dashboard.py (a script, not a package module)."""
    name = "spendstream_grafana_dashboard"
    spec = importlib.util.spec_from_file_location(name, GRAFANA / "dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def expand(sql: str, projects: list[str] | None) -> str:
    """Grafana's variables and the ClickHouse plugin's macros, as Grafana expands them before the
    query reaches ClickHouse (`projects` None: "All" selected)."""
    quoted = ",".join("'" + p.replace("'", "\\'") + "'" for p in projects or [])
    sql = sql.replace("${project:singlequote}", quoted)

    def conditional_all(match: re.Match[str]) -> str:
        return "1=1" if projects is None else match.group(1)

    sql = re.sub(r"\$__conditionalAll\((.*?\)),\s*\$project\)", conditional_all, sql)
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 >= toDateTime({FROM_S}) AND \1 <= toDateTime({TO_S})", sql)
    sql = re.sub(
        r"\$__timeInterval\((\w+)\)", rf"toStartOfInterval(toDateTime(\1), INTERVAL {INTERVAL_S} second)", sql
    )
    assert "$" not in sql, f"a macro or variable left unexpanded: {sql}"
    return sql


@pytest.fixture(scope="module")
def store() -> Iterator[ClickHouseStore]:
    s = ClickHouseStore(f"chdb://{_CHDB}", f"g_{uuid.uuid4().hex[:12]}")
    s.migrate()
    rows = []
    for i, (project, model, pico, status) in enumerate(
        [
            ("checkout", "gpt-4o", 12 * 10**12, "priced"),
            ("search", "gpt-9", None, "unpriced"),
            ("labs", "o3", 10**9, "fallback"),
        ]
    ):
        usage = build_event(
            service="svc",
            project=project,
            provider="openai",
            model=model,
            input_tokens=1,
            output_tokens=2,
            team="web",
            user=f"u{i}",
            event_time=datetime(2026, 12, 2, 10, i, tzinfo=UTC),
        )
        rows.append(
            usage_row(
                {
                    "usage": usage,
                    "cost_pico_usd": pico,
                    "price_card": "c",
                    "priced_at": 1_796_220_000_000_000,
                    "pricing_status": status,
                    "card_version": "v",
                    "itemised": {},
                    "unpriced_reason": "" if pico else "no price card",
                    "saved_pico_usd": 0,
                }
            )
        )
    s.insert("usage_events", rows, USAGE_COLUMNS)
    yield s
    s.close()


def clickhouse_targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["rawSql"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if panel["datasource"]["type"] == "grafana-clickhouse-datasource"
    ]


def test_the_committed_dashboard_is_the_generated_one() -> None:
    committed = (GRAFANA / "dashboards" / "spendstream.json").read_text()
    assert committed == generator().render(), "run: python deploy/grafana/dashboard.py"


def test_every_panel_sql_returns_the_columns_its_panel_expects(store: ClickHouseStore) -> None:
    gen = generator()
    board = gen.build()
    expected = {p.title: p.columns for p in gen.SQL_PANELS}
    targets = clickhouse_targets(board)
    assert sorted(title for title, _ in targets) == sorted(expected)  # every panel, once
    for title, sql in targets:
        for projects in (None, ["checkout", "o'brien"]):
            query = expand(sql, projects)
            store.user_query(query)  # runs, read-only, like Grafana's user
            described = store.user_query(f"DESCRIBE ({query})").rows  # its columns, also when empty
            assert tuple(r[0] for r in described) == expected[title], title
    spend = store.user_query(expand(dict(targets)["Spend"], None)).rows
    assert spend == [[store.query("SELECT sum(cost_usd) FROM usage_events FINAL").rows[0][0]]]
    by_project = store.user_query(expand(dict(targets)["Spend by project"], ["checkout"])).rows
    assert [(r[1], r[2]) for r in by_project] == [("checkout", 12)]
    [gaps_sql] = [sql for title, sql in targets if title.startswith("Pricing gaps")]
    gaps = store.user_query(expand(gaps_sql, None)).rows
    assert sorted((r[0], r[2]) for r in gaps) == [("fallback", "o3"), ("unpriced", "gpt-9")]
    [variable] = board["templating"]["list"]
    assert [r[0] for r in store.user_query(variable["query"]).rows] == ["checkout", "labs", "search"]


def test_provisioning_prometheus_and_compose_agree_with_the_dashboard() -> None:
    board = generator().build()
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "spendstream.yaml").read_text())
    by_uid = {d["uid"]: d for d in sources["datasources"]}
    used = {(p["datasource"]["type"], p["datasource"]["uid"]) for p in board["panels"] if "datasource" in p}
    assert used == {(by_uid[uid]["type"], uid) for uid in by_uid}  # both sources used, types match
    clickhouse = by_uid["spendstream-clickhouse"]
    assert clickhouse["jsonData"]["defaultDatabase"] == "spendstream"
    assert clickhouse["secureJsonData"]["password"] == "${CLICKHOUSE_PASSWORD}"  # never in the file
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "spendstream.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["spendstream-gateway"]["static_configs"] == [{"targets": ["gateway:4000"]}]
    # every worker replica: the service name resolves to each in Docker's DNS
    assert jobs["spendstream-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 6066, "refresh_interval": "15s"}
    ]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["worker"]["environment"]["SPENDSTREAM_WEB_BIND"] == "0.0.0.0"
    assert "6066" in services["worker"]["expose"]
    assert "network_mode" not in services["prometheus"]
    assert "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    mounts = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    assert by_uid["spendstream-prometheus"]["url"] == "http://prometheus:9090"
