"""Every metered endpoint, called through the real SDKs of whichever generation is installed.

Used in-process by tests/test_instrument_sdk.py (openai >= 3 / anthropic >= 1 on httpx2) and, for
the legacy generation (openai 2.x / anthropic 0.x on httpx), run in `.venv-sdk-legacy` as

    python -m tests.providers.calls BASE_URL BOOTSTRAP TOPIC GENERATION

which emits through a real SyncEmitter and Emitter to TOPIC and prints a JSON summary.

Each call carries `X-Spendstream-Tags: case=<name>, gen=<generation>, mode=<sync|async>`, so the
test can find its event(s) on `usage.raw`. `EXPECTED` is what each case must produce.
"""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import openai

from producers.instrument import AsyncMeteringTransport, MeteringTransport
from spendstream.errors import BudgetExceeded

if not openai.__version__.startswith("2."):
    import httpx2 as sdk_httpx  # openai >= 3 and anthropic >= 1 take an httpx2 client
else:  # pragma: no cover - legacy venv
    import httpx as sdk_httpx  # type: ignore[no-redef]

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"anthropic.*")
warnings.filterwarnings("ignore", message=r".*deprecated.*", category=DeprecationWarning)

PROJECT = "checkout"
CLAUDE = "claude-sonnet-4-5-20250929"
SPEECH_INPUT = "The quick brown fox jumped over the lazy dog."
BOTH_ESTIMATED = "input_tokens,output_tokens:chars/4"

