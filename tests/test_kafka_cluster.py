"""The local multi-broker cluster, end to end: three KRaft nodes (`spendstream kafka start
--brokers 3`), topics at replication factor 3 with min.insync.replicas 2, one node stopped while a
producer writes with acks=all (every message acknowledged, every one read back once), the node
back in every partition's ISR, `kafka status` per node, and a node that is down still counted.

Runs its own cluster on TEST_KAFKA_PORT + 500 .. + 505 (node i on + 500 + 2*(i-1), its controller
on the port after), never the session broker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from hypothesis import given
from hypothesis import strategies as st

from spendstream.cli.kafka_local import LocalCluster, LocalKafka
from spendstream.cli.up import prepare, replication_factor
from spendstream.errors import KafkaLocalError
from spendstream.settings import Settings
from spendstream.topics import Topics, broker_count, ensure_topics, replication_for
from tests.conftest import REPO, TEST_KAFKA_PORT, describe_partitions, own_cluster, start_worker

pytestmark = pytest.mark.integration

PORT = TEST_KAFKA_PORT + 500
RATE = 400  # messages/s the producer offers while a node goes down and comes back
ISR_BOUND_S = 60.0  # a restarted node must be back in every ISR within this


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    t0 = time.monotonic()
    with own_cluster("cluster", 500) as c:
        print(f"\n3-node cluster started in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield c


async def _min_isr(bootstrap: str, names: list[str]) -> dict[str, str]:
    """min.insync.replicas per topic, once the broker asked knows every topic (a moment after
    creation it may answer UNKNOWN_TOPIC_OR_PARTITION)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(50):
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
            )
            resources = [r for response in responses for r in response.to_object()["resources"]]
            if all(r["error_code"] == 0 for r in resources):
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    out: dict[str, str] = {}
    for res in resources:
        assert res["error_code"] == 0, res
        entries = {e["config_names"]: e["config_value"] for e in res["config_entries"]}
        out[res["resource_name"]] = entries["min.insync.replicas"]
    return out


def _cli(cluster: LocalCluster, *args: str, brokers: int | None = None) -> subprocess.CompletedProcess[str]:
    """`spendstream kafka <args>` on the cluster's state dir and ports, with
    SPENDSTREAM_KAFKA_BROKERS = `brokers` (default: the cluster's node count)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env.update(
        {
            "SPENDSTREAM_STATE_DIR": str(cluster.home.parent),
            "SPENDSTREAM_KAFKA_PORT": str(cluster.port),
            "SPENDSTREAM_KAFKA_CONTROLLER_PORT": str(cluster.controller_port),
            "SPENDSTREAM_KAFKA_BROKERS": str(brokers or cluster.brokers),
            "COLUMNS": "250",
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "spendstream", "kafka", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_ports_and_bootstrap() -> None:
    cluster = LocalCluster(Path("/nonexistent"), brokers=3, port=9092, controller_port=9093)
    assert [(n.node_id, n.port, n.controller_port) for n in cluster.nodes] == [
        (1, 9092, 9093),
        (2, 9094, 9095),
        (3, 9096, 9097),
    ]
    assert cluster.bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert Settings(kafka_brokers=3).bootstrap == cluster.bootstrap  # clients list every node
    assert Settings().bootstrap == "127.0.0.1:9092"  # one node: as before
    with pytest.raises(KafkaLocalError, match="ports collide"):
        LocalCluster(Path("/nonexistent"), brokers=3, port=9092, controller_port=9094)
    with pytest.raises(KafkaLocalError, match="no node 4"):
        cluster.node(4)
    assert [replication_for(n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]


@given(st.integers(min_value=1, max_value=1000))
def test_replication_survives_one_broker_down(brokers: int) -> None:
    factor, min_isr = replication_for(brokers)
    assert 1 <= min_isr <= factor <= min(3, brokers)
    assert factor - min_isr == (1 if factor > 1 else 0)  # one replica may be away, never more
    assert min_isr >= 2 or factor < 3  # from 3 replicas on, no write is acknowledged by one alone


@given(
    st.integers(min_value=1024, max_value=30000),
    st.integers(min_value=1024, max_value=30000),
    st.integers(min_value=2, max_value=9),
)
def test_node_ports_never_collide(port: int, controller_port: int, brokers: int) -> None:
    distance = controller_port - port
    if distance % 2 == 0 and abs(distance) < 2 * brokers:  # node i's client port = node j's controller's
        with pytest.raises(KafkaLocalError, match="ports collide"):
            LocalCluster(Path("/nonexistent"), brokers, port, controller_port)
        return
    cluster = LocalCluster(Path("/nonexistent"), brokers, port, controller_port)
    ports = [p for n in cluster.nodes for p in (n.port, n.controller_port)]
    assert len(set(ports)) == 2 * brokers
    assert [n.port for n in cluster.nodes] == [port + 2 * i for i in range(brokers)]
    assert [n.controller_port for n in cluster.nodes] == [controller_port + 2 * i for i in range(brokers)]


def test_replication_factor_of_the_worker(cluster: LocalCluster) -> None:
    """What `spendstream up` gives its topics and Faust's changelogs: the local cluster's node
    count as configured, an external cluster's brokers as its metadata lists them."""
    assert replication_factor(Settings(kafka_brokers=3)) == 3
    assert replication_factor(Settings(kafka_brokers=2)) == 2
    assert replication_factor(Settings()) == 1
    # A node whose heartbeats ran late on a busy machine is fenced for a moment and not listed
    # (CI: "Fencing broker 2 because its session has timed out", unfenced 2 s later): the count
    # is what the metadata lists now, so wait for all three to be listed before reading it.
    cluster._wait_listed(cluster.nodes, time.monotonic() + 60)
    assert replication_factor(Settings(bootstrap_servers=cluster.bootstrap)) == 3
    assert replication_factor(Settings(bootstrap_servers=cluster.nodes[0].bootstrap)) == 3


