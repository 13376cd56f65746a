"""Create spendstream's topics explicitly, with known partition counts and per-topic configs.

The broker runs with `auto.create.topics.enable=false`: every Faust table is co-partitioned with
its source topic, so all topics must have the same, deliberate partition count.

    usage.raw       events as emitted                       broker default retention
    usage.priced    events with their cost                  broker default retention
    spend.control   latest budget state/decision per key    cleanup.policy=compact
    usage.dlq       poison events with the reason attached  retention.ms = 30 days
    prices          price cards published at run time       cleanup.policy=compact
    budgets         budget specs per scope                  cleanup.policy=compact
    spend.deltas    spend per scope, repartitioned by scope broker default retention (internal)
    usage.seen      event ids the meter counted (dedupe)    retention.ms = dedupe horizon + 1 h (internal)

Replication: min(3, brokers) replicas each, and from 3 replicas on `min.insync.replicas=2`: an
acks=all write is acknowledged once two brokers hold it, so losing any one broker loses no
acknowledged write and stops no producer (with two of three down, producers wait or fail; none
is told "written" for a write held by one broker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from spendstream.errors import ConfigError
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth

__all__ = [
    "DEDUPE_HORIZON_S",
    "DLQ_RETENTION_MS",
    "Topics",
    "broker_count",
    "ensure_topics",
    "partitions_of",
    "replication_for",
    "topic_configs",
    "wait_for_broker",
]

DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000
GATEWAY_RATES_RETENTION_MS = 10 * 60 * 1000  # the gateways' rate-limit counts: minutes matter, not history
DEDUPE_HORIZON_S = 6 * 3600  # default of SPENDSTREAM_DEDUPE_HORIZON_SECONDS
_TOPIC_ALREADY_EXISTS = 36
_INVALID_REPLICATION_FACTOR = 38

log = logging.getLogger(__name__)


class Topics:
    """The public topic names (the contract), each behind the optional prefix."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.usage_raw = f"{prefix}usage.raw"
        self.usage_priced = f"{prefix}usage.priced"
        self.spend_control = f"{prefix}spend.control"
        self.usage_dlq = f"{prefix}usage.dlq"
        self.prices = f"{prefix}prices"
        self.budgets = f"{prefix}budgets"
        self.spend_deltas = f"{prefix}spend.deltas"
        self.usage_seen = f"{prefix}usage.seen"
        self.gateway_keys = f"{prefix}gateway.keys"
        self.gateway_rates = f"{prefix}gateway.rates"

    def all(self) -> list[str]:
        return [
            self.usage_raw,
            self.usage_priced,
            self.spend_control,
            self.usage_dlq,
            self.prices,
            self.budgets,
            self.spend_deltas,
            self.usage_seen,
            self.gateway_keys,
            self.gateway_rates,
        ]


def topic_configs(topics: Topics, dedupe_horizon_s: int = DEDUPE_HORIZON_S) -> dict[str, dict[str, str]]:
    """The per-topic configs set at creation (topics not listed use the broker defaults)."""
    return {
        topics.usage_seen: {"retention.ms": str((dedupe_horizon_s + 3600) * 1000)},
        topics.spend_control: {"cleanup.policy": "compact"},
        topics.usage_dlq: {"retention.ms": str(DLQ_RETENTION_MS)},
        topics.prices: {"cleanup.policy": "compact"},
        topics.budgets: {"cleanup.policy": "compact"},
        topics.gateway_keys: {"cleanup.policy": "compact"},
        topics.gateway_rates: {"retention.ms": str(GATEWAY_RATES_RETENTION_MS)},
    }


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of topics on a cluster of `brokers`: three copies
    once there are three brokers, and then an acks=all write needs two of them."""
    factor = min(3, max(brokers, 1))
    return factor, 2 if factor >= 3 else 1


async def broker_count(bootstrap: str, kafka_auth: KafkaAuth = PLAINTEXT) -> int:
    """The brokers of the cluster (see `_known_brokers`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_auth.client_kwargs())
    try:
        await admin.start()
        return await _known_brokers(admin)
    finally:
        await admin.close()


async def _known_brokers(admin: AIOKafkaAdminClient) -> int:
    """The brokers the metadata lists now, and those holding a replica of any existing topic.

    A broker that is down, or fenced for a moment (its heartbeats late on a busy host: unfenced
    seconds later), is not listed, but the replica lists of its topics still name it: counting the
    listed ones only, a worker started meanwhile gave its changelogs 2 replicas for good."""
    cluster: dict[str, Any] = await admin.describe_cluster()
    brokers = {b["node_id"] for b in cluster["brokers"]}
    described: list[dict[str, Any]] = await admin.describe_topics()
    for topic in described:
        for partition in topic["partitions"]:
            brokers.update(partition["replicas"])
    return len(brokers)


