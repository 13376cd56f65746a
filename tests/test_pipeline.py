"""The whole pipeline on the real parts: a Kafka broker, a worker process, embedded ClickHouse.

10,000+ events go through the public SyncEmitter from a separate process; ClickHouse's per-project
totals must equal an independent decimal computation exactly; the project pushed over its budget
gets exactly one `blocked` signal and the others none; garbage and invalid events land in the
dead-letter topic with a reason while the valid events still arrive.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from producers import build_event
from spendstream.wire import default_codec
from stream_processors.feeds import publish
from tests.conftest import REPO, Worker, start_worker

pytestmark = pytest.mark.integration

EVENTS = 12_000
OVER_LIMIT_USD = Decimal("40")
BUDGETS = f"""
budgets:
  project:alpha: {{daily: "10000", monthly: "100000"}}
  project:beta:  {{daily: "10000"}}
  project:gamma: {{monthly: "100000"}}
  project:over:  {{daily: "{OVER_LIMIT_USD}", monthly: "100000"}}
"""
GARBAGE = b"\x00\x01 this is not avro"


async def read_all(bootstrap: str, topic: str, idle: float = 3.0) -> list[tuple[bytes | None, bytes]]:
    """Every message on `topic` from the beginning, until `idle` seconds pass with nothing new."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[tuple[bytes | None, bytes]] = []
    try:
        last = time.monotonic()
        while time.monotonic() - last < idle:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                out.extend((m.key, m.value) for m in messages)
                last = time.monotonic()
    finally:
        await consumer.stop()
    return out