def test_start_is_idempotent(cluster: LocalCluster) -> None:
    pids = [n.pid for n in cluster.status().nodes]
    again = cluster.start()
    assert again.already_running is True
    assert [n.pid for n in again.nodes] == pids
    assert all(p is not None for p in pids)
    assert len({n.cluster_id() for n in cluster.nodes}) == 1  # one cluster, not three

    out = _cli(cluster, "start", "--brokers", "3", brokers=1)  # the flag overrides the setting
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.startswith(
        f"Kafka cluster already running at {cluster.bootstrap} (node 1 pid {pids[0]}"
    )
    out = _cli(cluster, "stop", "--node", "1", brokers=1)
    assert out.returncode == 2
    assert "--node needs a local cluster" in out.stderr
    assert cluster.status().running is True


def test_topics_replicated_three_times_min_insync_two(cluster: LocalCluster) -> None:
    topics = Topics("rf.")
    created = asyncio.run(ensure_topics(cluster.bootstrap, topics, 4))  # factor derived: 3 brokers
    assert sorted(created) == sorted(topics.all())
    described = asyncio.run(describe_partitions(cluster.bootstrap, topics.all()))
    for name, partitions in described.items():
        assert len(partitions) == 4, name
        for p in partitions:
            assert sorted(p["replicas"]) == [1, 2, 3], (name, p)
            assert sorted(p["isr"]) == [1, 2, 3], (name, p)
    assert asyncio.run(_min_isr(cluster.bootstrap, topics.all())) == dict.fromkeys(topics.all(), "2")


def test_up_prepares_the_local_cluster(cluster: LocalCluster) -> None:
    """`spendstream up`'s first half with SPENDSTREAM_KAFKA_BROKERS=3: the running cluster is left
    alone, the topics get 3 replicas, and the cluster's id (the worker's state dir is under it)
    comes back."""
    settings = Settings(
        state_dir=cluster.home.parent,
        kafka_port=cluster.port,
        kafka_controller_port=cluster.controller_port,
        kafka_brokers=3,
        topic_prefix="up.",
    )
    said: list[str] = []
    cluster_name = prepare(settings, said.append)
    assert said[0].startswith(f"Kafka cluster already running at {cluster.bootstrap} (node 1 pid ")
    assert cluster_name == cluster.cluster_id()
    described = asyncio.run(describe_partitions(cluster.bootstrap, settings.topics.all()))
    assert {len(p["replicas"]) for parts in described.values() for p in parts} == {3}


