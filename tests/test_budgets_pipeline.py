"""Budgets through the real worker: CLI management, scopes, windows, grace, runaway, forecast,
manual blocks, concurrent emitters, and a kill -9 of the worker mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from producers import SyncEmitter, SyncGuard
from spendstream.errors import BudgetExceeded
from spendstream.wire import default_codec
from stream_processors.meter_input import meter_group
from tests.conftest import REPO, Worker, module_worker, start_worker
from tests.test_pipeline import read_all

pytestmark = pytest.mark.integration

OUTPUT_TOKENS_PER_USD = 100_000  # gpt-4o output: $10 per 1M tokens, so any cent amount is exact


def tokens(usd: str) -> int:
    count = Decimal(usd) * OUTPUT_TOKENS_PER_USD
    assert count == count.to_integral_value()
    return int(count)


def cli(worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return worker.cli(*args)


def emit(kafka: str, worker: Worker, project: str, usd: str, n: int = 1, **kw: Any) -> None:
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as em:
        for _ in range(n):
            em.emit(
                project=project,
                provider="openai",
                model="gpt-4o",
                input_tokens=0,
                output_tokens=tokens(usd),
                **kw,
            )


def signals(kafka: str, worker: Worker, scope: str) -> list[dict[str, Any]]:
    return [
        default_codec().decode(v)[1]
        for k, v in asyncio.run(read_all(kafka, worker.topics.spend_control, idle=1.5))
        if k == scope.encode()
    ]


def wait_signal(kafka: str, worker: Worker, scope: str, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = signals(kafka, worker, scope)
        if found and found[-1]["state"] == state:
            return found[-1]
    raise AssertionError(f"no {state} signal for {scope}: {signals(kafka, worker, scope)}")


def budgets(worker: Worker) -> dict[tuple[str, str], dict[str, Any]]:
    rows = httpx.get(f"http://127.0.0.1:{worker.port}/budgets", timeout=10).json()["budgets"]
    return {(r["scope"], r["window"].split(":")[0]): r for r in rows}


worker = module_worker(
    "budgets",
    "budgets: {}\n",
    SPENDSTREAM_LATE_GRACE_SECONDS=str(2 * 86_400),
    SPENDSTREAM_DEDUPE_HORIZON_SECONDS=str(8 * 86_400),  # the late events below still move budgets
)


def test_budget_set_list_cross_and_raise_unblocks(kafka: str, worker: Worker) -> None:
    cli(worker, "budget", "set", "project:b1", "5", "--window", "daily", "--warn", "50")
    emit(kafka, worker, "b1", "3")
    warn = wait_signal(kafka, worker, "project:b1", "warn")
    assert (warn["reason"], warn["level"]) == ("threshold", 50)
    listed = cli(worker, "budget", "list").stdout
    assert "project:b1" in listed
    assert "$3.00" in listed
    assert "60.0" in listed
    emit(kafka, worker, "b1", "2.5")
    blocked = wait_signal(kafka, worker, "project:b1", "blocked")
    assert (blocked["reason"], blocked["limit_pico_usd"]) == ("budget_exceeded", 5 * 10**12)
    cli(worker, "budget", "set", "project:b1", "50", "--window", "daily")
    ok = wait_signal(kafka, worker, "project:b1", "ok")
    assert ok["reason"] == "within_budget"
    assert [s["sequence"] for s in signals(kafka, worker, "project:b1")] == [1, 2, 3]


def test_team_user_and_model_filter_scopes_count_across_projects(kafka: str, worker: Worker) -> None:
    cli(worker, "budget", "set", "team:data", "4", "--window", "daily")
    cli(worker, "budget", "set", "project:p9/model:gpt-4o*", "100", "--window", "daily")
    time.sleep(1)  # the meter learns the model filter from the budgets topic
    emit(kafka, worker, "etl-a", "2.5", team="data", user="ann")
    emit(kafka, worker, "etl-b", "2.5", team="data", user="bob")  # another project, same team
    emit(kafka, worker, "p9", "1")
    wait_signal(kafka, worker, "team:data", "blocked")
    rows = budgets(worker)
    assert Decimal(rows[("team:data", "day")]["spend_usd"]) == Decimal("5")
    assert Decimal(rows[("project:p9/model:gpt-4o*", "day")]["spend_usd"]) == Decimal("1")


def test_berlin_monthly_budget_uses_the_berlin_month(kafka: str, worker: Worker) -> None:
    cli(worker, "budget", "set", "project:ber", "1", "--window", "monthly", "--tz", "Europe/Berlin")
    emit(kafka, worker, "ber", "1.5")
    blocked = wait_signal(kafka, worker, "project:ber", "blocked")
    berlin = datetime.now(ZoneInfo("Europe/Berlin"))
    assert blocked["window"] == f"month:{berlin:%Y-%m}@Europe/Berlin"
    start = datetime(berlin.year, berlin.month, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    assert blocked["window_start"] == int(start.timestamp()) * 10**6


def test_rolling_window_and_runaway_ceiling(kafka: str, worker: Worker) -> None:
    cli(worker, "budget", "set", "project:roll", "1", "--window", "rolling:10m")
    emit(kafka, worker, "roll", "0.6", n=2)
    blocked = wait_signal(kafka, worker, "project:roll", "blocked")
    assert blocked["window"] == "rolling:10m"
    cli(worker, "budget", "runaway", "project:loop", "--multiplier", "0", "--usd-per-minute", "1")
    emit(kafka, worker, "loop", "0.5", n=12)  # $6 in a minute: above $1/min over 5 minutes
    runaway = wait_signal(kafka, worker, "project:loop", "blocked")
    assert runaway["reason"] == "runaway"
    assert runaway["window"] == "rolling:5m"


def test_forecast_warns_before_the_monthly_limit(kafka: str, worker: Worker) -> None:
    cli(worker, "budget", "set", "project:burn", "5000", "--window", "monthly")
    now = datetime.now(UTC)
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as em:
        for minutes_ago in range(20, -1, -1):  # $2/min over the last 20 minutes: $2,880 a day
            em.emit(
                project="burn",
                provider="openai",
                model="gpt-4o",
                input_tokens=0,
                output_tokens=tokens("2"),
                event_time=now - timedelta(minutes=minutes_ago),
            )
    warn = wait_signal(kafka, worker, "project:burn", "warn")
    assert warn["reason"] == "forecast"
    projected = datetime.fromtimestamp(warn["projected_at"] / 1e6, UTC)
    assert now + timedelta(hours=30) < projected < now + timedelta(hours=50)  # ($5000 - $42) / $2 per minute


def test_late_events_inside_grace_count_outside_are_flagged(kafka: str, worker: Worker) -> None:
    cli(worker, "budget", "set", "project:late", "1000", "--window", "daily")
    yesterday = datetime.now(UTC) - timedelta(days=1)
    week_ago = datetime.now(UTC) - timedelta(days=7)
    emit(kafka, worker, "late", "2", event_time=yesterday)  # inside the 2-day grace
    emit(kafka, worker, "late", "3", event_time=week_ago)  # outside: recorded and flagged
    emit(kafka, worker, "late", "1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = budgets(worker).get(("project:late", "day"))
        if row and Decimal(row["late_usd"]) == 3 and Decimal(row["spend_usd"]) == 1:
            break
        time.sleep(0.3)
    assert row is not None
    assert Decimal(row["spend_usd"]) == 1
    assert Decimal(row["late_usd"]) == 3
    metrics = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=5).text
    late_line = next(line for line in metrics.splitlines() if 'kind="beyond_grace"' in line)
    assert int(late_line.split()[-1]) == 2 * 3 * 10**12  # $3, counted in scopes org and project:late


def test_manual_block_and_unblock_reach_a_guard(kafka: str, worker: Worker) -> None:
    with SyncGuard(bootstrap_servers=kafka, topic=worker.topics.spend_control) as guard:
        guard.check(project="any", team="ops")
        cli(worker, "block", "team:ops", "--reason", "incident 42")
        deadline = time.monotonic() + 20
        while (s := guard.state("team:ops")) is None or s.state != "blocked":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(BudgetExceeded, match="team:ops is blocked \\(manual\\)"):
            guard.check(project="any", team="ops")
        guard.check(project="any", team="other")
        cli(worker, "unblock", "team:ops")
        while (s := guard.state("team:ops")) is None or s.state != "ok":
            assert time.monotonic() < deadline + 20
            time.sleep(0.05)
        guard.check(project="any", team="ops")


CONCURRENT_EMITTER = """
import sys, time
from producers import SyncEmitter, SyncGuard
from spendstream.errors import BudgetExceeded
bootstrap, raw, control, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
refused = 0
with SyncGuard(bootstrap_servers=bootstrap, topic=control) as guard, \\
        SyncEmitter(bootstrap_servers=bootstrap, service="conc", topic=raw, linger_ms=20) as em:
    for i in range(n):
        try:
            guard.check(project="conc")
        except BudgetExceeded:
            refused += 1
            continue
        em.emit(project="conc", provider="openai", model="gpt-4o", input_tokens=0, output_tokens=%d)
        time.sleep(0.02)
