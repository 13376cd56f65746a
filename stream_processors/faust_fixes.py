"""Workarounds for faust-streaming 0.15 behaviour that costs latency or loses records.

They patch Faust's internals (there is no public API for any of this): re-check them on every
faust-streaming upgrade. `create_app` installs them; docs/architecture.md says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any

import faust
from aiokafka.errors import IllegalStateError

from spendstream.errors import ConfigError

__all__ = [
    "CHECKED_VERSIONS",
    "ack_only_what_this_generation_handled",
    "all_acknowledged",
    "check_internals",
    "check_partitions_once_known",
    "commit_only_what_is_delivered",
    "hold_flow_while_seeking",
    "partitions_in_flight",
    "reread_undelivered",
    "short_fetch_wait",
]

log = logging.getLogger(__name__)


# The versions these workarounds were written and tested against (constraints.txt pins them).
CHECKED_VERSIONS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}


def _patched_names() -> list[tuple[str, Callable[[], bool]]]:
    """Every private name (and public one whose behaviour is relied on) the workarounds touch,
    with a check that it is still there: a method on its class, or an attribute its __init__ sets."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.consumer.fetcher import Fetcher
    from faust.assignor import PartitionAssignor
    from faust.stores.memory import Store as MemoryStore
    from faust.tables.base import Collection
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducerDriver
    from faust.transport.producer import ProducerBuffer
    from faust.types import tuples

    def sets(cls: type, attribute: str, method: str = "__init__") -> Callable[[], bool]:
        return lambda: f"self.{attribute} =" in inspect.getsource(getattr(cls, method))

    def has(owner: Any, name: str) -> Callable[[], bool]:
        return lambda: hasattr(owner, name)

    return [
        ("faust Consumer.ack", has(Consumer, "ack")),
        ("faust Consumer.perform_seek", has(Consumer, "perform_seek")),
        ("faust Consumer.stop_flow", has(Consumer, "stop_flow")),
        ("faust Consumer._unacked_messages", sets(Consumer, "_unacked_messages")),
        ("faust Consumer._read_offset", sets(Consumer, "_read_offset")),
        ("faust Consumer._acked", sets(Consumer, "_acked")),
        ("faust types.tuples.ack_lock", has(tuples, "ack_lock")),
        (
            "faust AIOKafkaConsumerThread._create_worker_consumer",
            has(AIOKafkaConsumerThread, "_create_worker_consumer"),
        ),
        ("faust AIOKafkaConsumerThread._ensure_consumer", has(AIOKafkaConsumerThread, "_ensure_consumer")),
        ("faust AIOKafkaConsumerThread.call_thread", has(AIOKafkaConsumerThread, "call_thread")),
        ("faust ProducerBuffer.flush_atmost", has(ProducerBuffer, "flush_atmost")),
        ("faust ProducerBuffer.size", has(ProducerBuffer, "size")),
        ("faust ProducerBuffer.max_messages", has(ProducerBuffer, "max_messages")),
        ("faust aiokafka Producer._ensure_producer", has(AIOKafkaProducerDriver, "_ensure_producer")),
        # stream_processors/restore.py: Faust's recovery resumes a table at its store's
        # persisted_offset, read as a partition is added; the store is made by _new_store.
        ("faust Collection._new_store", has(Collection, "_new_store")),
        (
            "faust Collection._verify_source_topic_partitions reads topic_partitions",
            lambda: (
                "topic_partitions(change_topic)"
                in inspect.getsource(_original(Collection._verify_source_topic_partitions))
            ),
        ),
        (
            "faust Recovery._add reads persisted_offset",
            lambda: "persisted_offset" in inspect.getsource(Recovery._add),
        ),
        (
            "faust memory Store._key_partition",
            lambda: "self._key_partition:" in inspect.getsource(MemoryStore.__post_init__),
        ),
        ("faust PartitionAssignor.assigned_actives", has(PartitionAssignor, "assigned_actives")),
        ("aiokafka AIOKafkaConsumer._fetch_max_wait_ms", sets(AIOKafkaConsumer, "_fetch_max_wait_ms")),
        ("aiokafka AIOKafkaConsumer._fetcher", sets(AIOKafkaConsumer, "_fetcher", "start")),
        ("aiokafka Fetcher._records", sets(Fetcher, "_records")),
    ]