async def wait_for_broker(
    bootstrap: str,
    timeout: float,  # noqa: ASYNC109 (retries)
    kafka_auth: KafkaAuth = PLAINTEXT,
) -> None:
    """Return once a broker at `bootstrap` answers a metadata request; ConfigError after timeout,
    or at once when the broker refuses `kafka_auth` (wrong password, mechanism, protocol)."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=5000, **kafka_auth.client_kwargs()
        )
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.5)):
                await admin.start()
                await admin.describe_cluster()
            return
        except (KafkaError, OSError, TimeoutError):
            refusal = await kafka_auth.refusal(bootstrap)
            if refusal is not None and (refusal.final or time.monotonic() >= deadline):
                raise ConfigError(refusal.reason) from None
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"no Kafka broker at {bootstrap}: run `spendstream kafka start` "
                    "or set SPENDSTREAM_BOOTSTRAP_SERVERS"
                ) from None
        finally:
            await admin.close()
        await asyncio.sleep(0.25)


async def ensure_topics(
    bootstrap: str,
    topics: Topics,
    partitions: int,
    replication_factor: int | None = None,
    dedupe_horizon_s: int = DEDUPE_HORIZON_S,
    kafka_auth: KafkaAuth = PLAINTEXT,
) -> list[str]:
    """Create whichever of `topics.all()` is missing; return the names created.

    New topics get `replication_factor` replicas (None: min(3, the cluster's brokers, down or
    fenced ones included: `_known_brokers`)) and, with 3 or more, `min.insync.replicas=2` (see `replication_for`). Existing topics
    are left as they are, but one with a partition count other than `partitions` is an error:
    Faust's tables require equal counts across topics.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_auth.client_kwargs())
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = topics.all()
        missing = [t for t in wanted if t not in existing]
        configs = topic_configs(topics, dedupe_horizon_s)
        created: list[str] = []
        if missing:
            if replication_factor is None:
                replication_factor = replication_for(await _known_brokers(admin))[0]
            min_isr = replication_for(replication_factor)[1]
            response = await admin.create_topics(
                [
                    NewTopic(
                        t,
                        partitions,
                        replication_factor,
                        topic_configs={**configs.get(t, {}), "min.insync.replicas": str(min_isr)},
                    )
                    for t in missing
                ]
            )
            for err in response.to_object()["topic_errors"]:
                if err["error_code"] == 0:
                    created.append(err["topic"])
                elif err["error_code"] == _INVALID_REPLICATION_FACTOR:
                    raise ConfigError(
                        f"could not create topic {err['topic']!r} on {bootstrap} with "
                        f"{replication_factor} replicas: the cluster has fewer brokers up. Start "
                        "the stopped ones (`spendstream kafka status` shows the local nodes) and "
                        "run again"
                    )
                elif err["error_code"] != _TOPIC_ALREADY_EXISTS:  # lost a race: checked below
                    raise ConfigError(
                        f"could not create topic {err['topic']!r} on {bootstrap}: "
                        f"error {err['error_code']} {err.get('error_message') or ''}".rstrip()
                    )
        await _check_partitions(admin, [t for t in wanted if t not in created], partitions)
        if created:
            log.info(
                "created topics %s (%d partitions, %d replicas) on %s",
                created,
                partitions,
                replication_factor,
                bootstrap,
            )
        return created
    finally:
        await admin.close()


async def _check_partitions(admin: AIOKafkaAdminClient, names: list[str], partitions: int) -> None:
    if not names:
        return
    described: list[dict[str, Any]] = await admin.describe_topics(names)
    for topic in described:
        count = len(topic["partitions"])
        if topic["error_code"] == 0 and count != partitions:
            raise ConfigError(
                f"topic {topic['topic']!r} has {count} partitions, but {partitions} are "
                "configured (SPENDSTREAM_PARTITIONS): Faust tables need every topic to have the "
                "same partition count. Set SPENDSTREAM_PARTITIONS to match, or delete the topics so "
                "they are recreated (a new SPENDSTREAM_TOPIC_PREFIX also gives a fresh set)"
            )


async def partitions_of(bootstrap: str, topic: str, kafka_auth: KafkaAuth = PLAINTEXT) -> list[int]:
    """The partition ids of `topic`; ConfigError if it does not exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_auth.client_kwargs())
    try:
        await admin.start()
        described: list[dict[str, Any]] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if not described or described[0]["error_code"] != 0 or not described[0]["partitions"]:
        raise ConfigError(f"topic {topic} does not exist: run `spendstream up` to create the topics")
    return sorted(p["partition"] for p in described[0]["partitions"])
