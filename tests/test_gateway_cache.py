"""The response cache (gateway/cache.py): keys that isolate projects and streams, the directive
header, the in-memory LRU, and RedisCache against a real redis-server (shared, killed)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as redis
from pydantic import ValidationError

from gateway.cache import (
    CacheDirective,
    CachedResponse,
    MemoryCache,
    RedisCache,
    cache_key,
    decode_response,
    encode_response,
    parse_directive,
)
from spendstream.settings import Settings
from tests.conftest import RedisServer

CHAT = "/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


def answer(size: int = 100, *, chunks: tuple[bytes, ...] | None = None) -> CachedResponse:
    return CachedResponse(
        status=200,
        content_type="text/event-stream" if chunks else "application/json",
        body=b"" if chunks else b"x" * size,
        chunks=chunks,
        usage_events=[{"model": "gpt-4o-mini", "input_tokens": 9, "output_tokens": 1}],
        created_at=1_764_000_000.5,
    )


def test_identical_bodies_of_two_projects_are_two_entries() -> None:
    assert cache_key("team-a", CHAT, BODY) != cache_key("team-b", CHAT, BODY)
    # project and route cannot run together into another request's key
    assert cache_key("ab", "/c", BODY) != cache_key("a", "b/c", BODY)


def test_a_stream_and_a_plain_call_never_share_an_entry() -> None:
    streamed = json.dumps({**json.loads(BODY), "stream": True}).encode()
    plain = json.dumps({**json.loads(BODY), "stream": False}).encode()
    assert cache_key("p", CHAT, streamed) != cache_key("p", CHAT, BODY)
    assert cache_key("p", CHAT, plain) == cache_key("p", CHAT, BODY)  # false is the default
    assert cache_key("p", "/v1beta/models/g:streamGenerateContent", BODY) != cache_key(
        "p", "/v1beta/models/g:generateContent", BODY
    )


def test_a_key_in_the_query_string_is_not_part_of_the_cache_key() -> None:
    gemini = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert (
        cache_key("p", f"{gemini}?key=sk-one&alt=sse", BODY)
        == cache_key("p", f"{gemini}?alt=sse&key=sk-two", BODY)
        == cache_key("p", f"{gemini}?alt=sse", BODY)
    )
    assert cache_key("p", f"{gemini}?alt=sse", BODY) != cache_key("p", gemini, BODY)
    assert (
        cache_key("p", f"{gemini}?key=sk-one", BODY)
        == cache_key("p", f"{gemini}?", BODY)
        == cache_key("p", gemini, BODY)
    )


def test_the_key_ignores_json_formatting_but_not_content() -> None:
    reordered = b'{"messages":[{"content":"hi","role":"user"}],\n "model":"gpt-4o-mini"}'
    assert cache_key("p", CHAT, reordered) == cache_key("p", CHAT, BODY)
    assert cache_key("p", CHAT, BODY.replace(b"hi", b"ho")) != cache_key("p", CHAT, BODY)
    assert cache_key("p", CHAT, b"\xff not json") != cache_key("p", CHAT, b"\xfe not json")
    assert len(cache_key("p", CHAT, b"")) == 64


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, CacheDirective(300, bypass=False)),
        ("", CacheDirective(300, bypass=False)),
        ("ttl=60", CacheDirective(60, bypass=False)),
        (" TTL = 2592000 ", CacheDirective(2_592_000, bypass=False)),
        ("no-cache", CacheDirective(None, bypass=True)),
    ],
)
def test_the_cache_header(header: str | None, expected: CacheDirective) -> None:
    assert parse_directive(header, 300) == expected


def test_without_a_default_nothing_is_cached_unless_asked() -> None:
    assert parse_directive(None, None) == CacheDirective(None, bypass=False)


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("ttl=0", "from 1 to 2592000"),
        ("ttl=2592001", "from 1 to 2592000"),
        ("ttl=1.5", "not '1.5'"),
        ("ttl=", "whole number"),
        ("max-age=60", "use `ttl=SECONDS`"),
        ("ttl=60, no-cache", "whole number"),
    ],
)
def test_a_bad_cache_header_says_what_to_send(header: str, says: str) -> None:
    with pytest.raises(ValueError, match="x-spendstream-cache") as err:
        parse_directive(header, None)
    assert says in str(err.value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_memory_cache_evicts_the_least_recently_used_by_bytes() -> None:
    async def run() -> None:
        cache = MemoryCache(max_bytes=4000, max_entry_fraction=0.5)
        size = answer(700).payload_bytes() + 200  # payload + fixed overhead: 4 fit, a fifth does not
        for name in "abcd":
            await cache.put(name, answer(700), ttl_s=60)
        assert cache.stats() == {
            "hits": 0,
            "misses": 0,
            "evictions": 0,
            "expired": 0,
            "too_large": 0,
            "entries": 4,
            "bytes": 4 * size,
        }
        assert await cache.get("a") is not None  # a is now the most recent: b goes first
        await cache.put("e", answer(700), ttl_s=60)
        assert [await cache.get(k) is not None for k in "abcde"] == [True, False, True, True, True]
        await cache.put("big", answer(2000), ttl_s=60)  # more than half the cap: not stored
        assert await cache.get("big") is None
        stats = cache.stats()
        assert (stats["entries"], stats["bytes"], stats["evictions"], stats["too_large"]) == (
            4,
            4 * size,
            1,
            1,
        )
        assert (stats["hits"], stats["misses"]) == (5, 2)
        await cache.put("a", answer(10), ttl_s=60)  # replacing an entry frees its old size
        assert cache.stats()["bytes"] == 3 * size + answer(10).payload_bytes() + 200

    asyncio.run(run())


def test_the_memory_cache_forgets_an_entry_at_its_ttl() -> None:
    async def run() -> None:
        clock = Clock()
        cache = MemoryCache(clock=clock)
        streamed = answer(chunks=(b"data: 1\n\n", b"data: [DONE]\n\n"))
        await cache.put("k", streamed, ttl_s=30)
        clock.now += 29.9
        assert await cache.get("k") is streamed
        clock.now += 0.1
        assert await cache.get("k") is None
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["expired"], stats["entries"], stats["bytes"]) == (
            1,
            1,
            1,
            0,
            0,
        )

    asyncio.run(run())


def test_the_stored_form_round_trips_and_refuses_anything_else() -> None:
    for value in (answer(50), answer(chunks=(b"a", b"", b"bc")), answer(0)):
        assert decode_response(encode_response(value)) == value
    data = encode_response(answer(50))
    for bad in (data[:-1], data + b"x", b"\x80\x04pickle" + data[10:], b"SSC1\x00\x00\x00\x02{}"):
        with pytest.raises((ValueError, KeyError)):
            decode_response(bad)


def test_two_redis_caches_share_entries_with_redis_own_ttl(redis_server: RedisServer) -> None:
    async def run() -> None:
        one, two = RedisCache(redis_server.url), RedisCache(redis_server.url)
        raw = redis.Redis.from_url(redis_server.url)
        try:
            streamed = answer(chunks=(b"data: {}\n\n", b"data: [DONE]\n\n"))
            key = cache_key("p", CHAT, BODY)
            assert await two.get(key) is None
            await one.put(key, streamed, ttl_s=120)
            assert await two.get(key) == streamed
            assert 118 <= await raw.ttl(f"spendstream:cache:{key}") <= 120
            stored = await raw.get(f"spendstream:cache:{key}")
            assert isinstance(stored, bytes)
            assert stored.startswith(b"SSC1")  # our own format, not pickle
            # someone with Redis access writes garbage (or a pickle): a miss, never an exception
            await raw.set(f"spendstream:cache:{key}", b"\x80\x04\x95garbage")
            assert await two.get(key) is None
            assert one.stats() == {
                "hits": 0,
                "misses": 0,
                "entries": 1,
                "bytes": len(encode_response(streamed)),
                "evictions": 0,
                "errors": 0,
                "skipped": 0,
                "too_large": 0,
                "undecodable": 0,
            }
            stats = two.stats()
            assert (stats["hits"], stats["misses"], stats["undecodable"], stats["errors"]) == (1, 2, 1, 0)
        finally:
            await asyncio.gather(one.close(), two.close(), raw.aclose())

    asyncio.run(run())


def test_redis_killed_mid_test_gives_counted_misses_and_comes_back(redis_server: RedisServer) -> None:
    """Redis is killed: 20 gets are misses and 20 puts do nothing, none raises, and only the first
    of a burst waits for the failure (the rest are skipped during the back-off). Redis restarted
    (empty): after the back-off the cache stores and serves again."""

    async def run() -> None:
        cache = RedisCache(redis_server.url, backoff_s=0.5)
        try:
            await cache.put("before", answer(), ttl_s=60)
            assert await cache.get("before") == answer()
            redis_server.stop()
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = [await cache.get("before") for _ in range(20)]
            for i in range(20):
                await cache.put(f"during{i}", answer(), ttl_s=60)
            took = loop.time() - started
            stats = cache.stats()
            assert results == [None] * 20
            assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 20, 1)
            assert (stats["errors"], stats["skipped"]) == (1, 39)
            assert took < 0.5  # one failed connection, then no waiting at all
            redis_server.start()
            await asyncio.sleep(0.6)
            await cache.put("after", answer(), ttl_s=60)
            assert await cache.get("after") == answer()
            assert await cache.get("before") is None  # the restarted Redis is empty
            assert cache.stats()["errors"] == 1
        finally:
            await cache.close()

    asyncio.run(run())


def test_the_cache_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_REDIS_URL", "redis://:s3cret@cache.internal:6379/2")
    settings = Settings()
    assert settings.cache_max_bytes == 64 << 20
    assert settings.redis_url is not None
    assert "s3cret" not in str(settings.redis_url)  # what `spendstream config` prints
    assert settings.redis_url.get_secret_value().endswith("@cache.internal:6379/2")
    monkeypatch.setenv("SPENDSTREAM_REDIS_URL", "http://cache.internal:6379")
    with pytest.raises(ValidationError, match="must start with redis://"):
        Settings()
