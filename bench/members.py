"""Members: one worker holding 100,000 live member scopes under a `user:*` template budget: its
memory, its restart time (ready, and enforcing again), its idle CPU, and `budget list`.

    .venv/bin/python bench/members.py [--members 100000] [--blocked-share 0.1]

One run (see bench/README.md):

1. Baseline: a worker (`spendstream up`, 4 partitions) with the budget `user:*: {daily: "10"}` and
   no member yet: RSS of the worker (VmRSS of its process and its meter process, the history
   process apart), CPU over 10 s idle, and a restart (SIGTERM, start again) timed to /health
   answering (tables recovered) and to enforcing: a probe event emitted while the worker was
   down, for a new member spending $12, is seen as `blocked` on spend.control.
2. `--members` users each make one call: $12 for `--blocked-share` of them (blocked), $1 for the
   rest (ok). Timed until the template's row counts every member: the members' load rate.
3. The same measurements with the members live: RSS (and bytes per member over the baseline),
   idle CPU (the ticks re-deciding blocked members), `budget list` (/budgets) latency, and the
   restart: the scopes table is re-read from its changelog.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer

from bench._common import (
    BOOTSTRAP,
    REPO,
    bench_broker,
    delete_topics,
    free_port,
    meter_pids,
    new_run_id,
    partitions,
    print_profile,
    profile_rows,
    say,
    worker_cpu_seconds,
    write_result,
)
from bench._profiled_worker import PROFILE_START, PROFILE_STOP
from producers import SyncEmitter
from spendstream.topics import Topics, ensure_topics
from spendstream.wire import default_codec

OUTPUT_TOKENS_PER_USD = 100_000  # gpt-4o output: $10 per 1M tokens


def rss_mib(pid: int) -> float:
    """Resident memory of a worker: its process and its meter process (not its history process)."""
    total_kib = 0
    for each in (pid, *meter_pids(pid)):
        lines = Path(f"/proc/{each}/status").read_text().splitlines()
        total_kib += next(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return round(total_kib / 1024, 1)


class Worker:
    """`spendstream up` run from `code` (a checkout: its modules come first on sys.path)."""

    def __init__(
        self,
        env: dict[str, str],
        port: int,
        log: Path,
        code: Path,
        profile: Path | None,
        log_level: str = "warning",
    ) -> None:
        self.env, self.port, self.log, self.code, self.profile = env, port, log, code, profile
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.profiles: list[Path] = []  # one stats file per process started (written as it exits)

    def start(self) -> float:
        """Start `spendstream up`; returns the monotonic time it was started."""
        cmd = [sys.executable, "-m", "spendstream"]
        if self.profile is not None:
            self.profiles.append(self.profile.with_suffix(f".{len(self.profiles)}.prof"))
            cmd = [sys.executable, "-m", "bench._profiled_worker", str(self.profiles[-1])]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*cmd, "up", "--log-level", self.log_level],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.code,
            )
        return time.monotonic()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def health(self) -> dict[str, Any] | None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
        except httpx.TransportError:
            return None
        return answer.json() if answer.status_code == 200 else None

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health and health.get("feeds_caught_up"):
                return time.monotonic()
            assert self.process is not None
            assert self.process.poll() is None, "the worker exited; see its log"
            assert time.monotonic() < deadline, f"the worker was not ready in {timeout} s"
            time.sleep(0.1)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)

    def budgets(self) -> tuple[list[dict[str, Any]], float]:
        started = time.perf_counter()
        rows = httpx.get(f"http://127.0.0.1:{self.port}/budgets", timeout=300).json()["budgets"]
        return rows, time.perf_counter() - started


def emit(topics: Topics, calls: list[tuple[str, str]]) -> float:
    """(user, USD) calls of project `bench`; returns seconds taken."""
    started = time.perf_counter()
    with SyncEmitter(bootstrap_servers=BOOTSTRAP, service="bench", topic=topics.usage_raw) as em:
        for user, usd in calls:
            em.emit(
                project="bench",
                provider="openai",
                model="gpt-4o",
                user=user,
                output_tokens=int(usd) * OUTPUT_TOKENS_PER_USD,
            )
    return time.perf_counter() - started


async def control_end(topics: Topics) -> dict[Any, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions(topics.spend_control)
        ends: dict[Any, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def wait_blocked(topics: Topics, scope: str, since: dict[Any, int], within_s: float = 600) -> float:
    """The monotonic time a `blocked` signal for `scope` is read from spend.control (after `since`)."""
    codec = default_codec()
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=100)).values():
                for m in messages:
                    if m.key == scope.encode() and codec.decode(m.value or b"")[1]["state"] == "blocked":
                        return time.monotonic()
        raise AssertionError(f"no blocked signal for {scope} in {within_s} s")
    finally:
        await consumer.stop()


def restart(worker: Worker, topics: Topics, probe: str) -> dict[str, float]:
    """Stop the worker, emit the probe's $12 call while it is down, start it again: seconds to
    /health answering with the feeds caught up, and to the probe's `blocked` on spend.control."""
    worker.stop()
    return start_timed(worker, topics, probe)


