"""Alert webhooks (`spendstream alerts`) against a loopback receiver that fails the first attempts:
each of warn, blocked, runaway and forecast is delivered once per state change to the webhooks
that want it, after retries, in Slack and generic JSON form; a restart resends nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from producers import SyncEmitter
from spendstream.cli.alerts import Alerter, Webhook, deliver, load_webhooks
from spendstream.errors import ConfigError
from tests.conftest import REPO, Worker, free_port, module_worker

pytestmark = pytest.mark.integration
FAILURES = 2  # the receiver answers 503 to the first attempts of every alert
OUTPUT_TOKENS_PER_USD = 100_000  # gpt-4o output: $10 per 1M tokens
HOOK_PORT = free_port()  # the receiver's: the budgets file below names it


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request (path, status answered, key, body)."""

    port: int
    requests: list[tuple[str, int, str, dict[str, Any]]] = field(default_factory=list)

    def delivered(self, path: str) -> dict[str, dict[str, Any]]:
        return {key: body for p, status, key, body in self.requests if p == path and status == 200}

    def attempts(self, path: str) -> Counter[str]:
        return Counter(key for p, _, key, _ in self.requests if p == path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver(HOOK_PORT)
    seen: Counter[tuple[str, str]] = Counter()

    async def hook(request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        seen[(request.path, key)] += 1
        status = 503 if seen[(request.path, key)] <= FAILURES else 200
        rec.requests.append((request.path, status, key, await request.json()))
        return web.Response(status=status)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/slack", hook)
    app.router.add_post("/json", hook)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", rec.port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield rec
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


worker = module_worker(
    "alerts",
    f"""\
budgets:
  project:alpha: {{monthly: "10"}}
  project:run: {{monthly: "100000", runaway: {{multiplier: 0, usd_per_minute: "1"}}}}
  project:burn: {{monthly: "5000"}}
alerts:
  - {{url: "http://127.0.0.1:{HOOK_PORT}/slack", format: slack, kinds: [blocked, runaway]}}
  - {{url: "http://127.0.0.1:{HOOK_PORT}/json", format: json}}
""",
)


def start_alerts(worker: Worker) -> tuple[subprocess.Popen[bytes], Path]:
    log = worker.log.with_name(f"alerts-{time.monotonic_ns()}.log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "alerts"],
            env=worker.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    deadline = time.monotonic() + 60
    while "alerts: following" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return process, log


def emit(kafka: str, worker: Worker, project: str, usd: str, at: datetime | None = None) -> None:
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as em:
        em.emit(
            project=project,
            provider="openai",
            model="gpt-4o",
            input_tokens=0,
            output_tokens=int(Decimal(usd) * OUTPUT_TOKENS_PER_USD),
            event_time=at or datetime.now(UTC),
        )


def wait_for(check: Any, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_each_state_change_is_delivered_once_after_retries_and_a_restart_resends_nothing(
    kafka: str, worker: Worker, receiver: Receiver
) -> None:
    process, log = start_alerts(worker)
    try:
        emit(kafka, worker, "alpha", "6")  # warn at 50% of $10
        worker.cli("block", "project:alpha", "--reason", "incident 4711")  # blocked (manual)
        emit(kafka, worker, "run", "6")  # $6 in a minute > $1/min over 5 min: runaway
        now = datetime.now(UTC)
        for minutes_ago in range(20, -1, -1):  # $2/min for 20 min: the $5000 month is reached in ~41 h
            emit(kafka, worker, "burn", "2", now - timedelta(minutes=minutes_ago))
        wait_for(lambda: len(receiver.delivered("/json")) >= 4 and len(receiver.delivered("/slack")) >= 2)
        time.sleep(2)  # anything more would come now
        sent = receiver.delivered("/json")
        assert sorted((b["kind"], b["scope"]) for b in sent.values()) == [
            ("blocked", "project:alpha"),
            ("forecast", "project:burn"),
            ("runaway", "project:run"),
            ("warn", "project:alpha"),
        ]
        assert set(receiver.attempts("/json").values()) == {FAILURES + 1}  # retried, then once: never twice
        warn = next(b for b in sent.values() if b["kind"] == "warn")
        assert (warn["spend_usd"], warn["limit_usd"], warn["level"]) == (
            "6.000000000000",
            "10.000000000000",
            50,
        )
        assert warn["dedupe_key"] == f"project:alpha#{warn['sequence']}"
        slack = receiver.delivered("/slack")
        assert len(slack) == 2
        texts = sorted(b["text"] for b in slack.values())
        assert "*project:alpha* is blocked by an operator" in texts[0]
        assert "*project:run* is blocked: runaway spend" in texts[1]
        assert set(receiver.attempts("/slack").values()) == {FAILURES + 1}
        assert "127.0.0.1" in log.read_text()
        assert "/json" not in log.read_text()  # hosts only in logs: a URL's path can hold its token
    finally:
        process.terminate()
        process.wait(30)
    before = len(receiver.requests)
    process, _ = start_alerts(worker)  # committed offsets: nothing is announced again
    try:
        time.sleep(3)
        assert len(receiver.requests) == before
        worker.cli("unblock", "project:alpha")  # back to warn (spend 60%): a new change, a new sequence
        wait_for(lambda: len(receiver.delivered("/json")) == 5)
        time.sleep(1.5)
        assert len(receiver.delivered("/json")) == 5
        assert len(receiver.delivered("/slack")) == 2  # slack only wants blocked and runaway
    finally:
        process.terminate()
        process.wait(30)


def test_alerter_dedupes_by_scope_and_sequence_and_by_decision() -> None:
    hooks = [Webhook("http://x/a", "json")]
    alerter = Alerter(hooks)
    signal = {
        "scope": "project:a",
        "state": "blocked",
        "reason": "budget_exceeded",
        "level": 100,
        "window": "month:2026-12@UTC",
        "window_start": 0,
        "window_end": 0,
        "spend_pico_usd": 11 * 10**12,
        "limit_pico_usd": 10 * 10**12,
        "decided_at": 1,
        "sequence": 3,
        "mode": "hard",
        "projected_at": 0,
        "signature": b"",
    }
    [(_, alert)] = alerter.on_signal(signal)
    assert (alert.kind, alert.dedupe_key) == ("blocked", "project:a#3")
    assert alerter.on_signal(signal) == []  # the same (scope, sequence) again
    assert alerter.on_signal({**signal, "sequence": 2}) == []  # an older one
    assert alerter.on_signal({**signal, "sequence": 4}) == []  # re-signed, same decision
    assert alerter.on_signal({**signal, "sequence": 5, "state": "ok", "reason": "within_budget"}) == []
    [(_, again)] = alerter.on_signal({**signal, "sequence": 6})
    assert again.dedupe_key == "project:a#6"


def test_a_refused_webhook_is_not_retried_and_a_dead_one_is_given_up(receiver: Receiver) -> None:
    alert = Alerter([Webhook("http://127.0.0.1:1/", "json")]).on_signal(
        {
            "scope": "project:z",
            "state": "warn",
            "reason": "threshold",
            "level": 80,
            "window": "",
            "window_start": 0,
            "window_end": 0,
            "spend_pico_usd": 0,
            "limit_pico_usd": 0,
            "decided_at": 1,
            "sequence": 1,
            "mode": "hard",
            "projected_at": 0,
        }
    )[0][1]
    slept: list[float] = []

    async def no_wait(seconds: float) -> None:
        slept.append(seconds)

    async def run(url: str) -> bool:
        async with httpx.AsyncClient() as client:
            return await deliver(client, Webhook(url), alert, sleep=no_wait)

    assert asyncio.run(run(f"http://127.0.0.1:{receiver.port}/nowhere")) is False  # 404: not retried
    assert slept == []
    assert asyncio.run(run(f"http://127.0.0.1:{free_port()}/")) is False  # nobody listens
    assert slept == [0.5, 1, 2, 4, 8]  # backoff, then given up after 6 attempts


def test_alert_config_errors_say_what_to_write(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("alerts:\n  - {url: 'ftp://x', format: json}\n")
    with pytest.raises(ConfigError, match="http"):
        load_webhooks(path)
    path.write_text("alerts:\n  - {url: 'https://x', format: teams}\n")
    with pytest.raises(ConfigError, match="slack or json"):
        load_webhooks(path)
    path.write_text("alerts:\n  - {url: 'https://x', kinds: [blocked, paged]}\n")
    with pytest.raises(ConfigError, match="paged"):
        load_webhooks(path)
    path.write_text("alerts:\n  - {url: 'https://x', on: [blocked]}\n")  # YAML reads `on` as true
    with pytest.raises(ConfigError, match="unknown"):
        load_webhooks(path)