def _original(method: Any) -> Any:
    """The library's own method behind a workaround's wrapper (what _patched_names checks)."""
    return getattr(method, "spendstream_original", method)


def check_internals() -> list[str]:
    """Refuse (ConfigError) when a name the workarounds patch is gone; return a warning line per
    library whose version was not checked with them (the worker logs those loudly)."""
    missing = []
    for name, present in _patched_names():
        try:
            found = present()
        except (OSError, TypeError, AttributeError):  # e.g. no source to read
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"faust-streaming/aiokafka internals that spendstream patches are missing: {', '.join(missing)}; "
            f"install the checked versions: pip install -c constraints.txt ({CHECKED_VERSIONS})"
        )
    warnings = []
    for package, checked in CHECKED_VERSIONS.items():
        installed = version(package)
        if installed != checked:
            warnings.append(
                f"{package} {installed} is installed; the worker's Faust workarounds were checked with "
                f"{checked} only (constraints.txt): records can be lost or stall across rebalances "
                "if its internals changed meaning"
            )
    return warnings


def commit_only_what_is_delivered(app: faust.App) -> None:
    """Make Faust's pre-commit flush a real one.

    Before committing input offsets Faust calls `producer.flush()`, but its buffer flush gives up
    after 0.1 s without progress, so a commit could overtake table changelog records still in the
    buffer, and a `kill -9` then loses spend. This flush hands every record buffered before the
    commit to Kafka and waits for the acknowledgements; only then are the offsets committed.
    """
    producer = app.producer
    flush_delivered = producer.flush

    async def flush() -> None:
        buffer = producer.buffer
        remaining = buffer.size
        while remaining > 0 and buffer.size:
            remaining -= await buffer.flush_atmost(remaining)
        await flush_delivered()

    producer.flush = flush  # type: ignore[method-assign]


async def changelog_ebb(app: faust.App, limit: int, poll: float = 0.002) -> None:
    """Wait until at most `limit` table changelog records are buffered.

    A table write buffers its changelog record for Faust's sender task, and Faust's own ebb (as
    each message is delivered) sends at most 100 of them and goes on. A `spend.deltas` message
    updates up to thousands of scopes, so under a backlog the buffer grew without bound (about
    950,000 records in bench/restart.py's load): every commit, which flushes it first, and a
    SIGTERM'd worker's stop (80 s) waited for all of it. The budget agent waits here after each
    message, so the backlog stays in Kafka, where a restart reads it again.

    It polls: Faust's own wait (`flush_atmost`) wakes its waiter once per record sent, which cost
    30 more CPU s in that load (255 against 225). A producer no longer running is not waited for:
    the app's stop flushes the buffer before it stops the producer (whose own stop cannot send
    what is left: Faust's `ProducerBuffer.on_stop` refuses to flush once stopping).
    """
    buffer = app.producer.buffer
    while buffer.size > limit and buffer.state == "running":  # noqa: ASYNC110 (an event would wake per record)
        await asyncio.sleep(poll)


def raise_faust_ebb(app: faust.App, records: int) -> None:
    """Faust's own ebb only past `records` buffered changelog records: changelog_ebb bounds the
    buffer, and Faust's, at 100, logged a warning and woke once per record sent for every message
    delivered while a budget message's records went out."""
    app.producer.buffer.max_messages = records


