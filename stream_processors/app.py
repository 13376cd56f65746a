"""The worker: one Faust app wiring the stages to their topics and tables.

    usage.raw --meter--> usage.priced ------------(history process: sink)--> ClickHouse usage_events
                  |  \\--> usage.dlq ------------(history process: sink)--> ClickHouse dead_letters
                  \\--> spend.deltas (by scope) --budget--> spend.control
                              budgets (by scope) --/     (table: scopes)
    prices --price feed--> catalogue;  budgets --budget feed--> model filters, `budget list`

The meter is partitioned by project; it re-partitions each message's spend by budget scope, so
every scope (org, team, project, user, model filter) has exactly one writer: no check-then-record
race, no limit multiplied by replicas. The sink, and the queries on ClickHouse, run in a process
of their own (stream_processors/history.py): its CPU stays out of the path from a crossing to its
signal. See docs/architecture.md for the guarantees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

import faust
import httpx
from faust.web import Request, Response, View

from spendstream.errors import ConfigError, SpendstreamError
from spendstream.gc_pauses import GcPauses
from spendstream.kafka_auth import KafkaAuth
from spendstream.settings import Settings
from spendstream.signing import encode_control, warn_unauthenticated
from spendstream.wire import Codec, default_codec
from stream_processors.budgets import (
    LONG_MAX,
    MINUTE_US,
    Decision,
    Spec,
    apply_deltas,
    decide,
    deltas_problem,
    fresh_deltas,
    new_state,
)
from stream_processors.dedupe import SeenIds, reload_seen
from stream_processors.faust_fixes import (
    ack_only_what_this_generation_handled,
    commit_only_what_is_delivered,
    hold_flow_while_seeking,
    reread_undelivered,
    short_fetch_wait,
)
from stream_processors.feeds import BudgetFeed, PriceFeed, budget_rejection
from stream_processors.history import HistoryProcess
from stream_processors.meter import MeterBatch, MeterStage
from stream_processors.pricing import Catalogue

__all__ = ["create_app", "faust_credentials"]

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_PAYLOAD = 1 << 20
MAX_PRICED_BATCH_BYTES = 4 << 20  # a PricedBatch message at most (the request limit is 8 MiB)
METER_TAKE = 1_000  # usage.raw messages the meter prices together at most
METER_WAIT = 0.005  # seconds it waits for more before pricing what it has (adds at most this latency)
FETCH_MAX_WAIT_MS = 20  # longest broker long-poll of the worker's consumer (see short_fetch_wait)


def _now_us() -> int:
    return time.time_ns() // 1_000


def create_app(
    settings: Settings,
    *,
    datadir: str,
    history: HistoryProcess,
    catalogue: Catalogue | None = None,
    codec: Codec | None = None,
) -> faust.App:
    codec = codec or default_codec()
    cat = catalogue or Catalogue.load(fallback=settings.unpriced_fallback)
    topics = settings.topics
    n = settings.partitions
    grace_us = settings.late_grace_seconds * 1_000_000
    signer, verifier = settings.signer(), settings.verifier()
    if verifier.enforcing and signer is None:
        raise ConfigError(
            "SPENDSTREAM_VERIFY_KEYS is set but SPENDSTREAM_SIGNING_KEY is not: Guards with those "
            "keys would ignore every signal of this worker; give it the signing key (docs/security.md)"
        )
    key_id = signer.key_id if signer else ""
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.bootstrap}",
        broker_credentials=faust_credentials(settings.kafka_auth),
        datadir=datadir,
        store="memory://",
        topic_partitions=n,
        topic_replication_factor=1,
        table_standby_replicas=1,
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        producer_max_request_size=8 << 20,
        producer_linger_ms=1,
        consumer_max_fetch_size=8 << 20,
        # Faust stops fetching a partition whose agent queue is under pressure, and when every
        # partition is stopped it sleeps a whole second before fetching again. With a small queue
        # that happens under ordinary load (the meter's queue fills while it prices a batch) and
        # the second of lag never drains: meter and budget agent share one fetcher, each waiting
        # on the other's output. So the queue holds several of the meter's batches.
        stream_buffer_maxsize=4 * METER_TAKE,
        broker_commit_every=500,
        broker_commit_interval=1.0,
        # A crashed worker's partitions move to a live one after 10 s, not Kafka's default minute:
        # until then nobody decides those scopes' budgets.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
    )

    commit_only_what_is_delivered(app)
    short_fetch_wait(FETCH_MAX_WAIT_MS)
    ack_only_what_this_generation_handled()
    hold_flow_while_seeking()

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

    raw_topic, priced_topic = raw(topics.usage_raw), raw(topics.usage_priced)
    control_topic, dlq_topic = raw(topics.spend_control), raw(topics.usage_dlq)
    deltas_topic, seen_topic = raw(topics.spend_deltas), raw(topics.usage_seen)
    budget_input = raw(topics.spend_deltas, topics.budgets)

    # scope -> {"w", "late", "m", "applied", "sig", "seq"} (stream_processors/budgets.py). One value
    # per scope, so spend, dedup offsets and the last signal change in one changelog record.
    scopes = app.Table("scopes", default=None, key_type=str, partitions=n)  # JSON values
    # scope -> BudgetSpec record, from the budgets topic (co-partitioned with spend.deltas)
    specs = app.Table("specs", default=None, key_type=str, partitions=n)
    parsed_specs: dict[tuple[str, int], Spec] = {}
    attention: dict[str, int] = {}  # scopes not ok -> partition: the timer re-decides them
    metrics: Counter[str] = Counter()
    gc_pauses = GcPauses()

    async def dead_letter(
        reason: str, detail: str, topic: str, partition: int, offset: int, key: bytes | None, payload: bytes
    ) -> None:
        if len(payload) > MAX_DEAD_LETTER_PAYLOAD:  # the letter must fit a Kafka message too
            detail += f" (payload cut to its first {MAX_DEAD_LETTER_PAYLOAD} of {len(payload)} bytes)"
            payload = payload[:MAX_DEAD_LETTER_PAYLOAD]
        letter = {
            "reason": reason,
            "detail": detail[:4000],
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "key": key[:1000] if key else key,
            "payload": payload,
            "failed_at": _now_us(),
        }
        metrics[f"dead_letters|{reason}"] += 1
        await dlq_topic.send(key=key, value=codec.encode("DeadLetter", letter))

    feed_args = {
        "bootstrap": settings.bootstrap,
        "kafka_auth": settings.kafka_auth,
        "codec": codec,
        "loop": app.loop,
        "beacon": app.beacon,
    }
    price_feed = PriceFeed(
        topic=topics.prices,
        catalogue=cat,
        **feed_args,  # type: ignore[arg-type]
        dead_letter=lambda *a: dead_letter(a[0], a[1], topics.prices, *a[2:]),
    )
    budget_feed = BudgetFeed(
        topic=topics.budgets,
        verifier=verifier,
        **feed_args,  # type: ignore[arg-type]
        dead_letter=lambda *a: dead_letter(a[0], a[1], topics.budgets, *a[2:]),
    )
    stage = MeterStage(
        cat,
        codec,
        budget_feed.model_globs,
        budget_feed.specs,
        dedupe_horizon_us=settings.dedupe_horizon_seconds * 1_000_000,
    )
    next_offset: dict[int, int] = {}  # usage.raw partition -> the offset the meter handles next

    async def follow_on(partition: int, offset: int) -> None:
        """Before handling a partition from an offset other than the next (start, rebalance, seek):
        re-load the ids counted before it, as whoever handled the partition last wrote them."""
        if next_offset.get(partition) != offset:
            stage.seen[partition] = SeenIds(stage.dedupe_horizon_us)
            await reload_seen(
                settings.bootstrap,
                topics.usage_seen,
                partition,
                offset,
                stage.seen[partition],
                codec,
                settings.kafka_auth,
            )
        next_offset[partition] = offset + 1

    async def send_priced(project: str, priced: list[dict[str, Any]]) -> None:
        """PricedBatch messages of at most MAX_PRICED_BATCH_BYTES (halved until they fit); an
        event that cannot be encoded at all (a bug) is dead-lettered alone."""
        try:
            value: bytes | None = codec.encode("PricedBatch", {"events": priced})
            problem = ""
        except Exception as exc:
            value, problem = None, repr(exc)[:1000]
        if value is not None and (len(value) <= MAX_PRICED_BATCH_BYTES or len(priced) == 1):
            await priced_topic.send(key=project.encode(), value=value)
        elif len(priced) > 1:
            half = len(priced) // 2
            await send_priced(project, priced[:half])
            await send_priced(project, priced[half:])
        else:
            payload = repr(priced[0]["usage"]).encode()
            await dead_letter(
                "processing_error", problem, topics.usage_priced, -1, -1, project.encode(), payload
            )

    @app.agent(raw_topic, name="meter")
    async def meter(stream: faust.StreamT[bytes]) -> None:
        # Price nothing before the cards and budgets published at run time are known.
        await price_feed.caught_up.wait()
        await budget_feed.caught_up.wait()
        # The messages waiting (up to METER_TAKE, or what arrived within METER_WAIT) are priced
        # together and their output coalesced: Faust's per-message cost is paid per destination,
        # not per input message. Their offsets are committed once all of them are handled.
        async for events in stream.take_events(METER_TAKE, within=METER_WAIT):  # type: ignore[attr-defined]  # on Stream, not StreamT
            batch = MeterBatch(n)
            now = _now_us()
            stage.model_globs = budget_feed.model_globs
            messages = [event.message for event in events]
            for msg in messages:
                await follow_on(msg.partition, msg.offset)
            results = stage.process_many(
                [(msg.partition, msg.key, msg.value or b"") for msg in messages], now
            )  # a tombstone is undecodable
            for msg, result in zip(messages, results, strict=True):
                for dead in result.dead:
                    await dead_letter(
                        dead.reason, dead.detail, msg.topic, msg.partition, msg.offset, msg.key, dead.payload
                    )
                for project, payload in result.rekey:
                    await raw_topic.send(key=project.encode(), value=payload)
                for status, count in result.statuses.items():
                    metrics[f"events|{status}"] += count
                if result.unbudgeted:
                    metrics["unbudgeted|beyond_dedupe_horizon"] += result.unbudgeted
                batch.add(result, msg.partition, msg.offset)
            # The ids counted go out with the deltas they moved, so a restarted meter knows them.
            for partition, record in batch.seen_records():
                await seen_topic.send(
                    key=str(partition).encode(), value=codec.encode("SeenIds", record), partition=partition
                )
            for partition, deltas in batch.delta_batches():
                await deltas_topic.send(
                    key=deltas[0]["scope"].encode(),
                    value=codec.encode("SpendDeltaBatch", {"deltas": deltas}),
                    partition=partition,
                )
            # History after enforcement: yield between PricedBatches, so the budget agent can
            # take the deltas just sent while the rest of the batch is encoded.
            for project, priced in batch.priced_batches():
                await asyncio.sleep(0)
                await send_priced(project, priced)

    def spec_of(scope: str) -> Spec | None:
        record = specs.get(scope)
        if record is None or record.get("removed"):
            return None
        cache_key = (scope, int(record.get("updated_at", 0)))
        spec = parsed_specs.get(cache_key)
        if spec is None:
            spec = parsed_specs[cache_key] = Spec.from_record(record)
        return spec

    async def decide_and_signal(scope: str, state: dict[str, Any], partition: int) -> bool:
        """Publish exactly one ControlSignal per change of (state, reason, level, window), and
        once more, re-signed, when the worker's signing key changed since the scope's last signal
        (so after a rotation Guards can drop the old key)."""
        now = _now_us()
        decision: Decision = decide(state, spec_of(scope), now)
        if decision.state == "ok":
            attention.pop(scope, None)
        else:
            attention[scope] = partition
        if decision.key == state["sig"] and (state["seq"] == 0 or state.get("kid", "") == key_id):
            return False
        state["sig"], state["kid"] = decision.key, key_id
        state["seq"] += 1
        signal = {
            "scope": scope,
            "state": decision.state,
            "reason": decision.reason,
            "window": decision.window.id,
            "window_start": decision.window.start_us,
            "window_end": decision.window.end_us,
            "spend_pico_usd": min(decision.spend_pico, LONG_MAX),  # an Avro long; $9.2M+ saturates
            "limit_pico_usd": decision.limit_pico,
            "decided_at": now,
            "sequence": state["seq"],
            "level": decision.level,
            "mode": decision.mode,
            "projected_at": decision.projected_at_us,
        }
        message = encode_control(codec, "ControlSignal", scope.encode(), signal, signer)
        await control_topic.send(key=scope.encode(), value=message)
        metrics[f"signals|{decision.state}"] += 1
        log.info(
            "signal %s %s (%s %s): spend %d of %d pico-USD",
            scope,
            decision.state,
            decision.reason,
            decision.window.id,
            decision.spend_pico,
            decision.limit_pico,
        )
        return True

    @app.agent(budget_input, name="budget")
    async def budget(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            if msg.topic == topics.budgets:
                scope = (msg.key or b"").decode()
                try:
                    record = codec.decode(msg.value)[1] if msg.value else None
                    if record is not None:
                        Spec.from_record(record)  # validate before it decides anything
                except (ConfigError, Exception) as exc:
                    await dead_letter(
                        "invalid_budget",
                        str(exc),
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        msg.key,
                        msg.value or b"",
                    )
                    continue
                kept = specs.get(scope)
                why = budget_rejection(verifier, msg.key, msg.value, record, kept and kept["updated_at"])
                if why is not None:  # unsigned, forged, a tombstone or a replay: changes nothing
                    metrics[f"control_rejected|{why}"] += 1
                    detail = f"{why} budget for {scope!r} ignored: only specs signed with a key in SPENDSTREAM_VERIFY_KEYS count"
                    await dead_letter(
                        f"budget_{why}",
                        detail,
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        msg.key,
                        msg.value or b"",
                    )
                    continue
                if record is None:
                    specs.pop(scope, None)
                else:  # kept, removed too: its updated_at is the scope's replay horizon
                    specs[scope] = {k: v for k, v in record.items() if k != "signature"}
                state = scopes.get(scope) or new_state()
                await decide_and_signal(scope, state, msg.partition)
                scopes[scope] = state
                continue
            try:
                name, batch = codec.decode(msg.value)
                problem = deltas_problem(name, batch, _now_us())
            except Exception as exc:
                name, problem = "undecodable", str(exc)
            if problem is not None:
                reason = "undecodable" if name == "undecodable" else "invalid_delta"
                await dead_letter(reason, problem, msg.topic, msg.partition, msg.offset, msg.key, msg.value)
                continue
            grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for d in batch["deltas"]:
                grouped[d["scope"]].append(d)
            now = _now_us()
            for scope, deltas in grouped.items():
                state = scopes.get(scope) or new_state()
                try:
                    fresh, duplicates = fresh_deltas(state["applied"], deltas)
                    if duplicates:
                        metrics["deltas|duplicate"] += duplicates  # re-delivered after a restart
                    late = apply_deltas(state, fresh, spec_of(scope), now, grace_us)
                    if late:
                        metrics["late_pico_usd|beyond_grace"] += late
                    signalled = await decide_and_signal(scope, state, msg.partition)
                except Exception as exc:  # a bug costs this scope's deltas of this message, never the agent
                    log.exception(
                        "budget agent: %s failed on %s[%d]@%d", scope, msg.topic, msg.partition, msg.offset
                    )
                    detail = f"{scope}: {exc!r}"[:1000]
                    await dead_letter(
                        "processing_error", detail, msg.topic, msg.partition, msg.offset, msg.key, msg.value
                    )
                    continue
                if signalled or fresh:
                    scopes[scope] = state  # a timer tick that changes nothing writes no changelog

    @app.timer(1.0)
    async def tick() -> None:
        """Re-decide scopes that are not ok, so a new window or a cooled-down rate unblocks them."""
        now_min = _now_us() // MINUTE_US
        by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for scope, partition in list(attention.items()):
            by_partition[partition].append(
                {
                    "scope": scope,
                    "minute": now_min,
                    "pico_usd": 0,
                    "events": 0,
                    "source_partition": -1,
                    "source_offset": -1,
                }
            )
        for partition, deltas in by_partition.items():
            await deltas_topic.send(
                key=deltas[0]["scope"].encode(),
                value=codec.encode("SpendDeltaBatch", {"deltas": deltas}),
                partition=partition,
            )

    reread_undelivered(app, (topics.usage_raw, topics.spend_deltas, topics.budgets), metrics)

    @app.task
    async def start_services() -> None:
        if not verifier.enforcing:
            warn_unauthenticated(log, "the worker")
        await app.add_runtime_dependency(price_feed)
        await app.add_runtime_dependency(budget_feed)

    http = httpx.AsyncClient(timeout=None)  # to the history process, on loopback

    async def from_history(
        method: str, path: str, body: bytes | None = None, within_s: float | None = None
    ) -> Any:
        """The history process's answer (status, JSON); 503 with the reason if it does not answer.

        Every request carries the token of the history process's current start (401 without it).
        """
        try:
            answer = await http.request(
                method, history.url + path, content=body, headers=history.headers, timeout=within_s
            )
        except httpx.TransportError as exc:
            return 503, {"error": f"the history process (ClickHouse) does not answer: {exc!r}"}
        try:
            return answer.status_code, answer.json()
        except ValueError:
            return 502, {"error": f"the history process answered {answer.status_code}: {answer.text[:300]}"}

    @app.timer(1.0)
    async def watch_history() -> None:
        """The sink resumes from its committed offsets: a history process that died is restarted."""
        if history.exitcode is not None:
            log.error("the history process exited (%s); restarting it", history.exitcode)
            try:
                await asyncio.to_thread(history.start)
            except SpendstreamError as exc:
                log.error("%s; retrying in 1 s", exc)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            status, body = await from_history("GET", "/health", within_s=5)
            return self.json(
                {
                    "status": "ok" if status == 200 else "degraded",
                    "sink_rows_written": body.get("sink_rows_written"),
                    "history_pid": body.get("pid"),
                    "budgets": len(budget_feed.specs),
                    "price_cards": len(cat),
                    "catalogue_version": cat.version,
                    "feeds_caught_up": price_feed.caught_up.is_set() and budget_feed.caught_up.is_set(),
                    "events": {k.split("|", 1)[1]: v for k, v in metrics.items() if k.startswith("events|")},
                    **({"history": body["error"]} if status != 200 else {}),
                }
            )

    @app.page("/budgets")
    class Budgets(View):
        """Every budget with its current window, spend and state (scopes owned by this worker)."""

        async def get(self, request: Request) -> Response:
            now = _now_us()
            rows = []
            for scope, spec in sorted(budget_feed.specs.items()):
                state = scopes.get(scope) or new_state()
                for lim in spec.limits:
                    win = lim.current(now)
                    if lim.rolling_minutes is None:
                        spend = state["w"].get(win.id, 0)
                    else:
                        spend = sum(v for k, v in state["m"].items() if int(k) >= win.start_us // MINUTE_US)
                    rows.append(
                        {
                            "scope": scope,
                            "window": win.id,
                            "window_end": win.end_us,
                            "mode": lim.mode,
                            "spend_usd": str(Decimal(spend).scaleb(-12)),
                            "limit_usd": str(Decimal(lim.limit_pico).scaleb(-12)),
                            "percent": round(spend * 100 / lim.limit_pico, 1),
                            "state": state["sig"][0],
                            "reason": state["sig"][1],
                            "late_usd": str(Decimal(sum(state["late"].values())).scaleb(-12)),
                        }
                    )
                if not spec.limits:
                    rows.append(
                        {
                            "scope": scope,
                            "window": "",
                            "window_end": 0,
                            "mode": "",
                            "spend_usd": "",
                            "limit_usd": "",
                            "percent": 0,
                            "state": state["sig"][0],
                            "reason": state["sig"][1],
                            "late_usd": "0",
                        }
                    )
            return self.json({"budgets": rows})

    def forwarded(path: str) -> type[View]:
        class Forward(View):
            """Answered by the history process, which owns ClickHouse (stream_processors/history.py)."""

            async def post(self, request: Request) -> Response:
                status, body = await from_history("POST", path, await request.read())
                return self.json(body, status=status)

        return Forward

    for path in ("/sql", "/reprice", "/flush"):
        app.page(path)(forwarded(path))

    @app.page("/metrics")
    class Metrics(View):
        """Prometheus text format."""

        async def get(self, request: Request) -> Response:
            _, history_health = await from_history("GET", "/health", within_s=5)
            names = {
                "events": ("spendstream_events_total", "pricing_status"),
                "dead_letters": ("spendstream_dead_letters_total", "reason"),
                "signals": ("spendstream_signals_total", "state"),
                "deltas": ("spendstream_spend_deltas_total", "kind"),
                "late_pico_usd": ("spendstream_late_spend_pico_usd_total", "kind"),
                "rebalance": ("spendstream_rebalance_rereads_total", "kind"),
                "unbudgeted": ("spendstream_unbudgeted_events_total", "reason"),
                "control_rejected": ("spendstream_control_rejected_total", "reason"),
            }
            lines = []
            for prefix, (metric, label) in names.items():
                lines.append(f"# TYPE {metric} counter")
                lines += [
                    f'{metric}{{{label}="{k.split("|", 1)[1]}"}} {v}'
                    for k, v in sorted(metrics.items())
                    if k.startswith(f"{prefix}|")
                ]
            lines += [
                "# TYPE spendstream_gc_pause_seconds_total counter",
                *(
                    f'spendstream_gc_pause_seconds_total{{generation="{g}"}} {secs:.6f}'
                    for g, secs in enumerate(gc_pauses.seconds)
                ),
                "# TYPE spendstream_sink_rows_written_total counter",
                f"spendstream_sink_rows_written_total {history_health.get('sink_rows_written', 'NaN')}",
                "# TYPE spendstream_price_cards gauge",
                f"spendstream_price_cards {len(cat)}",
            ]
            return self.text("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")

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
