"""`spendstream up`: broker (if local) -> topics -> the history process (ClickHouse DDL, sink) -> the
meter process -> the Faust worker (budget agent), foreground. `--role` splits them: `meter` (the
worker and its meter process alone: run one per host or more, with distinct web ports) and
`history` (the sink and the queries alone: one)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import faust

from spendstream.cli.kafka_local import LocalCluster, LocalKafka
from spendstream.errors import SpendstreamError
from spendstream.settings import Settings
from spendstream.topics import broker_count, ensure_topics, replication_for, wait_for_broker
from stream_processors.budgets import Spec, load_specs
from stream_processors.gc_pauses import WORKER_GC_THRESHOLDS

if TYPE_CHECKING:
    from stream_processors.history import HistoryProcess

__all__ = ["ROLES", "local_kafka", "prepare", "publish_specs", "replication_factor", "run", "run_worker"]

ROLES = ("all", "meter", "history")

log = logging.getLogger(__name__)


def local_kafka(settings: Settings) -> LocalKafka | LocalCluster:
    """The local broker (SPENDSTREAM_KAFKA_BROKERS=1), or the local cluster of that many nodes."""
    if settings.kafka_brokers == 1:
        return LocalKafka(
            home=settings.kafka_dir,
            port=settings.kafka_port,
            controller_port=settings.kafka_controller_port,
            heap=settings.kafka_heap,
        )
    return LocalCluster(
        home=settings.kafka_dir,
        brokers=settings.kafka_brokers,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        heap=settings.kafka_heap,
    )


def replication_factor(settings: Settings) -> int:
    """Replicas of the project's topics and the worker's internal ones: min(3, brokers), counting
    the local nodes configured or, for an external cluster, its brokers (`broker_count`: those down
    or fenced for a moment included)."""
    if settings.local_kafka:
        return replication_for(settings.kafka_brokers)[0]
    brokers = asyncio.run(broker_count(settings.bootstrap, settings.kafka_auth))
    return replication_for(brokers)[0]


def prepare(settings: Settings, say: Callable[[str], None], *, import_budgets: bool = True) -> str:
    """Start the local broker if configured, create topics, import the budgets file (with
    `import_budgets`); returns the Kafka cluster's name, which the worker's data dir is under."""
    if settings.local_kafka:
        kafka = local_kafka(settings)
        say(kafka.start(progress=say).describe())
        cluster = kafka.cluster_id() or "unknown"
    else:
        asyncio.run(wait_for_broker(settings.bootstrap, timeout=30, kafka_auth=settings.kafka_auth))
        cluster = "external-" + hashlib.sha256(settings.bootstrap.encode()).hexdigest()[:12]
    created = asyncio.run(
        ensure_topics(
            settings.bootstrap,
            settings.topics,
            settings.partitions,
            replication_factor=replication_factor(settings) if settings.local_kafka else None,
            dedupe_horizon_s=settings.dedupe_horizon_seconds,
            kafka_auth=settings.kafka_auth,
        )
    )
    say(f"topics: {', '.join(settings.topics.all())}" + (f" (created {len(created)})" if created else ""))
    specs = load_specs(settings.budgets_file) if import_budgets else []
    if specs:  # the budgets file is an import format for the budgets topic
        asyncio.run(publish_specs(settings, specs))
        say(f"budgets: imported {len(specs)} scopes from {settings.budgets_file}")
    return cluster


async def publish_specs(settings: Settings, specs: list[Spec], removed: tuple[str, ...] = ()) -> None:
    """Publish budget specs, and removals of every budget of the `removed` scopes, to the budgets
    topic (key = scope), signed with SPENDSTREAM_SIGNING_KEY if set. A removal is a spec with
    `removed` set, not a tombstone: it can be signed, and it carries the scope's replay horizon."""
    from spendstream.signing import encode_control
    from spendstream.wire import default_codec
    from stream_processors.feeds import publish

    now = time.time_ns() // 1000
    codec, signer = default_codec(), settings.signer()
    records = [
        *((s.scope, s.to_record(now)) for s in specs),
        *((r, {**Spec(r).to_record(now), "removed": True}) for r in removed),
    ]
    await publish(
        settings.bootstrap,
        settings.topics.budgets,
        [
            (scope.encode(), encode_control(codec, "BudgetSpec", scope.encode(), r, signer))
            for scope, r in records
        ],
        settings.kafka_auth,
    )


def run(settings: Settings, say: Callable[[str], None], role: str = "all", loglevel: str = "info") -> None:
    """`spendstream up --role <role>`, in the foreground until SIGINT/SIGTERM."""
    if role == "history":
        from stream_processors.history import run_standalone

        prepare(settings, say, import_budgets=False)  # the meter workers import the budgets
        say(f"ClickHouse {_redact(settings.dsn)}")
        run_standalone(settings, loglevel, say)
    else:
        run_worker(settings, say, loglevel, with_history=role == "all")