print(refused)
"""


def test_concurrent_emitters_overshoot_is_bounded(kafka: str, worker: Worker, tmp_path: Path) -> None:
    cli(worker, "budget", "set", "project:conc", "10", "--window", "daily")
    script = tmp_path / "emit.py"
    script.write_text(CONCURRENT_EMITTER % tokens("0.01"))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), kafka, worker.topics.usage_raw, worker.topics.spend_control, "600"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    refused = [int(p.communicate(timeout=120)[0].strip()) for p in procs]
    ended = time.time()
    blocked = wait_signal(kafka, worker, "project:conc", "blocked")
    print(f"block decided {ended - blocked['decided_at'] / 1e6:.1f} s before the emitters ended")
    time.sleep(2)
    spend = Decimal(budgets(worker)[("project:conc", "day")]["spend_usd"])
    overshoot = spend - Decimal(10)
    print(
        f"3 emitters x 600 calls at $0.01: spend ${spend} of $10, overshoot ${overshoot} "
        f"({int(overshoot * 100)} calls in flight after the block), refused {refused}"
    )
    assert blocked["spend_pico_usd"] >= 10 * 10**12
    assert sum(refused) > 0  # the guards stopped the calls ...
    assert Decimal(0) <= overshoot < Decimal("1")  # ... within a bounded overshoot (< 100 calls in flight)


def signal_lines(state: Path) -> list[str]:
    """The signals the worker logged deciding them, killed and restarted, to tell a signal never
    decided from one decided and not delivered."""
    return [
        f"{log.name}: {line.strip()}"
        for log in (state / "worker.log", state / "worker-restart.log")
        if log.exists()
        for line in log.read_text(errors="replace").splitlines()
        if " signal project:" in line
    ]


def kill9_diagnostics(kafka: str, w: Worker, totals: str) -> str:
    """Where the events of the kill -9 test are: usage.raw, usage.priced, the meter's committed offsets."""
    from aiokafka.admin import AIOKafkaAdminClient

    def count(topic: str) -> int:
        return sum(
            len(default_codec().decode(v)[1]["events"])
            for _, v in asyncio.run(read_all(kafka, topic, idle=2))
        )

    async def committed() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(meter_group(w.env["SPENDSTREAM_WORKER_ID"]))
        finally:
            await admin.close()
        return {f"{tp.topic}[{tp.partition}]": meta.offset for tp, meta in offsets.items()}

    health = httpx.get(f"http://127.0.0.1:{w.port}/health", timeout=5).text
    return (
        f"{totals}\nusage.raw events: {count(w.topics.usage_raw)}\nusage.priced events: "
        f"{count(w.topics.usage_priced)}\ncommitted: {asyncio.run(committed())}\nhealth: {health}\n"
    )


