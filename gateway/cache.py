"""The gateway's exact-match response cache: one tenant never gets another's answer.

The cache key is SHA-256 over the project, the route and the request body canonicalised (JSON with
sorted keys and no whitespace), with the `stream` flag made explicit: so the same question asked by
two projects is two entries, and a streamed and a plain answer never share one. The caller's
credentials are not part of the key (two keys of one project share the project's entries).

Two implementations of `ResponseCache`:

- `MemoryCache` (the default): an LRU bounded in bytes, with a TTL per entry; get/put are O(1).
- `RedisCache`: shared between gateway instances. Values are a small binary format of their own
  (a JSON header and the raw bytes), never pickle: whoever can write to Redis can make the gateway
  serve a wrong answer from the cache, but cannot run code in it. Redis being down or slow is a
  miss (get) or nothing (put), counted in `stats()["errors"]`, never an exception to the caller.

Opt-in per request with the `x-spendstream-cache` header (`parse_directive`): `ttl=SECONDS` or
`no-cache`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = [
    "MAX_TTL_S",
    "CacheDirective",
    "CachedResponse",
    "MemoryCache",
    "RedisCache",
    "ResponseCache",
    "cache_key",
    "parse_directive",
]

log = logging.getLogger(__name__)

MAX_TTL_S = 30 * 86_400
_ENTRY_OVERHEAD = 200  # bytes a cached entry costs beyond its payload (objects, dict slot), roughly


@dataclass
class CachedResponse:
    """An upstream answer as the gateway replays it: `body` (a plain response) or `chunks` (a
    streamed one, replayed chunk by chunk as a stream; `body` is then b""), and the usage events the
    original call was metered with (JSON values only), so that a hit is metered with usage_source
    "cache" and what it would have cost. Treat a value returned by a cache as read-only."""

    status: int
    content_type: str
    body: bytes
    chunks: tuple[bytes, ...] | None
    usage_events: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    def payload_bytes(self) -> int:
        chunks = self.chunks or ()
        return len(self.body) + sum(len(c) for c in chunks) + len(json.dumps(self.usage_events))


def cache_key(project: str, route: str, body: bytes) -> str:
    """The hex SHA-256 naming a request's entry: project, route, the explicit stream flag and the
    body canonicalised (a JSON object: sorted keys, no whitespace, `stream` taken out and put in
    the flag, so `"stream": false` and no `stream` are one entry; anything else: the raw bytes).
    Each part is length-prefixed, so no two different requests can run together into one key.

    A query string in `route` counts with its parameters sorted, except `key` (Gemini's API key in
    the URL): a credential is never part of the cache key, as the auth headers are not."""
    path, _, query = route.partition("?")
    params = sorted(p for p in query.split("&") if p and p.split("=", 1)[0] != "key")
    route = f"{path}?{'&'.join(params)}" if params else path
    stream = False
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict):
        stream = bool(parsed.pop("stream", False))
        canonical = (
            b"J" + json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        )
    else:
        canonical = b"R" + body
    digest = hashlib.sha256()
    for part in (project.encode(), route.encode(), b"stream" if stream else b"plain", canonical):
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheDirective:
    """What a request asks of the cache: `ttl_s` (None: not cached) and `bypass` (no-cache: neither
    read nor written)."""

    ttl_s: int | None
    bypass: bool


def parse_directive(header: str | None, default_ttl_s: int | None) -> CacheDirective:
    """The `x-spendstream-cache` header: absent or empty -> the key's or project's default TTL
    (None: caching off); `ttl=SECONDS` (1 s .. 30 days) -> cached that long; `no-cache` -> bypass.
    Anything else is a ValueError whose message the server returns as a 400."""
    value = (header or "").strip().lower()
    if not value:
        return CacheDirective(default_ttl_s, bypass=False)
    if value == "no-cache":
        return CacheDirective(None, bypass=True)
    name, sep, seconds = value.partition("=")
    if name.strip() == "ttl" and sep:
        try:
            ttl = int(seconds.strip())
        except ValueError:
            ttl = 0
        if 1 <= ttl <= MAX_TTL_S:
            return CacheDirective(ttl, bypass=False)
        raise ValueError(
            f"x-spendstream-cache: ttl must be a whole number of seconds from 1 to {MAX_TTL_S} "
            f"(30 days), not {seconds.strip()!r}; use `no-cache` to bypass the cache"
        )
    raise ValueError(
        f"x-spendstream-cache: {header!r} is not understood: use `ttl=SECONDS` (1 to {MAX_TTL_S}) or `no-cache`"
    )


class ResponseCache(Protocol):
    """Where the gateway keeps answers. `stats()`: hits, misses, entries, bytes, evictions (and
    what else an implementation counts)."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, value: CachedResponse, ttl_s: int) -> None: ...

    def stats(self) -> dict[str, int]: ...


@dataclass
class _Entry:
    value: CachedResponse
    expires_at: float
    size: int