def start_timed(worker: Worker, topics: Topics, probe: str) -> dict[str, float]:
    """With the worker stopped: emit the probe's $12 call, start it again, and time /health
    answering with the feeds caught up, the probe's `blocked`, and the CPU until then
    (`started_at`: the wall clock at the start)."""
    since = asyncio.run(control_end(topics))
    emit(topics, [(probe, "12")])
    started_at = time.time()
    started = worker.start()
    health = {"at": 0.0}

    async def both() -> float:
        async def ready() -> None:
            health["at"] = await asyncio.to_thread(worker.wait_ready)

        task = asyncio.create_task(ready())
        blocked = await wait_blocked(topics, f"user:{probe}", since)
        await task
        return blocked

    blocked = asyncio.run(both())
    return {
        "ready_s": round(health["at"] - started, 2),
        "enforcing_s": round(blocked - started, 2),
        # CPU the new process spent until then: what the start costs, whatever else the machine does
        "cpu_s": round(worker_cpu_seconds(worker.pid), 2),
        "started_at": started_at,
    }


def idle_cpu(worker: Worker, seconds: float = 10) -> float:
    """The worker's CPU use (share of one core) over `seconds` with no events coming in."""
    cpu0, t0 = worker_cpu_seconds(worker.pid), time.monotonic()
    time.sleep(seconds)
    return round((worker_cpu_seconds(worker.pid) - cpu0) / (time.monotonic() - t0), 3)


def measure(worker: Worker, topics: Topics, probe: str, profile: bool = False) -> dict[str, Any]:
    time.sleep(3)  # the first ticks after a start (and a template sweep) settle
    out: dict[str, Any] = {"rss_mib": rss_mib(worker.pid)}
    if profile:
        worker.signal(PROFILE_START)
    out["idle_cpu_share"] = idle_cpu(worker)
    if profile:
        worker.signal(PROFILE_STOP)
    rows, seconds = worker.budgets()
    out["budget_list_s"] = round(seconds, 3)
    out["budget_list_rows"] = len(rows)
    out["restart"] = restart(worker, topics, probe)
    time.sleep(3)
    out["rss_mib_after_restart"] = rss_mib(worker.pid)
    out["idle_cpu_share_after_restart"] = idle_cpu(worker)
    return out