def ack_only_what_this_generation_handled() -> None:
    """Keep Faust from committing past records it skipped across a rebalance.

    A record fetched before a rebalance and reaching its stream after it is skipped (its
    generation is stale, or flow is stopped) and then acknowledged like a handled one, so the
    next commit moved past records the meter never priced: after a `kill -9` and restart (the
    dead member's session expiring is a second rebalance) about one run in ten lost a few hundred
    events, silently. Such a record is now released without counting as acknowledged: the
    committed offset stays before it, and `reread_undelivered` reads it again. A record handled
    just before the rebalance may so be handled twice, which the spend tables (source offsets,
    in offset order) and ClickHouse (`event_id`) absorb.

    A record acknowledged but not counted by Faust (its offset was acknowledged before, as when
    a record is read twice) also leaves the in-flight set: Faust keeps it there for as long as
    anything references it, and the re-read check waits on in-flight records.
    """
    from faust.transport.consumer import Consumer
    from faust.types.tuples import ack_lock

    ack = Consumer.ack
    if getattr(ack, "spendstream_generation_guard", False):
        return

    def ack_current(self: Consumer, message: Any) -> bool:
        app = self.app
        generation = getattr(message, "generation_id", None)
        if (generation is not None and generation != app.consumer_generation_id) or not (
            app.flow_control.is_active()
        ):
            with ack_lock:
                message.acked = True
                self._unacked_messages.discard(message)
            return False
        counted = ack(self, message)
        if message.acked and not counted:
            # Acknowledged, not counted (its offset was acknowledged before, or is below the
            # committed one): Faust leaves such a message in its in-flight set for as long as
            # anything references it.
            with ack_lock:
                self._unacked_messages.discard(message)
        return counted

    ack_current.spendstream_generation_guard = True  # type: ignore[attr-defined]
    Consumer.ack = ack_current  # type: ignore[method-assign]


def hold_flow_while_seeking() -> None:
    """Stop the consumer's flow before Faust seeks the stream partitions to their committed offsets.

    At the end of recovery Faust seeks with flow already running and only then resumes flow,
    which clears the agents' queues (meant for records fetched before the rebalance). Records
    fetched after the seek were so queued, cleared, and never fetched again: the fetch position
    was past them. The records after them were handled, so the commit stalled before the cleared
    ones until `reread_undelivered` read them again, and the budget agent then skipped their spend
    (it skips offsets below the last one it applied). In 10 looped `kill -9` restarts the clear
    dropped 2 to 288 queued usage.raw records in 8, never fetched again in 4. With flow stopped,
    Faust delivers nothing from the seek until recovery resumes flow after clearing the queues
    (it does so right after the seek; the other caller, a fetch with flow stopped, has it stopped
    already), so what the clear drops is fetched again, in order.
    """
    from faust.transport.consumer import Consumer

    perform_seek = Consumer.perform_seek
    if getattr(perform_seek, "spendstream_hold_flow", False):
        return

    async def seek_held(self: Consumer) -> None:
        self.stop_flow()
        await perform_seek(self)

    seek_held.spendstream_hold_flow = True  # type: ignore[attr-defined]
    Consumer.perform_seek = seek_held  # type: ignore[method-assign]


def check_partitions_once_known() -> None:
    """Compare a table's changelog partitions with its source topic's only once the consumer knows
    the changelog's.

    A worker started on fresh topics can take its first record before its consumer's metadata has
    the changelog topic Faust has just created: Faust then counts 0 changelog partitions, raises
    PartitionsMismatch in the agent writing the table, and the agent crashes on that record again
    each time it is delivered. Seen once in ~15 runs of bench/enforcement.py (2026-12-02): the
    budget agent decided no budget for 270 s, until Faust's stream timeout rebalanced the worker.
    Faust already skips the check while the count is unknown (None); 0 is the same state, so the
    check is left for a later write, and a real mismatch (both counts known) still raises.
    """
    from faust.tables.base import Collection

    verify = Collection._verify_source_topic_partitions
    if getattr(verify, "spendstream_known_first", False):
        return

    def verify_once_known(self: Collection, source_topic: str) -> None:
        if self.app.consumer.topic_partitions(self.changelog_topic_name) == 0:
            return  # not in the consumer's metadata yet
        verify(self, source_topic)

    verify_once_known.spendstream_known_first = True  # type: ignore[attr-defined]
    verify_once_known.spendstream_original = verify  # type: ignore[attr-defined]
    Collection._verify_source_topic_partitions = verify_once_known  # type: ignore[method-assign]


