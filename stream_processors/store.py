"""ClickHouse, embedded (chDB, `chdb:///path`) or a server (`http(s)://...`), via clickhouse-connect.

The same client type serves both DSNs, so there is one store class. chDB admits one engine per
process: while a worker runs, it owns the embedded database and answers the CLI's queries.

Users' SQL (`spendstream sql`, `POST /sql`) runs in sessions of its own, never on the writer's:

1. ClickHouse's parser decides what the statement is (`formatQuerySingleLine` of the text as a
   parameter: exactly one statement; then `EXPLAIN AST`): SELECT/WITH, SHOW, DESCRIBE, EXPLAIN or
   EXISTS, without `INTO OUTFILE`. Embedded chDB writes `INTO OUTFILE` files itself (a client-side
   clause that `readonly` does not cover), and allows `KILL QUERY` and `USE` under `readonly`.
2. The session has `readonly=1`, set after its limits (`QueryLimits`): no write, no `file()`,
   `url()` or `Python()`, and no `SETTINGS` clause or `SET` can lift a limit.
3. A query past `max_execution_time` is stopped by ClickHouse; the sink's inserts run on their own
   session meanwhile (measured: a query at its 8 s limit did not hold back inserts every 50 ms).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clickhouse_connect

from spendstream.contracts import contract_dir
from spendstream.errors import QueryError
from spendstream.settings import Settings

__all__ = ["USAGE_COLUMNS", "ClickHouseStore", "QueryLimits", "QueryResult", "sql_literal"]

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
    "saved_usd",
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
_MIGRATION = re.compile(r"^(\d+)_[\w-]+\.sql$")
# Statement kinds users may run, as the first word of ClickHouse's `EXPLAIN AST` (node names).
_READ_KINDS = ("SelectWithUnionQuery", "SelectIntersectExceptQuery", "Explain", "Show", "Describe", "Exists")
_READ_ONLY_HINT = "one read-only statement is allowed (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS)"
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
_TIMEOUT_EXCEEDED, _READONLY, _MEMORY_LIMIT_EXCEEDED, _TOO_MANY_ROWS = 159, 164, 241, 396


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class QueryLimits:
    """ClickHouse's own limits on a user's query (settings of the session it runs in)."""

    timeout_seconds: float = 30.0  # max_execution_time: ClickHouse stops the query
    max_rows: int = 100_000  # max_result_rows: more is an error, never a silently cut result
    max_memory_bytes: int = 1 << 30  # max_memory_usage of one query

    @classmethod
    def of(cls, settings: Settings) -> QueryLimits:
        return cls(settings.query_timeout_seconds, settings.query_max_rows, settings.query_max_memory_bytes)

    def settings(self) -> dict[str, Any]:
        """Applied in this order: `readonly` last, so nothing after it can change any of them."""
        return {
            "max_execution_time": self.timeout_seconds,
            "timeout_overflow_mode": "throw",
            "max_result_rows": self.max_rows,
            "result_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_bytes,
            "allow_python_table_function": 0,  # chDB reads Python objects of the process (readonly too)
            "readonly": 1,
        }


class ClickHouseStore:
    """Applies the DDL in `sql/`, inserts rows, answers read-only queries. Thread-safe."""

    def __init__(self, dsn: str, database: str = "spendstream", limits: QueryLimits | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
            raise QueryError(f"database name {database!r} must be a plain identifier")
        self.database = database
        self.limits = limits or QueryLimits()
        self._dsn = dsn
        self._lock = threading.Lock()
        self._files_dir: str | None = None  # private temp dir of insert_file's files (chDB only)
        self._idle_sessions: list[Any] = []  # guarded sessions for users' queries, one per caller at a time
        self._sessions_lock = threading.Lock()
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

    @property
    def inserts_files(self) -> bool:
        """Whether `insert_file` is available: embedded chDB only (a server would read the same
        data through `input()`; not built, as no server can be tested here)."""
        return self._dsn.startswith("chdb:")

    def insert_file(
        self,
        table: str,
        columns: Sequence[str],
        select: Callable[[str], str],
        fmt: str,
        structure: str,
        data: bytes,
    ) -> None:
        """`INSERT INTO table (columns) select(source)`, where `source` is a table function reading
        `data` (in ClickHouse's format `fmt`: Avro, Native) with `structure`: ClickHouse parses it
        and builds the rows. The file lives in a private temp dir (0700, in memory under /dev/shm when there is
        one) only while the insert runs; a process killed meanwhile leaves it, and the next store to
        insert removes the dirs of processes no longer running. Raises what ClickHouse raises
        (clickhouse-connect's types)."""
        if not self.inserts_files:
            raise QueryError("insert_file needs embedded ClickHouse (a chdb:// DSN)")
        if self._files_dir is None:
            self._files_dir = _private_temp_dir()
        fd, path = tempfile.mkstemp(suffix=f".{fmt.lower()}", dir=self._files_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            source = f"file({sql_literal(path)}, {sql_literal(fmt)}, {sql_literal(structure)})"
            # No ReplacingMergeTree merge of the block at insert (optimize_on_insert): measured at
            # ~45% of the CPU of such an insert. Ids repeated within it collapse at merge time and
            # under FINAL, exactly as those repeated across two inserts always have.
            sql = (
                f"INSERT INTO {self.database}.{table} ({', '.join(columns)}) {select(source)} "
                "SETTINGS optimize_on_insert = 0"
            )
            with self._lock:
                self._client.command(sql)
        finally:
            os.unlink(path)

    def query(self, sql: str) -> QueryResult:
        """Run spendstream's own SQL (the repricer's reads); users' SQL goes to `user_query`."""
        try:
            with self._lock:
                result = self._client.query(sql)
        except Exception as exc:  # clickhouse-connect raises driver-specific types
            raise QueryError(_first_line(exc)) from exc
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    def user_query(self, sql: str) -> QueryResult:
        """Run one read-only statement from a user under ClickHouse's guard (see the module doc).

        Raises QueryError with ClickHouse's reason; a query stopped by a limit names the limit.
        """
        statement = sql.strip().rstrip(";").strip()
        with self._guarded_session() as session:
            self._check_statement(session, statement)
            try:
                result = session.query(statement)
            except Exception as exc:
                raise QueryError(self._explain(exc)) from exc
        return QueryResult(list(result.column_names), [list(r) for r in result.result_rows])

    def _check_statement(self, session: Any, statement: str) -> None:
        """ClickHouse's parser says what the statement is; only one read-only statement passes."""
        try:
            # The text is a parameter here, never run: one statement, or ClickHouse's syntax error.
            session.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": statement})
            ast = [row[0] for row in session.query(f"EXPLAIN AST {statement}").result_rows]
        except Exception as exc:
            raise QueryError(self._explain(exc)) from exc
        kind = ast[0].split(" ", 1)[0] if ast else ""
        children = [line.strip() for line in ast[1:] if line.startswith(" ") and not line.startswith("  ")]
        if kind == "Explain" and children:  # EXPLAIN <statement>: the statement must be one of these too
            kind = children[0].split(" ", 1)[0] if not children[0].startswith("Literal") else kind
        if not kind.startswith(_READ_KINDS):
            raise QueryError(f"only {_READ_ONLY_HINT}; ClickHouse parsed it as {kind or 'something else'}")
        # A top-level Literal child of the statement is its INTO OUTFILE file name (and compression):
        # in embedded chDB that file would be written on the worker's host.
        if any(child.startswith("Literal") for child in children):
            raise QueryError(
                "INTO OUTFILE is not allowed (it would write a file on the worker's host): "
                "save a result with `spendstream sql -f csv ... > file.csv`"
            )

    def _explain(self, exc: Exception) -> str:
        message = _first_line(exc)
        code = _ERROR_CODE.search(message)
        limits = self.limits
        hints = {
            _TIMEOUT_EXCEEDED: f"the query ran past {limits.timeout_seconds:g} s and ClickHouse stopped it "
            "(max_execution_time = SPENDSTREAM_QUERY_TIMEOUT_SECONDS): narrow the time range or aggregate",
            _TOO_MANY_ROWS: f"the result has more than {limits.max_rows:,} rows (max_result_rows = "
            "SPENDSTREAM_QUERY_MAX_ROWS): add a LIMIT or aggregate",
            _MEMORY_LIMIT_EXCEEDED: f"the query needs more than {limits.max_memory_bytes:,} bytes "
            "(max_memory_usage = SPENDSTREAM_QUERY_MAX_MEMORY_BYTES)",
            _READONLY: "read-only: ClickHouse refused it (no writes, files, URLs or SETTINGS in user queries)",
        }
        hint = hints.get(int(code.group(1))) if code else None
        return f"{hint}: {message}" if hint else message

    @contextmanager
    def _guarded_session(self) -> Iterator[Any]:
        """A session with `QueryLimits.settings()`: readonly after the limits, so none can be lifted."""
        with self._sessions_lock:
            session = self._idle_sessions.pop() if self._idle_sessions else None
        if session is None:
            session = clickhouse_connect.get_client(
                dsn=self._dsn, database=self.database, settings=self.limits.settings()
            )
        try:
            yield session
        finally:
            with self._sessions_lock:
                self._idle_sessions.append(session)

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._idle_sessions = self._idle_sessions, []
        for session in sessions:
            session.close()
        with self._lock:
            self._client.close()
        if self._files_dir is not None:
            shutil.rmtree(self._files_dir, ignore_errors=True)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _private_temp_dir() -> str:
    """A new `spendstream-sink-<pid>-*` dir (0700) for insert_file's files, after removing those of
    processes that no longer run (killed during an insert: nothing of users' data stays behind)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for stale in Path(base).glob("spendstream-sink-*-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"spendstream-sink-{os.getpid()}-", dir=base)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sql_literal(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _statements(text: str) -> list[str]:
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
