"""Transport behaviour at the edges: failures never reach the caller, refusals, pass-through, and
`meter_call` / `@metered` for code that does not use httpx."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import httpx2
import openai
import pytest
from openai.types import CompletionUsage

from producers import SyncEmitter, build_event, meter_call, metered
from producers.instrument import AsyncMeteringTransport, GuardLike, MeteringTransport
from producers.instrument._call import Attribution, CallMeter, plan_call
from producers.instrument._routes import route_of
from spendstream.errors import BudgetExceeded, EmitterClosed, InvalidUsage
from tests.providers.calls import BlockedSetGuard
from tests.providers.replay import ReplayServer, fixture

CHAT = {"model": "o3", "messages": [{"role": "user", "content": "Say hello"}]}


class Recorder:
    """Anything with emit(**event) is an emitter for the transport; this one keeps the events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, **event: Any) -> str:
        self.events.append(event)
        return "00000000-0000-0000-0000-000000000000"


class BrokenGuard:
    def check(
        self,
        *,
        project: str,
        team: str | None = None,
        user: str | None = None,
        model: str | None = None,
        key: str | None = None,
    ) -> None:
        raise RuntimeError("guard state unreadable")


@pytest.fixture(scope="module")
def server() -> Iterator[ReplayServer]:
    with ReplayServer() as s:
        yield s


def test_one_class_is_a_transport_of_both_httpx_generations() -> None:
    t = MeteringTransport(emitter=Recorder(), project="p")
    assert isinstance(t, httpx.BaseTransport)
    assert isinstance(t, httpx2.BaseTransport)
    a = AsyncMeteringTransport(emitter=Recorder(), project="p")
    assert isinstance(a, httpx.AsyncBaseTransport)
    assert isinstance(a, httpx2.AsyncBaseTransport)
    assert isinstance(BlockedSetGuard(set()), GuardLike)


@pytest.mark.parametrize("client_cls", [httpx.Client, httpx2.Client])
def test_plain_clients_of_both_generations_are_metered(server: ReplayServer, client_cls: Any) -> None:
    rec = Recorder()
    with client_cls(transport=MeteringTransport(emitter=rec, project="p")) as client:
        r = client.post(f"{server.url}/v1/chat/completions", json=CHAT)
        assert r.json()["usage"]["prompt_tokens"] == 2006
    assert [(e["model"], e["input_tokens"], e["cached_input_tokens"]) for e in rec.events] == [
        ("o3", 86, 1920)
    ]


@pytest.mark.integration
def test_an_unavailable_emitter_never_fails_the_call(
    server: ReplayServer, kafka: str, caplog: pytest.LogCaptureFixture
) -> None:
    emitter = SyncEmitter(bootstrap_servers=kafka, service="t")
    emitter.close()  # every emit() now raises EmitterClosed
    with pytest.raises(EmitterClosed):
        emitter.emit(project="p", provider="openai", model="o3", input_tokens=1, output_tokens=1)
    transport = MeteringTransport(emitter=emitter, project="p")
    caplog.set_level(logging.ERROR, logger="producers.instrument")
    with httpx2.Client(transport=transport) as client:
        for _ in range(3):
            assert client.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert transport.stats.lost == 3
    assert transport.stats.metered == 0
    assert transport.stats.errors == {"emit:EmitterClosed": 3}
    logged = [r for r in caplog.records if "EmitterClosed" in r.getMessage()]
    assert len(logged) == 1  # once per error type, then only counted


def test_on_blocked_raise_raises_budget_exceeded_before_anything_is_sent(server: ReplayServer) -> None:
    guard = BlockedSetGuard({"model:o3"})
    before = len(server.requests)
    transport = MeteringTransport(emitter=Recorder(), project="p", guard=guard, on_blocked="raise")
    with httpx2.Client(transport=transport) as client, pytest.raises(BudgetExceeded) as blocked:
        client.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert (blocked.value.scope, blocked.value.spend_usd, blocked.value.limit_usd) == (
        "model:o3",
        Decimal("12.50"),
        Decimal("10"),
    )
    # the current openai SDK lets non-transport errors through unchanged
    oai = openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key="k",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )
    with pytest.raises(BudgetExceeded):
        oai.chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}])
    assert len(server.requests) == before
    assert transport.stats.refused == 2


