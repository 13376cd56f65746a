"""Gateway keys benchmark: what N internal keys cost a gateway instance at start and per request.

    .venv/bin/python bench/keys.py [--keys N] [--bootstrap HOST:PORT]

Measured in one run (see bench/README.md):

1. Start: N signed `ApiKey` records on a fresh `gateway.keys` topic (4 partitions), read by
   `KeyStore.start()` with verify keys (decode + Ed25519 verify + bounds per record) and without
   (decode + bounds), against a raw `getmany` loop reading the same topic without decoding (the
   baseline). Reported: seconds of each and the ratios.
2. Memory: the bytes a KeyStore holding N keys keeps allocated (tracemalloc), per key.
3. `authenticate()`: ns per call for a known secret (SHA-256 + dict lookup + expiry check), against
   a bare `hashlib.sha256` + dict lookup (the baseline).

`--bootstrap` uses a running broker instead of starting the bench broker (the run's topics are
left on it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import time
import tracemalloc
from contextlib import nullcontext
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._common import bench_broker, new_run_id, say, write_result
from gateway.keys import KeyStore
from spendstream.api_keys import encode_key, mint_key
from spendstream.signing import Signer, public_key_b64
from spendstream.topics import Topics, ensure_topics, partitions_of


async def publish_keys(bootstrap: str, topic: str, n: int, signer: Signer) -> tuple[list[str], float]:
    now = time.time_ns() // 1000
    started = time.perf_counter()
    records = []
    secrets_ = []
    for i in range(n):
        key, secret = mint_key(project=f"p{i % 100}", team=f"t{i % 1000}", user=f"u{i}", rpm=600, now_us=now)
        records.append(encode_key(key, signer))
        if i % 1000 == 0:
            secrets_.append(secret)
    mint_sign_s = time.perf_counter() - started
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=k) for k, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return secrets_, mint_sign_s


async def raw_read(bootstrap: str, topic: str) -> tuple[int, float]:
    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        started = time.perf_counter()
        await consumer.seek_to_beginning()
        end = await consumer.end_offsets(tps)
        n = 0
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                n += len(messages)
        return n, time.perf_counter() - started
    finally:
        await consumer.stop()


async def store_start(bootstrap: str, topic: str, verify_keys: list[str]) -> tuple[KeyStore, float]:
    store = KeyStore(bootstrap_servers=bootstrap, topic=topic, verify_keys=verify_keys, ready_timeout=600)
    started = time.perf_counter()
    await store.start()
    seconds = time.perf_counter() - started
    await store.stop()
    return store, seconds


async def retained_bytes(bootstrap: str, topic: str) -> int:
    """Bytes still allocated (tracemalloc) once a KeyStore has read the topic and stopped: its keys."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store, _ = await store_start(bootstrap, topic, [])
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.keys()
    return retained


def authenticate_ns(store: KeyStore, secrets_: list[str], rounds: int) -> tuple[float, float]:
    calls = [secrets_[i % len(secrets_)] for i in range(rounds)]
    started = time.perf_counter_ns()
    for secret in calls:
        store.authenticate(secret)
    store_ns = (time.perf_counter_ns() - started) / rounds
    table = {hashlib.sha256(s.encode()).hexdigest(): s for s in secrets_}
    started = time.perf_counter_ns()
    for secret in calls:
        table.get(hashlib.sha256(secret.encode()).hexdigest())
    return store_ns, (time.perf_counter_ns() - started) / rounds


async def measure(bootstrap: str, run_id: str, n: int) -> dict[str, Any]:
    topics = Topics(f"{run_id}.")
    await ensure_topics(bootstrap, topics, 4)
    signer = Signer(Ed25519PrivateKey.generate())
    secrets_, mint_sign_s = await publish_keys(bootstrap, topics.gateway_keys, n, signer)
    say(f"minted and signed {n:,} keys in {mint_sign_s:.1f} s; published")
    read, raw_s = await raw_read(bootstrap, topics.gateway_keys)
    _, open_s = await store_start(bootstrap, topics.gateway_keys, [])
    store, verified_s = await store_start(bootstrap, topics.gateway_keys, [public_key_b64(signer.public_key)])
    retained = await retained_bytes(bootstrap, topics.gateway_keys)
    assert read == n == len(store.keys()), (read, n, len(store.keys()))
    assert sum(store.rejected.values()) == 0
    auth_ns, base_ns = authenticate_ns(store, secrets_, 200_000)
    result = {
        "load_average_1m": os.getloadavg()[0],
        "keys": n,
        "mint_and_sign_us_per_key": round(mint_sign_s / n * 1e6, 1),
        "raw_read_s": round(raw_s, 2),
        "start_without_verify_keys_s": round(open_s, 2),
        "start_with_verify_keys_s": round(verified_s, 2),
        "start_vs_raw_read": round(verified_s / raw_s, 1),
        "bytes_per_key": round(retained / n),
        "authenticate_ns": round(auth_ns),
        "sha256_plus_dict_ns": round(base_ns),
        "authenticate_vs_baseline": round(auth_ns / base_ns, 2),
    }
    for name, value in result.items():
        say(f"{name}: {value}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--bootstrap", help="use this running broker instead of the bench broker")
    args = parser.parse_args()
    run_id = new_run_id("keys")
    context: Any = nullcontext() if args.bootstrap else bench_broker(run_id)
    with context as kafka:
        bootstrap = args.bootstrap or kafka.bootstrap
        result = asyncio.run(measure(bootstrap, run_id, args.keys))
    say(f"wrote {write_result('keys', result)}")


if __name__ == "__main__":
    main()