class MemoryCache:
    """In-process LRU bounded by `max_bytes` (the entries' payload plus a fixed overhead each). An
    entry larger than `max_bytes * max_entry_fraction` is not stored (counted in `too_large`), so
    one huge answer cannot flush the whole cache. Expired entries go when next looked up or when
    evicted. `clock` (monotonic seconds) is for tests."""

    def __init__(
        self,
        max_bytes: int = 64 << 20,
        *,
        max_entry_fraction: float = 0.125,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = int(max_bytes * max_entry_fraction)
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._counts = {"hits": 0, "misses": 0, "evictions": 0, "expired": 0, "too_large": 0}

    async def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self._clock():
            self._remove(key)
            self._counts["expired"] += 1
            entry = None
        if entry is None:
            self._counts["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self._counts["hits"] += 1
        return entry.value

    async def put(self, key: str, value: CachedResponse, ttl_s: int) -> None:
        size = value.payload_bytes() + _ENTRY_OVERHEAD
        if size > self.max_entry_bytes:
            self._counts["too_large"] += 1
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(value, self._clock() + ttl_s, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self._counts["evictions"] += 1

    def _remove(self, key: str) -> None:
        self._bytes -= self._entries.pop(key).size

    def stats(self) -> dict[str, int]:
        return {**self._counts, "entries": len(self._entries), "bytes": self._bytes}


_MAGIC = b"SSC1"  # spendstream cache, format 1
_HEAD = struct.Struct(">4sI")  # magic, header length


def encode_response(value: CachedResponse) -> bytes:
    """The stored form: magic, a JSON header (status, content type, time, usage events, the lengths
    of body and chunks), then the body and chunks back to back. No code is ever loaded from it."""
    chunks = value.chunks
    header = json.dumps(
        {
            "status": value.status,
            "content_type": value.content_type,
            "created_at": value.created_at,
            "usage_events": value.usage_events,
            "body": len(value.body),
            "chunks": None if chunks is None else [len(c) for c in chunks],
        },
        separators=(",", ":"),
    ).encode()
    return b"".join([_HEAD.pack(_MAGIC, len(header)), header, value.body, *(chunks or ())])


def decode_response(data: bytes) -> CachedResponse:
    """The inverse of encode_response; ValueError for anything that is not exactly that."""
    magic, length = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("not a spendstream cache entry")
    start = _HEAD.size + length
    header = json.loads(data[_HEAD.size : start])
    view = memoryview(data)
    body = bytes(view[start : start + header["body"]])
    at = start + header["body"]
    chunks: list[bytes] | None = None
    if header["chunks"] is not None:
        chunks = []
        for n in header["chunks"]:
            chunks.append(bytes(view[at : at + n]))
            at += n
    if at != len(data) or len(body) != header["body"]:
        raise ValueError("truncated or padded cache entry")
    if not isinstance(header["usage_events"], list):
        raise ValueError("usage_events is not a list")
    return CachedResponse(
        status=int(header["status"]),
        content_type=str(header["content_type"]),
        body=body,
        chunks=None if chunks is None else tuple(chunks),
        usage_events=header["usage_events"],
        created_at=float(header["created_at"]),
    )


class RedisCache:
    """A cache shared by every gateway instance pointing at one Redis (`url`, e.g.
    redis://:password@host:6379/0). Keys are `prefix` + cache_key; the TTL is Redis's own (SET EX).

    Failure: any Redis error or a reply slower than `timeout_s` makes get() a miss and put() a
    no-op, counted in `errors`; after one, Redis is left alone for `backoff_s` (calls in between
    are misses at once, counted in `skipped`), so an outage costs the gateway no latency.
    `stats()`'s entries and bytes are what this instance stored (Redis holds the truth)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "spendstream:cache:",
        timeout_s: float = 0.25,
        backoff_s: float = 1.0,
        max_entry_bytes: int = 8 << 20,
    ) -> None:
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        # no retries (redis-py's default retries 3 times with back-off): a miss now beats a hit late
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._down_until = 0.0
        self._counts = {
            "hits": 0,
            "misses": 0,
            "entries": 0,
            "bytes": 0,
            "evictions": 0,
            "errors": 0,
            "skipped": 0,
            "too_large": 0,
            "undecodable": 0,
        }

    async def get(self, key: str) -> CachedResponse | None:
        if self._skip():
            self._counts["misses"] += 1
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                data = await self._redis.get(self.prefix + key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("get", exc)
            data = None
        value = None
        if isinstance(data, bytes):  # never str: the client does not decode replies
            try:
                value = decode_response(data)
            except (ValueError, KeyError, TypeError, struct.error):
                self._counts["undecodable"] += 1
                log.warning("response cache: ignored an undecodable entry under %s", self.prefix)
        self._counts["hits" if value is not None else "misses"] += 1
        return value

    async def put(self, key: str, value: CachedResponse, ttl_s: int) -> None:
        data = encode_response(value)
        if len(data) > self.max_entry_bytes:
            self._counts["too_large"] += 1
            return
        if self._skip():
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(self.prefix + key, data, ex=ttl_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("put", exc)
            return
        self._counts["entries"] += 1
        self._counts["bytes"] += len(data)

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    async def close(self) -> None:
        await self._redis.aclose()

    def _skip(self) -> bool:
        if time.monotonic() < self._down_until:
            self._counts["skipped"] += 1
            return True
        return False

    def _failed(self, what: str, exc: BaseException) -> None:
        self._counts["errors"] += 1
        self._down_until = time.monotonic() + self._backoff_s
        # the error's type only: its message may quote the URL, password and all
        log.warning(
            "response cache: Redis %s failed (%s); misses for %.0f s",
            what,
            type(exc).__name__,
            self._backoff_s,
        )
