"""Plumbing shared by the benchmarks: the bench broker, workloads, statistics, result files.

Every benchmark starts its own single-node Kafka in `<repo>/.spendstream/bench/kafka` on ports
19392/19393 (SPENDSTREAM_BENCH_KAFKA_PORT; never the developer's 9092), uses topic names unique to the run, deletes those topics
at the end and stops the broker. A file lock serialises benchmarks: they share that broker.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import platform
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from spendstream.cli.kafka_local import KAFKA_VERSION, LocalKafka
from spendstream.topics import Topics, ensure_topics
from stream_processors.gc_pauses import GcPauses
from stream_processors.meter_process import PROCESS_NAME

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = REPO / ".spendstream" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
# SPENDSTREAM_BENCH_KAFKA_PORT moves the bench broker (controller on the next port), so benches of
# several checkouts on one machine do not share a broker.
KAFKA_PORT = int(os.environ.get("SPENDSTREAM_BENCH_KAFKA_PORT", "19392"))
KAFKA_CONTROLLER_PORT = KAFKA_PORT + 1
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"

# (provider, model): models with a card in the seed catalogue (stream_processors/catalogue/).
MODELS = (
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("google", "gemini-2.5-pro"),
)


def say(message: str) -> None:
    print(message, flush=True)


def new_run_id(name: str) -> str:
    """A name for this run, used as topic prefix and worker id: `bench-<name>-<utc time>-<hex>`."""
    return f"bench-{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def usage_calls(n: int, projects: int, seed: int = 7) -> list[dict[str, Any]]:
    """`n` keyword sets for `Emitter.emit()`: round-robin over `projects`, a random priced model each."""
    rng = random.Random(seed)
    calls = []
    for i in range(n):
        provider, model = rng.choice(MODELS)
        prompt = rng.randint(200, 8000)
        cached = rng.randint(0, prompt // 2)
        output = rng.randint(20, 1500)
        calls.append(
            {
                "project": f"proj-{i % projects}",
                "team": f"team-{i % projects % 3}",
                "user": f"user-{rng.randrange(100):03d}",
                "provider": provider,
                "model": model,
                "input_tokens": prompt - cached,
                "cached_input_tokens": cached,
                "output_tokens": output,
                "reasoning_tokens": rng.randint(0, output // 4),
                "tags": {"env": "bench"},
            }
        )
    return calls


# -- the bench broker ------------------------------------------------------------------------


@contextmanager
def bench_broker(run_id: str) -> Iterator[LocalKafka]:
    """Start the bench broker; on exit delete the run's topics and stop the broker."""
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    with open(BENCH_HOME / ".bench.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another benchmark is using the bench broker: waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        kafka = LocalKafka(
            BENCH_HOME / "kafka", port=KAFKA_PORT, controller_port=KAFKA_CONTROLLER_PORT, heap="512m"
        )
        started = kafka.start(progress=say)
        state = (
            "was already running (left over; stopped at the end)" if started.already_running else "started"
        )
        say(f"Kafka {KAFKA_VERSION} on {kafka.bootstrap} {state} in {started.seconds:.1f} s")
        try:
            yield kafka
        finally:
            try:
                deleted = asyncio.run(delete_topics(run_id))
                say(f"deleted {deleted} topics of {run_id}")
            except Exception as exc:  # cleanup must not hide the benchmark's own error
                say(f"could not delete the topics of {run_id}: {exc!r}")
            kafka.stop()
            say("Kafka stopped")


async def create_topics(prefixes: list[str], partitions: int) -> list[Topics]:
    """Create the spendstream topics under each prefix and wait until every partition has a leader.

    A producer that starts right after creation gets NotLeaderForPartition retries (with backoff)
    for a while; topics are created before any clock starts, and checked ready here.
    """
    sets = [Topics(p) for p in prefixes]
    for topics in sets:
        await ensure_topics(BOOTSTRAP, topics, partitions)
    names = [name for topics in sets for name in topics.all()]
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        for _ in range(100):
            described = await admin.describe_topics(names)
            if all(p["leader"] >= 0 for t in described for p in t["partitions"]):
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    await asyncio.sleep(1.0)  # leadership reaches the broker's own metadata a moment later
    return sets


