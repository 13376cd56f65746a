"""The meter's process of its own (stream_processors/meter_process.py): killed mid-stream, the
worker starts another and every event is counted once; the worker killed, its meter goes too."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from producers import SyncEmitter
from spendstream.wire import default_codec
from stream_processors.meter_process import PROCESS_NAME
from tests.conftest import Worker, module_worker, restart_worker
from tests.test_budgets_pipeline import budgets
from tests.test_pipeline import read_all

pytestmark = pytest.mark.integration

PROJECTS = [f"m{i}" for i in range(6)]
OVER = "m0"  # 500 of the 3,000 events: crosses $0.3 at its 301st, after the kill
USD_PER_EVENT = Decimal("0.001")  # 100 gpt-4o output tokens at $10 per million
RATE = 300  # events/s
EVENTS = 3_000
KILL_AT = 1_200
BUDGETS = "budgets:\n" + "".join(
    f'  project:{p}: {{daily: "{"0.3" if p == OVER else 1000}"}}\n' for p in PROJECTS
)

worker = module_worker("meterproc", BUDGETS)


def meter_pid(worker: Worker, timeout: float = 60) -> int:
    """The pid of the worker's meter process once it has reported (it names itself for the OS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = worker.health()
        if health["feeds_caught_up"] and health["partitions"]:
            pid: int = health["meter_pid"]
            assert Path(f"/proc/{pid}/comm").read_text().strip() == PROCESS_NAME.decode()
            return pid
        time.sleep(0.1)
    raise AssertionError(f"no meter process reported in {timeout:.0f} s: {worker.health()}")


def test_a_meter_process_killed_mid_stream_is_replaced_and_every_event_counts_once(
    kafka: str, worker: Worker
) -> None:
    first = meter_pid(worker)
    sent = dict.fromkeys(PROJECTS, 0)
    with SyncEmitter(bootstrap_servers=kafka, service="meterproc", topic=worker.topics.usage_raw) as em:
        start = time.monotonic()
        for i in range(EVENTS):
            if i == KILL_AT:
                em.flush()
                counted_before = sum(worker.health()["events"].values())
                os.kill(first, signal.SIGKILL)  # mid-stream: its take, sends and commits cut anywhere
            project = PROJECTS[i % len(PROJECTS)]
            em.emit(project=project, provider="openai", model="gpt-4o", input_tokens=0, output_tokens=100)
            sent[project] += 1
            if (lag := start + (i + 1) / RATE - time.monotonic()) > 0:
                time.sleep(lag)
        em.flush()
        assert em.sent_events == EVENTS
    assert counted_before > 0  # the first meter process was metering
    second = meter_pid(worker)
    assert second != first
    assert worker.process.poll() is None  # the worker went on: only its meter was replaced

    total = "SELECT count(), uniqExact(event_id), toString(sum(cost_usd)) FROM usage_events FINAL"
    found = worker.wait_rows(f"{total} HAVING count() >= {EVENTS}", 1, timeout=90)
    raw: int = worker.sql("SELECT count() FROM usage_events")[0][0]  # type: ignore[assignment]
    stored, distinct, usd = found[0]
    assert (stored, distinct, Decimal(str(usd))) == (EVENTS, EVENTS, EVENTS * USD_PER_EVENT), found

    want = {f"project:{p}": n * USD_PER_EVENT for p, n in sent.items()}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spend = {s: Decimal(r["spend_usd"]) for (s, _), r in budgets(worker).items()}
        if spend == want:
            break
        time.sleep(0.5)
    assert spend == want  # none lost with the killed process, none counted twice by its successor

    control = asyncio.run(read_all(kafka, worker.topics.spend_control, idle=1.5))
    signals = [default_codec().decode(v)[1] for _, v in control]
    blocked = Counter(s["scope"] for s in signals if s["state"] == "blocked")
    assert blocked == {f"project:{OVER}": 1}

    # The counters of /metrics and /health never go back: the killed process's are kept, and it
    # reported every event a commit covered before the commit. What it priced after its last
    # commit is priced again by its successor (as duplicates when the dedupe knew them).
    events = worker.health()["events"]
    metered = sum(events.values())
    assert metered >= EVENTS, events
    metrics = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=10).text
    assert f'spendstream_events_total{{pricing_status="priced"}} {events["priced"]}' in metrics
    log = worker.log.read_text()
    assert "the meter process exited (-9); restarting it" in log
    print(
        f"\nmeter process kill -9 after {KILL_AT} of {EVENTS} events at {RATE}/s (it had counted "
        f"{counted_before}): replaced (pid {first} -> {second}); stored {stored} (distinct {distinct}, "
        f"{raw - EVENTS} rows priced twice collapsed by FINAL), sum ${usd}, every budget's spend exact, "
        f"blocked signals {dict(blocked)}; /health events {events}"
    )


def running(pid: int) -> bool:
    """`pid` exists and is not a zombie (exited, not yet reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_killed_takes_its_meter_process_with_it(worker: Worker) -> None:
    old = meter_pid(worker)
    restart_worker(worker, kill=True)  # kill -9 of the worker, then a new one on the same state
    deadline = time.monotonic() + 30
    while running(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(old), "the killed worker's meter process is still running"
    new = meter_pid(worker)
    assert new != old