# case -> the UsageEvent fields each of its events must have (meters not named must be 0 / default)
EXPECTED: dict[str, list[dict[str, Any]]] = {
    "chat": [
        {"provider": "openai", "model": "o3", "input_tokens": 86, "cached_input_tokens": 1920}
        | {"output_tokens": 300, "reasoning_tokens": 192}
    ],
    "chat_stream": [{"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 19, "output_tokens": 10}],
    # cut after 3 events: "" + "Hello" + " there, how can I help" = 27 chars -> 7; prompt "Say hello" -> 3
    "chat_stream_cut": [
        {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 3, "output_tokens": 7}
        | {"usage_source": "estimated", "usage_missing": "stream_cut", "usage_estimate": BOTH_ESTIMATED}
    ],
    # the caller opted out of usage: "Hello there, how can I help you today?" = 38 chars -> 10
    "chat_stream_optout": [
        {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 3, "output_tokens": 10}
        | {"usage_source": "estimated", "usage_missing": "not_requested", "usage_estimate": BOTH_ESTIMATED}
    ],
    "responses": [
        {
            "provider": "openai",
            "model": "o1",
            "input_tokens": 81,
            "output_tokens": 1035,
            "reasoning_tokens": 832,
        }
    ],
    "responses_stream": [{"provider": "openai", "model": "gpt-5.4", "input_tokens": 37, "output_tokens": 11}],
    "embeddings": [
        {"provider": "openai", "model": "text-embedding-3-small", "input_tokens": 8, "output_tokens": 0}
    ],
    "transcription": [
        {"provider": "openai", "model": "gpt-4o-transcribe", "input_audio_tokens": 14, "output_tokens": 45}
    ],
    "transcription_whisper": [{"provider": "openai", "model": "whisper-1", "audio_seconds": Decimal(9)}],
    "speech": [{"provider": "openai", "model": "tts-1", "characters": len(SPEECH_INPUT)}],
    "images": [
        {"provider": "openai", "model": "gpt-image-1", "input_tokens": 50, "output_tokens": 50}
        | {"images": 1, "image_size": "1024x1024", "image_quality": "high"}
    ],
    "images_dalle": [
        {
            "provider": "openai",
            "model": "dall-e-3",
            "images": 1,
            "image_size": "1792x1024",
            "image_quality": "hd",
        }
    ],
    "azure_chat": [
        {"provider": "azure", "model": "gpt-4o-2024-08-06", "input_tokens": 900, "cached_input_tokens": 300}
        | {"output_tokens": 250, "region": "data_zone"}
    ],
    "batch_openai": [
        {"provider": "openai", "model": "gpt-3.5-turbo-0125", "input_tokens": 22, "output_tokens": 2}
        | {"service_tier": "batch", "batch_line": "batch_req_123"},
        {"provider": "openai", "model": "gpt-3.5-turbo-0125", "input_tokens": 20, "output_tokens": 9}
        | {"service_tier": "batch", "batch_line": "batch_req_456"},
    ],
    "messages": [
        {"provider": "anthropic", "model": CLAUDE, "input_tokens": 50, "cached_input_tokens": 1800}
        | {"cache_write_tokens": 1548, "cache_write_1h_tokens": 500, "output_tokens": 503}
    ],
    "messages_stream": [{"provider": "anthropic", "model": CLAUDE, "input_tokens": 25, "output_tokens": 15}],
    # cut after message_start, content_block_start, ping, "Hello": input reported, output max(1, 5/4 -> 2)
    "messages_stream_cut": [
        {"provider": "anthropic", "model": CLAUDE, "input_tokens": 25, "output_tokens": 2}
        | {
            "usage_source": "estimated",
            "usage_missing": "stream_cut",
            "usage_estimate": "output_tokens:chars/4",
        }
    ],
    "batch_anthropic": [
        {
            "provider": "anthropic",
            "model": "claude-3-5-sonnet-20240620",
            "input_tokens": 11,
            "output_tokens": 36,
        }
        | {"service_tier": "batch", "batch_line": "msg_014VwiXbi91y3JMjcpyGBHX5"},
        {
            "provider": "anthropic",
            "model": "claude-3-5-sonnet-20240620",
            "input_tokens": 10,
            "output_tokens": 34,
        }
        | {"service_tier": "batch", "batch_line": "msg_01FqfsLoHwgeFbguDgpz48m7"},
    ],
    "gemini": [
        {"provider": "google", "model": "gemini-2.5-flash", "input_tokens": 250, "cached_input_tokens": 1000}
        | {"output_tokens": 500, "reasoning_tokens": 380}
    ],
    "gemini_stream": [
        {"provider": "google", "model": "gemini-2.5-flash", "input_tokens": 10, "output_tokens": 96}
        | {"reasoning_tokens": 64}
    ],
    "gemini_gzip": [
        {"provider": "google", "model": "gemini-2.5-flash", "input_tokens": 250, "cached_input_tokens": 1000}
        | {"output_tokens": 500, "reasoning_tokens": 380}
    ],
    "blocked": [],  # refused by the guard: no event, no upstream request
    "upstream_error": [],  # a 500: nothing billable
}
ASYNC_CASES: tuple[str, ...] = ("chat", "chat_stream", "chat_stream_cut", "responses_stream", "messages")
ASYNC_CASES += ("messages_stream", "gemini_stream", "blocked")


class BlockedSetGuard:
    """A GuardLike with a fixed set of blocked scopes, e.g. {"project:frozen"}."""

    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked
        self.window_end = (datetime.now(UTC) + timedelta(days=1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        self.checks: list[dict[str, Any]] = []

    def check(
        self,
        *,
        project: str,
        team: str | None = None,
        user: str | None = None,
        model: str | None = None,
        key: str | None = None,
    ) -> None:
        self.checks.append({"project": project, "team": team, "user": user, "model": model})
        for scope in (f"project:{project}", f"team:{team}", f"user:{user}", f"model:{model}"):
            if scope in self.blocked:
                raise BudgetExceeded(
                    scope, "budget_exceeded", Decimal("12.50"), Decimal("10"), self.window_end
                )


def tags(case: str, gen: str, mode: str) -> dict[str, str]:
    return {"X-Spendstream-Tags": f"case={case}, gen={gen}, mode={mode}"}


def run_sync(base: str, emitter: Any, gen: str, guard: Any = None) -> dict[str, Any]:
    """Every case through the sync SDK clients; returns what the caller saw (for assertions)."""
    transport = MeteringTransport(emitter=emitter, project=PROJECT, team="commerce", guard=guard)
    seen: dict[str, Any] = {}
    http = sdk_httpx.Client(transport=transport)
    oai: Any = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", http_client=http, max_retries=0)
    ant: Any = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", http_client=http, max_retries=0)
    h = lambda case: tags(case, gen, "sync")  # noqa: E731
    msgs = [{"role": "user", "content": "Say hello"}]

    r = oai.chat.completions.create(model="o3", messages=msgs, extra_headers=h("chat"))
    seen["chat"] = r.usage.prompt_tokens if r.usage else None
    text = ""
    for chunk in oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=msgs,
        stream=True,
        extra_headers=h("chat_stream"),
    ):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    seen["chat_stream"] = text
    try:
        for _ in oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=msgs,
            stream=True,
            extra_headers={**h("chat_stream_cut"), "x-replay-cut": "3"},
        ):
            pass
        seen["chat_stream_cut"] = "completed"
    except Exception as exc:
        seen["chat_stream_cut"] = type(exc).__name__
    for _ in oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=msgs,
        stream=True,
        stream_options={"include_usage": False},
        extra_headers=h("chat_stream_optout"),
    ):
        pass
    oai.responses.create(model="o1", input="Tongue twister?", extra_headers=h("responses"))
    with oai.responses.stream(model="gpt-5.4", input="Hi", extra_headers=h("responses_stream")) as rs:
        for _ in rs:
            pass
    oai.embeddings.create(
        model="text-embedding-3-small", input="The food was delicious", extra_headers=h("embeddings")
    )
    oai.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("a.mp3", b"ID3 fake audio"), extra_headers=h("transcription")
    )
    oai.audio.transcriptions.create(
        model="whisper-1",
        file=("a.mp3", b"ID3 fake audio"),
        response_format="verbose_json",
        timestamp_granularities=["word"],
        extra_headers=h("transcription_whisper"),
    )
    speech = oai.audio.speech.create(
        model="tts-1", voice="alloy", input=SPEECH_INPUT, extra_headers=h("speech")
    )
    seen["speech_bytes"] = len(speech.read())
    oai.images.generate(
        model="gpt-image-1",
        prompt="A cute baby sea otter",
        size="1024x1024",
        quality="high",
        extra_headers=h("images"),
    )
    oai.images.generate(
        model="dall-e-3",
        prompt="A cute baby sea otter",
        size="1792x1024",
        quality="hd",
        extra_headers=h("images_dalle"),
    )
    oai.batches.create(
        input_file_id="file-abc123",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers=h("batch_create"),
    )
    seen["batch_openai"] = len(oai.files.content("file-cvaTdG", extra_headers=h("batch_openai")).read())

    azure_transport = MeteringTransport(emitter=emitter, project=PROJECT, team="commerce", region="data_zone")
    az: Any = openai.AzureOpenAI(
        azure_endpoint=base,
        api_version="2024-10-21",
        api_key="azure-test",
        http_client=sdk_httpx.Client(transport=azure_transport),
        max_retries=0,
    )
    az.chat.completions.create(model="my-gpt4o-deployment", messages=msgs, extra_headers=h("azure_chat"))

    ant.messages.create(model=CLAUDE, max_tokens=64, messages=msgs, extra_headers=h("messages"))
    with ant.messages.stream(
        model=CLAUDE,
        max_tokens=64,
        messages=msgs,
        extra_headers=h("messages_stream"),
    ) as ms:
        seen["messages_stream"] = "".join(ms.text_stream)
    try:
        with ant.messages.stream(
            model=CLAUDE,
            max_tokens=64,
            messages=msgs,
            extra_headers={**h("messages_stream_cut"), "x-replay-cut": "4"},
        ) as ms:
            "".join(ms.text_stream)
        seen["messages_stream_cut"] = "completed"
    except Exception as exc:
        seen["messages_stream_cut"] = type(exc).__name__
    results = list(
        ant.messages.batches.results("msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d", extra_headers=h("batch_anthropic"))
    )
    seen["batch_anthropic"] = len(results)

    gem_url = f"{base}/v1beta/models/gemini-2.5-flash"
    gem_body = {"contents": [{"parts": [{"text": "How does AI work?"}]}]}
    http.post(f"{gem_url}:generateContent", json=gem_body, headers=h("gemini")).raise_for_status()
    with http.stream(
        "POST", f"{gem_url}:streamGenerateContent?alt=sse", json=gem_body, headers=h("gemini_stream")
    ) as s:
        seen["gemini_stream"] = sum(1 for line in s.iter_lines() if line.startswith("data:"))
    gz = http.post(
        f"{gem_url}:generateContent", json=gem_body, headers={**h("gemini_gzip"), "x-replay-gzip": "1"}
    )
    seen["gemini_gzip"] = gz.json()["usageMetadata"]["promptTokenCount"]

    try:
        oai.chat.completions.create(
            model="o3",
            messages=msgs,
            extra_headers={**h("blocked"), "X-Spendstream-Project": "frozen"},
        )
        seen["blocked"] = "not refused"
    except openai.RateLimitError as exc:
        seen["blocked"] = {"status": exc.status_code, "body": exc.body}
    try:
        oai.chat.completions.create(
            model="o3",
            messages=msgs,
            extra_headers={**h("upstream_error"), "x-replay-status": "500"},
        )
        seen["upstream_error"] = "no error"
    except openai.InternalServerError as exc:
        seen["upstream_error"] = exc.status_code
    try:
        ant.messages.create(
            model=CLAUDE,
            max_tokens=64,
            messages=msgs,
            extra_headers={**h("blocked"), "X-Spendstream-User": "mallory"},
        )
        seen["blocked_anthropic"] = "not refused"
    except anthropic.RateLimitError as exc:
        seen["blocked_anthropic"] = {"status": exc.status_code, "body": exc.body}
    http.close()
    az.close()
    seen["stats"] = vars(transport.stats) | {"azure_metered": azure_transport.stats.metered}
    return seen