def scenario(code: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement with the worker's code from `code`, on topics of its own."""
    run_id = new_run_id("members")
    topics = Topics(f"{run_id}.")
    state = REPO / ".spendstream" / "bench" / run_id
    state.mkdir(parents=True, exist_ok=True)
    budgets = state / "budgets.yaml"
    budgets.write_text('budgets:\n  "user:*": {daily: "10"}\n')
    blocked_every = round(1 / args.blocked_share) if args.blocked_share else 0
    calls = [
        (f"u{i:06d}", "12" if blocked_every and i % blocked_every == 0 else "1") for i in range(args.members)
    ]
    result: dict[str, Any] = {"members": args.members, "blocked_members": sum(u == "12" for _, u in calls)}
    asyncio.run(ensure_topics(BOOTSTRAP, topics, 4))
    env = {
        **os.environ,
        "SPENDSTREAM_BOOTSTRAP_SERVERS": BOOTSTRAP,
        "SPENDSTREAM_TOPIC_PREFIX": topics.prefix,
        "SPENDSTREAM_STATE_DIR": str(state),
        "SPENDSTREAM_WEB_PORT": str(free_port()),
        "SPENDSTREAM_WORKER_ID": run_id,
        "SPENDSTREAM_BUDGETS_FILE": str(budgets),
    }
    prof = state / "worker.prof" if args.profile else None
    worker = Worker(env, int(env["SPENDSTREAM_WEB_PORT"]), state / "worker.log", code, prof)
    worker.start()
    try:
        worker.wait_ready()
        say("worker ready; baseline (no members)")
        result["baseline"] = measure(worker, topics, "probe-0")
        say(f"  {result['baseline']}")
        say(f"emitting one call for each of {args.members:,} members")
        started, cpu0 = time.monotonic(), worker_cpu_seconds(worker.pid)
        result["emit_s"] = round(emit(topics, calls), 2)
        want = f"{args.members + 1} members with spend, {result['blocked_members'] + 1} blocked"
        while True:  # + the baseline's probe
            rows, _ = worker.budgets()
            template = next(r for r in rows if r["scope"] == "user:*")
            if template["reason"] == want:
                break
            time.sleep(2)
        loaded = time.monotonic() - started
        result["load"] = {
            "seconds": round(loaded, 2),
            "members_per_s": round(args.members / loaded),
            "worker_cpu_us_per_member": round((worker_cpu_seconds(worker.pid) - cpu0) * 1e6 / args.members),
        }
        say(f"  every member applied in {loaded:.1f} s: {result['load']}")
        result["members_live"] = measure(worker, topics, "probe-1", profile=args.profile)
        say(f"  {result['members_live']}")
    finally:
        worker.stop()
        asyncio.run(delete_topics(run_id))
    if prof is not None:
        result["idle_profile"] = profile_rows(worker.profiles[1], "tottime")  # started by the first restart
        print_profile("worker, idle with the members live (by own time)", result["idle_profile"])
    base, live = result["baseline"], result["members_live"]
    result["bytes_per_member"] = round((live["rss_mib"] - base["rss_mib"]) * 2**20 / args.members)
    result["bytes_per_member_after_restart"] = round(
        (live["rss_mib_after_restart"] - base["rss_mib_after_restart"]) * 2**20 / args.members
    )
    say(
        f"RSS {base['rss_mib']} -> {live['rss_mib']} MiB ({result['bytes_per_member']} bytes per member; "
        f"{result['bytes_per_member_after_restart']} after a restart); restart to enforcing "
        f"{base['restart']['enforcing_s']} -> {live['restart']['enforcing_s']} s, CPU "
        f"{base['restart']['cpu_s']} -> {live['restart']['cpu_s']} s; idle CPU {base['idle_cpu_share']} -> "
        f"{live['idle_cpu_share']} of a core; budget list {live['budget_list_s']} s"
    )
    return result


def checkout(ref: str) -> Path:
    """The tree of git `ref` (a commit of this repository), extracted under .spendstream/bench."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = REPO / ".spendstream" / "bench" / f"code-{sha}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--blocked-share", type=float, default=0.1)
    parser.add_argument(
        "--compare", metavar="REF", help="also measure the worker of this git commit first, in the same run"
    )
    parser.add_argument("--profile", action="store_true", help="profile the worker while idle with members")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with bench_broker(new_run_id("members")):
        if args.compare:
            say(f"== the worker of {args.compare}")
            result["compared"] = {"ref": args.compare, **scenario(checkout(args.compare), args)}
            say("== the worker of this checkout")
        result.update(scenario(REPO, args))
    if args.compare:
        old, new = result["compared"], result
        result["ratios_vs_compared"] = {
            "bytes_per_member": round(new["bytes_per_member"] / old["bytes_per_member"], 2),
            "bytes_per_member_after_restart": round(
                new["bytes_per_member_after_restart"] / old["bytes_per_member_after_restart"], 2
            ),
            "restart_enforcing_s": round(
                new["members_live"]["restart"]["enforcing_s"] / old["members_live"]["restart"]["enforcing_s"],
                2,
            ),
            "restart_cpu_s": round(
                new["members_live"]["restart"]["cpu_s"] / old["members_live"]["restart"]["cpu_s"], 2
            ),
            "idle_cpu_share": round(
                new["members_live"]["idle_cpu_share"] / max(old["members_live"]["idle_cpu_share"], 0.001), 2
            ),
            "load_worker_cpu_per_member": round(
                new["load"]["worker_cpu_us_per_member"] / old["load"]["worker_cpu_us_per_member"], 2
            ),
        }
        say(f"this checkout / {args.compare}: {result['ratios_vs_compared']}")
    say(f"wrote {write_result('members', result)}")


if __name__ == "__main__":
    main()