def run_worker(
    settings: Settings, say: Callable[[str], None], loglevel: str = "info", *, with_history: bool = True
) -> None:
    """Run the worker (its meter process and the budget agent) until SIGINT/SIGTERM;
    `with_history`: and its history process as its child, whose sink flushes what it holds on
    stop. Without: /sql, /reprice and /flush go to the writer at SPENDSTREAM_HISTORY_URL (503 if
    unset)."""
    from stream_processors.history import HistoryEndpoint, HistoryProcess, RemoteHistory
    from stream_processors.meter_process import MeterProcess

    # Tie the worker's table state to this broker's life (a re-formatted broker gets a new cluster
    # id, so a fresh dir), and give each worker a dir of its own (its web port: two live workers
    # on a host never share one). With the memory store Faust keeps only empty dirs there, but a
    # persistent store (rocksdb) locks its dir.
    datadir = settings.worker_dir / prepare(settings, say) / str(settings.web_port)
    datadir.mkdir(parents=True, exist_ok=True)
    history: HistoryEndpoint | None = None
    child: HistoryProcess | None = None
    if with_history:
        history = child = HistoryProcess(settings, loglevel)
        # The sink and ClickHouse, in a process of their own: it starts (imports ClickHouse,
        # migrates) while this one imports Faust and builds the app, on the other core.
        child.spawn()
    elif settings.history_url:
        token = settings.history_token.get_secret_value() if settings.history_token else None
        history = RemoteHistory(settings.history_url, token, settings.history_token_file)
        say(f"history writer: {settings.history_url}")
    else:
        say("no history writer (SPENDSTREAM_HISTORY_URL unset): /sql, /reprice and /flush answer 503")
    # The meter, in a process of its own (stream_processors/meter_process.py): it starts reading
    # usage.raw while this one imports Faust; the budget agent decides what it sends.
    meter = MeterProcess(settings, loglevel)
    meter.start()
    stopping = threading.Event()  # set once this process stops: a child stopped then is no failure
    try:
        from stream_processors.app import create_app  # import faust's app lazily: it is heavy

        app = create_app(
            settings,
            datadir=str(datadir),
            history=history,
            meter=meter,
            replication_factor=replication_factor(settings),
        )
        failed: list[SpendstreamError] = []
        if child is not None:
            # Enforcement does not wait for ClickHouse: Faust starts (tables restored, budgets
            # decided) while the history process still starts; the worker's /health, /sql, ...
            # wait for it (stream_processors/web.py), and a history process that cannot start
            # stops the worker with its error, as before.
            threading.Thread(
                target=_await_history,
                args=(child, settings, say, failed, stopping),
                name="history-start",
                daemon=True,
            ).start()
        say(f"worker {settings.worker_id}: web http://127.0.0.1:{settings.web_port}/health; Ctrl-C stops")
        worker = faust.Worker(app, loglevel=loglevel, quiet=True)
        # Faust's start-up spinner turns the root logger to DEBUG for good (its handler spins per
        # record): every debug call of Faust and aiokafka then built a record, found its caller and
        # was dropped by the handlers, per message sent (3.6% of the worker's busy time at 5,000
        # events/s, sampled). Without the spinner the root logger stays at `loglevel`.
        worker.spinner = None
        # What exists now (Faust, aiokafka, the catalogue, the schemas) lives as long as the
        # worker: frozen, the garbage collector stops rescanning it on every full collection.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*WORKER_GC_THRESHOLDS)
        try:
            worker.execute_from_commandline()
        except SystemExit:
            if failed:
                raise failed[0] from None
            raise
    finally:
        stopping.set()
        meter.stop()  # its take finished and committed
        if child is not None:
            child.stop()  # the sink flushes what it holds


def _await_history(
    child: HistoryProcess,
    settings: Settings,
    say: Callable[[str], None],
    failed: list[SpendstreamError],
    stopping: threading.Event,
) -> None:
    """Wait for the history process to serve and say so; if it fails (and the worker is not
    stopping anyway), keep the error in `failed` and stop the worker (SIGTERM to this process:
    Faust stops cleanly, `run_worker` raises the error)."""
    try:
        child.wait_ready()
    except SpendstreamError as exc:
        if stopping.is_set():
            return
        failed.append(exc)
        say(f"{exc}: stopping the worker")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    say(
        f"ClickHouse {_redact(settings.dsn)} database {settings.clickhouse_database}"
        + (f": applied {', '.join(child.applied)}" if child.applied else ": schema up to date")
    )


def _redact(dsn: str) -> str:
    if "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return dsn
