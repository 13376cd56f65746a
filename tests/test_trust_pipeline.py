"""Hostile and repeated input through the real worker: every event re-sent 1-3 times (also across
a worker restart and under the wrong key) moves budgets once; every poison kind interleaved with
valid events is dead-lettered alone while its neighbours are priced, stored and counted."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from producers import build_event
from spendstream.wire import default_codec
from stream_processors.feeds import publish
from tests.conftest import Worker, module_worker, restart_worker

pytestmark = pytest.mark.integration

CODEC = default_codec()
CENT_OF_OUTPUT = 1_000  # gpt-4o output tokens worth $0.01 ($10 per 1M)


def event(project: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "service": "trust",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 0,
        "output_tokens": CENT_OF_OUTPUT,
    }
    return build_event(project=project, **{**base, **kw})


def batch(events: list[dict[str, Any]]) -> bytes:
    return CODEC.encode("UsageBatch", {"events": events})


def send(kafka: str, worker: Worker, records: list[tuple[bytes | None, bytes | None]]) -> None:
    asyncio.run(publish(kafka, worker.topics.usage_raw, records))


def metric(worker: Worker, name: str, label: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=10).text
    found = [line for line in text.splitlines() if line.startswith(f"{name}{{") and f'"{label}"' in line]
    return int(found[0].split()[-1]) if found else 0


def spend(worker: Worker, scope: str) -> Decimal | None:
    """The scope's spend in today's window, from the worker's budget table (None: no budget yet)."""
    rows = httpx.get(f"http://127.0.0.1:{worker.port}/budgets", timeout=10).json()["budgets"]
    day = [Decimal(r["spend_usd"]) for r in rows if r["scope"] == scope and r["window"].startswith("day")]
    return day[0] if day else None


