"""Scale benchmark: events/s through 1, 2 and 3 meter workers on the same topic, and the CPU
seconds each spends per million events (the figure that carries to a machine with more cores).

    .venv/bin/python bench/scale.py [--events N] [--projects P] [--workers 1,2,3]

Measured in one run, against the bench broker this script starts (see bench/README.md):

1. N usage events are encoded before any clock starts, as UsageBatch messages of 500 events of
   one project (key = project), the workload of bench/pipeline.py spread over P projects.
2. For each worker count W: fresh 12-partition topics; W `spendstream up --role meter` processes
   (its meter process, and the spend tables and budget agent in Faust; no history writer:
   usage.priced is left for one to read later) join one consumer group. Once each holds its
   share of the partitions (their /health), the messages are produced, and the clock runs from
   the first send to the workers' metered-event counts (/health) adding up to N. CPU seconds of
   every worker (its process and its meter process) over that time are read from /proc.
3. Baseline, same run: a raw `getmany` loop decoding every event of the same topic, in one process.

On a machine with fewer cores than workers + broker, events/s stops growing with W; the CPU
seconds per million events do not depend on the core count, and are what the cost model in
docs/operations.md rests on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import (
    BENCH_HOME,
    BOOTSTRAP,
    bench_broker,
    create_topics,
    free_port,
    new_run_id,
    say,
    worker_cpu_seconds,
    write_result,
)
from pipeline import BATCH_EVENTS, build_workload, consume, produce, write_budgets

from spendstream.topics import Topics

PARTITIONS = 12
DEADLINE_S = 300.0


@dataclass
class Meter:
    """One `spendstream up --role meter` process."""

    label: str
    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def health(self) -> dict[str, Any] | None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5)
        except httpx.TransportError:
            return None
        return answer.json() if answer.status_code == 200 else None

    def failed(self, why: str) -> RuntimeError:
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        return RuntimeError(f"worker {self.label}: {why}; log {self.log}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_meters(count: int, topics: Topics, group: str, budgets: Path, scratch: Path) -> list[Meter]:
    meters = []
    for i in range(count):
        port, state = free_port(), scratch / f"meter-{i}"
        state.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
        env |= {
            "SPENDSTREAM_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "SPENDSTREAM_TOPIC_PREFIX": topics.prefix,
            "SPENDSTREAM_PARTITIONS": str(PARTITIONS),
            "SPENDSTREAM_STATE_DIR": str(state),
            "SPENDSTREAM_WEB_PORT": str(port),
            "SPENDSTREAM_WORKER_ID": group,
            "SPENDSTREAM_BUDGETS_FILE": str(budgets),
        }
        log = state / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "spendstream", "up", "--role", "meter", "--log-level", "warning"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=state,  # `-m` puts the cwd first on sys.path: keep it neutral
            )
        meters.append(Meter(f"{count}x#{i}", env, port, log, proc))
    return meters


def wait_assigned(meters: list[Meter]) -> float:
    """Until every worker answers /health and holds a share of the partitions, together all."""
    started = time.monotonic()
    while time.monotonic() - started < DEADLINE_S:
        for m in meters:
            if m.proc.poll() is not None:
                raise m.failed(f"exited {m.proc.returncode} while starting")
        healths = [m.health() for m in meters]
        if all(h is not None and h.get("feeds_caught_up") for h in healths):
            held = [set(h["partitions"]) for h in healths if h is not None]
            if all(held) and len(set().union(*held)) == PARTITIONS and sum(map(len, held)) == PARTITIONS:
                return time.monotonic() - started
        time.sleep(0.2)
    raise meters[0].failed(f"the {len(meters)} workers did not share the partitions in {DEADLINE_S:.0f} s")


def metered(meters: list[Meter]) -> int:
    total = 0
    for m in meters:
        h = m.health()
        if h is None:
            raise m.failed("stopped answering /health")
        total += sum(h["events"].values())
    return total


def run_workers(
    count: int, topics: Topics, group: str, budgets: Path, scratch: Path, workload: Any
) -> dict[str, Any]:
    meters = start_meters(count, topics, group, budgets, scratch)
    try:
        settle_s = wait_assigned(meters)
        cpu0 = [worker_cpu_seconds(m.proc.pid) for m in meters]
        started = time.monotonic()
        produce_s = asyncio.run(produce(topics.usage_raw, workload.messages))
        done = 0
        while done < workload.events:
            if time.monotonic() - started > DEADLINE_S:
                raise meters[0].failed(
                    f"{done:,} of {workload.events:,} events metered in {DEADLINE_S:.0f} s"
                )
            time.sleep(0.05)
            done = metered(meters)
        seconds = time.monotonic() - started
        cpu = [round(worker_cpu_seconds(m.proc.pid) - c, 2) for m, c in zip(meters, cpu0, strict=True)]
        per_worker = [sum(h["events"].values()) for h in (m.health() or {} for m in meters)]
    finally:
        for m in meters:
            m.stop()
    if done != workload.events:
        raise RuntimeError(f"{count} workers metered {done:,} events, {workload.events:,} were sent")
    return {
        "workers": count,
        "settle_s": round(settle_s, 1),
        "produce_s": round(produce_s, 2),
        "seconds": round(seconds, 2),
        "events_per_s": round(workload.events / seconds),
        "events_per_worker": per_worker,
        "cpu_seconds_per_worker": cpu,
        "cpu_seconds_per_million_events": round(sum(cpu) / workload.events * 1e6, 1),
    }


def measure(args: argparse.Namespace, run_id: str, scratch: Path) -> dict[str, Any]:
    counts = [int(c) for c in args.workers.split(",")]
    sets = asyncio.run(create_topics([f"{run_id}.w{c}." for c in counts], PARTITIONS))
    say(f"encoding {args.events:,} events ({args.projects} projects, {BATCH_EVENTS} per message)...")
    workload = build_workload(args.events, args.projects)
    budgets = scratch / "budgets.yaml"
    write_budgets(budgets, workload.spend_by_project)
    runs = []
    for count, topics in zip(counts, sets, strict=True):
        say(f"{count} meter worker(s), {PARTITIONS} partitions...")
        run = run_workers(count, topics, f"{run_id}-w{count}", budgets, scratch / f"w{count}", workload)
        say(
            f"  {run['events_per_s']:,} events/s ({run['seconds']:.2f} s; settled in {run['settle_s']} s); "
            f"CPU per worker {run['cpu_seconds_per_worker']} s = "
            f"{run['cpu_seconds_per_million_events']} CPU s per million events; "
            f"events per worker {run['events_per_worker']}"
        )
        runs.append(run)
    say("baseline: raw getmany loop + decode of every event, one process...")
    base_s, base_events, base_cpu = asyncio.run(consume(sets[0].usage_raw, len(workload.messages), None))
    assert base_events == args.events, (base_events, args.events)
    base_rate, base_cpu_per_m = args.events / base_s, base_cpu / args.events * 1e6
    say(f"  {base_rate:,.0f} events/s, {base_cpu_per_m:.1f} CPU s per million events")
    for run in runs:
        run["ratio_to_baseline"] = round(run["events_per_s"] / base_rate, 3)
        run["speedup_over_one_worker"] = round(run["events_per_s"] / runs[0]["events_per_s"], 2)
        run["ratio_to_baseline_by_cpu"] = round(base_cpu_per_m / run["cpu_seconds_per_million_events"], 3)
    return {
        "events": args.events,
        "projects": args.projects,
        "partitions": PARTITIONS,
        "usage_raw_messages": len(workload.messages),
        "cores": os.cpu_count(),
        "baseline": {
            "seconds": round(base_s, 3),
            "events_per_s": round(base_rate),
            "cpu_seconds_per_million_events": round(base_cpu_per_m, 1),
        },
        "runs": runs,
    }


def report(result: dict[str, Any]) -> None:
    base = result["baseline"]["events_per_s"]
    say("")
    say(
        f"Scale, {result['events']:,} events, {result['partitions']} partitions, "
        f"{result['cores']} cores shared by the workers, the broker and this script:"
    )
    base_cpu = result["baseline"]["cpu_seconds_per_million_events"]
    say(
        f"  raw getmany + decode, one process (baseline)  {base:>9,} events/s   1.00x   {base_cpu:>6} CPU s / M events"
    )
    for r in result["runs"]:
        say(
            f"  {r['workers']} meter worker(s)                            {r['events_per_s']:>9,} events/s   "
            f"{r['ratio_to_baseline']:.3f}x   {r['speedup_over_one_worker']:.2f}x one worker   "
            f"{r['cpu_seconds_per_million_events']:>6} CPU s / M events ({r['ratio_to_baseline_by_cpu']:.3f}x by CPU)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--projects", type=int, default=48, help="spread over the partitions by key")
    parser.add_argument("--workers", default="1,2,3", help="worker counts to run, e.g. 1,2,3")
    args = parser.parse_args()
    run_id = new_run_id("scale")
    scratch = BENCH_HOME / "runs" / run_id
    scratch.mkdir(parents=True)
    started = time.monotonic()
    with bench_broker(run_id):
        result = measure(args, run_id, scratch)
    shutil.rmtree(scratch, ignore_errors=True)  # kept after a failure, for the worker logs
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    report(result)
    say(f"results: {write_result('scale', result)}")


if __name__ == "__main__":
    main()
