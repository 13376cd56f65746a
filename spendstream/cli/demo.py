"""`spendstream demo`: a realistic synthetic workload against a real worker, until a kill switch.

Four projects of four teams call four models. `backlog-reprocessor` is the weekend script that
re-processes a backlog in a loop: it burns through its daily budget in seconds, the worker
publishes `blocked` on spend.control, and the demo stops it and reads the spend back from
ClickHouse. Each run uses its own topics (prefix demo-<run>.) and the `spendstream_demo` database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from producers import Emitter
from spendstream.cli.watch import format_signal, tail_control
from spendstream.errors import BufferFull, SpendstreamError
from spendstream.settings import Settings
from stream_processors.feeds import publish
from stream_processors.pricing import Catalogue, pico_to_usd

__all__ = ["run_demo"]

BUDGETS = Path(__file__).with_name("demo_budgets.yaml")
UI_PORT = 8050  # `spendstream ui`'s default


@dataclass(frozen=True)
class Profile:
    project: str
    team: str
    provider: str
    model: str
    share: float  # of the event rate
    input_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    cached_ratio: float = 0.0


PROFILES = (
    Profile("checkout", "commerce", "openai", "gpt-4o-mini", 0.25, (400, 1500), (50, 400)),
    Profile("search", "discovery", "google", "gemini-2.5-pro", 0.15, (1000, 6000), (100, 800), 0.3),
    Profile("support-bot", "cx", "anthropic", "claude-sonnet-4-20250514", 0.2, (2000, 8000), (200, 900), 0.6),
    Profile("backlog-reprocessor", "data", "openai", "gpt-4o", 0.4, (3000, 9000), (400, 1500)),
)
USERS = [f"user-{i:03d}" for i in range(40)]


def _usage(p: Profile, rng: random.Random) -> dict[str, Any]:
    prompt = rng.randint(*p.input_tokens)
    cached = int(prompt * p.cached_ratio * rng.random())
    output = rng.randint(*p.output_tokens)
    return {
        "input_tokens": prompt - cached,
        "cached_input_tokens": cached,
        "cache_write_tokens": 0,
        "output_tokens": output,
        "reasoning_tokens": 0,
    }


def _worker_alive(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _start_dashboard(env: dict[str, str], log_path: Path, console: Console) -> subprocess.Popen[bytes] | None:
    """`spendstream ui` beside the demo's worker (port 8050, or a free one if taken); None if it
    does not come up in 30 s (the demo goes on without it)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", UI_PORT))
            port = UI_PORT
        except OSError:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "ui", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "control", timeout=1).status_code == 200:
                console.print(
                    f"[bold]dashboard: {url}[/bold]  (open it now: the weekend script crosses its budget live)",
                    soft_wrap=True,  # a URL, a path or a topic cut by a newline cannot be copied
                )
                return process
        except httpx.TransportError:
            time.sleep(0.3)
    console.print(f"[yellow]the dashboard did not start; see {log_path}[/yellow]", soft_wrap=True)
    process.kill()
    process.wait()
    return None


