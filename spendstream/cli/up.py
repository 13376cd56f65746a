"""`spendstream up`: broker (if local) -> topics -> the history process (ClickHouse DDL, sink) -> the
Faust worker, foreground."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections.abc import Callable

import faust

from spendstream.cli.kafka_local import LocalKafka
from spendstream.settings import Settings
from spendstream.topics import ensure_topics, wait_for_broker
from stream_processors.budgets import Spec, load_specs

__all__ = ["local_kafka", "prepare", "publish_specs", "run_worker"]

log = logging.getLogger(__name__)


def local_kafka(settings: Settings) -> LocalKafka:
    return LocalKafka(
        home=settings.kafka_dir,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        heap=settings.kafka_heap,
    )


def prepare(settings: Settings, say: Callable[[str], None]) -> str:
    """Start the local broker if configured, create topics; returns the worker's data dir."""
    if settings.local_kafka:
        kafka = local_kafka(settings)
        result = kafka.start(progress=say)
        verb = "already running" if result.already_running else f"started in {result.seconds:.1f}s"
        say(f"Kafka {kafka.bootstrap} {verb} (pid {result.pid})")
        # Tie the worker's table state to this broker's life: a re-formatted broker gets a new
        # cluster id and so a fresh worker dir (a stale one fails with ConsistencyError).
        cluster = kafka.cluster_id() or "unknown"
    else:
        asyncio.run(wait_for_broker(settings.bootstrap, timeout=30, kafka_auth=settings.kafka_auth))
        cluster = "external-" + hashlib.sha256(settings.bootstrap.encode()).hexdigest()[:12]
    created = asyncio.run(
        ensure_topics(
            settings.bootstrap,
            settings.topics,
            settings.partitions,
            dedupe_horizon_s=settings.dedupe_horizon_seconds,
            kafka_auth=settings.kafka_auth,
        )
    )
    say(f"topics: {', '.join(settings.topics.all())}" + (f" (created {len(created)})" if created else ""))
    specs = load_specs(settings.budgets_file)
    if specs:  # the budgets file is an import format for the budgets topic
        asyncio.run(publish_specs(settings, specs))
        say(f"budgets: imported {len(specs)} scopes from {settings.budgets_file}")
    datadir = settings.worker_dir / cluster
    datadir.mkdir(parents=True, exist_ok=True)
    return str(datadir)


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


def run_worker(settings: Settings, say: Callable[[str], None], loglevel: str = "info") -> None:
    """Run the worker until SIGINT/SIGTERM; on stop the sink flushes what it holds."""
    from stream_processors.app import create_app  # import faust's app lazily: it is heavy
    from stream_processors.history import HistoryProcess

    datadir = prepare(settings, say)
    history = HistoryProcess(settings, loglevel)
    history.start()  # the sink and ClickHouse, in a process of their own
    try:
        say(
            f"ClickHouse {_redact(settings.dsn)} database {settings.clickhouse_database}"
            + (f": applied {', '.join(history.applied)}" if history.applied else ": schema up to date")
        )
        app = create_app(settings, datadir=datadir, history=history)
        say(f"worker {settings.worker_id}: web http://127.0.0.1:{settings.web_port}/health; Ctrl-C stops")
        worker = faust.Worker(app, loglevel=loglevel, quiet=True)
        # What exists now (Faust, aiokafka, the catalogue, the schemas) lives as long as the
        # worker: frozen, the garbage collector stops rescanning it on every full collection.
        gc.collect()
        gc.freeze()
        worker.execute_from_commandline()
    finally:
        history.stop()  # the sink flushes what it holds


def _redact(dsn: str) -> str:
    if "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return dsn
