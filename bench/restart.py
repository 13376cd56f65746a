"""Restart: one worker holding 100,000 scopes and 1,000,000 counted events, stopped (SIGTERM, and
kill -9) and started again: seconds to ready and to enforcing, the CPU and memory of the start.

    .venv/bin/python -m bench.restart [--users 100000] [--events 1000000] [--compare REF]

One run (see bench/README.md):

1. A worker (`spendstream up`, 4 partitions) with budgets for 8 projects and the template
   `user:*: {daily: "10"}`, no state yet: a restart (SIGTERM, start again) timed to /health
   answering with the feeds caught up (ready) and to enforcing: a probe event emitted while the
   worker was down, for a new member spending $12, is read as `blocked` from spend.control.
2. `--events` usage events ($0.01 each, 500 per UsageBatch message, pre-encoded, sent with a raw
   producer) over the 8 projects and `--users` users, so the scopes changelog holds a record per
   user scope, usage.seen every event id, spend.deltas the deltas. Timed until every project's
   spend and the template's member count are in the worker's /budgets; the worker's RSS then.
3. Baseline of the same run: a raw aiokafka read (getmany, nothing decoded) of what a restart
   must read: the scopes changelog and usage.seen.
4. Restarts with the state: SIGTERM, then kill -9, each with a probe as in 1; the seconds the
   stopped process took to exit, the CPU the new process spent until enforcing and its RSS;
   every project's spend and the member count are compared with what they were before the
   restart (a restart must lose and double nothing).
   With `--compare REF` the worker of git commit REF is restarted the same two ways first, on
   the same state (the tables' changelog format is the same), for a before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import (
    BOOTSTRAP,
    REPO,
    bench_broker,
    delete_topics,
    free_port,
    new_run_id,
    partitions,
    read_topic,
    say,
    worker_cpu_seconds,
    write_result,
)
from bench.members import Worker, checkout, rss_mib, start_timed
from producers import build_event
from spendstream.topics import Topics, ensure_topics
from spendstream.wire import default_codec

PROJECTS = 8
BATCH_EVENTS = 500
EVENT_OUTPUT_TOKENS = 1_000  # gpt-4o output at $10 per 1M tokens: $0.01 per event


def usage_messages(users: int, events: int) -> list[tuple[bytes, bytes]]:
    """(project, UsageBatch) messages: event i of project bench-(i % 8) by user u(i % users)."""
    codec = default_codec()
    by_project: dict[str, list[dict[str, Any]]] = {f"bench-{p}": [] for p in range(PROJECTS)}
    for i in range(events):
        project = f"bench-{i % PROJECTS}"
        by_project[project].append(
            build_event(
                service="bench",
                project=project,
                provider="openai",
                model="gpt-4o",
                user=f"u{i % users:06d}",
                output_tokens=EVENT_OUTPUT_TOKENS,
            )
        )
    return [
        (project.encode(), codec.encode("UsageBatch", {"events": evs[i : i + BATCH_EVENTS]}))
        for project, evs in by_project.items()
        for i in range(0, len(evs), BATCH_EVENTS)
    ]


async def send(topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP, max_request_size=8 << 20, max_batch_size=1 << 20, linger_ms=5
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_read(topics: list[str]) -> dict[str, float]:
    """Seconds to read every record of `topics` with one getmany loop (nothing decoded), and the count."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, fetch_max_bytes=64 << 20
    )
    await consumer.start()
    try:
        tps = [tp for topic in topics for tp in await partitions(topic)]
        started = time.perf_counter()
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records, left = 0, {tp for tp, end in ends.items() if end > 0}
        while left:
            for tp, messages in (await consumer.getmany(*left, timeout_ms=500)).items():
                records += len(messages)
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
        return {"seconds": round(time.perf_counter() - started, 2), "records": records}
    finally:
        await consumer.stop()


def state(worker: Worker) -> dict[str, Any]:
    """Every project's spend today and the template's summary, from /budgets."""
    rows, _ = worker.budgets()
    out: dict[str, Any] = {r["scope"]: r["spend_usd"] for r in rows if r["scope"].startswith("project:")}
    out["user:*"] = next(r["reason"] for r in rows if r["scope"] == "user:*")
    return out