def wait_until(what: str, check: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


TRUST_BUDGETS = 'budgets:\n  project:dup1: {daily: "100000"}\n  project:poison: {daily: "100000"}\n'
worker = module_worker("trust", TRUST_BUDGETS)


def test_every_event_resent_1_to_3_times_moves_budgets_once(kafka: str, worker: Worker) -> None:
    """300 events ($3.00); then, after a worker restart, every one re-sent 1-3 more times: in
    other batches, alone, and under no key (the meter forwards it to its project's partition)."""
    events = [event("dup1") for _ in range(300)]
    send(kafka, worker, [(b"dup1", batch(events[i : i + 50])) for i in range(0, 300, 50)])
    wait_until("the first copies", lambda: spend(worker, "project:dup1") == Decimal("3"))
    restart_worker(worker)  # the copies meet a meter that re-loaded what it counted

    copies: list[tuple[bytes | None, bytes | None]] = []
    resent = 0
    for extra in (1, 2, 3):
        chosen = [e for i, e in enumerate(events) if i % 3 < extra]  # 300, 200, 100 events
        resent += len(chosen)
        copies += [(b"dup1", batch(chosen[i : i + 37])) for i in range(0, len(chosen), 37)]
    copies += [(b"dup1", CODEC.encode("UsageEvent", e)) for e in events[:20]]
    copies += [(None, CODEC.encode("UsageEvent", e)) for e in events[20:40]]  # re-keyed
    resent += 40
    send(kafka, worker, copies)

    wait_until(
        f"{resent} duplicates counted",
        lambda: metric(worker, "spendstream_events_total", "duplicate") >= resent,
    )
    time.sleep(1)
    duplicates = metric(worker, "spendstream_events_total", "duplicate")
    worker.flush()
    [[rows, total]] = worker.sql(
        "SELECT count(), sum(cost_usd) FROM usage_events FINAL WHERE project = 'dup1'"
    )
    found = (spend(worker, "project:dup1"), rows, Decimal(str(total)), duplicates)
    print(f"sent 300 events + {resent} copies; budget, ClickHouse rows, ClickHouse $, duplicates: {found}")
    assert found == (Decimal("3"), 300, Decimal("3"), resent)


def test_every_poison_kind_costs_only_itself(kafka: str, worker: Worker) -> None:
    """Each poison kind sits between valid events (in one batch where the bytes allow, else in a
    message of its own between valid messages): the valid ones are all priced, stored and counted."""
    now = datetime.now(UTC)
    poisons: dict[str, dict[str, Any]] = {
        "tokens_4e12": {"output_tokens": 4 * 10**12},
        "tokens_2_62": {"input_tokens": 2**62},
        "negative": {"output_tokens": -1},
        "audio_huge": {"audio_seconds": (10**13).to_bytes(8, "big")},  # 10^7 s
        "far_future": {"event_time": 2**62},
        "before_2015": {"event_time": 1_000},
        "huge_model": {"model": "m" * 5_000},
        "many_tags": {"tags": {f"k{i}": "v" for i in range(500)}},
        "bad_tier": {"service_tier": "platinum"},
        "reasoning_over_output": {"reasoning_tokens": CENT_OF_OUTPUT + 1},
    }
    records: list[tuple[bytes | None, bytes | None]] = []
    valid = 0
    for changes in poisons.values():
        good = [event("poison") for _ in range(3)]
        bad = {**event("poison"), **changes}
        records.append((b"poison", batch([good[0], bad, good[1]])))
        records.append((b"poison", batch([good[2]])))
        valid += 3
    whole_message_poisons = [
        b"\x00garbage",  # not Avro single-object
        batch([event("poison")])[:-7],  # truncated
        b"\xc3\x01" + bytes(8) + b"\x02",  # unknown schema fingerprint
        CODEC.encode(
            "DeadLetter",
            {
                "reason": "x",
                "detail": "",
                "source_topic": "t",
                "source_partition": 0,
                "source_offset": 0,
                "key": None,
                "payload": b"",
                "failed_at": 0,
            },
        ),
        None,  # a tombstone
    ]
    for poison in whole_message_poisons:
        records.append((b"poison", poison))
        records.append((b"poison", batch([event("poison")])))
        valid += 1
    old = event("poison", event_time=now - timedelta(days=3))  # older than the dedupe horizon
    records.append((b"poison", batch([old])))
    send(kafka, worker, records)

    expected_dead = len(poisons) + len(whole_message_poisons)
    wait_until(
        "every poison dead-lettered",
        lambda: (
            len(
                worker.wait_rows(
                    "SELECT reason FROM dead_letters FINAL WHERE key = 'poison'", expected_dead, 5
                )
            )
            >= expected_dead
        ),
    )
    wait_until(
        "every valid event priced", lambda: (spend(worker, "project:poison") or 0) >= Decimal(valid) / 100
    )
    [[rows, total]] = worker.wait_rows(
        "SELECT count(), sum(cost_usd) FROM usage_events FINAL WHERE project = 'poison' HAVING count() >= "
        f"{valid + 1}",
        1,
    )
    reasons = Counter(r[0] for r in worker.sql("SELECT reason FROM dead_letters FINAL WHERE key = 'poison'"))
    print(f"sent {valid} valid + 1 old + {expected_dead} poison; stored {rows}, dead letters {dict(reasons)}")
    assert reasons == {"invalid_event": len(poisons), "undecodable": 4, "wrong_schema": 1}
    assert (rows, Decimal(str(total))) == (valid + 1, Decimal(valid + 1) / 100)  # the old one is stored ...
    assert spend(worker, "project:poison") == Decimal(valid) / 100  # ... and moves no budget
    assert metric(worker, "spendstream_unbudgeted_events_total", "beyond_dedupe_horizon") == 1
    assert worker.health()["status"] == "ok"


def test_a_forged_priced_row_is_dead_lettered_by_the_sink_and_the_rest_is_stored(
    kafka: str, worker: Worker
) -> None:
    """Any Kafka client can write usage.priced: a row ClickHouse cannot hold must not stall the sink."""

    def priced(project: str, **changes: Any) -> dict[str, Any]:
        record = {
            "usage": event(project),
            "cost_pico_usd": 10**10,
            "price_card": "forged",
            "priced_at": time.time_ns() // 1000,
            "pricing_status": "priced",
            "card_version": "",
            "itemised": {},
            "unpriced_reason": "",
        }
        return {**record, **changes}

    good = [priced("forged"), priced("forged")]
    bad = [priced("forged", priced_at=2**62), priced("forged", cost_pico_usd=2**62)]
    value = CODEC.encode("PricedBatch", {"events": [good[0], *bad, good[1]]})
    asyncio.run(publish(kafka, worker.topics.usage_priced, [(b"forged", value)]))
    send(kafka, worker, [(b"poison", batch([event("poison")]))])  # and the sink carries on

    stored = worker.wait_rows("SELECT event_id FROM usage_events FINAL WHERE project = 'forged'", 2)
    dead = worker.wait_rows("SELECT detail FROM dead_letters FINAL WHERE reason = 'sink_invalid_row'", 2)
    print(f"sent 2 good + 2 bad priced rows; stored {len(stored)}, dead-lettered {len(dead)}")
    assert sorted(r[0] for r in stored) == sorted(str(p["usage"]["event_id"]) for p in good)
    assert sorted(str(r[0]).split(":", 1)[1].strip()[:11] for r in dead) == ["cost_pico_u", "priced_at 4"]
