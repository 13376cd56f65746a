"""The worker: one Faust app wiring the stages to their topics and tables.

    usage.raw --meter--> usage.priced --sink--> ClickHouse usage_events
                 |  \\--> usage.dlq    --sink--> ClickHouse dead_letters
                 \\--> spend (table) --budget check--> spend.control

The meter agent is the single writer of each project's spend (key = project, one partition per
key), so budget checks have no check-then-record race. Guarantee: at least once; see
docs/architecture.md for what that means for spend after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import faust
from faust.web import Request, Response, View

from spendstream.errors import QueryError
from spendstream.settings import Settings
from spendstream.store import ClickHouseStore
from spendstream.wire import Codec, default_codec
from stream_processors.budgets import BudgetBook, Period, Window, crossed
from stream_processors.meter import MeterStage
from stream_processors.price_feed import PriceFeed
from stream_processors.pricing import Catalogue
from stream_processors.repricer import reprice
from stream_processors.sink import Sink

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _now_us() -> int:
    return time.time_ns() // 1_000


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def create_app(
    settings: Settings,
    *,
    datadir: str,
    store: ClickHouseStore,
    catalogue: Catalogue | None = None,
    budgets: BudgetBook | None = None,
    codec: Codec | None = None,
) -> faust.App:
    codec = codec or default_codec()
    cat = catalogue or Catalogue.load(fallback=settings.unpriced_fallback)
    book = budgets if budgets is not None else BudgetBook.load(settings.budgets_file)
    topics = settings.topics
    n = settings.partitions
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.bootstrap}",
        datadir=datadir,
        store="memory://",
        topic_partitions=n,
        topic_replication_factor=1,
        table_standby_replicas=1,
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        producer_max_request_size=8 << 20,
        consumer_max_fetch_size=8 << 20,
        stream_buffer_maxsize=64,
        broker_commit_every=500,
        broker_commit_interval=1.0,
    )

    def raw(name: str) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=n,
            internal=False,
        )

    raw_topic, priced_topic = raw(topics.usage_raw), raw(topics.usage_priced)
    control_topic, dlq_topic = raw(topics.spend_control), raw(topics.usage_dlq)

    # scope|window -> spend in pico-USD. Changelog-backed: restored on restart.
    spend = app.Table("spend", default=int, key_type=str, value_type=int, partitions=n)
    # scope|window -> last state signalled ("ok" until a signal says otherwise).
    signalled = app.Table("signalled", default=str, key_type=str, value_type=str, partitions=n)
    # scope -> sequence number of the last signal, so subscribers can drop stale ones.
    sequence = app.Table("sequence", default=int, key_type=str, value_type=int, partitions=n)
    stage = MeterStage(cat, codec)
    metrics: Counter[str] = Counter()

    async def check_budget(scope: str, period: Period, window: Window, before: int, after: int) -> None:
        for budget in book.for_scope(scope):
            if budget.period != period:
                continue
            key = f"{scope}|{window.id}"
            state = "blocked" if after >= budget.limit_pico_usd else "ok"
            if state == (signalled[key] or "ok"):
                continue
            if state == "blocked" and not crossed(before, after, budget.limit_pico_usd):
                log.warning("%s is over budget without a crossing (restored state?)", key)
            signalled[key] = state
            sequence[scope] += 1
            signal = {
                "scope": scope,
                "state": state,
                "reason": "budget_exceeded" if state == "blocked" else "budget_ok",
                "window": window.id,
                "window_start": window.start_us,
                "window_end": window.end_us,
                "spend_pico_usd": after,
                "limit_pico_usd": budget.limit_pico_usd,
                "decided_at": _now_us(),
                "sequence": sequence[scope],
            }
            await control_topic.send(key=scope.encode(), value=codec.encode("ControlSignal", signal))
            metrics[f"signals|{state}"] += 1
            log.info(
                "signal %s %s (%s): spend %d of %d pico-USD",
                scope,
                state,
                window.id,
                after,
                budget.limit_pico_usd,
            )

    async def dead_letter(
        reason: str, detail: str, topic: str, partition: int, offset: int, key: bytes | None, payload: bytes
    ) -> None:
        letter = {
            "reason": reason,
            "detail": detail,
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "key": key,
            "payload": payload,
            "failed_at": _now_us(),
        }
        metrics[f"dead_letters|{reason}"] += 1
        await dlq_topic.send(key=key, value=codec.encode("DeadLetter", letter))

    feed = PriceFeed(
        bootstrap=settings.bootstrap,
        topic=topics.prices,
        catalogue=cat,
        codec=codec,
        dead_letter=lambda *a: dead_letter(a[0], a[1], topics.prices, *a[2:]),
        loop=app.loop,
        beacon=app.beacon,
    )

    @app.agent(raw_topic, name="meter")
    async def meter(stream: faust.StreamT[bytes]) -> None:
        # Price nothing before the cards published at run time are known.
        await feed.caught_up.wait()
        async for event in stream.events():
            msg = event.message
            result = stage.process(msg.key, msg.value, _now_us())
            for dead in result.dead:
                await dead_letter(
                    dead.reason, dead.detail, msg.topic, msg.partition, msg.offset, msg.key, dead.payload
                )
            for project, payload in result.rekey:
                await raw_topic.send(key=project.encode(), value=payload)
            for status, count in result.statuses.items():
                metrics[f"events|{status}"] += count
            if result.project is None:
                continue
            project = result.project
            await priced_topic.send(
                key=project.encode(), value=codec.encode("PricedBatch", {"events": result.priced})
            )
            scope = f"project:{project}"
            for (period, window), delta in result.spend.items():
                key = f"{scope}|{window.id}"
                before = spend[key]
                spend[key] = before + delta
                await check_budget(scope, period, window, before, before + delta)

    sink = Sink(
        bootstrap=settings.bootstrap,
        topics=topics,
        group_id=f"{settings.worker_id}-sink",
        store=store,
        codec=codec,
        max_rows=settings.sink_max_rows,
        max_seconds=settings.sink_max_seconds,
        loop=app.loop,
        beacon=app.beacon,
    )

    @app.task
    async def start_services() -> None:
        await app.add_runtime_dependency(feed)
        await app.add_runtime_dependency(sink)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json(
                {
                    "status": "ok",
                    "sink_rows_written": sink.rows_written,
                    "budgets": len(book),
                    "price_cards": len(cat),
                    "catalogue_version": cat.version,
                    "price_feed_caught_up": feed.caught_up.is_set(),
                    "events": {k.split("|", 1)[1]: v for k, v in metrics.items() if k.startswith("events|")},
                }
            )

    @app.page("/sql")
    class Sql(View):
        async def post(self, request: Request) -> Response:
            body = await request.json()
            try:
                result = await asyncio.to_thread(store.query, str(body.get("query", "")))
            except QueryError as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json({"columns": result.columns, "rows": _jsonable(result.rows)})

    @app.page("/reprice")
    class Reprice(View):
        async def post(self, request: Request) -> Response:
            body = await request.json()
            report = await asyncio.to_thread(
                reprice, store, cat, int(body["from_us"]), int(body["to_us"]), body.get("model") or None
            )
            return self.json(
                {"pricing_version": report.pricing_version, "events": report.events, "rows": report.rows()}
            )

    @app.page("/flush")
    class Flush(View):
        async def post(self, request: Request) -> Response:
            await sink.flush()
            return self.json({"sink_rows_written": sink.rows_written})

    @app.page("/metrics")
    class Metrics(View):
        """Prometheus text format."""

        async def get(self, request: Request) -> Response:
            lines = [
                "# TYPE spendstream_events_total counter",
                *(
                    f'spendstream_events_total{{pricing_status="{k.split("|", 1)[1]}"}} {v}'
                    for k, v in sorted(metrics.items())
                    if k.startswith("events|")
                ),
                "# TYPE spendstream_dead_letters_total counter",
                *(
                    f'spendstream_dead_letters_total{{reason="{k.split("|", 1)[1]}"}} {v}'
                    for k, v in sorted(metrics.items())
                    if k.startswith("dead_letters|")
                ),
                "# TYPE spendstream_signals_total counter",
                *(
                    f'spendstream_signals_total{{state="{k.split("|", 1)[1]}"}} {v}'
                    for k, v in sorted(metrics.items())
                    if k.startswith("signals|")
                ),
                "# TYPE spendstream_sink_rows_written_total counter",
                f"spendstream_sink_rows_written_total {sink.rows_written}",
                "# TYPE spendstream_price_cards gauge",
                f"spendstream_price_cards {len(cat)}",
            ]
            return self.text("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")

    return app