def short_fetch_wait(max_wait_ms: int) -> None:
    """Cap how long the worker's consumer long-polls the broker (Faust hard-codes 1,500 ms).

    aiokafka keeps one fetch in flight per broker, and a fetch leaves out the partitions whose
    records are still buffered. So a fetch can go out holding only idle partitions (budgets, a
    quiet spend.deltas partition); the broker parks it for the whole wait, and records that
    arrive meanwhile on the busy partitions wait with it: under load the meter and the budget
    agent fell a steady 1-2 s behind, on a mostly idle CPU.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "spendstream_max_wait_ms", None) == max_wait_ms:
        return

    def create_worker_consumer(self: AIOKafkaConsumerThread, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms  # read by consumer.start() to build its Fetcher
        return consumer

    create_worker_consumer.spendstream_max_wait_ms = max_wait_ms  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


def all_acknowledged(acked: Iterable[int], committed: int, position: int) -> bool:
    """Whether every offset from `committed` up to the fetch position was acknowledged (handled):
    records waiting for a commit that is slow, not records Faust dropped."""
    return len({offset for offset in acked if committed <= offset < position}) == position - committed


def partitions_in_flight(unacked: Iterable[Any]) -> set[Any]:
    """The partitions with a record handed to a stream and not yet acknowledged.

    Faust's in-flight set (`Consumer._unacked_messages`) is a WeakSet that can still hold records
    already acknowledged: Faust leaves a record it does not count (its offset acknowledged
    before, or below the committed one) in it for as long as anything references the record,
    and the meter's agent holds its last batch until the next one comes. On a stalled partition
    no next batch comes, so that record would count as in flight forever.
    """
    return {m.tp for m in unacked if not m.acked}


def reread_undelivered(app: faust.App, inputs: tuple[str, ...], metrics: Counter[str]) -> None:
    """Install a 2-second timer that seeks a partition of `inputs` back to its committed offset
    when records between it and the fetch position were never delivered to an agent and nothing
    has moved for a whole tick.

    Across a rebalance Faust can drop fetched records (a batch cut short when flow stops, a
    partition inactive for a moment, a stale generation skipped) while the fetch position stays
    past them; its seek to the committed offsets after the rebalance can come before the drop
    (the case seen after `kill -9` + restart, now prevented by `hold_flow_while_seeking`). The
    partition then sits still, with no error. Only records not yet acknowledged count as in
    flight (see `partitions_in_flight`), and records all acknowledged but not yet committed (a
    commit slowed by a busy broker took 10-73 s under load) are left alone (`all_acknowledged`):
    taken for dropped ones, they were read and priced again, 31,500-250,000 events per bench run.

    Records read again after later ones were handled reach ClickHouse (deduplicated by
    `event_id`) but not the spend tables: the budget agent skips every source offset below the
    last one it applied. The warning says so.
    """
    progress: dict[Any, tuple[int, int, int | None]] = {}
    reread_from: dict[Any, int] = {}  # once per committed offset: a transaction marker is no record

    @app.timer(2.0)
    async def reread() -> None:
        consumer: Any = app.consumer  # faust-streaming internals: there is no public API for this
        if app.rebalancing or not app.flow_control.is_active():
            progress.clear()
            reread_from.clear()
            return
        thread = consumer._thread
        kafka = thread._ensure_consumer()
        buffered = kafka._fetcher._records
        in_flight = partitions_in_flight(consumer._unacked_messages)
        for tp in consumer.assignment():
            if tp.topic not in inputs:
                continue
            if tp in buffered or tp in in_flight:
                progress.pop(tp, None)
                continue
            try:
                position = await consumer.position(tp)
                committed = await thread.call_thread(kafka.committed, tp) or 0
            except IllegalStateError:  # revoked meanwhile (another worker joined or left): not ours
                progress.pop(tp, None)
                continue
            if position is None or position <= committed or reread_from.get(tp) == committed:
                progress.pop(tp, None)
                continue
            if all_acknowledged(consumer._acked.get(tp, ()), committed, position):
                progress.pop(tp, None)  # handled, only not committed yet (a slow commit): nothing dropped
                continue
            seen = (position, committed, consumer._read_offset.get(tp))
            if progress.get(tp) != seen:
                progress[tp] = seen  # look again next tick before acting
                continue
            log.warning(
                "%s[%d]: records %d..%d were fetched but never handled (dropped by Faust across a "
                "rebalance); reading them again (the spend of any read after later ones is skipped)",
                tp.topic,
                tp.partition,
                committed,
                position - 1,
            )
            metrics["rebalance|reread"] += 1
            progress.pop(tp, None)
            reread_from[tp] = committed
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile: its next owner reads it
                await consumer.seek(tp, committed)