async def delete_topics(prefix: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
        return len(names)
    finally:
        await admin.close()


async def partitions(topic: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return [
        TopicPartition(topic, p["partition"])
        for p in sorted(described["partitions"], key=lambda p: p["partition"])
    ]


async def end_offsets(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    offsets: dict[TopicPartition, int] = await consumer.end_offsets(tps)
    return offsets


async def read_records(topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every message of `topic` with its offset and timestamp, partition by partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, fetch_max_bytes=64 << 20
    )
    await consumer.start()
    try:
        ends = await end_offsets(consumer, await partitions(topic))
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        want, out = sum(ends.values()), list[ConsumerRecord[bytes, bytes]]()
        while len(out) < want:
            for messages in (await consumer.getmany(timeout_ms=1000)).values():
                out.extend(messages)
        return out
    finally:
        await consumer.stop()


async def read_topic(topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every message of `topic` (key, value), partition by partition."""
    return [(m.key, m.value or b"") for m in await read_records(topic)]


# -- measuring -------------------------------------------------------------------------------


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max of nanosecond samples, in microseconds."""
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] / 1000, 2)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p99.9": at(0.999), "max": at(1.0), "n": n}


@contextmanager
def gc_pauses() -> Iterator[GcPauses]:
    """Count the cyclic garbage collector's runs per generation and their pauses meanwhile."""
    pauses = GcPauses()
    try:
        yield pauses
    finally:
        pauses.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def meter_pids(worker_pid: int) -> list[int]:
    """The worker's meter process (stream_processors/meter_process.py), by the name it gives
    itself; none for a commit from before the meter had a process of its own."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().split("(", 1)[1].rsplit(")", 1)
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
        if name == PROCESS_NAME.decode() and int(rest.split()[1]) == worker_pid:
            pids.append(int(stat.parent.name))
    return pids


def worker_cpu_seconds(pid: int) -> float:
    """CPU seconds of a worker: its process and its meter process (not its history process)."""
    return cpu_seconds(pid) + sum(cpu_seconds(meter) for meter in meter_pids(pid))


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds_of(stat: bytes) -> dict[str, float]:
    """`busy` (user, nice, system, irq), `idle` and `steal` (time the hypervisor gave this VM's
    CPUs to someone else) of /proc/stat's first line: all CPUs, in seconds."""
    fields = [int(x) / _TICK for x in stat.split(b"\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def machine_cpu_seconds() -> dict[str, float]:
    """This machine's CPU time so far (Linux /proc/stat): see _cpu_seconds_of."""
    return _cpu_seconds_of(Path("/proc/stat").read_bytes())


class StealSampler:
    """Samples this VM's steal time (CPU time the hypervisor gave to someone else, all CPUs
    together, /proc/stat) every `interval` seconds in a thread, while in its `with` block: how much
    was stolen between two wall-clock times, and the worst burst. A pipeline that stalls while
    the host takes the CPUs away shows it here, not in its own code."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._times: list[float] = []
        self._steal: list[float] = []  # cumulative seconds at _times
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steal-sampler", daemon=True)

    def __enter__(self) -> StealSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with open("/proc/stat", "rb", buffering=0) as stat:  # kept open: ~2% of a core at 10 ms
            while not self._stop.is_set():
                stat.seek(0)
                self._times.append(time.time())
                self._steal.append(_cpu_seconds_of(stat.read(512))["steal"])
                time.sleep(self.interval)

    def between(self, start: float, end: float) -> float:
        """Seconds stolen (summed over the CPUs) from `start` to `end` (epoch seconds)."""
        if not self._times:
            return 0.0
        i = max(bisect_left(self._times, start) - 1, 0)
        j = min(bisect_left(self._times, end), len(self._times) - 1)
        return self._steal[j] - self._steal[i]

    def worst(self, window: float = 0.1) -> tuple[float, float]:
        """(epoch seconds, seconds stolen): the `window` that lost the most to the hypervisor."""
        best = (self._times[0] if self._times else 0.0, 0.0)
        j = 0
        for i, start in enumerate(self._times):
            while j < len(self._times) - 1 and self._times[j] < start + window:
                j += 1
            stolen = self._steal[j] - self._steal[i]
            if stolen > best[1]:
                best = (start, stolen)
        return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def profile_rows(stats_path_or_stats: Any, sort: str, limit: int = 15) -> list[dict[str, Any]]:
    """The top `limit` functions of a pstats.Stats by `sort` ("tottime" or "cumulative")."""
    import pstats

    stats = (
        stats_path_or_stats
        if isinstance(stats_path_or_stats, pstats.Stats)
        else pstats.Stats(str(stats_path_or_stats))
    )
    key = {"tottime": 2, "cumulative": 3}[sort]
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][key], reverse=True)  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in entries[:limit]:
        where = func if file == "~" else f"{_short(file)}:{line}({func})"
        rows.append(
            {
                "function": where,
                "ncalls": ncalls,
                "tottime_s": round(tottime, 3),
                "cumtime_s": round(cumtime, 3),
            }
        )
    return rows


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def print_profile(title: str, rows: list[dict[str, Any]]) -> None:
    say(f"  {title}")
    say(f"    {'ncalls':>9} {'tottime':>8} {'cumtime':>8}  function")
    for r in rows:
        say(f"    {r['ncalls']:>9} {r['tottime_s']:>8.3f} {r['cumtime_s']:>8.3f}  {r['function']}")


# -- results ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        # Other work on the machine while the benchmark ran (1, 5, 15 min load averages at the end).
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "kafka": KAFKA_VERSION,
        "aiokafka": version("aiokafka"),
        "faust-streaming": version("faust-streaming"),
        "fastavro": version("fastavro"),
    }


def code() -> dict[str, Any]:
    """Which code was measured: the checkout's commit and changes, and where the packages came from."""
    import spendstream

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "--untracked-files=no").splitlines(),
        "spendstream_imported_from": str(Path(spendstream.__file__).parent),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write `bench/results/<name>.json` (atomically) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    body: dict[str, Any] = {"benchmark": name, "date": datetime.now(UTC).isoformat(timespec="seconds")}
    body |= {"machine": machine(), "code": code(), **result}
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
