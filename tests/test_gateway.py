"""The gateway end to end: the real broker, a real worker, TWO gateway processes, the replay server
as the providers (tests/providers/replay.py), and the official SDKs changed only in base_url and
api_key (current generation in-process; the legacy one from .venv-sdk-legacy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import REPO, TEST_KAFKA_PORT, RedisServer, Worker, free_port, module_worker, wait_healthy
from tests.providers.replay import ReplayServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning"),
]

MASTER = {  # the providers' master keys: only ever in the gateway's environment
    "OPENAI_API_KEY": "sk-master-openai-" + uuid.uuid4().hex,
    "ANTHROPIC_API_KEY": "sk-ant-master-" + uuid.uuid4().hex,
    "GEMINI_API_KEY": "AIza-master-" + uuid.uuid4().hex,
}
POLICY = """
tiers:
  basic: ["gpt-4o-mini*", "text-embedding-*", "claude-3-5-haiku*"]
  premium: ["*"]
projects:
  gw-basic: {tier: basic}
  gw-prate: {rpm: 3}
"""
CLAUDE = "claude-sonnet-4-5-20250929"
MSGS: Any = [{"role": "user", "content": "Say hello"}]
LEGACY_PYTHON = REPO / ".venv-sdk-legacy" / "bin" / "python"

worker = module_worker("gateway", "budgets: {}\n")


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/health", timeout=5).json()
        return body


def start_gateway(
    base_env: dict[str, str], replay: ReplayServer, state: Path, name: str, redis_url: str | None = None
) -> Gateway:
    """`spendstream gateway` as a child process with `base_env`'s Kafka and topics, the master keys,
    the replay server as every provider; returns once its /health answers 200."""
    port = free_port()
    policy = state / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        **base_env,
        **MASTER,
        "SPENDSTREAM_STATE_DIR": str(state / name),
        "SPENDSTREAM_POLICY_FILE": str(policy),
        "SPENDSTREAM_OPENAI_BASE_URL": f"{replay.url}/v1",
        "SPENDSTREAM_ANTHROPIC_BASE_URL": replay.url,
        "SPENDSTREAM_GEMINI_BASE_URL": replay.url,
    }
    if redis_url is not None:
        env["SPENDSTREAM_REDIS_URL"] = redis_url
    log = state / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "gateway", "--port", str(port)],
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    gateway = Gateway(f"http://127.0.0.1:{port}", process, log)
    wait_healthy(process, f"{gateway.url}/health", log, "gateway", timeout=60)
    return gateway


@pytest.fixture(scope="module")
def replay() -> Iterator[ReplayServer]:
    with ReplayServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateways(
    worker: Worker, replay: ReplayServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    state = tmp_path_factory.mktemp("gateways")
    redis = RedisServer(TEST_KAFKA_PORT + 401, state / "redis.log")  # Debian's redis-server
    redis.start()
    try:
        a = start_gateway(worker.env, replay, state, "gateway-a", redis.url)  # one shared response cache
        b = start_gateway(worker.env, replay, state, "gateway-b", redis.url)
        yield a, b
        for g in (a, b):
            g.process.terminate()
            assert g.process.wait(timeout=30) == 0, g.log.read_text()[-2000:]
    finally:
        redis.stop()


def create_key(worker: Worker, *args: str) -> tuple[str, str]:
    out = worker.cli("keys", "create", *args, "--format", "json")
    doc = json.loads(out.stdout)
    return doc["id"], doc["key"]


def gpt(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def claude(gateway: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)


def rows(worker: Worker, where: str, n: int) -> list[list[Any]]:
    return worker.wait_rows(
        "SELECT tags['case'], usage_source, toString(cost_usd), pricing_status, service, tags['spendstream.key'], "
        f"input_tokens, output_tokens FROM usage_events FINAL WHERE {where} ORDER BY tags['case']",
        n,
    )


def test_sdks_through_two_gateways_are_metered_exactly(
    worker: Worker, gateways: tuple[Gateway, Gateway], replay: ReplayServer
) -> None:
    a, b = gateways
    key_id, key = create_key(worker, "--project", "gw-shop", "--team", "web", "--user", "ann")
    tag = {"X-Spendstream-Tags": "case=%s"}

    def h(case: str) -> dict[str, str]:
        return {
            "X-Spendstream-Tags": tag["X-Spendstream-Tags"] % case,
            "X-Spendstream-Project": "someone-else",
        }

    gpt(a, key).chat.completions.create(model="o3", messages=MSGS, extra_headers=h("chat"))
    chunks = list(
        gpt(b, key).chat.completions.create(
            model="gpt-4o-mini", messages=MSGS, stream=True, extra_headers=h("stream_no_usage")
        )
    )
    # the gateway asked the provider for usage to meter the stream; the client did not, so it sees none
    assert [c for c in chunks if c.usage is not None] == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello there, how can I help you today?"
    )
    asked = list(
        gpt(a, key).chat.completions.create(
            model="gpt-4o-mini",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=h("stream_usage"),
        )
    )
    assert asked[-1].usage is not None
    assert asked[-1].usage.completion_tokens == 10
    gpt(b, key).responses.create(model="o1", input="Say hello", extra_headers=h("responses"))
    gpt(a, key).embeddings.create(
        model="text-embedding-ada-002", input="Say hello", extra_headers=h("embeddings")
    )
    claude(b, key).messages.create(model=CLAUDE, max_tokens=64, messages=MSGS, extra_headers=h("messages"))
    with claude(a, key).messages.stream(
        model=CLAUDE, max_tokens=64, messages=MSGS, extra_headers=h("messages_stream")
    ) as stream:
        assert "".join(stream.text_stream) == "Hello!"
    gemini_body = {"contents": [{"parts": [{"text": "Say hello"}]}]}
    got = httpx.post(
        f"{b.url}/v1beta/models/gemini-2.5-flash:generateContent",
        json=gemini_body,
        headers={"x-goog-api-key": key, **h("gemini")},
    )
    assert got.status_code == 200, got.text
    with httpx.stream(
        "POST",
        f"{a.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={key}",
        json=gemini_body,
        headers=h("gemini_stream"),
    ) as streamed:
        assert streamed.status_code == 200
        assert b"".join(streamed.iter_bytes()).count(b"data:") >= 2
    with pytest.raises(openai.APIError):  # the provider drops the stream after 3 events
        for _ in gpt(b, key).chat.completions.create(
            model="gpt-4o-mini",
            messages=MSGS,
            stream=True,
            extra_headers=h("stream_cut"),
            extra_query={"replay_cut": 3},
        ):
            pass

    # multipart uploads and binary answers: the model comes from the form, the meter from the body
    gpt(a, key).audio.transcriptions.create(
        model="whisper-1",
        file=("a.mp3", b"ID3 fake audio"),
        response_format="verbose_json",
        extra_headers=h("audio_in"),
    )
    speech = gpt(b, key).audio.speech.create(
        model="tts-1",
        voice="alloy",
        input="The quick brown fox jumped over the lazy dog.",
        extra_headers=h("audio_out"),
    )
    assert speech.read().startswith(b"ID3")
    gpt(a, key).images.generate(
        model="gpt-image-1", prompt="An otter", size="1024x1024", quality="high", extra_headers=h("images")
    )

    found = rows(worker, "project = 'gw-shop'", 13)
    by_case = {r[0]: r[1:] for r in found}
    assert sorted(by_case) == sorted(
        [
            "chat",
            "stream_no_usage",
            "stream_usage",
            "responses",
            "embeddings",
            "messages",
            "messages_stream",
            "gemini",
            "gemini_stream",
            "stream_cut",
            "audio_in",
            "audio_out",
            "images",
        ]
    )
    for case, (_source, cost, status, service, key_tag, *_counts) in by_case.items():
        assert (status, service, key_tag) == ("priced", "gateway", key_id), case
        assert Decimal(cost) > 0, case  # never $0, cut streams included
    # exact, by hand from the price cards (per million tokens):
    # 50 x $3 + 1800 cache reads x $0.30 + 1548 5m writes x $3.75 + 500 1h writes x $6 + 503 x $15
    assert by_case["chat"][:2] == ["reported", "0.003532"]  # o3: 86 x $2 + 1920 cached x $0.50 + 300 x $8
    assert by_case["messages"][:2] == ["reported", "0.01704"]
    assert by_case["messages_stream"][:2] == ["reported", "0.0003"]  # 25 x $3 + 15 x $15
    assert by_case["stream_no_usage"][:2] == ["reported", "0.00000885"]  # 19 x $0.15 + 10 x $0.60
    assert by_case["stream_usage"][:2] == ["reported", "0.00000885"]
    assert by_case["embeddings"][:2] == ["reported", "0.0000008"]  # 8 x $0.10
    assert by_case["stream_cut"][0] == "estimated"
    assert by_case["audio_in"][:2] == ["reported", "0.0009"]  # whisper-1: 9 s x $0.0001
    assert by_case["audio_out"][:2] == ["reported", "0.000675"]  # tts-1: 45 characters x $15 per M
    listed = {k["id"]: k for k in json.loads(worker.cli("keys", "list", "--format", "json").stdout)}
    assert time.time() - listed[key_id]["last_used_at_us"] / 1e6 < 600  # its latest call, from the history
    # the key decided the attribution, not the X-Spendstream-Project header
    assert worker.sql(
        f"SELECT DISTINCT project, team, user FROM usage_events WHERE tags['spendstream.key'] = '{key_id}'"
    ) == [["gw-shop", "web", "ann"]]
    # no provider request carried the internal key; every one carried the master key
    sent = [r for r in replay.requests if "Say hello" in r.body.decode("utf-8", "replace")]
    assert len(sent) >= 10
    assert all(key not in json.dumps(r.headers) and key not in r.path for r in sent)
    auth = {
        r.headers.get("authorization") or r.headers.get("x-api-key") or r.headers.get("x-goog-api-key")
        for r in sent
    }
    assert auth == {
        f"Bearer {MASTER['OPENAI_API_KEY']}",
        MASTER["ANTHROPIC_API_KEY"],
        MASTER["GEMINI_API_KEY"],
    }


def test_refusals_raise_each_sdks_own_exception(worker: Worker, gateways: tuple[Gateway, Gateway]) -> None:
    a, b = gateways
    with pytest.raises(openai.AuthenticationError):
        gpt(a, "sk-ss-not-a-key").chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    with pytest.raises(anthropic.AuthenticationError):
        claude(b, "sk-ss-not-a-key").messages.create(model=CLAUDE, max_tokens=8, messages=MSGS)
    gem = httpx.post(
        f"{a.url}/v1beta/models/gemini-2.5-flash:generateContent?key=nope", json={"contents": []}
    )
    assert (gem.status_code, gem.json()["error"]["status"]) == (401, "UNAUTHENTICATED")

    _, basic = create_key(worker, "--project", "gw-basic")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gpt(b, basic).chat.completions.create(model="o3", messages=MSGS)
    assert "basic" in str(refused.value)
    assert "gpt-4o-mini*" in str(refused.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude(a, basic).messages.create(model=CLAUDE, max_tokens=8, messages=MSGS)
    assert gpt(a, basic).chat.completions.create(model="gpt-4o-mini", messages=MSGS).usage is not None
    allowed = [m.id for m in gpt(b, basic).models.list()]
    assert allowed == ["gpt-4o-mini", "text-embedding-3-small"]  # o3, gpt-4o: outside the basic tier
    with pytest.raises(openai.BadRequestError):
        gpt(a, basic).chat.completions.create(
            model="gpt-4o-mini", messages=MSGS, extra_headers={"x-spendstream-cache": "ttl=forever"}
        )


def test_fleet_wide_rate_limit_across_two_instances(
    worker: Worker, gateways: tuple[Gateway, Gateway]
) -> None:
    """4 requests per minute for the key, 10 asked alternately of both instances: 4 served."""
    a, b = gateways
    _, key = create_key(worker, "--project", "gw-rate", "--rpm", "4")
    served, limited = 0, []
    for i in range(10):
        try:
            gpt((a, b)[i % 2], key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
            served += 1
        except openai.RateLimitError as exc:
            limited.append(exc.response)
        time.sleep(0.15)  # longer than the instances' sync interval: the fleet sees every request
    assert (served, len(limited)) == (4, 6)
    headers = limited[0].headers
    assert headers["x-ratelimit-limit-requests"] == "4"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 61  # whole seconds, rounded up

    # the project's own limit (policy file: gw-prate 3 RPM) holds across its keys and both instances
    keys = [create_key(worker, "--project", "gw-prate")[1] for _ in range(2)]
    served = 0
    for i in range(8):
        try:
            gpt((a, b)[i % 2], keys[i // 2 % 2]).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
            served += 1
        except openai.RateLimitError as exc:
            limited.append(exc.response)
        time.sleep(0.15)
    assert served == 3
    assert {r.headers["x-ratelimit-limit-requests"] for r in limited[6:]} == {"3"}


def wait_status(gateway: Gateway, key: str, status: int, timeout: float = 5) -> float:
    """Seconds until a chat call through `gateway` answers `status`."""
    started = time.monotonic()
    while True:
        got = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MSGS},
            headers={"authorization": f"Bearer {key}"},
        )
        if got.status_code == status:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, (got.status_code, got.text)
        time.sleep(0.02)


def test_revoke_and_block_take_effect_on_both_instances(
    worker: Worker, gateways: tuple[Gateway, Gateway]
) -> None:
    a, b = gateways
    key_id, key = create_key(worker, "--project", "gw-revoke")
    assert wait_status(a, key, 200) < 1.5
    assert wait_status(b, key, 200) < 1.5
    worker.cli("keys", "revoke", key_id)
    assert wait_status(a, key, 401) < 1.5
    assert wait_status(b, key, 401) < 1.5

    _, blocked_key = create_key(worker, "--project", "gw-block")
    worker.cli("block", "project:gw-block", "--reason", "incident 42")
    assert wait_status(a, blocked_key, 429) < 3
    assert wait_status(b, blocked_key, 429) < 3
    with pytest.raises(openai.RateLimitError) as refused:
        gpt(a, blocked_key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["scope"], error["reason"], error["code"]) == (
        "project:gw-block",
        "manual",
        "budget_exceeded",
    )
    worker.cli("unblock", "project:gw-block")
    assert wait_status(b, blocked_key, 200) < 3


def test_key_budget_and_member_template_block_only_who_crossed(
    worker: Worker, gateways: tuple[Gateway, Gateway]
) -> None:
    a, b = gateways
    worker.cli("budget", "set", "user:*", "0.001", "--window", "daily")
    _, alice = create_key(worker, "--project", "gw-team", "--user", "alice")
    _, bob = create_key(worker, "--project", "gw-team", "--user", "bob")
    capped_id, capped = create_key(worker, "--project", "gw-team", "--budget", "0.001", "--window", "daily")
    for key in (alice, capped):  # one o3 call costs $0.003532 > $0.001
        gpt(a, key).chat.completions.create(model="o3", messages=MSGS)
    wait_status(b, alice, 429, timeout=15)
    wait_status(a, capped, 429, timeout=15)
    with pytest.raises(anthropic.RateLimitError) as refused:
        claude(b, alice).messages.create(model=CLAUDE, max_tokens=8, messages=MSGS)
    body = refused.value.body
    assert isinstance(body, dict)
    assert (body["error"]["scope"], body["error"]["reason"]) == ("user:alice", "budget_exceeded")
    assert int(refused.value.response.headers["retry-after"]) > 0
    with pytest.raises(openai.RateLimitError) as refused_key:
        gpt(b, capped).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert isinstance(refused_key.value.body, dict)
    assert refused_key.value.body["scope"] == f"key:{capped_id}"
    assert wait_status(a, bob, 200) < 1  # bob, same project and template, did not cross


def test_cache_hits_skip_the_provider_and_never_cross_projects(
    worker: Worker, gateways: tuple[Gateway, Gateway], replay: ReplayServer
) -> None:
    a, b = gateways
    _, one = create_key(worker, "--project", "gw-cache-1")
    _, two = create_key(worker, "--project", "gw-cache-2")
    cached = {"x-spendstream-cache": "ttl=300", "X-Spendstream-Tags": "case=cached"}

    def upstream_calls() -> int:
        return sum(1 for r in replay.requests if "cache me" in r.body.decode("utf-8", "replace"))

    ask: Any = [{"role": "user", "content": "cache me"}]
    first = gpt(a, one).chat.completions.with_raw_response.create(
        model="o3", messages=ask, extra_headers=cached
    )
    second = gpt(b, one).chat.completions.with_raw_response.create(  # the other instance: shared Redis
        model="o3", messages=ask, extra_headers=cached
    )
    assert upstream_calls() == 1
    assert second.headers.get("x-spendstream-cache") == "hit"
    assert second.parse().model_dump() == first.parse().model_dump()
    gpt(a, two).chat.completions.create(model="o3", messages=ask, extra_headers=cached)  # another tenant
    assert upstream_calls() == 2
    streams = [
        list(
            gpt(g, one).chat.completions.create(
                model="gpt-4o-mini", messages=ask, stream=True, extra_headers=cached
            )
        )
        for g in (b, a)
    ]
    assert upstream_calls() == 3  # the stream was replayed as a stream, chunk for chunk
    assert [c.model_dump() for c in streams[0]] == [c.model_dump() for c in streams[1]]
    found = worker.wait_rows(
        "SELECT project, usage_source, toString(cost_usd), toString(saved_usd) FROM usage_events FINAL "
        "WHERE project LIKE 'gw-cache-%' ORDER BY project, usage_source, cost_usd",
        5,
    )
    assert [r[:2] for r in found] == [
        ["gw-cache-1", "cache"],
        ["gw-cache-1", "cache"],
        ["gw-cache-1", "reported"],
        ["gw-cache-1", "reported"],
        ["gw-cache-2", "reported"],
    ]
    hits = [r for r in found if r[1] == "cache"]
    assert all(r[2] == "0" for r in hits)
    saved = sorted(Decimal(r[3]) for r in hits)
    paid = sorted(Decimal(r[2]) for r in found if r[0] == "gw-cache-1" and r[1] == "reported")
    assert saved == paid  # what each hit would have cost: the savings are in SQL


def test_http_ingest_attributes_by_key_and_counts_retries_once(
    worker: Worker, gateways: tuple[Gateway, Gateway]
) -> None:
    a, b = gateways
    worker.cli("budget", "set", "project:gw-ingest", "100", "--window", "daily")
    key_id, key = create_key(worker, "--project", "gw-ingest", "--team", "batch")
    ids = [str(uuid.uuid4()) for _ in range(2)]
    batch = [
        {
            "event_id": ids[0],
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": 1000,
            "output_tokens": 100,
        },
        {"event_id": ids[1], "provider": "openai", "model": "gpt-4o-mini", "input_tokens": 2000},
        {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": -5},
        {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 5, "project": "not-mine"},
    ]
    headers = {"authorization": f"Bearer {key}"}
    first = httpx.post(f"{a.url}/v1/usage", json={"events": batch}, headers=headers)
    again = httpx.post(f"{b.url}/v1/usage", json=batch[:2], headers=headers)  # a client's retry
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["accepted"] == 2
    assert [e["index"] for e in first.json()["errors"]] == [2, 3]
    assert "not-mine" in first.json()["errors"][1]["error"]
    assert httpx.post(f"{a.url}/v1/usage", content=b"{not json", headers=headers).status_code == 400
    assert httpx.post(f"{a.url}/v1/usage", json=batch[:1]).status_code == 401
    found = worker.wait_rows(
        "SELECT event_id, team, tags['spendstream.key'], toString(cost_usd) FROM usage_events FINAL "
        "WHERE project = 'gw-ingest' ORDER BY input_tokens",
        2,
    )
    assert [r[:3] for r in found] == [[ids[0], "batch", key_id], [ids[1], "batch", key_id]]
    # budgets count the retried events once: 1000 x $0.15 + 100 x $0.60 + 2000 x $0.15 per M
    budgets = httpx.get(f"http://127.0.0.1:{worker.port}/budgets", timeout=30).json()["budgets"]
    spend = {r["scope"]: r["spend_usd"] for r in budgets}
    assert Decimal(spend["project:gw-ingest"]) == Decimal("0.00051")


@pytest.mark.skipif(not LEGACY_PYTHON.exists(), reason="scripts/sdk-venvs creates it in ./dev setup")
def test_legacy_sdk_generation_through_the_gateway(worker: Worker, gateways: tuple[Gateway, Gateway]) -> None:
    a, _ = gateways
    _, key = create_key(worker, "--project", "gw-legacy")
    script = f"""
