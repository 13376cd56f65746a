"""The pricing engine in the running pipeline: run-time price changes, unknown models, re-pricing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from producers import build_event
from spendstream.wire import default_codec
from stream_processors.feeds import publish
from tests.conftest import REPO, Worker, module_worker

pytestmark = pytest.mark.integration


def cli(worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return worker.cli(*args, check=False)


def usage_messages(events: list[dict[str, Any]]) -> list[tuple[bytes, bytes | None]]:
    return [(e["project"].encode(), default_codec().encode("UsageEvent", e)) for e in events]


worker = module_worker("pricing", "budgets: {}\n")


def test_a_published_price_changes_the_cost_of_later_events_only(kafka: str, worker: Worker) -> None:
    change = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    before = build_event(
        service="t",
        project="p1",
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=1_000_000,
        output_tokens=0,
        event_time=change - timedelta(seconds=1),
    )
    version = worker.health()["catalogue_version"]
    out = cli(
        worker,
        "prices",
        "set",
        "openai",
        "gpt-4o-mini",
        "--input",
        "0.10",
        "--output",
        "0.40",
        "--source",
        "https://example.test/new-price",
        "--effective-from",
        change.isoformat(),
    )
    assert out.returncode == 0, out.stderr
    assert f"published openai/gpt-4o-mini@{change.isoformat().replace('+00:00', 'Z')}" in out.stdout
    deadline = time.monotonic() + 30
    while worker.health()["catalogue_version"] == version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.health()["catalogue_version"] > version  # applied without a restart
    after = build_event(
        service="t",
        project="p1",
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=1_000_000,
        output_tokens=0,
        event_time=change,
    )
    asyncio.run(publish(kafka, worker.topics.usage_raw, usage_messages([before, after])))
    rows = worker.wait_rows(
        "SELECT toString(event_id), cost_usd, price_card, card_version FROM usage_events FINAL "
        "WHERE project = 'p1' ORDER BY event_time",
        2,
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (before["event_id"], "0.150000000000", "openai/gpt-4o-mini@2024-07-18"),
        (
            after["event_id"],
            "0.100000000000",
            f"openai/gpt-4o-mini@{change.isoformat().replace('+00:00', 'Z')}",
        ),
    ]


def test_unknown_model_is_visible_and_repriced_once_a_price_exists(
    kafka: str, worker: Worker, tmp_path: Path
) -> None:
    event = build_event(
        service="t",
        project="p2",
        provider="openai",
        model="gpt-new-1",
        input_tokens=2_000_000,
        output_tokens=1_000_000,
        event_time=datetime(2026, 11, 20, 12, tzinfo=UTC),
    )
    asyncio.run(publish(kafka, worker.topics.usage_raw, usage_messages([event])))
    [row] = worker.wait_rows(
        "SELECT pricing_status, price_card, cost_usd > 0, unpriced_reason FROM usage_events "
        "FINAL WHERE project = 'p2'",
        1,
    )
    assert row[0] == "fallback"  # charged at the provider's most expensive card: budgets still move
    assert row[2] == 1
    assert "no price card for openai/gpt-new-1" in row[3]
    metrics = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=5).text
    assert 'spendstream_events_total{pricing_status="fallback"} 1' in metrics

    catalogue = tmp_path / "cards.toml"
    catalogue.write_text(
        '[[card]]\nprovider = "openai"\nmodels = ["gpt-new-1"]\neffective_from = "2026-11-01"\n'
        'source = "https://example.test/gpt-new-1"\nchecked = "2026-11-27"\n'
        '[card.per_million]\ninput = "1.25"\noutput = "5.00"\n'
    )
    out = cli(worker, "prices", "import", str(catalogue))
    assert out.returncode == 0, out.stderr
    shown = cli(worker, "prices", "show", "gpt-new-1")
    assert "2026-11-01" in shown.stdout
    assert "1.25" in shown.stdout
    time.sleep(2)  # the worker's price feed follows the topic
    out = cli(worker, "reprice", "--from", "2026-11-20", "--to", "2026-11-21", "--model", "gpt-new-1")
    assert out.returncode == 0, out.stderr
    assert "pricing version 2: 1 events re-priced" in " ".join(out.stdout.split())
    rows = worker.sql(
        "SELECT pricing_version, pricing_status, cost_usd, price_card FROM usage_repriced FINAL "
        f"WHERE event_id = '{event['event_id']}'"
    )
    assert rows == [[2, "priced", "7.500000000000", "openai/gpt-new-1@2026-11-01"]]
    latest = worker.sql(
        f"SELECT cost_usd, pricing_version FROM usage_cost_latest WHERE event_id = '{event['event_id']}'"
    )
    assert latest == [["7.500000000000", 2]]
    # the streamed row is history: never overwritten
    [[status]] = worker.sql(
        f"SELECT pricing_status FROM usage_events FINAL WHERE event_id = '{event['event_id']}'"
    )
    assert status == "fallback"
    assert Decimal(str(latest[0][0])) == Decimal("2") * Decimal("1.25") + Decimal("5.00")


def test_price_cli_prices_one_event_without_kafka() -> None:
    env = {"PATH": "/usr/bin:/bin", "SPENDSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "spendstream",
            "price",
            "--format",
            "json",
            "--json",
            '{"provider": "openai", "model": "o3", "input_tokens": 1000, "output_tokens": 2000, '
            '"event_time": "2025-06-09T12:00:00Z"}',
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    import json

    body = json.loads(ok.stdout)
    assert body["total_usd"] == "0.09"  # $10/M in + $40/M out before the 2025-06-10 cut
    assert body["card"]["id"] == "openai/o3@2025-04-16"
    assert body["itemised"] == {"input": "0.01", "output": "0.08"}
    unknown = subprocess.run(
        [
            sys.executable,
            "-m",
            "spendstream",
            "price",
            "--json",
            '{"provider": "openai", "model": "gpt-unknown", "input_tokens": 1, "output_tokens": 1}',
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert unknown.returncode == 1
    assert "no price for model 'gpt-unknown'" in " ".join(unknown.stderr.split())
    huge = subprocess.run(
        [
            sys.executable,
            "-m",
            "spendstream",
            "price",
            "--json",
            '{"provider": "openai", "model": "gpt-4o", "input_tokens": 100000000000000000000, "output_tokens": 1}',
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert huge.returncode != 0  # refused like the emitter and the meter refuse it, never $250 trillion
    assert "input_tokens 100000000000000000000 is above the maximum of 1,000,000,000" in huge.stderr
    assert "Traceback" not in huge.stderr