async def run_async(base: str, emitter: Any, gen: str, guard: Any = None) -> dict[str, Any]:
    """The ASYNC_CASES through the async SDK clients and an AsyncMeteringTransport."""
    transport = AsyncMeteringTransport(emitter=emitter, project=PROJECT, team="commerce", guard=guard)
    seen: dict[str, Any] = {}
    http = sdk_httpx.AsyncClient(transport=transport)
    oai: Any = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-test", http_client=http, max_retries=0)
    ant: Any = anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test", http_client=http, max_retries=0)
    h = lambda case: tags(case, gen, "async")  # noqa: E731
    msgs = [{"role": "user", "content": "Say hello"}]

    await oai.chat.completions.create(model="o3", messages=msgs, extra_headers=h("chat"))
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=msgs,
        stream=True,
        extra_headers=h("chat_stream"),
    )
    async for _ in stream:
        pass
    try:
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=msgs,
            stream=True,
            extra_headers={**h("chat_stream_cut"), "x-replay-cut": "3"},
        )
        async for _ in stream:
            pass
        seen["chat_stream_cut"] = "completed"
    except Exception as exc:
        seen["chat_stream_cut"] = type(exc).__name__
    async with oai.responses.stream(model="gpt-5.4", input="Hi", extra_headers=h("responses_stream")) as rs:
        async for _ in rs:
            pass
    await ant.messages.create(model=CLAUDE, max_tokens=64, messages=msgs, extra_headers=h("messages"))
    async with ant.messages.stream(
        model=CLAUDE,
        max_tokens=64,
        messages=msgs,
        extra_headers=h("messages_stream"),
    ) as ms:
        seen["messages_stream"] = "".join([t async for t in ms.text_stream])
    gem = f"{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    body = {"contents": [{"parts": [{"text": "How does AI work?"}]}]}
    async with http.stream("POST", gem, json=body, headers=h("gemini_stream")) as s:
        seen["gemini_stream"] = len([line async for line in s.aiter_lines() if line.startswith("data:")])
    try:
        await oai.chat.completions.create(
            model="o3",
            messages=msgs,
            extra_headers={**h("blocked"), "X-Spendstream-Project": "frozen"},
        )
        seen["blocked"] = "not refused"
    except openai.RateLimitError as exc:
        seen["blocked"] = {"status": exc.status_code, "body": exc.body}
    await http.aclose()
    seen["stats"] = vars(transport.stats)
    return seen


def main(argv: list[str]) -> None:
    """Legacy-generation run: real emitters to TOPIC, summary JSON on stdout."""
    from producers import Emitter, SyncEmitter

    base, bootstrap, topic, gen = argv
    guard = BlockedSetGuard({"project:frozen", "user:mallory"})
    with SyncEmitter(bootstrap_servers=bootstrap, service="instrument-test", topic=topic) as emitter:
        sync_seen = run_sync(base, emitter, gen, guard)

    async def run() -> dict[str, Any]:
        async with Emitter(bootstrap_servers=bootstrap, service="instrument-test", topic=topic) as em:
            return await run_async(base, em, gen, guard)

    async_seen = asyncio.run(run())
    versions = {"openai": openai.__version__, "anthropic": anthropic.__version__, "http": sdk_httpx.__name__}
    print(json.dumps({"sync": sync_seen, "async": async_seen, "versions": versions, "checks": guard.checks}))


if __name__ == "__main__":
    main(sys.argv[1:])
