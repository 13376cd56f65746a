"""`spendstream sql` and POST /sql against a real worker: read-only in ClickHouse itself, stopped at
its time limit while the sink keeps writing, errors in one line, and a history port that answers
its worker only."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

from tests.conftest import REPO, Worker, start_worker
from tests.test_history_process import emit

HEAVY = "SELECT count() FROM numbers(2000000000) WHERE sipHash64(number) % 1000 = 7"  # ~110 s unbounded here


def cli_env(w: Worker) -> dict[str, str]:
    return {**w.env, "PYTHONPATH": str(REPO)}  # this checkout's CLI, run from another directory


def cli_sql(w: Worker, query: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream", "sql", query],
        env=cli_env(w),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_sql_is_read_only_bounded_and_never_stalls_the_sink(kafka: str, tmp_path: Path) -> None:
    w = start_worker(
        kafka,
        tmp_path / "w",
        "budgets: {}\n",
        SPENDSTREAM_QUERY_TIMEOUT_SECONDS="10",
        SPENDSTREAM_QUERY_MAX_CONCURRENT="2",
    )
    public = f"http://127.0.0.1:{w.port}"
    try:
        # INTO OUTFILE, through the CLI and the HTTP endpoint: refused, and no file anywhere.
        name = f"outfile-{uuid.uuid4().hex[:8]}.txt"
        targets = [name, str(tmp_path / name)]  # relative: the CLI's cwd, or the history process's
        for target in targets:
            sql = f"SELECT 'x' INTO OUTFILE '{target}' APPEND"
            assert "INTO OUTFILE is not allowed" in one_error_line(cli_sql(w, sql, tmp_path))
            answer = httpx.post(f"{public}/sql", json={"query": sql}, timeout=30)
            assert answer.status_code == 400
            assert "INTO OUTFILE is not allowed" in answer.json()["error"]
        assert not (tmp_path / name).exists()
        assert not (REPO / name).exists()  # the worker's (and its history process's) cwd

        # Errors say what went wrong: a write, a ClickHouse error, a body that is not JSON.
        assert "parsed it as InsertQuery" in one_error_line(
            cli_sql(w, "INSERT INTO usage_events (project) VALUES ('x')", tmp_path)
        )
        assert "Cannot execute query in readonly mode" in one_error_line(
            cli_sql(w, "SELECT * FROM file('/etc/hostname', 'LineAsString')", tmp_path)
        )
        assert "Unknown table" in one_error_line(cli_sql(w, "SELECT * FROM no_such_table", tmp_path))
        unknown = httpx.post(f"{public}/sql", json={"query": "SELECT * FROM no_such_table"}, timeout=30)
        assert unknown.status_code == 400
        assert "UNKNOWN_TABLE" in unknown.json()["error"]
        for body in (b"not json", b'{"q": "SELECT 1"}', b"[1]"):
            bad = httpx.post(f"{public}/sql", content=body, timeout=30)
            assert (bad.status_code, bad.json()) == (
                400,
                {"error": 'body must be JSON {"query": "<one read-only statement>"}'},
            )
        assert httpx.post(f"{public}/reprice", content=b"{}", timeout=30).status_code == 400

        # A ~110 s query is stopped at 10 s; the sink writes 300 events meanwhile.
        before = w.health()["sink_rows_written"]
        query = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "sql", HEAVY],
            env=cli_env(w),
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        time.sleep(1)  # the query is running
        threading.Thread(target=emit, args=(kafka, w, 300)).start()
        written_while_running = 0
        while query.poll() is None:
            written_while_running = w.health()["sink_rows_written"] - before
            if written_while_running >= 300:
                break
            time.sleep(0.2)
        assert query.poll() is None, "the query ended before the sink wrote the 300 events"
        assert written_while_running == 300
        assert w.sql("SELECT count() FROM usage_events WHERE project = 'h'") == [[300]]  # a 2nd query too
        # Two heavy queries run (the most at once here): a third is refused at once, not queued.
        second: list[httpx.Response] = []
        worker2 = threading.Thread(
            target=lambda: second.append(httpx.post(f"{public}/sql", json={"query": HEAVY}, timeout=60))
        )
        worker2.start()
        time.sleep(1)
        third = httpx.post(f"{public}/sql", json={"query": "SELECT 1"}, timeout=30)
        assert third.status_code == 429, third.text
        assert third.json()["error"].startswith(
            "2 queries are running, the most at once (SPENDSTREAM_QUERY_MAX_CONCURRENT)"
        )
        worker2.join(timeout=60)
        assert second[0].status_code == 400  # stopped by ClickHouse at its limit
        assert "max_execution_time" in second[0].json()["error"]
        _, stderr = query.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert query.returncode == 1
        assert re.fullmatch(
            r"error: the query ran past 10 s and ClickHouse stopped it \(max_execution_time = "
            r"SPENDSTREAM_QUERY_TIMEOUT_SECONDS\).*TIMEOUT_EXCEEDED\)",
            stderr.strip(),
        ), stderr
        assert 10 <= elapsed < 30, elapsed
        assert w.health()["status"] == "ok"
    finally:
        w.stop()


def test_the_history_port_answers_its_worker_only(kafka: str, tmp_path: Path) -> None:
    w = start_worker(kafka, tmp_path / "t", "budgets: {}\n")
    try:
        port = re.search(r"history writer serving on 127\.0\.0\.1:(\d+)", w.log.read_text())
        assert port is not None, w.log.read_text()[-2000:]
        private = f"http://127.0.0.1:{port.group(1)}"
        for headers in ({}, {"Authorization": "Bearer guessed"}, {"Authorization": ""}):
            for path, body in (("/sql", {"query": "SELECT 1"}), ("/flush", {}), ("/reprice", {})):
                answer = httpx.post(private + path, json=body, headers=headers, timeout=10)
                assert answer.status_code == 401, (path, headers, answer.text)
            health = httpx.get(private + "/health", headers=headers, timeout=10)  # open: probes need it
            assert (health.status_code, set(health.json())) == (200, {"pid", "sink_rows_written"})
        assert w.sql("SELECT 1") == [[1]]  # the worker's own port, with the token it holds
        w.flush()
        assert w.health()["status"] == "ok"
    finally:
        w.stop()
