"""Rate limits and response cache of the gateway: what they cost per request, and how far a fleet of
gateway instances can exceed a shared limit.

    .venv/bin/python -m bench.gateway_limits [--rounds 3] [--seconds 25] [--bootstrap HOST:PORT]

Measured in one run (see bench/README.md):

1. `FleetLimiter.admit()` per call (a key rule and a project rule, requests and tokens), against
   the naive limiter (a fixed-window counter in a dict: the baseline).
2. Cache get/put per call, a 2 KB answer: `MemoryCache` against a plain dict (baseline), and
   `RedisCache` against raw redis-py GET/SET of the same bytes on the same local redis-server.
3. Over-admission: 3 gateway processes (one FleetLimiter each, on the bench broker) hammer one key
   (~500 tries/s each, starting at the same instant on a fresh key) under a limit of 60 per 10 s
   window (the window shortened from 60 s so a run takes seconds); reported: the most admitted in
   any 10 s window (sliding, over every admission of the 3 processes), per round and sync
   interval, and the sync lag (send to read back) the instances saw. `--bootstrap`: use that
   broker instead of starting the bench broker (e.g. when another checkout's bench holds its port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from aiokafka.admin import AIOKafkaAdminClient

from bench._common import BENCH_HOME, BOOTSTRAP, bench_broker, new_run_id, say, write_result
from gateway.cache import CachedResponse, MemoryCache, RedisCache, cache_key, encode_response
from gateway.limits import FleetLimiter, Rule
from spendstream.topics import Topics, ensure_topics

REDIS_PORT = 19395
WINDOW_S, LIMIT, INSTANCES = 10.0, 60, 3


def per_call_us(fn: Any, n: int) -> float:
    started = time.perf_counter_ns()
    for i in range(n):
        fn(i)
    return (time.perf_counter_ns() - started) / n / 1000


async def per_call_async_us(fn: Any, n: int) -> float:
    started = time.perf_counter_ns()
    for i in range(n):
        await fn(i)
    return (time.perf_counter_ns() - started) / n / 1000


def admission(n: int = 200_000) -> dict[str, float]:
    limiter = FleetLimiter(bootstrap_servers=BOOTSTRAP, topic="unused", instance_id="bench")
    keys = [f"key:k{i}" for i in range(1000)]
    rules = [[Rule(k, rpm=10**9, tpm=10**12), Rule("project:p", rpm=10**9, tpm=10**12)] for k in keys]
    naive: dict[tuple[str, int], int] = {}

    def fixed_window(i: int) -> bool:
        minute = int(time.time() // 60)
        ok = True
        for rule in rules[i % 1000]:
            slot = (rule.scope, minute)
            ok &= naive.get(slot, 0) < (rule.rpm or 0)
        if ok:
            for rule in rules[i % 1000]:
                slot = (rule.scope, minute)
                naive[slot] = naive.get(slot, 0) + 1
        return ok

    baseline = min(per_call_us(fixed_window, n) for _ in range(3))
    ours = min(per_call_us(lambda i: limiter.admit(rules[i % 1000], 500), n) for _ in range(3))
    return {"fixed_window_dict_us": baseline, "fleet_limiter_admit_us": ours, "ratio": ours / baseline}


def answer() -> CachedResponse:
    return CachedResponse(
        200, "application/json", b"x" * 2048, None, [{"model": "gpt-4o-mini", "input_tokens": 9}]
    )


async def cache_costs(url: str, n: int = 20_000) -> dict[str, float]:
    value = answer()
    keys = [cache_key("p", "/v1/chat/completions", f'{{"i":{i}}}'.encode()) for i in range(1000)]
    plain: dict[str, CachedResponse] = {}

    async def dict_put(i: int) -> None:
        plain[keys[i % 1000]] = value

    async def dict_get(i: int) -> None:
        plain.get(keys[i % 1000])

    memory = MemoryCache()
    shared = RedisCache(url)
    raw = redis.Redis.from_url(url)
    data = encode_response(value)

    async def raw_put(i: int) -> None:
        await raw.set(f"raw:{keys[i % 1000]}", data, ex=60)

    async def raw_get(i: int) -> None:
        await raw.get(f"raw:{keys[i % 1000]}")

    result = {
        "dict_put_us": await per_call_async_us(dict_put, n * 10),
        "dict_get_us": await per_call_async_us(dict_get, n * 10),
        "memory_put_us": await per_call_async_us(lambda i: memory.put(keys[i % 1000], value, 60), n * 10),
        "memory_get_us": await per_call_async_us(lambda i: memory.get(keys[i % 1000]), n * 10),
        "raw_redis_set_us": await per_call_async_us(raw_put, n),
        "raw_redis_get_us": await per_call_async_us(raw_get, n),
        "redis_put_us": await per_call_async_us(lambda i: shared.put(keys[i % 1000], value, 60), n),
        "redis_get_us": await per_call_async_us(lambda i: shared.get(keys[i % 1000]), n),
    }
    assert (memory.stats()["hits"], shared.stats()["hits"]) == (n * 10, n)
    await shared.close()
    await raw.aclose()
    return result


def instance(
    bootstrap: str, topic: str, index: int, sync_s: float, start_at: float, seconds: float
) -> dict[str, Any]:
    """One gateway process: its FleetLimiter hammered from `start_at` (wall clock) for `seconds`."""

    async def run() -> dict[str, Any]:
        limiter = FleetLimiter(
            bootstrap_servers=bootstrap,
            topic=topic,
            instance_id=f"gw{index}",
            sync_interval_s=sync_s,
            window_s=WINDOW_S,
        )
        await limiter.start()
        rule = Rule("key:hot", rpm=LIMIT, tpm=None)
        rng = random.Random(index)
        await asyncio.sleep(max(start_at - time.time(), 0))
        peers = limiter.instances
        admitted: list[float] = []
        lags: list[float] = []
        last_lag_check = 0.0
        while (now := time.time()) < start_at + seconds:
            if limiter.admit([rule], 0, now=now)[0].allowed:
                admitted.append(now)
            if now - last_lag_check > 0.1:
                lags.append(limiter.stats.sync_lag_s)
                last_lag_check = now
            await asyncio.sleep(rng.uniform(0, 0.004))
        tried = limiter.stats.admitted + limiter.stats.refused
        await limiter.stop()
        return {"admitted": admitted, "tried": tried, "instances_seen": peers, "lags": lags}

    return asyncio.run(run())


def max_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while times[start] < t - window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


def over_admission(bootstrap: str, run_id: str, sync_s: float, seconds: float) -> dict[str, Any]:
    topics = Topics(f"{run_id}-{int(sync_s * 1000)}ms-{time.time_ns()}.")
    asyncio.run(ensure_topics(bootstrap, topics, 4))
    start_at = time.time() + 8  # every process started and in sync by then
    with multiprocessing.get_context("spawn").Pool(INSTANCES) as pool:
        results = pool.starmap(
            instance,
            [(bootstrap, topics.gateway_rates, i, sync_s, start_at, seconds) for i in range(INSTANCES)],
        )
    everything = [t for r in results for t in r["admitted"]]
    lags = sorted(lag for r in results for lag in r["lags"] if lag > 0)
    return {
        "sync_interval_ms": sync_s * 1000,
        "tried": sum(r["tried"] for r in results),
        "admitted": len(everything),
        "per_instance": [len(r["admitted"]) for r in results],
        "instances_seen": [r["instances_seen"] for r in results],
        "most_in_any_window": max_in_any_window(everything, WINDOW_S),
        "sync_lag_ms_p50": round(lags[len(lags) // 2] * 1000, 1) if lags else None,
        "sync_lag_ms_p99": round(lags[int(len(lags) * 0.99)] * 1000, 1) if lags else None,
    }


@contextlib.contextmanager
def broker(bootstrap: str | None, run_id: str) -> Iterator[str]:
    """The bench broker, or the given one (the run's topics deleted at the end either way)."""
    if bootstrap is None:
        with bench_broker(run_id):
            yield BOOTSTRAP
        return
    try:
        yield bootstrap
    finally:
        asyncio.run(delete_topics_at(bootstrap, run_id))


async def delete_topics_at(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([t for t in await admin.list_topics() if t.startswith(prefix)])
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds at the default 50 ms sync interval")
    parser.add_argument("--seconds", type=float, default=25.0, help="hammering per round (windows of 10 s)")
    parser.add_argument("--bootstrap", help="a running broker to use instead of the bench broker")
    args = parser.parse_args()
    run_id = new_run_id("gateway-limits")

    say("admit(): a key rule and a project rule, requests and tokens, 1000 keys ...")
    admit = admission()
    say(
        f"  fixed-window dict counter (baseline) {admit['fixed_window_dict_us']:6.2f} us\n"
        f"  FleetLimiter.admit                   {admit['fleet_limiter_admit_us']:6.2f} us   {admit['ratio']:.1f}x"
    )

    log = Path(BENCH_HOME) / "redis.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(REDIS_PORT),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        time.sleep(0.5)
        cache = asyncio.run(cache_costs(f"redis://127.0.0.1:{REDIS_PORT}/0"))
    finally:
        server.kill()
        server.wait()
    say(
        "cache, a 2 KB answer (get = hit):\n"
        f"  dict          put {cache['dict_put_us']:6.2f} us  get {cache['dict_get_us']:6.2f} us (baseline)\n"
        f"  MemoryCache   put {cache['memory_put_us']:6.2f} us  get {cache['memory_get_us']:6.2f} us\n"
        f"  raw redis-py  SET {cache['raw_redis_set_us']:6.1f} us  GET {cache['raw_redis_get_us']:6.1f} us (baseline)\n"
        f"  RedisCache    put {cache['redis_put_us']:6.1f} us  get {cache['redis_get_us']:6.1f} us   "
        f"{cache['redis_put_us'] / cache['raw_redis_set_us']:.2f}x / {cache['redis_get_us'] / cache['raw_redis_get_us']:.2f}x"
    )

    rounds: list[dict[str, Any]] = []
    with broker(args.bootstrap, run_id) as bootstrap:
        for sync_s in [0.05] * args.rounds + [0.01, 0.2]:
            r = over_admission(bootstrap, run_id, sync_s, args.seconds)
            rounds.append(r)
            say(
                f"3 processes, {LIMIT} per {WINDOW_S:.0f} s, sync {r['sync_interval_ms']:.0f} ms: tried {r['tried']:,}, "
                f"admitted {r['admitted']} {r['per_instance']}, most in any window {r['most_in_any_window']} "
                f"(+{r['most_in_any_window'] - LIMIT}, {r['most_in_any_window'] / LIMIT:.3f}x the limit), "
                f"sync lag p50 {r['sync_lag_ms_p50']} ms p99 {r['sync_lag_ms_p99']} ms, instances seen {r['instances_seen']}"
            )
    path = write_result("gateway_limits", {"admit": admit, "cache": cache, "over_admission": rounds})
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