@pytest.fixture(scope="module")
def run(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Start a worker, push the workload and the bad messages, wait until ClickHouse has it all."""
    state = tmp_path_factory.mktemp("pipeline")
    worker = start_worker(kafka, state, BUDGETS)
    try:
        bad = {
            **build_event(
                service="s",
                project="alpha",
                provider="openai",
                model="gpt-4o",
                input_tokens=10,
                output_tokens=10,
            ),
            "input_tokens": -7,
        }
        asyncio.run(
            publish(
                kafka,
                worker.topics.usage_raw,
                [(b"alpha", GARBAGE), (b"alpha", default_codec().encode("UsageEvent", bad))],
            )
        )
        expected_file = state / "expected.json"
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tests" / "workload.py"),
                kafka,
                worker.topics.usage_raw,
                str(EVENTS),
                str(expected_file),
            ],
            check=True,
            cwd=REPO,
            timeout=300,
        )
        emit_seconds = time.monotonic() - started
        expected = json.loads(expected_file.read_text())
        totals = wait_for_totals(worker, expected, timeout=180)
        yield {
            "worker": worker,
            "expected": expected,
            "totals": totals,
            "bad": bad,
            "emit_seconds": emit_seconds,
            "kafka": kafka,
        }
    finally:
        code = worker.stop()
        print(f"worker exit code {code}; log tail:\n{worker.log.read_text()[-1500:]}")


def wait_for_totals(
    worker: Worker, expected: dict[str, Any], timeout: float
) -> dict[str, tuple[int, Decimal]]:
    want = {p: (v["events"], Decimal(v["usd"])) for p, v in expected.items()}
    deadline = time.monotonic() + timeout
    got: dict[str, tuple[int, Decimal]] = {}
    while time.monotonic() < deadline:
        worker.flush()
        rows = worker.sql("SELECT project, count(), sum(cost_usd) FROM usage_events FINAL GROUP BY project")
        got = {str(p): (int(str(n)), Decimal(str(usd))) for p, n, usd in rows}
        if got == want:
            break
        time.sleep(1)
    return got


def test_clickhouse_totals_equal_the_independent_computation_exactly(run: dict[str, Any]) -> None:
    expected = run["expected"]
    assert sum(v["events"] for v in expected.values()) == EVENTS
    assert run["totals"] == {p: (v["events"], Decimal(v["usd"])) for p, v in expected.items()}
    # exact to the pico-dollar: compare the decimal strings, not floats
    rows = run["worker"].sql("SELECT toString(sum(cost_usd)) FROM usage_events FINAL WHERE project = 'over'")
    assert Decimal(rows[0][0]) == Decimal(expected["over"]["usd"])


def test_exactly_one_blocked_signal_for_the_project_over_budget(run: dict[str, Any]) -> None:
    worker: Worker = run["worker"]
    messages = asyncio.run(read_all(run["kafka"], worker.topics.spend_control))
    signals = [default_codec().decode(v)[1] for _, v in messages]
    assert {s["scope"] for s in signals} == {"project:over"}, signals  # none for the projects under budget
    assert {k for k, _ in messages} == {b"project:over"}  # compacted topic, key = scope
    blocked = [s for s in signals if s["state"] == "blocked"]
    assert [(s["reason"], s["level"]) for s in blocked] == [("budget_exceeded", 100)], signals  # exactly one
    # warn signals (50 %, 80 %) may precede it, each once, in order; the block is the last word
    assert [s["sequence"] for s in signals] == list(range(1, len(signals) + 1)), signals
    assert signals[-1]["state"] == "blocked", signals
    assert all(s["state"] == "warn" and s["reason"] == "threshold" for s in signals[:-1]), signals
    assert len({s["level"] for s in signals}) == len(signals), signals
    signal = blocked[0]
    assert signal["limit_pico_usd"] == int(OVER_LIMIT_USD * 10**12)
    assert signal["spend_pico_usd"] >= signal["limit_pico_usd"]
    assert signal["window"].startswith("day:")
    assert signal["window"].endswith("@UTC")
    assert signal["window_end"] - signal["window_start"] == 86_400 * 10**6
    assert Decimal(run["expected"]["over"]["usd"]) > OVER_LIMIT_USD


def test_garbage_and_invalid_events_are_dead_lettered_with_reasons(run: dict[str, Any]) -> None:
    worker: Worker = run["worker"]
    messages = asyncio.run(read_all(run["kafka"], worker.topics.usage_dlq))
    letters = sorted((default_codec().decode(v)[1] for _, v in messages), key=lambda d: d["reason"])
    assert [(d["reason"], d["source_topic"], d["key"]) for d in letters] == [
        ("invalid_event", worker.topics.usage_raw, b"alpha"),
        ("undecodable", worker.topics.usage_raw, b"alpha"),
    ]
    assert letters[0]["detail"] == "input_tokens is negative (-7)"
    assert default_codec().decode(letters[0]["payload"]) == ("UsageEvent", run["bad"])
    assert letters[1]["payload"] == GARBAGE
    assert "not an Avro single-object message" in letters[1]["detail"]
    # ... and the same two are queryable in ClickHouse
    rows = worker.sql("SELECT reason, payload FROM dead_letters FINAL ORDER BY reason")
    assert [r[0] for r in rows] == ["invalid_event", "undecodable"]
    assert rows[1][1] == GARBAGE.hex()


def test_sql_cli_goes_through_the_worker(run: dict[str, Any]) -> None:
    worker: Worker = run["worker"]
    query = "SELECT project, count() AS n FROM usage_events FINAL GROUP BY project ORDER BY project"
    out = subprocess.run(
        [sys.executable, "-m", "spendstream", "sql", query, "--format", "json"],
        env=worker.env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    got = {r["project"]: r["n"] for r in json.loads(out.stdout)}
    assert got == {p: v["events"] for p, v in run["expected"].items()}
    csv_out = subprocess.run(
        [sys.executable, "-m", "spendstream", "sql", query, "-f", "csv"],
        env=worker.env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert csv_out.stdout.splitlines()[0] == "project,n"
    refused = subprocess.run(
        [sys.executable, "-m", "spendstream", "sql", "DROP TABLE usage_events"],
        env=worker.env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert refused.returncode == 1
    assert "read-only" in refused.stderr


def test_watch_cli_decodes_the_control_topic(run: dict[str, Any]) -> None:
    worker: Worker = run["worker"]
    count = len(asyncio.run(read_all(run["kafka"], worker.topics.spend_control)))
    text = subprocess.run(
        [sys.executable, "-m", "spendstream", "watch", "--limit", str(count)],
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    assert "BLOCKED project:over budget_exceeded spend $" in " ".join(text.stdout.split())
    out = subprocess.run(
        [sys.executable, "-m", "spendstream", "watch", "--limit", str(count), "-f", "json"],
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    last = json.loads(out.stdout.splitlines()[-1])
    assert (last["scope"], last["state"], last["reason"], last["limit_usd"]) == (
        "project:over",
        "blocked",
        "budget_exceeded",
        "40.000000000000",
    )
    assert Decimal(last["spend_usd"]) >= OVER_LIMIT_USD
    assert last["window_end"].endswith("T00:00:00+00:00")


def test_worker_stops_cleanly_on_sigterm(kafka: str, tmp_path: Path) -> None:
    worker = start_worker(kafka, tmp_path, "budgets: {}\n")
    started = time.monotonic()
    code = worker.stop(timeout=60)
    assert time.monotonic() - started < 30
    assert code == 0, worker.log.read_text()[-2000:]
