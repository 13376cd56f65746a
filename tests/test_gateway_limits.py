"""Fleet-wide rate limits (gateway/limits.py): the window arithmetic on one instance, the headers,
and on the real broker: three instances holding one limit together, and a broker outage."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.limits import FleetLimiter, Rule, Verdict, go_duration, rate_headers
from spendstream.cli.kafka_local import LocalKafka
from spendstream.topics import Topics, ensure_topics
from tests.conftest import own_broker


def local(window_s: float = 60.0) -> FleetLimiter:
    """A limiter that is never started: one instance on its own (healthy False, per-instance limits)."""
    return FleetLimiter(
        bootstrap_servers="127.0.0.1:1", topic="unused", instance_id="solo", window_s=window_s
    )


KEY = Rule("key:k1", rpm=3, tpm=None)


def test_a_request_counts_for_the_window_plus_at_most_one_bucket() -> None:
    limiter = local()
    assert [v.allowed for t in (1000.2, 1000.5, 1010.0) for v in limiter.admit([KEY], 0, now=t)] == [True] * 3
    [refused] = limiter.admit([KEY], 0, now=1020.0)
    # bucket 1000 (two requests) leaves the window at 1061: then one request fits
    assert refused == Verdict(False, "key:k1", "requests", 3, 0, reset_s=51.0, retry_after_s=41.0)
    assert not limiter.admit([KEY], 0, now=1060.99)[0].allowed  # 60.79 s after 1000.2: still counted
    [allowed] = limiter.admit([KEY], 0, now=1061.0)
    assert allowed == Verdict(True, "key:k1", "requests", 3, 1, reset_s=61.0, retry_after_s=0.0)
    assert limiter.count("key:k1", "requests", now=1061.0) == 2
    assert (limiter.stats.admitted, limiter.stats.refused) == (4, 2)


def test_tokens_a_refusal_counts_nothing_and_corrections_count() -> None:
    limiter = local()
    key, project = Rule("key:k1", rpm=10, tpm=100), Rule("project:p", rpm=None, tpm=1000)
    assert all(v.allowed for v in limiter.admit([key, project], 60, now=500.0))
    verdicts = limiter.admit([key, project], 50, now=501.0)
    assert [(v.scope, v.what, v.allowed, v.remaining) for v in verdicts] == [
        ("key:k1", "requests", True, 8),
        ("key:k1", "tokens", False, 40),
        ("project:p", "tokens", True, 890),
    ]
    assert verdicts[1].retry_after_s == 60.0  # the 60 tokens of bucket 500 leave at 561
    # refused: neither scope counted the request nor its tokens
    assert limiter.count("key:k1", "requests", now=501.0) == 1
    assert limiter.count("project:p", "tokens", now=501.0) == 60
    # the call used 30 tokens, not the estimated 60: taken from its own bucket
    limiter.record_tokens(["key:k1", "project:p"], -30, now=502.0, admitted_at=500.0)
    assert limiter.count("key:k1", "tokens", now=502.0) == 30
    assert limiter.admit([key, project], 50, now=503.0)[1].allowed
    limiter.record_tokens(["key:k1"], 15, now=504.0)  # used more than estimated: counted now
    assert limiter.count("key:k1", "tokens", now=504.0) == 95
    # without admitted_at: the oldest buckets first, never below zero, never more than is there
    limiter.record_tokens(["key:k1"], -500, now=505.0)
    assert limiter.count("key:k1", "tokens", now=505.0) == 0
    # a correction for an admission that has left the window takes nothing from newer ones
    limiter.admit([key], 40, now=530.0)
    limiter.record_tokens(["key:k1"], -40, now=580.0, admitted_at=503.0)
    assert limiter.count("key:k1", "tokens", now=580.0) == 40


def test_a_request_larger_than_the_limit_never_fits() -> None:
    limiter = local()
    [requests, tokens] = limiter.admit([Rule("key:k1", rpm=5, tpm=100)], 101, now=10.0)
    assert (requests.allowed, tokens.allowed) == (True, False)
    assert (tokens.limit, tokens.remaining, tokens.retry_after_s) == (100, 100, 60.0)
    assert limiter.count("key:k1", "requests", now=10.0) == 0


@settings(max_examples=300, deadline=None)
@given(
    window_s=st.sampled_from([60.0, 10.0]),
    rpm=st.integers(1, 20),
    tpm=st.integers(1, 2000),
    calls=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 400)), min_size=1, max_size=300),
)
def test_one_instance_never_admits_more_than_the_limit_in_any_window(
    window_s: float, rpm: int, tpm: int, calls: list[tuple[int, int]]
) -> None:
    """Calls arrive `gap` ms apart with `tokens` each; in every closed window of window_s seconds
    ending at an admission, admitted requests <= rpm and admitted tokens <= tpm."""
    limiter = local(window_s)
    rule = Rule("key:k", rpm=rpm, tpm=tpm)
    now_ms = 1_700_000_000_000
    admitted: list[tuple[int, int]] = []
    for gap, tokens in calls:
        now_ms += gap
        if all(v.allowed for v in limiter.admit([rule], tokens, now=now_ms / 1000)):
            admitted.append((now_ms, tokens))
    window_ms = int(window_s * 1000)
    for end, _ in admitted:
        inside = [t for at, t in admitted if end - window_ms <= at <= end]
        assert len(inside) <= rpm
        assert sum(inside) <= tpm


def verdict(
    what: str, allowed: bool, limit: int, remaining: int, reset_s: float, retry: float = 0.0
) -> Verdict:
    return Verdict(allowed, "key:k", what, limit, remaining, reset_s, retry)  # type: ignore[arg-type]


def test_headers_come_from_the_tightest_verdict_of_each_kind() -> None:
    verdicts = [
        verdict("requests", True, 60, 59, 60.0),
        verdict("tokens", True, 150_000, 149_000, 59.5),
        replace(verdict("requests", True, 1000, 12, 6.0), scope="project:p"),
        replace(verdict("tokens", True, 10_000_000, 9_000_000, 360.0), scope="project:p"),
    ]
    assert rate_headers(verdicts) == {
        "x-ratelimit-limit-requests": "1000",
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149000",
        "x-ratelimit-reset-tokens": "59.5s",
    }
    refused = [verdict("requests", False, 60, 0, 41.0, 40.2), verdict("tokens", True, 100, 1, 0.12)]
    assert rate_headers(refused) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "41s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "1",
        "x-ratelimit-reset-tokens": "120ms",
        "retry-after": "41",
        "retry-after-ms": "40200",
    }
    assert rate_headers([verdict("tokens", False, 10, 0, 0.0, 0.1)])["retry-after"] == "1"
    assert rate_headers([]) == {}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (59.5, "59.5s"),
        (360, "6m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_durations_are_written_the_way_openai_writes_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


# -- on the real broker ---------------------------------------------------------------------------
def fresh_rates_topic(bootstrap: str) -> str:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics, 4))
    return topics.gateway_rates


def max_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while times[start] < t - window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


async def hammer(limiters: list[FleetLimiter], rule: Rule, seconds: float) -> list[list[float]]:
    """Every instance tries the rule ~500 times a second (random gaps of 0-4 ms) for `seconds`;
    returns the admission times of each instance."""
    admitted: list[list[float]] = [[] for _ in limiters]
    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            now = time.time()
            if limiters[i].admit([rule], 0, now=now)[0].allowed:
                admitted[i].append(now)
            await asyncio.sleep(rng.uniform(0, 0.004))

    await asyncio.gather(*(one(i) for i in range(len(limiters))))
    return admitted


def test_three_instances_hold_a_60_per_window_limit_together(kafka: str) -> None:
    """3 instances hammered at once (a burst on a fresh key, then ~500 tries/s each) under a limit of
    60 per 10 s window for 2.5 windows: in no 10 s window does the fleet admit more than 60 + 2
    (the design's race bound: n - 1 single requests at the tail), and it is not starved either."""
    topic = fresh_rates_topic(kafka)
    window_s, limit, instances = 10.0, 60, 3

    async def run() -> tuple[list[list[float]], list[FleetLimiter]]:
        limiters = [
            FleetLimiter(bootstrap_servers=kafka, topic=topic, instance_id=f"gw{i}", window_s=window_s)
            for i in range(instances)
        ]
        await asyncio.gather(*(limiter.start() for limiter in limiters))
        try:
            await asyncio.sleep(0.5)  # every instance hears the others' heartbeats
            assert [(lim.healthy, lim.instances) for lim in limiters] == [(True, 3)] * 3
            return await hammer(limiters, Rule("key:hot", rpm=limit, tpm=None), 2.5 * window_s), limiters
        finally:
            await asyncio.gather(*(limiter.stop() for limiter in limiters))

    admitted, limiters = asyncio.run(run())
    everything = [t for times in admitted for t in times]
    most = max_in_any_window(everything, window_s)
    tried = sum(lim.stats.admitted + lim.stats.refused for lim in limiters)
    lag = max(lim.stats.sync_lag_max_s for lim in limiters)
    print(
        f"3 instances, {limit} per {window_s:.0f} s: tried {tried:,}, admitted {len(everything)} "
        f"(per instance {[len(a) for a in admitted]}), most in any window {most} (+{most - limit}), "
        f"sync lag max {lag * 1000:.0f} ms"
    )
    assert most <= limit + instances - 1
    assert len(everything) >= 2 * limit  # the windows at 0 s, ~10 s and ~20 s each let in ~60


def test_a_stopping_instance_publishes_what_it_admitted_since_its_last_sync(kafka: str) -> None:
    """A syncs every 2 s: 3 admitted just after a sync and A stopped at once still reach B."""
    topic = fresh_rates_topic(kafka)

    async def run() -> int:
        a, b = (
            FleetLimiter(
                bootstrap_servers=kafka,
                topic=topic,
                instance_id=name,
                sync_interval_s=sync_s,
                health_timeout_s=10,
            )
            for name, sync_s in (("a", 2.0), ("b", 0.05))
        )
        rule = Rule("key:k1", rpm=100, tpm=None)
        await asyncio.gather(a.start(), b.start())
        try:
            assert all(a.admit([rule], 0)[0].allowed for _ in range(3))
            await a.stop()
            await until(lambda: b.count("key:k1", "requests") == 3, 5, "B sees A's 3")
            return b.count("key:k1", "requests")
        finally:
            await asyncio.gather(a.stop(), b.stop())

    assert asyncio.run(run()) == 3


def test_increments_are_written_to_every_in_sync_replica(kafka: str) -> None:
    """The fleet's increments go out with acks=all and idempotence: one the leader alone held
    could be lost in a failover and then confirmed by the peers' acknowledgement of a later one."""
    topic = fresh_rates_topic(kafka)

    async def run() -> tuple[int, bool]:
        limiter = FleetLimiter(bootstrap_servers=kafka, topic=topic, instance_id="acks")
        await limiter.start()
        try:
            producer = limiter._producer
            assert producer is not None
            return producer._sender._acks, producer._txn_manager is not None
        finally:
            await limiter.stop()

    assert asyncio.run(run()) == (-1, True)


def test_a_producer_stuck_after_an_outage_is_replaced(kafka: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a broker outage an idempotent producer's sends can fail for good while the broker is
    back (OutOfOrderSequenceNumber: seen in CI, the gateway stayed degraded). Here A's first
    producer fails every send from a moment on, with 7 admissions pending: A discards it and
    connects a new one, turns healthy again within 5 s, and B ends with A's 3 + 7 admissions."""
    topic = fresh_rates_topic(kafka)
    rule = Rule("key:k", rpm=1_000, tpm=None)
    made: list[AIOKafkaProducer] = []  # A's producers
    stuck = asyncio.Event()

    class Producer(AIOKafkaProducer):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if kwargs["client_id"] == "spendstream-limits-a":
                made.append(self)

        async def send_and_wait(self, *args: Any, **kwargs: Any) -> Any:
            if made and self is made[0] and stuck.is_set():
                raise OutOfOrderSequenceNumber()
            return await super().send_and_wait(*args, **kwargs)

    monkeypatch.setattr("gateway.limits.AIOKafkaProducer", Producer)

    async def run() -> tuple[int, int, int]:
        a, b = (
            FleetLimiter(bootstrap_servers=kafka, topic=topic, instance_id=name, health_timeout_s=1.0)
            for name in ("a", "b")
        )
        await asyncio.gather(a.start(), b.start())
        try:
            assert sum(a.admit([rule], 0)[0].allowed for _ in range(3)) == 3
            await until(lambda: b.count("key:k", "requests") == 3, 5, "B sees A's first 3")
            stuck.set()
            assert sum(a.admit([rule], 0)[0].allowed for _ in range(7)) == 7
            await until(lambda: a.stats.send_failures > 0, 5, "A's send fails")
            await until(lambda: a.healthy, 5, "A healthy again")
            await until(lambda: b.count("key:k", "requests") == 10, 5, "B sees all 10")
            return len(made), a.count("key:k", "requests"), b.count("key:k", "requests")
        finally:
            await asyncio.gather(a.stop(), b.stop())

    producers, on_a, on_b = asyncio.run(run())
    assert producers == 2  # the stuck one and its replacement
    assert (on_a, on_b) == (10, 10)


def test_token_corrections_reach_the_other_instances(kafka: str) -> None:
    """A admits a call estimated at 500 tokens and corrects it to 200 (real) and, for another call,
    to 900: B ends with A's real 1,100 tokens, the first correction taken from its admission's bucket."""
    topic = fresh_rates_topic(kafka)
    rule = Rule("project:p", rpm=None, tpm=10_000)

    async def run() -> tuple[int, int]:
        a, b = (FleetLimiter(bootstrap_servers=kafka, topic=topic, instance_id=name) for name in ("a", "b"))
        await asyncio.gather(a.start(), b.start())
        try:
            first = time.time()
            assert a.admit([rule], 500, now=first)[0].allowed
            assert a.admit([rule], 500)[0].allowed
            a.record_tokens(["project:p"], 200 - 500, admitted_at=first)
            a.record_tokens(["project:p"], 900 - 500)
            await until(lambda: b.count("project:p", "tokens") == 1_100, 5, "B counts A's real tokens")
            return a.count("project:p", "tokens"), b.count("project:p", "tokens")
        finally:
            await asyncio.gather(a.stop(), b.stop())

    assert asyncio.run(run()) == (1_100, 1_100)


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    """A broker this module may stop and start (data kept across the restart)."""
    with own_broker("kafka-rates-outage", 310) as own:  # +300 would be the bench broker's port
        yield own


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)


def test_an_outage_degrades_to_per_instance_limits_and_recovers(broker: LocalKafka) -> None:
    """Limit 10 per window. 4 admitted on A before the outage, seen by B. Broker stopped: both turn
    unhealthy and each admits up to the limit as it knows it (A 6 more, B 6 more: 16 in the fleet).
    Broker started: both turn healthy again, each learns the other's outage admissions (16 on both)
    and refuses."""
    topic = fresh_rates_topic(broker.bootstrap)
    rule = Rule("key:k", rpm=10, tpm=None)

    def take_all(limiter: FleetLimiter) -> int:
        n = 0
        while limiter.admit([rule], 0)[0].allowed:
            n += 1
        return n

    async def run() -> None:
        a, b = (
            FleetLimiter(
                bootstrap_servers=broker.bootstrap,
                topic=topic,
                instance_id=name,
                window_s=600,
                health_timeout_s=1.0,
            )
            for name in ("a", "b")
        )
        await asyncio.gather(a.start(), b.start())
        try:
            assert (a.healthy, b.healthy) == (True, True)
            assert sum(a.admit([rule], 0)[0].allowed for _ in range(4)) == 4
            await until(lambda: b.count("key:k", "requests") == 4, 5, "B sees A's 4")
            await asyncio.to_thread(broker.stop)
            await until(lambda: not a.healthy and not b.healthy, 10, "both unhealthy")
            assert (a.instances, b.instances) == (1, 1)
            assert (take_all(a), take_all(b)) == (6, 6)
            await asyncio.to_thread(broker.start, 180)
            await until(lambda: a.healthy and b.healthy, 60, "both healthy again")
            await until(
                lambda: a.count("key:k", "requests") == b.count("key:k", "requests") == 16, 10, "16 on both"
            )
            assert (take_all(a), take_all(b)) == (0, 0)
            print(f"outage: A and B each admitted 6 alone; after recovery both count 16; {a.stats} {b.stats}")
        finally:
            await asyncio.gather(a.stop(), b.stop())

    asyncio.run(run())