def test_worker_topics_replicated(cluster: LocalCluster, tmp_path: Path) -> None:
    """A worker on the cluster (external bootstrap: the factor comes from the metadata): its own
    topics, Faust's changelogs included, have 3 replicas and min.insync.replicas 2."""
    worker = start_worker(cluster.bootstrap, tmp_path, 'budgets:\n  project:rf: {daily: "1"}\n')
    try:
        worker_id = worker.env["SPENDSTREAM_WORKER_ID"]
        changelogs = {f"{worker_id}-scopes-changelog", f"{worker_id}-specs-changelog"}
        deadline = time.monotonic() + 60  # Faust declares them once its tables start
        while not changelogs <= set(names := asyncio.run(_topic_names(cluster.bootstrap))):
            assert time.monotonic() < deadline, names
            time.sleep(0.5)
        names = [n for n in names if n.startswith(worker_id)]
        described = asyncio.run(describe_partitions(cluster.bootstrap, [*names, *worker.topics.all()]))
        replicas = {n: {len(p["replicas"]) for p in parts} for n, parts in described.items()}
        assert replicas == {n: {3} for n in described}
        assert set(asyncio.run(_min_isr(cluster.bootstrap, [*names, *worker.topics.all()])).values()) == {"2"}
    finally:
        worker.stop()