def timeline(log: Path, pid: int, started: float) -> dict[str, Any]:
    """Seconds from the process start (wall clock `started`) to its history process serving, to
    Faust's worker starting (imports, topics, the budgets import, the history process) and to its
    tables being ready, from the worker's log (at --log-level info); what the restore and the
    dedupe re-load (the meter process's, or the worker's own before it had one) said they took."""
    out: dict[str, Any] = {"restored": [], "dedupe_reloaded": []}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("[20"):
            continue
        at = time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")) + int(line[21:24]) / 1000
        if "] [history " in line and "history writer serving on" in line and at >= started:
            out.setdefault("history_serving_s", round(at - started, 2))  # its child's, this start's
        if "] [meter " in line and "dedupe: partition" in line and at >= started:  # its meter process's
            out["dedupe_reloaded"].append(line.split("dedupe: ", 1)[1].strip())
        if f"] [{pid}] [" not in line:
            continue
        if "[^Worker]: Starting" in line:
            out["faust_start_s"] = round(at - started, 2)
        elif "[^Worker]: Ready" in line:
            out["tables_ready_s"] = round(at - started, 2)
        elif ": restored " in line:
            out["restored"].append(line.split("[INFO] ", 1)[1].strip())
        elif "dedupe: partition" in line:
            out["dedupe_reloaded"].append(line.split("dedupe: ", 1)[1].strip())
    return out


def restart(worker: Worker, topics: Topics, probe: str, *, kill: bool) -> dict[str, Any]:
    """Stop the worker (SIGTERM, or SIGKILL with kill), emit the probe's $12 call while it is down,
    start it again: seconds to ready and to the probe's `blocked`, CPU until then, RSS after."""
    assert worker.process is not None
    signalled = time.monotonic()
    worker.signal(signal.SIGKILL if kill else signal.SIGTERM)
    worker.process.wait(timeout=900)
    stop_s = round(time.monotonic() - signalled, 1)
    timed = start_timed(worker, topics, probe)
    wall = timed.pop("started_at")
    return {
        "stop_s": stop_s,
        **timed,
        "rss_mib": rss_mib(worker.pid),
        **timeline(worker.log, worker.pid, wall),
    }


