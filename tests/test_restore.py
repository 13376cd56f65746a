"""Tables restored from their changelog by one bulk read (stream_processors/restore.py): the store
against the real broker, then a real worker restarted with state (kill -9, then SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import faust
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faust.types import TP

from producers import SyncEmitter
from spendstream.topics import Topics
from stream_processors.restore import RestoredStore, RestoredTable
from tests.conftest import REPO, Worker, _fresh_env, free_port, restart_worker, start_worker, topic_configs
from tests.test_budgets_pipeline import signals, tokens, wait_signal

pytestmark = pytest.mark.integration


def store_on(kafka: str) -> RestoredStore:
    app = faust.App(f"t{uuid.uuid4().hex[:8]}", broker=f"kafka://{kafka}", store="memory://")
    table = RestoredTable(
        app,
        name="scopes",
        default=None,
        key_type=str,
        partitions=2,
        changelog_consumer=lambda: AIOKafkaConsumer(bootstrap_servers=kafka, fetch_max_wait_ms=20),
    )
    store = table.data
    assert isinstance(store, RestoredStore)
    return store


async def create_topic(kafka: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def test_a_restore_applies_each_partition_to_its_end_and_resumes_faust_there(kafka: str) -> None:
    store = store_on(kafka)
    topic = store.table.changelog_topic_name
    rng = random.Random(14)
    model: dict[int, dict[str, str]] = {0: {}, 1: {}}
    records: dict[int, list[tuple[bytes, bytes | None]]] = {0: [], 1: []}
    for i in range(3_000):  # 60 keys, overwritten and deleted (tombstones) in offset order
        partition, key = rng.randrange(2), f"user:{rng.randrange(30)}"
        key = f"{key}@{partition}"
        if rng.random() < 0.15:
            model[partition].pop(key, None)
            records[partition].append((json.dumps(key).encode(), None))
        else:
            model[partition][key] = value = json.dumps({"spend": i})
            records[partition].append((json.dumps(key).encode(), json.dumps(value).encode()))

    async def run() -> None:
        await create_topic(kafka, topic, 2)
        for partition in (0, 1):
            await publish_to(kafka, topic, partition, records[partition])
        p0, p1 = TP(topic, 0), TP(topic, 1)
        # what a store could hold before: a standby's stale copy of partition 0, a key of partition 1
        store.data.update({"user:stale@0": "{}", "user:kept@1": "{}"})
        store._key_partition.update({"user:stale@0": 0, "user:kept@1": 1})
        decoded: list[bytes | None] = []
        decode_value = store._decode_value

        def counted(value: bytes | None) -> Any:
            decoded.append(value)
            return decode_value(value)

        store._decode_value = counted  # type: ignore[method-assign]
        read = await store.restore([p0])
        assert read == len(records[0])
        # ~1,500 records of 30 keys: only each key's last value is decoded (tombstones need none)
        assert len(decoded) == len(model[0])
        assert {k: v for k, v in store.data.items() if k.endswith("@0")} == model[0]
        assert store.data["user:kept@1"] == "{}"  # another partition's keys are not touched
        assert (store.persisted_offset(p0), store.persisted_offset(p1)) == (len(records[0]) - 1, None)
        # this worker's own writes, acknowledged in order, move the offset; a partition it did
        # not restore keeps none (Faust then replays it all)
        store.set_persisted_offset(p0, len(records[0]) + 4)
        store.set_persisted_offset(p1, 9)
        assert (store.persisted_offset(p0), store.persisted_offset(p1)) == (len(records[0]) + 4, None)
        # a rebalance: partition 0 leaves (kept as a standby at most), partition 1 arrives
        store.app.assignor.assigned_actives = lambda: {p1, TP("usage.raw", 1)}  # type: ignore[method-assign]
        await store.on_rebalance({p0, p1}, set(), {p1})
        assert (store.persisted_offset(p0), store.persisted_offset(p1)) == (None, len(records[1]) - 1)
        assert {k: v for k, v in store.data.items() if k.endswith("@1")} == model[1]  # kept@1 replaced

    asyncio.run(run())


async def publish_to(
    kafka: str, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
) -> None:
    """Records onto one partition, as Faust's changelog writes them (the source record's partition)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k, partition=partition) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


PROJECTS = 6
MEMBERS = 240
BUDGETS = (
    "budgets:\n"
    + "".join(f"  project:r{p}: {{daily: '1000'}}\n" for p in range(PROJECTS))
    + "  'user:*': {daily: '5'}\n"
)


def emit(kafka: str, worker: Worker, calls: list[tuple[str, str, str]]) -> None:
    """(project, user, USD) calls of gpt-4o output."""
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as em:
        for project, user, usd in calls:
            em.emit(project=project, user=user, provider="openai", model="gpt-4o", output_tokens=tokens(usd))


def spend(worker: Worker) -> dict[str, str]:
    """Every project's spend today (exact decimal) and the template's member summary."""
    rows = httpx.get(f"http://127.0.0.1:{worker.port}/budgets", timeout=30).json()["budgets"]
    out = {r["scope"]: str(Decimal(r["spend_usd"])) for r in rows if r["scope"].startswith("project:")}
    out["user:*"] = next((r["reason"] for r in rows if r["scope"] == "user:*"), "")
    return out


