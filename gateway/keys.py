"""KeyStore: the gateway's view of every internal key, read from the compacted `gateway.keys` topic.

Each gateway instance reads the whole topic from the beginning (no consumer group: every instance
holds every key), then follows it, so a key created or revoked with `spendstream keys ...` takes
effect on every instance as soon as its consumer fetches the record (measured: docs/keys.md).
`authenticate()` is one SHA-256 and one dict lookup; it never does I/O and never logs the secret.

Which records are accepted is `spendstream.api_keys.admit_record` (signatures when verify keys
are set, replays, bounds, revocation is final); one more rule lives here: a secret hash that
already belongs to another id is refused (`duplicate_secret`), so one secret never names two keys.
Ignored records are counted in `rejected` by reason.

If the broker goes away after start, the store keeps the keys it has (a known key keeps working,
an unknown one stays refused) and reconnects every second; a revocation published meanwhile takes
effect when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from spendstream.api_keys import (
    MAX_SECRET_CHARS,
    SECRET_PREFIX,
    ApiKey,
    RecordRefused,
    admit_record,
    hash_secret,
)
from spendstream.errors import ConfigError
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.signing import Verifier
from spendstream.topics import partitions_of

__all__ = ["DUPLICATE_SECRET", "KeyRefused", "KeyStore"]

log = logging.getLogger(__name__)
DUPLICATE_SECRET = "duplicate_secret"
_EPOCH_FMT = "%Y-%m-%d %H:%M UTC"

_warned = False


class KeyRefused(Exception):
    """A request's key may not be used. `reason`: unknown | revoked | expired | malformed; the
    message says what to do (it never contains the secret). `key_id`: the key's public id, if known."""

    def __init__(self, reason: str, message: str, key_id: str | None = None) -> None:
        self.reason = reason
        self.key_id = key_id
        super().__init__(message)