def test_a_refusal_carries_retry_after_and_tells_sdks_not_to_retry(server: ReplayServer) -> None:
    guard = BlockedSetGuard({"team:growth"})
    transport = MeteringTransport(emitter=Recorder(), project="p", team="growth", guard=guard)
    with httpx2.Client(transport=transport) as client:
        r = client.post(
            f"{server.url}/v1/messages", json={"model": "claude-x", "max_tokens": 1, "messages": []}
        )
    assert r.status_code == 429
    assert r.headers["x-should-retry"] == "false"
    assert 0 < int(r.headers["retry-after"]) <= 86400
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["scope"] == "team:growth"


def test_a_broken_guard_fails_open(server: ReplayServer) -> None:
    rec = Recorder()
    transport = MeteringTransport(emitter=rec, project="p", guard=BrokenGuard())
    with httpx2.Client(transport=transport) as client:
        assert client.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert transport.stats.guard_errors == 1
    assert len(rec.events) == 1


def test_other_requests_pass_through_unmetered_and_unchecked(server: ReplayServer) -> None:
    rec = Recorder()
    guard = BlockedSetGuard({"project:p"})
    transport = MeteringTransport(emitter=rec, project="p", guard=guard)
    with httpx2.Client(transport=transport) as client:
        r = client.get(f"{server.url}/v1/models", headers={"X-Spendstream-Team": "t"})
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o-mini", "gpt-4o", "o3", "text-embedding-3-small"]
    assert rec.events == []
    assert guard.checks == []
    assert "x-spendstream-team" not in server.requests[-1].headers


def test_a_call_without_a_project_goes_through_and_is_counted(server: ReplayServer) -> None:
    rec = Recorder()
    transport = MeteringTransport(emitter=rec)
    with httpx2.Client(transport=transport) as client:
        assert client.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
        client.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"X-Spendstream-Project": "hdr"})
    assert transport.stats.errors == {"plan:LookupError": 1}
    assert [e["project"] for e in rec.events] == ["hdr"]


def test_header_attribution_overrides_the_defaults(server: ReplayServer) -> None:
    rec = Recorder()
    transport = MeteringTransport(emitter=rec, project="p", team="t", tags={"env": "prod"})
    headers = {
        "X-Spendstream-User": "u-42",
        "X-Spendstream-Team": "search",
        "X-Spendstream-Tags": "feature=rerank",
    }
    with httpx2.Client(transport=transport) as client:
        client.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=headers)
    e = rec.events[0]
    assert (e["project"], e["team"], e["user"], e["tags"]) == (
        "p",
        "search",
        "u-42",
        {"env": "prod", "feature": "rerank"},
    )


def test_a_caller_that_stops_reading_a_stream_gets_an_estimated_event(server: ReplayServer) -> None:
    rec = Recorder()
    transport = MeteringTransport(emitter=rec, project="p")
    oai = openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key="k",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # "Hello"
    stream.close()
    (event,) = rec.events
    assert event["usage_source"] == "estimated"
    assert event["tags"]["usage_missing"] == "client_closed"
    assert event["output_tokens"] >= 2  # at least the 5 characters read


def test_upstream_errors_and_timeouts_emit_nothing(server: ReplayServer) -> None:
    rec = Recorder()
    transport = MeteringTransport(emitter=rec, project="p")
    with httpx2.Client(transport=transport) as client:
        r = client.post(f"{server.url}/v1/messages", json={"model": "m"}, headers={"x-replay-status": "529"})
        assert r.status_code == 529
    dead = MeteringTransport(emitter=rec, project="p")
    with httpx2.Client(transport=dead, timeout=0.5) as client, pytest.raises(httpx2.ConnectError):
        client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    assert rec.events == []
    assert transport.stats.upstream_errors == 1


def test_the_async_transport_uses_emit_nowait_and_never_awaits_the_emitter(server: ReplayServer) -> None:
    class NowaitOnly:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        async def emit(self, **event: Any) -> str:  # pragma: no cover - must not be used
            raise AssertionError("emit() awaited on the request path")

        def emit_nowait(self, **event: Any) -> str:
            self.events.append(event)
            return "id"

    em = NowaitOnly()

    async def go() -> None:
        async with httpx2.AsyncClient(transport=AsyncMeteringTransport(emitter=em, project="p")) as client:
            await client.post(
                f"{server.url}/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}
            )

    asyncio.run(go())
    assert [(e["model"], e["input_tokens"]) for e in em.events] == [("text-embedding-3-small", 8)]


# ---------------------------------------------------------------- meter_call / @metered


