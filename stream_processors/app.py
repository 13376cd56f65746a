"""The worker: a Faust app (the budget agent, its tables, the HTTP views) and its meter process.

    usage.raw --meter--> usage.priced ------------(history process: sink)--> ClickHouse usage_events
                  |  \\--> usage.dlq ------------(history process: sink)--> ClickHouse dead_letters
                  |  \\--> usage.seen (event ids counted: the dedupe's memory)
                  \\--> spend.deltas (by scope) --budget--> spend.control
                              budgets (by scope) --/     (tables: scopes, specs)
    prices --price feed--> catalogue;  budgets --budget feed--> model filters, `budget list`

The stages' logic is plain classes (MeterStage in meter.py, BudgetStage in budget_stage.py). The
meter runs in a process of its own (meter_process.py: its consumer, stage and producer), which
this worker starts, restarts and reports on; the budget agent here feeds BudgetStage messages and
sends what it returns. The HTTP views are in web.py.

The meter is partitioned by project; it re-partitions each message's spend by budget scope, so
every scope (org, team, project, user, model filter) has exactly one writer: no check-then-record
race, no limit multiplied by replicas. The sink, and the queries on ClickHouse, run in a process
of their own too (stream_processors/history.py): its CPU stays out of the path from a crossing to
its signal. See docs/architecture.md for the guarantees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer

from spendstream.errors import ConfigError, SpendstreamError
from spendstream.kafka_auth import KafkaAuth
from spendstream.settings import Settings
from spendstream.signing import warn_unauthenticated
from spendstream.wire import Codec, default_codec
from stream_processors.budget_stage import BudgetStage
from stream_processors.faust_fixes import (
    ack_only_what_this_generation_handled,
    changelog_ebb,
    check_internals,
    check_partitions_once_known,
    commit_only_what_is_delivered,
    hold_flow_while_seeking,
    raise_faust_ebb,
    reread_undelivered,
    short_fetch_wait,
)
from stream_processors.feeds import BudgetFeed
from stream_processors.gc_pauses import GcPauses
from stream_processors.history import HistoryEndpoint, HistoryProcess
from stream_processors.meter import dead_letter_record
from stream_processors.meter_process import MeterProcess
from stream_processors.restore import PromptTableManager, RestoredTable
from stream_processors.web import HistoryClient, add_views

__all__ = ["create_app", "faust_credentials"]

log = logging.getLogger(__name__)

SIGNAL_RETRY_SECONDS = 1.0  # a signal the broker did not take is sent again after this


async def deliver(send: Callable[..., Awaitable[Awaitable[Any]]], signals: list[tuple[bytes, bytes]]) -> None:
    """Send `signals` (key, value) together and return once the broker has acknowledged every one.
    A signal that failed (the producer gave up after its 20-minute timeout, a topic gone) is logged
    and sent again every SIGNAL_RETRY_SECONDS: the budget agent waits, and drops none."""
    pending = signals
    while pending:
        failed: list[tuple[bytes, bytes]] = []
        deliveries = []
        for key, value in pending:
            try:
                deliveries.append(((key, value), await send(key=key, value=value)))
            except Exception as exc:
                failed.append((key, value))
                error = exc
        for signal, delivery in deliveries:
            try:
                await delivery
            except Exception as exc:
                failed.append(signal)
                error = exc
        if failed:
            log.error(
                "%d kill-switch signal(s) not acknowledged (%r), e.g. for %s; sending them again in %.0f s",
                len(failed),
                error,
                failed[0][0].decode("utf-8", "replace"),
                SIGNAL_RETRY_SECONDS,
            )
            await asyncio.sleep(SIGNAL_RETRY_SECONDS)
        pending = failed


# Table changelog records buffered at most after a budget message (see changelog_ebb): the budget
# agent waits for the rest to go out before the next message. Faust's own ebb only past FAUST_EBB
# (a single message updating more scopes than that).
CHANGELOG_BUFFERED = 1_000
FAUST_EBB = 20_000
FETCH_MAX_WAIT_MS = 20  # longest broker long-poll of the worker's consumer (see short_fetch_wait)


def _now_us() -> int:
    return time.time_ns() // 1_000


def create_app(
    settings: Settings,
    *,
    datadir: str,
    history: HistoryEndpoint | None,
    meter: MeterProcess,
    codec: Codec | None = None,
    replication_factor: int = 1,  # of the topics Faust creates (changelogs): see spendstream.topics
) -> faust.App:
    codec = codec or default_codec()
    topics = settings.topics
    n = settings.partitions
    signer, verifier = settings.signer(), settings.verifier()
    if verifier.enforcing and signer is None:
        raise ConfigError(
            "SPENDSTREAM_VERIFY_KEYS is set but SPENDSTREAM_SIGNING_KEY is not: Guards with those "
            "keys would ignore every signal of this worker; give it the signing key (docs/security.md)"
        )
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.bootstrap}",
        broker_credentials=faust_credentials(settings.kafka_auth),
        datadir=datadir,
        store="memory://",
        topic_partitions=n,
        topic_replication_factor=replication_factor,
        table_standby_replicas=1,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host="127.0.0.1",
        producer_max_request_size=8 << 20,
        producer_linger=0.001,  # seconds: 1 ms
        # aiokafka keeps one produce request in flight per broker and, when a partition's batch is
        # full, makes the next send to it wait until that batch has gone out. With Faust's 16 KiB
        # batches every PricedBatch (tens of KiB) filled one, so the meter waited a produce round
        # trip per message, and the deltas and signals behind it queued: measured at 5,000 ev/s,
        # a take of ~8 messages took 100 ms (p50) to send instead of 22 ms, kill switch p50
        # 1.5 s -> 0.2 s on the same busy machine.
        producer_max_batch_size=1 << 20,
        consumer_max_fetch_size=8 << 20,
        # Faust stops fetching a partition whose agent queue is under pressure, and when every
        # partition is stopped it sleeps a whole second before fetching again. With a small queue
        # that happened under ordinary load (a queue fills while the loop prices a take) and the
        # second of lag never drained. So the budget agent's queue holds 4,000 messages.
        stream_buffer_maxsize=4_000,
        # Offsets are committed by Faust's 1-second timer, never inline: Faust's delivery loop
        # commits itself every `broker_commit_every` acknowledged records, and that commit (our
        # flush waits for every buffered record's acknowledgement first) stops all delivery to
        # the agents meanwhile: at 500 it ran about once a second at 5,000 ev/s and held the
        # meter's and the budget agent's input for 0.1-0.5 s each time on a busy machine.
        broker_commit_every=1_000_000,
        broker_commit_interval=1.0,
        # A crashed worker's partitions move to a live one after 6 s (the least a broker accepts
        # by default, group.min.session.timeout.ms), not Kafka's default 45 s: until then nobody
        # decides those scopes' budgets, and a worker restarted after kill -9 waits for it too.
        # Heartbeats go every 2 s from Faust's consumer thread, which has an event loop of its
        # own: agents holding the main loop do not delay them; two may be missed.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=2.0,
        TableManager=PromptTableManager,
    )

    for warning in check_internals():  # raises ConfigError if a patched name is gone
        log.warning("UNCHECKED VERSION: %s", warning)
    commit_only_what_is_delivered(app)
    raise_faust_ebb(app, FAUST_EBB)
    short_fetch_wait(FETCH_MAX_WAIT_MS)
    ack_only_what_this_generation_handled()
    hold_flow_while_seeking()
    check_partitions_once_known()

    def raw(*names: str) -> faust.TopicT:
        return app.topic(
            *names,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=n,
            internal=False,
        )

    control_topic, dlq_topic = raw(topics.spend_control), raw(topics.usage_dlq)
    deltas_topic = raw(topics.spend_deltas)
    budget_input = raw(topics.spend_deltas, topics.budgets)

    def changelog_consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=20,  # how long the broker holds a fetch short of data (default 500 ms)
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
            **settings.kafka_auth.client_kwargs(),
        )

    def table(name: str) -> faust.Table[str, Any]:
        """A table restored by a bulk read of its changelog on assignment (stream_processors/restore.py)."""
        return app.tables.add(  # type: ignore[return-value]
            RestoredTable(
                app,
                name=name,
                default=None,
                key_type=str,  # values are JSON
                partitions=n,
                beacon=app.tables.beacon,
                changelog_consumer=changelog_consumer,
            )
        )

    # scope -> BudgetState (stream_processors/budgets.py). One value per scope, so spend, dedup
    # offsets and the last signal change in one changelog record.
    scopes = table("scopes")
    # scope -> BudgetSpec record, from the budgets topic (co-partitioned with spend.deltas)
    specs = table("specs")
    metrics: Counter[str] = Counter()
    gc_pauses = GcPauses()

    async def dead_letter(
        reason: str, detail: str, topic: str, partition: int, offset: int, key: bytes | None, payload: bytes
    ) -> None:
        metrics[f"dead_letters|{reason}"] += 1
        letter = dead_letter_record(reason, detail, topic, partition, offset, key, payload, _now_us())
        await dlq_topic.send(key=key, value=codec.encode("DeadLetter", letter))

    feed_args = {
        "bootstrap": settings.bootstrap,
        "kafka_auth": settings.kafka_auth,
        "codec": codec,
        "loop": app.loop,
        "beacon": app.beacon,
    }
    budget_feed = BudgetFeed(
        topic=topics.budgets,
        verifier=verifier,
        **feed_args,  # type: ignore[arg-type]
        dead_letter=lambda *a: dead_letter(a[0], a[1], topics.budgets, *a[2:]),
    )
    budget_stage = BudgetStage(
        codec,
        scopes,
        specs,
        grace_us=settings.late_grace_seconds * 1_000_000,
        signer=signer,
        verifier=verifier,
        partitions=n,
        feed_specs=budget_feed.specs,  # the whole topic: templates whichever partition holds them
    )

    @app.agent(budget_input, name="budget")
    async def budget(stream: faust.StreamT[bytes]) -> None:
        # Decide nothing before the templates are known: a member decided meanwhile would have no
        # budget, and a blocked one re-read after a crash (its deltas re-delivered) was signalled
        # `ok` and then `blocked` again once the feed caught up.
        await budget_feed.caught_up.wait()
        async for event in stream.events():
            msg = event.message
            if msg.topic == topics.budgets:
                result = budget_stage.on_budget(msg.key, msg.value, msg.partition, _now_us())
            else:
                result = budget_stage.on_deltas(msg.value, msg.partition, _now_us())
            await deliver(control_topic.send, result.signals)  # acknowledged before the states
            budget_stage.keep(result)  # that record them (BudgetStage.keep)
            for dead in result.dead:
                await dead_letter(
                    dead.reason, dead.detail, msg.topic, msg.partition, msg.offset, msg.key, dead.payload
                )
            metrics.update(result.metrics)
            await changelog_ebb(app, CHANGELOG_BUFFERED)

    @app.timer(1.0)
    async def tick() -> None:
        """Re-decide scopes that are not ok, so a new window or a cooled-down rate unblocks them,
        and the members of a template that changed."""
        for partition, deltas in budget_stage.ticks(_now_us()):
            await deltas_topic.send(
                key=deltas[0]["scope"].encode(),
                value=codec.encode("SpendDeltaBatch", {"deltas": deltas}),
                partition=partition,
            )

    reread_undelivered(app, (topics.spend_deltas, topics.budgets), metrics)

    @app.task
    async def start_services() -> None:
        if not verifier.enforcing:
            warn_unauthenticated(log, "the worker")
        await app.add_runtime_dependency(budget_feed)

    @app.timer(1.0)
    async def watch_meter() -> None:
        """The meter resumes from its committed offsets: a meter process that died is restarted
        (what it read and did not commit is read again, and the dedupe skips what it counted)."""
        if meter.exitcode is not None:
            log.error("the meter process exited (%s); restarting it", meter.exitcode)
            meter.start()

    if isinstance(history, HistoryProcess):  # role all: the worker's own child

        @app.timer(1.0)
        async def watch_history() -> None:
            """The sink resumes from its committed offsets: a history process that died is restarted."""
            if history.exitcode is not None:
                log.error("the history process exited (%s); restarting it", history.exitcode)
                try:
                    await asyncio.to_thread(history.start)
                except SpendstreamError as exc:
                    log.error("%s; retrying in 1 s", exc)

    def assigned(topic: str) -> list[int]:
        """The partitions of `topic` this worker's Faust consumer holds now, not as a standby
        (several workers share them: spend.deltas' are the scopes whose budgets it decides)."""
        return sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic)

    add_views(
        app,
        HistoryClient(history, part_of_worker=isinstance(history, HistoryProcess)),
        status=lambda: {
            "budgets": len(budget_feed.specs),
            "price_cards": (report := meter.report()).get("price_cards"),
            "catalogue_version": report.get("catalogue_version"),
            "feeds_caught_up": budget_feed.caught_up.is_set() and report.get("feeds_caught_up", False),
            "events": {k.split("|", 1)[1]: v for k, v in meter.metrics().items() if k.startswith("events|")},
            "partitions": report.get("partitions", []),
            "meter_pid": meter.pid,
            **({} if meter.exitcode is None else {"meter": f"the meter process exited ({meter.exitcode})"}),
        },
        budgets=lambda: budget_stage.rows(budget_feed.specs, _now_us(), set(assigned(topics.spend_deltas))),
        metrics=lambda: metrics + meter.metrics(),
        gc_seconds=lambda: [a + b for a, b in zip(gc_pauses.seconds, meter.gc_seconds(), strict=True)],
        price_cards=lambda: meter.report().get("price_cards"),
        remote_token=settings.history_token.get_secret_value() if settings.history_token else None,
    )
    return app


def faust_credentials(auth: KafkaAuth) -> faust.auth.Credentials | None:
    """The worker's Kafka security in Faust's terms (its consumers, producer and topic creation
    all use it); None for PLAINTEXT. SCRAM passes through: Faust hands the mechanism to aiokafka."""
    context = auth.ssl_context() if auth.tls else None
    if auth.sasl:
        return faust.SASLCredentials(
            username=auth.sasl_username,
            password=auth.sasl_password,
            mechanism=auth.sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context is not None else None
