"""What the read-only commands (`sql`, `budget list`, `report`, `ui`) read: the history in ClickHouse
and the worker's budget table. One place, so every view of the numbers reads them the same way."""

from __future__ import annotations

from typing import Any

import httpx

from spendstream.errors import QueryError, SpendstreamError
from spendstream.settings import Settings
from stream_processors.store import ClickHouseStore, QueryLimits, QueryResult

__all__ = ["query", "sql_literal", "worker_budgets", "worker_url"]


def sql_literal(text: str) -> str:
    """A ClickHouse string literal (backslash and quote escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def worker_url(settings: Settings) -> str:
    """The worker's HTTP API on this host (it binds 127.0.0.1: reach a remote one through a tunnel)."""
    return f"http://127.0.0.1:{settings.web_port}"


def query(settings: Settings, sql: str, worker: str | None = None) -> QueryResult:
    """Run a user's read-only query: through the running worker (it owns embedded chDB), or directly
    when no worker listens. Either way ClickHouse guards it (read-only, `QueryLimits`)."""
    worker = worker or worker_url(settings)
    try:
        response = httpx.post(
            f"{worker}/sql",
            json={"query": sql},
            timeout=settings.query_timeout_seconds + 30,  # the worker answers by then: ClickHouse stops it
        )
    except httpx.ConnectError:
        store = ClickHouseStore(settings.dsn, settings.clickhouse_database, QueryLimits.of(settings))
        try:
            return store.user_query(sql)
        finally:
            store.close()
    except httpx.TransportError as exc:
        raise QueryError(f"the worker at {worker} did not answer: {exc!r}") from None
    try:
        body = response.json()
    except ValueError:
        raise QueryError(f"the worker answered {response.status_code}: {response.text[:300]}") from None
    if response.status_code != 200:
        raise QueryError(body.get("error", response.text))
    return QueryResult(body["columns"], body["rows"])


def worker_budgets(settings: Settings, worker: str | None = None) -> list[dict[str, Any]]:
    """Every budget with its current window, spend, state, burn rate and forecast (the worker's
    `/budgets`: spend is known by the worker, to the last event it counted)."""
    worker = worker or worker_url(settings)
    try:
        rows: list[dict[str, Any]] = httpx.get(f"{worker}/budgets", timeout=30).json()["budgets"]
    except httpx.TransportError:
        raise SpendstreamError(
            f"no worker answers at {worker}: spend is known by the worker; start it with `spendstream up`"
        ) from None
    return rows
