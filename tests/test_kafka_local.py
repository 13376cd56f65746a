"""The project-managed broker, end to end: fetch, format, start, topics, stop.

Runs its own broker in a temporary home on non-default ports, so it never touches the shared
session broker (or a developer's broker on 9092).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from spendstream.cli.kafka_local import KAFKA_VERSION, LocalKafka
from spendstream.errors import ConfigError, KafkaLocalError
from spendstream.topics import DLQ_RETENTION_MS, Topics, ensure_topics, wait_for_broker
from tests.conftest import describe_partitions, topic_configs

pytestmark = pytest.mark.integration

PORT, CONTROLLER_PORT = 19192, 19193
BOOTSTRAP = f"127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka"), port=PORT, controller_port=CONTROLLER_PORT, heap="256m"
    )
    try:
        yield broker
    finally:
        broker.wipe()


def test_not_running_before_start(kafka: LocalKafka) -> None:
    status = kafka.status()
    assert status.running is False
    assert status.pid is None
    assert status.cluster_id is None
    assert kafka.stop() is False
    with pytest.raises(ConfigError, match=f"no Kafka broker at {BOOTSTRAP}"):
        asyncio.run(wait_for_broker(BOOTSTRAP, timeout=1.0))


def test_lifecycle_and_topics(kafka: LocalKafka) -> None:
    messages: list[str] = []
    first = kafka.start(timeout=90.0, progress=messages.append)
    assert first.already_running is False
    assert first.formatted is True
    assert first.bootstrap == BOOTSTRAP
    assert any("formatting" in m for m in messages)
    assert (kafka.home / "lib" / "kafka_2.13-3.9.1.jar").is_file()

    status = kafka.status()
    assert status.running is True
    assert status.pid == first.pid
    assert status.bootstrap == BOOTSTRAP
    assert status.version == KAFKA_VERSION == "3.9.1"
    cluster_id = kafka.cluster_id()
    assert cluster_id is not None
    assert len(cluster_id) == 22
    assert status.cluster_id == cluster_id

    again = kafka.start()
    assert again.already_running is True
    assert again.pid == first.pid
    assert again.formatted is False

    asyncio.run(wait_for_broker(BOOTSTRAP, timeout=10.0))

    topics = Topics("test-kl.")
    created = asyncio.run(ensure_topics(BOOTSTRAP, topics, partitions=3))
    assert sorted(created) == sorted(topics.all())
    assert len(created) == 10
    described = asyncio.run(describe_partitions(BOOTSTRAP, topics.all()))
    assert {t: len(parts) for t, parts in described.items()} == dict.fromkeys(topics.all(), 3)

    configs = asyncio.run(topic_configs(BOOTSTRAP, topics.all()))
    assert configs[topics.spend_control]["cleanup.policy"] == "compact"
    assert configs[topics.prices]["cleanup.policy"] == "compact"
    assert configs[topics.usage_dlq]["retention.ms"] == str(DLQ_RETENTION_MS)
    assert configs[topics.usage_dlq]["cleanup.policy"] == "delete"
    assert configs[topics.usage_seen]["retention.ms"] == str(7 * 3600 * 1000)  # dedupe horizon + 1 h
    assert configs[topics.gateway_keys]["cleanup.policy"] == "compact"
    assert configs[topics.gateway_rates]["retention.ms"] == str(10 * 60 * 1000)
    assert configs[topics.usage_raw]["cleanup.policy"] == "delete"
    assert configs[topics.usage_raw]["retention.ms"] == str(7 * 24 * 3600 * 1000)
    assert {configs[t]["min.insync.replicas"] for t in topics.all()} == {"1"}  # one broker: one replica

    with pytest.raises(ConfigError, match="with 3 replicas: the cluster has fewer brokers up"):
        asyncio.run(ensure_topics(BOOTSTRAP, Topics("test-kl-rf3."), partitions=1, replication_factor=3))

    assert asyncio.run(ensure_topics(BOOTSTRAP, topics, partitions=3)) == []

    with pytest.raises(ConfigError, match="has 3 partitions, but 5 are configured"):
        asyncio.run(ensure_topics(BOOTSTRAP, topics, partitions=5))

    # Someone else on our port: a second home must refuse to start, and say why.
    intruder = LocalKafka(kafka.home.parent / "other", port=PORT, controller_port=CONTROLLER_PORT)
    with pytest.raises(KafkaLocalError, match=f"port {PORT} on 127.0.0.1 is in use"):
        intruder.start(timeout=5.0)

    assert kafka.stop() is True
    status = kafka.status()
    assert status.running is False
    assert status.pid is None
    assert status.cluster_id == cluster_id  # data kept across stop
    assert not (kafka.home / "broker.pid").exists()
    assert kafka.stop() is False


def test_restart_keeps_topics_and_wipe_forgets_them(kafka: LocalKafka) -> None:
    topics = Topics("test-kl-restart.")
    kafka.start(timeout=90.0)
    asyncio.run(ensure_topics(BOOTSTRAP, topics, partitions=2))
    cluster_id = kafka.cluster_id()
    assert kafka.stop() is True

    restarted = kafka.start(timeout=90.0)
    assert restarted.already_running is False
    assert restarted.formatted is False
    assert kafka.cluster_id() == cluster_id
    assert asyncio.run(ensure_topics(BOOTSTRAP, topics, partitions=2)) == []

    kafka.wipe()
    assert kafka.status().running is False
    assert kafka.cluster_id() is None
    assert not (kafka.home / "data").exists()