def test_meter_call_normalises_provider_usage_objects() -> None:
    rec = Recorder()
    usage = CompletionUsage(
        prompt_tokens=2006,
        completion_tokens=300,
        total_tokens=2306,
        prompt_tokens_details={"cached_tokens": 1920},  # type: ignore[arg-type]
        completion_tokens_details={"reasoning_tokens": 192},  # type: ignore[arg-type]
    )
    meter_call(rec, project="p", provider="openai", model="o3", usage=usage, service_tier="batch")
    meter_call(
        rec,
        project="p",
        provider="anthropic",
        model="claude-x",
        usage={"input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 9},
    )
    meter_call(rec, project="p", provider="mistral", model="mistral-large", input_tokens=4, output_tokens=2)
    a, b, c = rec.events
    assert (a["input_tokens"], a["cached_input_tokens"], a["reasoning_tokens"], a["service_tier"]) == (
        86,
        1920,
        192,
        "batch",
    )
    assert (b["input_tokens"], b["cached_input_tokens"], b["output_tokens"]) == (5, 7, 9)
    assert (c["provider"], c["input_tokens"], c["output_tokens"]) == ("mistral", 4, 2)


@pytest.mark.integration
def test_meter_call_validates_like_emit(kafka: str) -> None:
    with SyncEmitter(bootstrap_servers=kafka, service="t") as emitter:
        with pytest.raises(InvalidUsage, match="openai usage: usage has no"):
            meter_call(emitter, project="p", provider="openai", model="o3", usage={"completion_tokens": 1})
        with pytest.raises(InvalidUsage, match="must be lowercase"):
            meter_call(emitter, project="p", provider="OpenAI", model="o3", input_tokens=1, output_tokens=1)
        assert emitter.sent_events == 0  # nothing invalid reached the buffer


def test_metered_decorator_sync_and_async() -> None:
    rec = Recorder()

    class Result:
        def __init__(self, usage: Any) -> None:
            self.model = "claude-x"
            self.usage = usage

    @metered(rec, project="p", provider="anthropic", team="t")
    def call(usage: Any) -> Result:
        return Result(usage)

    @metered(rec, project="p", provider="anthropic")
    async def acall(usage: Any) -> Result:
        return Result(usage)

    @metered(rec, project="p", provider="anthropic")
    def fails() -> Result:
        raise TimeoutError("upstream")

    assert call({"input_tokens": 3, "output_tokens": 4}).model == "claude-x"
    asyncio.run(acall({"input_tokens": 5, "output_tokens": 6}))
    call(None)  # a result without usage: recorded as missing, never silently zero
    call({"input_tokens": -1, "output_tokens": 1})  # invalid: logged and counted, result still returned
    with pytest.raises(TimeoutError):
        fails()
    assert [
        (e["input_tokens"], e["output_tokens"], e.get("usage_source", "reported")) for e in rec.events
    ] == [
        (3, 4, "reported"),
        (5, 6, "reported"),
        (0, 0, "missing"),
    ]
    stats = call.metering  # type: ignore[attr-defined]
    assert (stats.metered, stats.missing, stats.lost, stats.errors) == (2, 1, 1, {"InvalidUsage": 1})


def test_responses_an_inner_transport_already_read_are_metered_too() -> None:
    rec = Recorder()
    body = fixture("anthropic_messages.json")
    inner = httpx2.MockTransport(lambda request: httpx2.Response(200, content=body))
    with httpx2.Client(transport=MeteringTransport(emitter=rec, project="p", transport=inner)) as client:
        client.post("https://api.anthropic.com/v1/messages", json={"model": "claude-x", "max_tokens": 1})
    assert [(e["cache_write_tokens"], e["cache_write_1h_tokens"]) for e in rec.events] == [(1548, 500)]


@pytest.mark.parametrize(
    ("usage", "emitted"),
    [
        ({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, []),
        ({"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}, [(12, 0)]),
    ],
)
def test_an_error_body_emits_its_usage_only_when_some_of_it_is_billable(
    usage: dict[str, int], emitted: list[tuple[int, int]]
) -> None:
    """A reported event needs one non-zero meter: an error that reports zero usage costs nothing."""
    route = route_of("POST", "api.openai.com", "/v1/chat/completions")
    assert route is not None
    plan = plan_call(route, Attribution("p", None, None, {}), b'{"model": "gpt-4o"}', None)
    meter = CallMeter(plan, "global")
    meter.start(400, "application/json", None)
    meter.feed(json.dumps({"error": {"message": "bad"}, "usage": usage}).encode())
    events = meter.finish("eof")
    assert [(e["input_tokens"], e["output_tokens"]) for e in events] == emitted
    for e in events:  # and what is emitted is a valid event
        build_event(service="s", **e)