import anthropic, openai
assert openai.__version__.startswith("2."), openai.__version__
msgs = [{{"role": "user", "content": "Say hello"}}]
g = openai.OpenAI(base_url="{a.url}/v1", api_key="{key}", max_retries=0)
g.chat.completions.create(model="o3", messages=msgs, extra_headers={{"X-Spendstream-Tags": "case=legacy_chat"}})
list(g.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,
     extra_headers={{"X-Spendstream-Tags": "case=legacy_stream"}}))
c = anthropic.Anthropic(base_url="{a.url}", api_key="{key}", max_retries=0)
c.messages.create(model="{CLAUDE}", max_tokens=64, messages=msgs, extra_headers={{"X-Spendstream-Tags": "case=legacy_messages"}})
try:
    openai.OpenAI(base_url="{a.url}/v1", api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError:
    print("refused")
"""
    out = subprocess.run(
        [str(LEGACY_PYTHON), "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert (out.returncode, out.stdout.strip()) == (0, "refused"), out.stderr
    found = rows(worker, "project = 'gw-legacy'", 3)
    assert [(r[0], r[1], r[2]) for r in found] == [
        ("legacy_chat", "reported", "0.003532"),  # 86 x $2 + 1920 cached x $0.50 + 300 x $8 per M
        ("legacy_messages", "reported", "0.01704"),
        ("legacy_stream", "reported", "0.00000885"),
    ]


def test_master_keys_never_leave_the_gateway(worker: Worker, gateways: tuple[Gateway, Gateway]) -> None:
    """Run last in the module: everything above has gone through the gateways."""
    a, b = gateways
    logs = a.log.read_text() + b.log.read_text() + worker.log.read_text()
    assert "gateway on http://" in a.log.read_text()
    assert " key=" in logs  # the access log is there, and below holds no secret
    for secret in MASTER.values():
        assert secret not in logs
        assert worker.sql(
            "SELECT count() FROM usage_events WHERE position(toString(tuple(*)), '" + secret + "') > 0"
        ) == [[0]]
    shown = worker.cli("config", check=True).stdout
    assert all(secret not in shown for secret in MASTER.values())
    env_config = subprocess.run(
        [sys.executable, "-m", "spendstream", "config"],
        env={**worker.env, **MASTER, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert "OPENAI_API_KEY" in env_config.stdout
    assert "**********" in env_config.stdout
    assert all(secret not in env_config.stdout + env_config.stderr for secret in MASTER.values())
    metrics = httpx.get(f"{a.url}/metrics").text
    assert 'spendstream_gateway_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert os.environ.get("OPENAI_API_KEY") != MASTER["OPENAI_API_KEY"]