def _utc(us: int) -> str:
    return time.strftime(_EPOCH_FMT, time.gmtime(us // 1_000_000))


class KeyStore:
    """Every internal key, by the SHA-256 of its secret. `await start()`, then `authenticate()`."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        verify_keys: Sequence[str] = (),
        kafka_auth: KafkaAuth = PLAINTEXT,
        ready_timeout: float = 30.0,
    ) -> None:
        """`verify_keys`: base64 Ed25519 public keys whose signed records are accepted (the settings'
        SPENDSTREAM_VERIFY_KEYS plus the signing key's own); none: every record is accepted."""
        self.topic = topic
        self._bootstrap = bootstrap_servers
        self._kafka_auth = kafka_auth
        self._ready_timeout = ready_timeout
        self._verifier = Verifier(verify_keys)
        self._by_id: dict[str, ApiKey] = {}
        self._by_hash: dict[str, ApiKey] = {}
        self._read_upto: dict[int, int] = {}  # partition -> last offset handled (re-reads are skipped)
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._last_error: str = ""
        self.applied = 0
        self.rejected: Counter[str] = Counter()  # reason -> records ignored

    # -- the request path: no I/O -----------------------------------------------------------------
    def authenticate(self, secret: str, now_us: int | None = None) -> ApiKey:
        """The key whose secret this is; KeyRefused if it is malformed, unknown, revoked or expired."""
        if type(secret) is not str or not secret.startswith(SECRET_PREFIX) or len(secret) > MAX_SECRET_CHARS:
            raise KeyRefused(
                "malformed",
                f"not a spendstream API key (they start with {SECRET_PREFIX}): send the key from "
                "`spendstream keys create` as the provider's API key",
            )
        key = self._by_hash.get(hash_secret(secret))
        if key is None:
            raise KeyRefused(
                "unknown",
                "unknown API key: ask your spendstream administrator for a key (`spendstream keys create`)",
            )
        now = time.time_ns() // 1000 if now_us is None else now_us
        why = key.refusal(now)
        if why == "revoked":
            assert key.revoked_at_us is not None
            raise KeyRefused(
                why, f"API key {key.id} was revoked at {_utc(key.revoked_at_us)}: ask for a new key", key.id
            )
        if why == "expired":
            assert key.expires_at_us is not None
            raise KeyRefused(
                why, f"API key {key.id} expired at {_utc(key.expires_at_us)}: ask for a new key", key.id
            )
        return key

    def keys(self) -> list[ApiKey]:
        """Every key known (revoked and expired ones too), oldest first."""
        return sorted(self._by_id.values(), key=lambda k: (k.created_at_us, k.id))

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    # -- following the topic ----------------------------------------------------------------------
    def _apply(self, partition: int, offset: int, kafka_key: bytes | None, value: bytes | None) -> None:
        if offset <= self._read_upto.get(partition, -1):
            return  # read again after a reconnect: handled the first time
        self._read_upto[partition] = offset
        key_id = kafka_key.decode(errors="replace") if kafka_key else ""
        previous = self._by_id.get(key_id)
        try:
            key = admit_record(self._verifier, kafka_key, value, previous)
            if key is not None:
                holder = self._by_hash.get(key.secret_sha256)
                if holder is not None and holder.id != key.id:
                    raise RecordRefused(DUPLICATE_SECRET, f"{key.id} has the secret of {holder.id}")
        except RecordRefused as exc:
            self.rejected[exc.reason] += 1
            log.warning("ignored a %s record at [%d]@%d: %s", self.topic, partition, offset, exc)
            return
        if previous is not None:
            self._by_hash.pop(previous.secret_sha256, None)
        if key is None:
            self._by_id.pop(key_id, None)
        else:
            self._by_id[key.id] = key
            self._by_hash[key.secret_sha256] = key
        self.applied += 1

    async def start(self) -> None:
        """Read the topic to its end (ConfigError after `ready_timeout`), then keep following it."""
        global _warned
        if not self._verifier.enforcing and not _warned:
            _warned = True
            log.warning(
                "UNAUTHENTICATED KEYS: no verify keys are configured, so a key record any Kafka client "
                "writes on %s is accepted (anyone who can write it can mint a working key). Run `spendstream keys generate` and set SPENDSTREAM_SIGNING_KEY / "
                "SPENDSTREAM_VERIFY_KEYS; see docs/security.md",
                self.topic,
            )
        started = time.monotonic()
        self._task = asyncio.create_task(self._follow(), name="spendstream-keystore")
        try:
            await asyncio.wait_for(asyncio.shield(self._caught_up.wait()), self._ready_timeout)
        except TimeoutError:
            await self.stop()
            raise ConfigError(
                f"could not read the keys on {self.topic} within {self._ready_timeout:.0f} s "
                f"({self._last_error or f'{self.applied + sum(self.rejected.values()):,} records read so far'}): "
                f"is Kafka at {self._bootstrap} up and the topic created (`spendstream up`)? A topic of "
                "many keys takes longer to read (about 0.1 ms per key with verify keys, docs/keys.md)"
            ) from None
        log.info(
            "%s read: %d keys, %d records ignored (%.2f s)",
            self.topic,
            len(self._by_id),
            sum(self.rejected.values()),
            time.monotonic() - started,
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        while True:
            consumer: AIOKafkaConsumer | None = None
            try:
                partitions = [
                    TopicPartition(self.topic, p)
                    for p in await partitions_of(self._bootstrap, self.topic, self._kafka_auth)
                ]
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    client_id=f"spendstream-keys-{uuid.uuid4().hex[:8]}",
                    fetch_max_wait_ms=20,
                    **self._kafka_auth.client_kwargs(),
                )
                await consumer.start()
                consumer.assign(partitions)
                await consumer.seek_to_beginning()
                end = await consumer.end_offsets(partitions)
                while True:
                    batch = await consumer.getmany(timeout_ms=200)
                    for messages in batch.values():
                        for msg in messages:
                            self._apply(msg.partition, msg.offset, msg.key, msg.value)
                    if not self._caught_up.is_set():
                        positions = [await consumer.position(tp) for tp in partitions]
                        if all(pos >= end[tp] for pos, tp in zip(positions, partitions, strict=True)):
                            self._caught_up.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away, or the topic is missing: retry
                why = await self._kafka_auth.refusal(self._bootstrap) or exc
                self._last_error = str(why)
                log.error("KeyStore lost %s (%s); retrying in 1 s", self.topic, why)
                await asyncio.sleep(1)
            finally:
                if consumer is not None:
                    await consumer.stop()