def run_demo(settings: Settings, console: Console, *, max_events: int, rate: int) -> None:
    if _worker_alive(settings.web_port):
        raise SpendstreamError(
            f"a worker already answers on port {settings.web_port}: stop it first (it owns the "
            "embedded ClickHouse), or set SPENDSTREAM_WEB_PORT for the demo"
        )
    run = time.strftime("%Y%m%d-%H%M%S")
    demo = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}demo-{run}.",
            "worker_id": f"spendstream-demo-{run}",
            "clickhouse_database": "spendstream_demo",
            "budgets_file": BUDGETS,
        }
    )
    log_path = demo.state_dir.expanduser() / f"demo-worker-{run}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(demo, name)
        key = f"SPENDSTREAM_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    console.print(f"[bold]spendstream demo[/bold] run {run}: worker log {log_path}", soft_wrap=True)
    with log_path.open("w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "up", "--log-level", "warning"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    dashboard: subprocess.Popen[bytes] | None = None
    try:
        with console.status("starting Kafka (first run fetches it from Maven Central), topics, worker..."):
            deadline = time.monotonic() + 300
            while not _worker_alive(demo.web_port):
                if worker.poll() is not None:
                    raise SpendstreamError(f"the worker exited ({worker.returncode}); see {log_path}")
                if time.monotonic() > deadline:
                    raise SpendstreamError(f"the worker did not become ready in 300 s; see {log_path}")
                time.sleep(0.5)
        console.print(
            f"worker ready on {demo.bootstrap}, topics {', '.join(demo.topics.all())}", soft_wrap=True
        )
        dashboard = _start_dashboard(env, log_path.with_name(f"demo-ui-{run}.log"), console)
        asyncio.run(_workload(demo, console, run=run, max_events=max_events, rate=rate))
        if dashboard is not None and sys.stdin.isatty():
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                input("The dashboard stays up with the worker: press Enter to stop both. ")
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(timeout=30)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


async def _workload(settings: Settings, console: Console, *, run: str, max_events: int, rate: int) -> None:
    catalogue = Catalogue.load(fallback=settings.unpriced_fallback)
    rng = random.Random(7)
    weights = [p.share for p in PROFILES]
    spend: Counter[str] = Counter()
    events: Counter[str] = Counter()
    blocked: dict[str, Any] = {}

    async def watch() -> None:
        async for s in tail_control(
            settings.bootstrap,
            settings.topics.spend_control,
            verifier=settings.verifier(),
            kafka_auth=settings.kafka_auth,
        ):
            if s["state"] == "blocked":
                blocked.update(s)
                return

    def view(elapsed: float) -> Table:
        table = Table(
            "project",
            "team",
            "model",
            "events",
            "spend (emitter side)",
            title=f"{sum(events.values()):,} events in {elapsed:.1f}s",
        )
        for p in PROFILES:
            table.add_row(
                p.project, p.team, p.model, f"{events[p.project]:,}", f"${pico_to_usd(spend[p.project]):,.4f}"
            )
        return table

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    async with Emitter(
        bootstrap_servers=settings.bootstrap,
        service="demo-workload",
        topic=settings.topics.usage_raw,
        kafka_auth=settings.kafka_auth,
    ) as emitter:
        unknown_id = await _emit_unknown_model(settings)
        with Live(view(0), console=console, refresh_per_second=8) as live:
            sent, tick = 0, 0.02
            while sent < max_events and not watcher.done():
                for _ in range(max(1, int(rate * tick))):
                    p = rng.choices(PROFILES, weights)[0]
                    usage = _usage(p, rng)
                    try:
                        emitter.emit_nowait(
                            project=p.project,
                            team=p.team,
                            user=rng.choice(USERS),
                            provider=p.provider,
                            model=p.model,
                            tags={"demo_run": run},
                            **usage,
                        )
                    except BufferFull:
                        break
                    event = {
                        **usage,
                        "provider": p.provider,
                        "model": p.model,
                        "event_time": time.time_ns() // 1000,
                    }
                    spend[p.project] += catalogue.price(event).cost_pico or 0
                    events[p.project] += 1
                    sent += 1
                live.update(view(time.monotonic() - started))
                await asyncio.sleep(tick)
            live.update(view(time.monotonic() - started))
    if not watcher.done():
        console.print(f"[yellow]{max_events:,} events sent and no budget tripped; waiting 10 s[/yellow]")
        await asyncio.wait([watcher], timeout=10)
    watcher.cancel()
    if blocked:
        console.print("\n[bold red]KILL SWITCH[/bold red] on spend.control:")
        console.print(format_signal(blocked))
    else:
        console.print("[yellow]no blocked signal seen[/yellow]")
    await _report(settings, console, run, spend, unknown_id)


async def _emit_unknown_model(settings: Settings) -> str:
    """One event for a model with no price: it must be flagged and charged at a fallback, never $0."""
    from producers import build_event
    from spendstream.wire import default_codec

    event = build_event(
        service="demo-workload",
        project="checkout",
        provider="openai",
        model="gpt-9-unreleased",
        input_tokens=100,
        output_tokens=10,
    )
    await publish(
        settings.bootstrap,
        settings.topics.usage_raw,
        [(b"checkout", default_codec().encode("UsageEvent", event))],
        settings.kafka_auth,
    )
    return str(event["event_id"])


async def _report(
    settings: Settings, console: Console, run: str, spend: Counter[str], unknown_id: str
) -> None:
    """Read spend back from ClickHouse (through the worker, which owns embedded chDB)."""
    from spendstream.cli.console import render
    from stream_processors.store import QueryResult

    base = f"http://127.0.0.1:{settings.web_port}"
    per_project = (
        "SELECT project, count() AS events, sum(cost_usd) AS spend_usd "
        f"FROM usage_events FINAL WHERE tags['demo_run'] = '{run}' GROUP BY project ORDER BY spend_usd DESC"
    )
    expected = {p: str(pico_to_usd(v)) for p, v in spend.items() if v}
    async with httpx.AsyncClient(timeout=60) as client:
        deadline = time.monotonic() + 60
        while True:  # the pipeline is asynchronous: wait until the sink has written everything
            await client.post(f"{base}/flush")
            body = (await client.post(f"{base}/sql", json={"query": per_project})).json()
            got = {r[0]: r[2] for r in body["rows"]}
            if got == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        console.print("\nSpend read back from ClickHouse ([dim]spendstream_demo.usage_events[/dim]):")
        console.print(render(QueryResult(body["columns"], body["rows"]), "table"))
        if got == expected:
            total = pico_to_usd(sum(spend.values()))
            console.print(
                f"[green]✓ equal to the emitter-side totals to the last pico-dollar (${total:,})[/green]"
            )
        else:
            console.print(f"[red]✗ ClickHouse totals differ from the emitter side: expected {expected}[/red]")
        unknown = (
            await client.post(
                f"{base}/sql",
                json={
                    "query": "SELECT model, pricing_status, price_card, cost_usd, unpriced_reason "
                    f"FROM usage_events FINAL WHERE event_id = '{unknown_id}'"
                },
            )
        ).json()
        for model, status, card, cost, reason in unknown.get("rows", []):
            console.print(
                f"unknown model [yellow]{model}[/yellow]: {reason}; stored as [bold]{status}[/bold]"
                + (f", charged ${cost} at {card} so budgets still move" if status == "fallback" else "")
            )
        dead = (
            await client.post(
                f"{base}/sql",
                json={
                    "query": (
                        f"SELECT reason, detail FROM dead_letters FINAL WHERE source_topic = '{settings.topics.usage_raw}' LIMIT 5"
                    )
                },
            )
        ).json()
        for reason, detail in dead.get("rows", []):
            console.print(f"dead letter: [yellow]{reason}[/yellow] {detail}")