def spend_when(worker: Worker, want: dict[str, str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (got := spend(worker)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


def restored_records(log: Path, timeout: float = 90) -> int:
    """Changelog records the worker's scopes table read in bulk (its log line), once Faust says
    the worker is ready (/health answers before: after a kill -9 the group waits for the dead
    member's session to expire)."""
    deadline = time.monotonic() + timeout
    while "[^Worker]: Ready" not in (text := log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = [line for line in text.splitlines() if "scopes: restored" in line]
    assert len(lines) == 1, lines
    return int(lines[0].split("scopes: restored ")[1].split()[0])


def test_a_restarted_worker_has_every_scope_exact_and_signals_each_crossing_once(
    kafka: str, tmp_path: Path
) -> None:
    w = start_worker(kafka, tmp_path / "w", BUDGETS)
    try:
        # 240 members, 3 calls of $1 each over 6 projects; u000 spends $6 more and crosses $5/day
        calls = [(f"r{i % PROJECTS}", f"u{i % MEMBERS:03d}", "1") for i in range(3 * MEMBERS)]
        emit(kafka, w, [*calls, ("r0", "u000", "6")])
        per_project = 3 * MEMBERS // PROJECTS
        want = {
            f"project:r{p}": f"{per_project + (6 if p == 0 else 0)}.000000000000" for p in range(PROJECTS)
        }
        want["user:*"] = f"{MEMBERS} members with spend, 1 blocked"
        assert spend_when(w, want) == want
        wait_signal(kafka, w, "user:u000", "blocked")
        # the changelogs roll a segment a minute, so Kafka's cleaner compacts all but the last one
        changelogs = [f"{w.env['SPENDSTREAM_WORKER_ID']}-{t}-changelog" for t in ("scopes", "specs")]
        configs = asyncio.run(topic_configs(kafka, changelogs))
        assert [(c["segment.ms"], c["cleanup.policy"]) for c in configs.values()] == [
            ("60000", "compact")
        ] * 2

        restart_worker(w, kill=True)  # what was not committed yet is delivered again
        assert restored_records(w.log) >= MEMBERS  # the scopes table came from the bulk read
        # not one scope lost or doubled: sent 721 calls, found 721 (and nothing more comes)
        assert spend_when(w, want) == want
        time.sleep(2)
        assert spend(w) == want
        emit(kafka, w, [("r1", "u001", "3")])  # u001: $3 + $3 crosses after the restart
        want |= {
            "project:r1": f"{per_project + 3}.000000000000",
            "user:*": f"{MEMBERS} members with spend, 2 blocked",
        }
        assert spend_when(w, want) == want
        wait_signal(kafka, w, "user:u001", "blocked")

        restart_worker(w)  # SIGTERM
        assert restored_records(w.log) >= MEMBERS
        assert spend_when(w, want) == want
        emit(kafka, w, [("r2", "u002", "3")])
        want |= {
            "project:r2": f"{per_project + 3}.000000000000",
            "user:*": f"{MEMBERS} members with spend, 3 blocked",
        }
        assert spend_when(w, want) == want
        wait_signal(kafka, w, "user:u002", "blocked")
        # exactly one `blocked` per crossing across both restarts, never an `ok` after it (a
        # forecast may `warn` before the crossing)
        for member in ("u000", "u001", "u002"):
            states = [s["state"] for s in signals(kafka, w, f"user:{member}")]
            assert [s for s in states if s != "warn"] == ["blocked"], (member, states)
        # under its limit: its threshold `warn` once, not again after either restart
        assert [s["state"] for s in signals(kafka, w, "user:u003")] == ["warn"]
    finally:
        w.stop()


def test_budgets_are_enforced_while_the_history_process_cannot_serve(kafka: str, tmp_path: Path) -> None:
    """A ClickHouse server that accepts connections and never answers keeps the history process
    from serving: the worker still starts and signals a crossing (Faust does not wait for the
    history process), while its /health waits for it (30 s, then says so)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = free_port()
        env = _fresh_env(
            kafka,
            tmp_path / "w",
            BUDGETS,
            SPENDSTREAM_WEB_PORT=str(port),
            SPENDSTREAM_CLICKHOUSE_DSN=f"http://127.0.0.1:{silent.getsockname()[1]}/",
        )
        log = tmp_path / "w" / "worker.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "spendstream", "up"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        w = Worker(env, port, Topics(env["SPENDSTREAM_TOPIC_PREFIX"]), process, log)
        try:
            deadline = time.monotonic() + 60
            while "Ctrl-C stops" not in log.read_text():  # topics created, the app built
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            emit(kafka, w, [("r0", "u900", "6")])  # $6 of a member's $5/day
            wait_signal(kafka, w, "user:u900", "blocked", timeout=60)
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).json()  # waits 30 s for it
            assert (health["status"], health["history"]) == (
                "degraded",
                "the history process (ClickHouse) has not started in 30 s",
            )
            assert "history writer serving" not in log.read_text()
            assert w.stop() == 0  # its history process stopped with it: no failure
        finally:
            w.stop()