def test_kill_9_of_the_worker_mid_stream_loses_and_doubles_nothing(kafka: str, tmp_path: Path) -> None:
    state = tmp_path / "k9"
    w = start_worker(kafka, state, 'budgets:\n  project:k9: {daily: "30"}\n')
    env = w.env
    feeder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom producers import SyncEmitter\n"
                f"with SyncEmitter(bootstrap_servers='{kafka}', service='k9', topic='{w.topics.usage_raw}', linger_ms=5) as em:\n"
                "    for i in range(6000):\n"
                f"        em.emit(project='k9', provider='openai', model='gpt-4o', input_tokens=0, output_tokens={tokens('0.01')})\n"
                "        time.sleep(0.0005)\n"
            ),
        ],
        cwd=REPO,
    )
    time.sleep(3)
    w.process.send_signal(signal.SIGKILL)  # mid-stream, no clean shutdown
    w.process.wait()
    assert feeder.wait(timeout=120) == 0
    with (state / "worker-restart.log").open("wb") as out:
        restarted = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    w2 = Worker(env, w.port, w.topics, restarted, state / "worker-restart.log")
    try:
        expected = Decimal(6000) * Decimal("0.01")
        deadline = time.monotonic() + 240  # the dead member's session times out, then the backlog
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                row = budgets(w2).get(("project:k9", "day"), {})
                if row and Decimal(row["spend_usd"]) >= expected:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        time.sleep(2)
        row = budgets(w2)[("project:k9", "day")]
        # The restarted history writer starts seconds after the spend tables are back (chDB's import;
        # 3 s under load), then reads usage.priced from its last commit: wait for it, then count.
        query = "SELECT count(), sum(cost_usd) FROM usage_events FINAL WHERE project = 'k9'"
        w2.wait_rows(f"{query} HAVING count() >= 6000", 1, timeout=60)
        [[n, total]] = w2.sql(query)
        print(
            f"after kill -9: spend table ${row['spend_usd']}, ClickHouse {n} rows ${total}, expected ${expected}"
        )
        if Decimal(row["spend_usd"]) != expected:  # say where the events are, to tell the stages apart
            report = REPO / ".spendstream" / "test" / "kill9-last-failure.txt"
            report.write_text(kill9_diagnostics(kafka, w2, f"spend ${row['spend_usd']}, ClickHouse {n} rows"))
            print(report.read_text())
        assert Decimal(row["spend_usd"]) == expected  # spend tables: nothing lost, nothing counted twice
        assert (n, Decimal(str(total))) == (6000, expected)  # ClickHouse too
        found = signals(kafka, w2, "project:k9")
        keys = [(s["state"], s["reason"], s["level"], s["window"]) for s in found]
        assert len(keys) == len(set(keys)), keys  # no signal re-emitted by the restart
        assert [s["sequence"] for s in found] == sorted({s["sequence"] for s in found})
        assert found[-1]["state"] == "blocked", (found, signal_lines(state))
        print(json.dumps({"signals": keys, "spend": str(expected)}))
    finally:
        w2.stop()
        if os.path.exists(state / "worker.log"):
            pass
