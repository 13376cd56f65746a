"""Roles: one history writer (`up --role history`) and meter workers (`up --role meter`) on the
same topics: the partitions spread over the meters, ClickHouse holds each event once, a budget
crossing gives one `blocked`, and a kill -9 of a meter moves its partitions to the other with
nothing lost or doubled."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka.partitioner import murmur2

from tests.conftest import Worker, start_history, start_meter

pytestmark = pytest.mark.integration

PARTITIONS = 8
PROJECTS = [f"r{i}" for i in range(12)]
OVER = "r0"  # the one project whose budget is crossed, once
USD_PER_EVENT = Decimal("0.001")  # 100 gpt-4o output tokens at $10 per million
OVER_LIMIT = "2"  # r0 crosses it at its 2,001st event
BUDGETS = "budgets:\n" + "".join(
    f'  project:{p}: {{daily: "{OVER_LIMIT if p == OVER else 1000}"}}\n' for p in PROJECTS
)


def partition_of(project: str) -> int:
    """Where the emitter's producer puts a project's events (Kafka's default partitioner)."""
    return (murmur2(project.encode()) & 0x7FFFFFFF) % PARTITIONS


@pytest.fixture(scope="module")
def history(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    h = start_history(
        kafka, tmp_path_factory.mktemp("roles"), BUDGETS, SPENDSTREAM_PARTITIONS=str(PARTITIONS)
    )
    yield h
    h.stop()


def test_the_history_writer_wants_its_token_and_a_meter_without_one_says_what_to_set(
    history: Worker,
) -> None:
    token_file = Path(history.env["SPENDSTREAM_STATE_DIR"]) / "history.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40
    assert token not in history.log.read_text()  # never logged
    base = f"http://127.0.0.1:{history.port}"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # open: a probe needs no token
    refused = httpx.post(f"{base}/sql", json={"query": "SELECT 1"}, timeout=10)
    assert refused.status_code == 401
    assert "SPENDSTREAM_HISTORY_TOKEN" in refused.json()["error"]
    assert history.sql("SELECT 1") == [[1]]

    # A meter worker of its own topics and group (it must not meter the next test's events).
    alone = start_meter(
        history,
        "meter-alone",
        SPENDSTREAM_HISTORY_URL="",
        SPENDSTREAM_TOPIC_PREFIX="alone.",
        SPENDSTREAM_WORKER_ID="spendstream-alone",
    )
    try:
        health = alone.health()
        assert health["status"] == "ok"  # enforcement does not depend on a writer
        answer = httpx.post(f"http://127.0.0.1:{alone.port}/sql", json={"query": "SELECT 1"}, timeout=10)
        assert answer.status_code == 503
        assert "SPENDSTREAM_HISTORY_URL" in answer.json()["error"]
        out = alone.cli("sql", "SELECT 1", check=False)
        assert out.returncode != 0
        assert "SPENDSTREAM_HISTORY_URL" in out.stdout + out.stderr
    finally:
        alone.stop()
