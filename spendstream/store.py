"""ClickHouse, embedded (chDB, `chdb:///path`) or a server (`http(s)://...`), via clickhouse-connect.

The same client type serves both DSNs, so there is one store class. chDB admits one engine per
process: while a worker runs, it owns the embedded database and answers the CLI's queries.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import clickhouse_connect

from spendstream.contracts import contract_dir
from spendstream.errors import QueryError

__all__ = ["USAGE_COLUMNS", "ClickHouseStore", "QueryResult"]

log = logging.getLogger(__name__)

USAGE_COLUMNS = (
    "event_id",
    "event_time",
    "project",
    "team",
    "user",
    "service",
    "provider",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tags",
    "cost_usd",
    "price_card",
    "priced_at",
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "audio_seconds",
    "characters",
    "images",
    "image_size",
    "image_quality",
    "requests",
    "service_tier",
    "region",
    "pricing_status",
    "card_version",
    "itemised",
    "unpriced_reason",
    "usage_source",
)
DEAD_LETTER_COLUMNS = (
    "failed_at",
    "reason",
    "detail",
    "source_topic",
    "source_partition",
    "source_offset",
    "key",
    "payload",
)
_READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)
_MIGRATION = re.compile(r"^(\d+)_[\w-]+\.sql$")


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]


class ClickHouseStore:
    """Applies the DDL in `sql/`, inserts rows, answers read-only queries. Thread-safe."""

    def __init__(self, dsn: str, database: str = "spendstream") -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
            raise QueryError(f"database name {database!r} must be a plain identifier")
        self.database = database
        self._lock = threading.Lock()
        bootstrap = clickhouse_connect.get_client(dsn=dsn)
        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        # Unqualified table names in users' queries resolve to this database.
        self._client = clickhouse_connect.get_client(dsn=dsn, database=database)

    def migrate(self) -> list[str]:
        """Apply numbered `sql/NNN_name.sql` files not applied yet; returns the ones applied."""
        db = self.database
        with self._lock:
            self._client.command(
                f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
                "(version UInt32, name String, applied_at DateTime64(6, 'UTC') DEFAULT now64(6)) "
                "ENGINE = MergeTree ORDER BY version"
            )
            done = {
                r[0] for r in self._client.query(f"SELECT version FROM {db}.schema_migrations").result_rows
            }
            applied = []
            for path in sorted(contract_dir("sql").glob("*.sql")):
                match = _MIGRATION.match(path.name)
                if match is None or int(match.group(1)) in done:
                    continue
                for statement in _statements(path.read_text().replace("{database}", db)):
                    self._client.command(statement)
                self._client.insert(
                    f"{db}.schema_migrations",
                    [(int(match.group(1)), path.name)],
                    column_names=["version", "name"],
                )
                applied.append(path.name)
        if applied:
            log.info("applied ClickHouse migrations %s to database %s", applied, db)
        return applied

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        with self._lock:
            self._client.insert(f"{self.database}.{table}", rows, column_names=list(columns))

    def query(self, sql: str) -> QueryResult:
        """Run one read-only statement (SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS)."""
        if not _READ_ONLY.match(sql) or ";" in sql.strip().rstrip(";"):
            raise QueryError(
                "only one read-only statement is allowed (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN)"
            )
        try:
            with self._lock:
                result = self._client.query(sql.strip().rstrip(";"), settings={"readonly": 1})
        except Exception as exc:  # clickhouse-connect raises driver-specific types
            raise QueryError(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from exc
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _statements(text: str) -> list[str]:
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