async def _topic_names(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def _produce_through_outage(cluster: LocalCluster, topic: str, node: int) -> dict[str, Any]:
    """Produce at RATE with acks=all while `node` crashes (SIGKILL) and is started again; meanwhile
    `kafka status` must report the cluster half-started. Returns the counts and timings."""
    producer = AIOKafkaProducer(
        bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    sent, acked, failed = 0, 0, 0
    futures: list[asyncio.Future[Any]] = []
    stop = asyncio.Event()

    async def produce() -> None:
        nonlocal sent
        t0 = time.monotonic()
        while not stop.is_set():
            futures.append(await producer.send(topic, f"{sent:08d}".encode(), key=str(sent % 97).encode()))
            sent += 1
            await asyncio.sleep(max(0.0, t0 + sent / RATE - time.monotonic()))

    task = asyncio.create_task(produce())
    try:
        await asyncio.sleep(2)
        before = sent
        assert await asyncio.to_thread(cluster.stop_node, node, kill=True) is True
        t_down = time.monotonic()
        status = await asyncio.to_thread(_cli, cluster, "status")  # while the node is down
        await asyncio.sleep(max(0.0, t_down + 3 - time.monotonic()))  # at least 3 s down
        t_start = time.monotonic()
        await asyncio.to_thread(cluster.start_node, node)
        started_s = time.monotonic() - t_start
        down = sent - before
        await asyncio.sleep(1)
        stop.set()
        await task
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException):
                failed += 1
            else:
                acked += 1
    finally:
        stop.set()
        await producer.stop()
    return {
        "sent": sent,
        "acked": acked,
        "failed": failed,
        "down": down,
        "start_s": started_s,
        "status": status,
        "down_s": time.monotonic() - t_down,
    }


async def _read_all(bootstrap: str, topic: str, partitions: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        values: list[bytes] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(timeout_ms=1000)
            values += [m.value for msgs in batches.values() for m in msgs if m.value is not None]
    finally:
        await consumer.stop()
    return values


async def _wait_full_isr(bootstrap: str, topic: str, bound: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        partitions = (await describe_partitions(bootstrap, [topic]))[topic]
        if partitions and all(len(p["isr"]) == 3 for p in partitions):
            return time.monotonic() - t0
        await asyncio.sleep(0.25)
    raise AssertionError(f"ISR of {topic} not back to 3 within {bound:.0f} s: {partitions}")


def test_one_node_down_loses_no_acknowledged_write(cluster: LocalCluster) -> None:
    topics = Topics("outage.")
    asyncio.run(ensure_topics(cluster.bootstrap, topics, 6))
    topic = topics.usage_raw
    counts = asyncio.run(_produce_through_outage(cluster, topic, node=2))
    rejoin_s = asyncio.run(_wait_full_isr(cluster.bootstrap, topic, ISR_BOUND_S))
    values = asyncio.run(_read_all(cluster.bootstrap, topic, 6))
    seen = Counter(values)
    print(
        f"\nnode 2 killed; start_node took {counts['start_s']:.1f} s, every ISR full again "
        f"{rejoin_s:.1f} s later; sent {counts['sent']} ({counts['down']} while it was down or "
        f"starting), acked {counts['acked']}, failed {counts['failed']}, read {len(values)}, "
        f"distinct {len(seen)}, doubled {sum(n - 1 for n in seen.values())}",
        file=sys.stderr,
    )
    assert counts["down"] >= 3 * RATE * 0.8  # the producer really wrote through the outage
    assert (counts["acked"], counts["failed"]) == (counts["sent"], 0)
    assert len(values) == counts["sent"]
    assert set(values) == {f"{i:08d}".encode() for i in range(counts["sent"])}  # none lost, none doubled

    status = counts["status"]  # `kafka status` while node 2 was down
    assert status.returncode == 1
    assert status.stdout.startswith("HALF-STARTED: "), status.stdout
    assert "2 of 3 nodes up" in status.stdout
    assert "node 2: not running, 127.0.0.1:" in status.stdout
    assert "`spendstream kafka start --node 2`" in status.stdout


def test_status_per_node(cluster: LocalCluster) -> None:
    """Last in the module: it leaves node 3 stopped (the fixture stops the rest)."""
    out = _cli(cluster, "status")
    assert out.returncode == 0, out.stderr + out.stdout
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"running: Kafka 3.9.1 cluster {cluster.cluster_id()}, 3 of 3 nodes up")
    assert "controller quorum leader node " in lines[0]
    leaders = 0
    for i, node in enumerate(cluster.status().nodes, 1):
        where = f"127.0.0.1:{PORT + 2 * (i - 1)} (controller {PORT + 2 * i - 1})"
        assert lines[i].startswith(f"node {i}: running, pid {node.pid}, {where}, leads "), lines[i]
        assert lines[i].endswith(" partitions, 0 under-replicated"), lines[i]
        leaders += int(lines[i].split(", leads ")[1].split()[0])
    names = asyncio.run(_topic_names(cluster.bootstrap))
    partitions = sum(
        len(parts) for parts in asyncio.run(describe_partitions(cluster.bootstrap, names)).values()
    )
    assert leaders == partitions > 0  # every partition of every topic has a leader

    out = _cli(cluster, "stop", "--node", "3")  # SIGTERM: a controlled shutdown
    assert (out.returncode, out.stdout.strip()) == (0, "Kafka node 3 stopped")
    out = _cli(cluster, "stop", "--node", "3")
    assert (out.returncode, out.stdout.strip()) == (0, "Kafka node 3 was not running")
    status = cluster.status()
    assert [n.running for n in status.nodes] == [True, True, False]
    assert status.running is False

    # The single-node layout started where the cluster lives (SPENDSTREAM_KAFKA_BROKERS forgotten):
    single = LocalKafka(cluster.home, port=cluster.port, controller_port=cluster.controller_port)
    with pytest.raises(
        KafkaLocalError, match="a local cluster lives in this home: set SPENDSTREAM_KAFKA_BROKERS"
    ):
        single.start(timeout=5)


def test_a_node_down_still_counts(cluster: LocalCluster) -> None:
    """After test_status_per_node (node 3 stopped): the metadata lists two brokers, but the
    replica lists of the existing topics name the third, so an external-cluster worker still
    counts 3, and new topics (its changelogs too) get 3 replicas, not 2."""
    deadline = time.monotonic() + 60
    while len(listed := asyncio.run(_listed_brokers(cluster.bootstrap))) != 2:
        assert time.monotonic() < deadline, listed
        time.sleep(0.5)
    assert asyncio.run(broker_count(cluster.bootstrap)) == 3
    assert replication_factor(Settings(bootstrap_servers=cluster.bootstrap)) == 3
    topics = Topics("down.")
    created = asyncio.run(ensure_topics(cluster.bootstrap, topics, 2))
    described = asyncio.run(describe_partitions(cluster.bootstrap, created))
    print(f"\nnode 3 down, topics created: {described[topics.usage_raw]}", file=sys.stderr)
    assert sorted(created) == sorted(topics.all())
    assert {len(p["replicas"]) for parts in described.values() for p in parts} == {3}


async def _listed_brokers(bootstrap: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return sorted(b["node_id"] for b in cluster["brokers"])