def scenario(codes: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    run_id = new_run_id("restart")
    topics = Topics(f"{run_id}.")
    home = REPO / ".spendstream" / "bench" / run_id
    home.mkdir(parents=True, exist_ok=True)
    budgets = home / "budgets.yaml"
    budgets.write_text(
        "budgets:\n"
        + "".join(f'  "project:bench-{p}": {{daily: "100000"}}\n' for p in range(PROJECTS))
        + '  "user:*": {daily: "10"}\n'
    )
    asyncio.run(ensure_topics(BOOTSTRAP, topics, 4))
    env = {
        **os.environ,
        "SPENDSTREAM_BOOTSTRAP_SERVERS": BOOTSTRAP,
        "SPENDSTREAM_TOPIC_PREFIX": topics.prefix,
        "SPENDSTREAM_STATE_DIR": str(home),
        "SPENDSTREAM_WEB_PORT": str(free_port()),
        "SPENDSTREAM_WORKER_ID": run_id,
        "SPENDSTREAM_BUDGETS_FILE": str(budgets),
    }
    port = int(env["SPENDSTREAM_WEB_PORT"])
    worker = Worker(env, port, home / "worker.log", REPO, None, log_level="info")
    result: dict[str, Any] = {"users": args.users, "events": args.events}
    probes = 0

    def probe() -> str:
        nonlocal probes
        probes += 1
        return f"probe-{probes}"

    worker.start()
    try:
        worker.wait_ready()
        say("worker ready; restart with no state (this checkout)")
        result["no_state"] = restart(worker, topics, probe(), kill=False)
        say(f"  {result['no_state']}")
        say(f"encoding {args.events:,} events of {args.users:,} users")
        messages = usage_messages(args.users, args.events)
        started, cpu0 = time.monotonic(), worker_cpu_seconds(worker.pid)
        asyncio.run(send(topics.usage_raw, messages))
        usd = Decimal(args.events // PROJECTS * EVENT_OUTPUT_TOKENS) / 100_000  # $10 per 1M tokens
        while sum((worker.health() or {}).get("events", {}).values()) < args.events + probes:
            time.sleep(2)  # metered; /budgets (seconds of the worker's CPU with 100,000 members) after
        while True:
            before = state(worker)
            if before["user:*"].startswith(f"{args.users + probes} members") and all(
                Decimal(before.get(f"project:bench-{p}") or 0) == usd for p in range(PROJECTS)
            ):
                break
            time.sleep(5)
        result["load"] = {
            "seconds": round(time.monotonic() - started, 1),
            "worker_cpu_s": round(worker_cpu_seconds(worker.pid) - cpu0, 1),
            "rss_mib": rss_mib(worker.pid),
        }
        say(f"  loaded: {result['load']}; {before}")
        result["raw_read"] = asyncio.run(raw_read([f"{run_id}-scopes-changelog", topics.usage_seen]))
        say(f"  raw read of the scopes changelog and usage.seen: {result['raw_read']}")
        for label, code in codes.items():
            worker.code = code
            for kill in (False, True):
                how = "kill -9" if kill else "SIGTERM"
                say(f"restart with the state, {how}, the worker of {label}")
                figures = restart(worker, topics, probe(), kill=kill)
                after = state(worker)
                expected = {**before, "user:*": after["user:*"]}
                figures["state_exact"] = after == expected and after["user:*"].startswith(
                    f"{args.users + probes} members"
                )
                result.setdefault(label, {})["sigkill" if kill else "sigterm"] = figures
                say(f"  {figures}")
                if not figures["state_exact"]:
                    say(f"  STATE DIFFERS: before {before}, after {after}")
        # Each probe crossed once: exactly one `blocked` each, and never an `ok` (a restart must
        # not re-decide a member before its template is known).
        codec, signals = default_codec(), Counter[str]()
        for key, value in asyncio.run(read_topic(topics.spend_control)):
            if key and key.startswith(b"user:probe-"):
                signals[f"{codec.decode(value)[1]['state']}"] += 1
        result["probe_signals"] = {"probes": probes, **signals}
        say(f"  signals of the {probes} probes: {dict(signals)}")
    finally:
        worker.stop()
        asyncio.run(delete_topics(run_id))
    return result


def compile_packages(code: Path) -> None:
    """Byte-compile the packages of `code`, as installing them does: a worker started with
    PYTHONDONTWRITEBYTECODE (set here) would otherwise compile them on every start, and the
    first start of a tree (the compared one's is a measured restart) would pay for it."""
    packages = [str(d) for d in sorted(code.iterdir()) if (d / "__init__.py").exists()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *packages], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--compare", metavar="REF", help="also restart the worker of this git commit on the same state"
    )
    args = parser.parse_args()
    codes = {args.compare: checkout(args.compare)} if args.compare else {}
    codes["this checkout"] = REPO
    for code in codes.values():
        compile_packages(code)
    with bench_broker(new_run_id("restart")):
        result = scenario(codes, args)
    raw = result["raw_read"]["seconds"]
    for label in codes:
        for figures in result[label].values():
            figures["enforcing_vs_raw_read"] = round(figures["enforcing_s"] / raw, 1)
    if args.compare:
        old, new = result[args.compare], result["this checkout"]
        result["ratios_vs_compared"] = {
            how: {
                "enforcing_s": round(new[how]["enforcing_s"] / old[how]["enforcing_s"], 2),
                "cpu_s": round(new[how]["cpu_s"] / old[how]["cpu_s"], 2),
            }
            for how in ("sigterm", "sigkill")
        }
        say(f"this checkout / {args.compare}: {result['ratios_vs_compared']}")
    say(f"wrote {write_result('restart', result)}")


if __name__ == "__main__":
    main()
