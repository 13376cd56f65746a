"""The real SDKs of both generations, through the metering transports, against a real loopback
server replaying provider bodies, emitting through real emitters to the real broker.

Current generation (openai >= 3, anthropic >= 1 on httpx2) runs in this process; the legacy one
(openai 2.8, anthropic 0.75 on httpx) in `.venv-sdk-legacy` (scripts/sdk-venvs), as a subprocess
of the same scenario module (tests/providers/calls.py). Every event is read back from `usage.raw`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from producers import Emitter, SyncEmitter
from spendstream.topics import Topics, ensure_topics
from spendstream.usage import COUNT_FIELDS
from spendstream.wire import default_codec
from stream_processors.pricing import audio_micros
from tests.conftest import REPO
from tests.providers import calls
from tests.providers.replay import ReplayServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning"),
]

LEGACY_PYTHON = REPO / ".venv-sdk-legacy" / "bin" / "python"
LEGACY_PINS = {"openai": "2.8.1", "anthropic": "0.75.0", "http": "httpx"}
GENERATIONS = ("current", "legacy")
METERS = COUNT_FIELDS  # every meter of UsageEvent
TAG_FIELDS = ("usage_missing", "usage_estimate", "batch_line")


async def consume(bootstrap: str, topic: str, expected: int, wait: float = 60) -> list[dict[str, Any]]:
    """Every UsageEvent on `topic` (UsageBatch records from the emitters, flattened)."""
    codec = default_codec()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    events: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + wait
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for m in messages:
                    name, record = codec.decode(m.value)
                    events.extend(record["events"] if name == "UsageBatch" else [record])
                    idle_since = time.monotonic()
            if len(events) >= expected and time.monotonic() - idle_since > 1.5:
                break
    finally:
        await consumer.stop()
    return events


def expected_count(mode: str) -> int:
    cases = calls.EXPECTED if mode == "sync" else {c: calls.EXPECTED[c] for c in calls.ASYNC_CASES}
    return sum(len(v) for v in cases.values())


@pytest.fixture(scope="module")
def run(kafka: str) -> dict[str, Any]:
    """Both generations, sync and async, every case; then everything read back from usage.raw."""
    topics = Topics(f"ti{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(kafka, topics, partitions=4))
    out: dict[str, Any] = {"seen": {}, "topic": topics.usage_raw}
    with ReplayServer() as server:
        guard = calls.BlockedSetGuard({"project:frozen", "user:mallory"})
        started = time.monotonic()
        with SyncEmitter(bootstrap_servers=kafka, service="instrument-test", topic=topics.usage_raw) as em:
            out["seen"]["current", "sync"] = calls.run_sync(server.url, em, "current", guard)

        async def run_async() -> dict[str, Any]:
            async with Emitter(
                bootstrap_servers=kafka, service="instrument-test", topic=topics.usage_raw
            ) as aem:
                return await calls.run_async(server.url, aem, "current", guard)

        out["seen"]["current", "async"] = asyncio.run(run_async())
        out["checks"] = list(guard.checks)
        assert LEGACY_PYTHON.exists(), "run scripts/sdk-venvs (./dev setup does) to create .venv-sdk-legacy"
        proc = subprocess.run(
            [
                str(LEGACY_PYTHON),
                "-m",
                "tests.providers.calls",
                server.url,
                kafka,
                topics.usage_raw,
                "legacy",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        legacy = json.loads(proc.stdout.strip().splitlines()[-1])
        out["seen"]["legacy", "sync"] = legacy["sync"]
        out["seen"]["legacy", "async"] = legacy["async"]
        out["legacy_versions"] = legacy["versions"]
        out["requests"] = list(server.requests)
        out["seconds"] = time.monotonic() - started
    total = 2 * (expected_count("sync") + expected_count("async"))
    events = asyncio.run(consume(kafka, topics.usage_raw, total))
    by_case: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_case[e["tags"]["gen"], e["tags"]["mode"], e["tags"]["case"]].append(e)
    out["events"] = events
    out["by_case"] = by_case
    return out


def test_the_legacy_venv_runs_the_legacy_generation(run: dict[str, Any]) -> None:
    assert run["legacy_versions"] == LEGACY_PINS


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_call_emits_exactly_its_events_and_no_others(run: dict[str, Any], gen: str, mode: str) -> None:
    cases = calls.EXPECTED if mode == "sync" else {c: calls.EXPECTED[c] for c in calls.ASYNC_CASES}
    got = {case: len(run["by_case"].get((gen, mode, case), [])) for case in cases}
    assert got == {case: len(events) for case, events in cases.items()}
    stray = [k for k in run["by_case"] if k[0] == gen and k[1] == mode and k[2] not in cases]
    assert stray == []


def _check(event: dict[str, Any], expected: dict[str, Any]) -> None:
    want: dict[str, Any] = dict.fromkeys(METERS, 0)
    want |= {
        "usage_source": "reported",
        "service_tier": "standard",
        "region": "global",
        "audio_seconds": Decimal(0),
    }
    want |= {"project": calls.PROJECT, "team": "commerce", "user": None, "service": "instrument-test"}
    want |= {"image_size": "", "image_quality": ""}
    tag_want = {k: expected[k] for k in TAG_FIELDS if k in expected}
    want |= {k: v for k, v in expected.items() if k not in TAG_FIELDS}
    got = {k: event[k] for k in want if k != "audio_seconds"}
    got["audio_seconds"] = Decimal(audio_micros(event["audio_seconds"])).scaleb(-6)
    assert got == want
    assert {k: event["tags"][k] for k in TAG_FIELDS if k in event["tags"]} == tag_want


CASES = [(gen, "sync", case) for gen in GENERATIONS for case in calls.EXPECTED if calls.EXPECTED[case]]
CASES += [(gen, "async", case) for gen in GENERATIONS for case in calls.ASYNC_CASES if calls.EXPECTED[case]]


@pytest.mark.parametrize(("gen", "mode", "case"), CASES)
def test_event_fields_are_exact(run: dict[str, Any], gen: str, mode: str, case: str) -> None:
    events = sorted(run["by_case"][gen, mode, case], key=lambda e: e["tags"].get("batch_line", ""))
    expected = sorted(calls.EXPECTED[case], key=lambda e: str(e.get("batch_line", "")))
    assert len(events) == len(expected)
    for event, want in zip(events, expected, strict=True):
        _check(event, want)


def test_batch_lines_have_stable_event_ids_across_generations(run: dict[str, Any]) -> None:
    ids = {
        gen: sorted(
            e["event_id"]
            for case in ("batch_openai", "batch_anthropic")
            for e in run["by_case"][gen, "sync", case]
        )
        for gen in GENERATIONS
    }
    assert len(ids["current"]) == 4
    assert ids["current"] == ids["legacy"]  # the same result line downloaded twice is one event downstream


@pytest.mark.parametrize("gen", GENERATIONS)
def test_blocked_calls_get_a_429_naming_scope_reason_and_window_and_never_go_upstream(
    run: dict[str, Any], gen: str
) -> None:
    seen = run["seen"][gen, "sync"]
    blocked = seen["blocked"]
    assert blocked["status"] == 429
    body = blocked["body"]
    body = body.get("error", body)  # openai 3.x hands over the "error" object, 2.x the whole body
    assert (body["scope"], body["reason"], body["spend_usd"], body["limit_usd"]) == (
        "project:frozen",
        "budget_exceeded",
        "12.50",
        "10",
    )
    assert body["window_end"].endswith("T00:00:00+00:00")
    anthropic_body = seen["blocked_anthropic"]["body"]
    assert anthropic_body["error"]["type"] == "rate_limit_error"
    assert anthropic_body["error"]["scope"] == "user:mallory"
    assert run["seen"][gen, "async"]["blocked"]["status"] == 429
    upstream = [r for r in run["requests"] if "case=blocked" in r.headers.get("x-spendstream-tags", "")]
    assert upstream == []
    assert not [r for r in run["requests"] if r.headers.get("x-spendstream-project") == "frozen"]


def test_the_guard_is_asked_once_per_billable_call_with_the_call_attribution(run: dict[str, Any]) -> None:
    checks = run["checks"]
    assert {"project": "frozen", "team": "commerce", "user": None, "model": "o3"} in checks
    assert {"project": "checkout", "team": "commerce", "user": "mallory", "model": calls.CLAUDE} in checks
    # current sync: every request but the two GETs (batch file content, Anthropic batch results: free)
    # and the Azure client (no guard); current async: every request
    sync_requests = run["seen"]["current", "sync"]["stats"]["requests"]
    async_requests = run["seen"]["current", "async"]["stats"]["requests"]
    assert len(checks) == (sync_requests - 3) + async_requests


def test_attribution_headers_never_leave_the_process(run: dict[str, Any]) -> None:
    leaked = [r.path for r in run["requests"] if any(h.startswith("x-spendstream-") for h in r.headers)]
    assert leaked == []


def test_openai_streams_are_asked_for_usage_unless_the_caller_opted_out(run: dict[str, Any]) -> None:
    streams = [
        r.json()
        for r in run["requests"]
        if r.path.endswith("/chat/completions") and b'"stream":true' in r.body
    ]
    assert streams
    opted_out = [b for b in streams if b["stream_options"] == {"include_usage": False}]
    asked = [b for b in streams if b["stream_options"] == {"include_usage": True}]
    assert len(opted_out) == 2  # one per generation
    assert len(asked) == len(streams) - 2


@pytest.mark.parametrize("gen", GENERATIONS)
def test_callers_see_the_provider_answers_unchanged(run: dict[str, Any], gen: str) -> None:
    seen = run["seen"][gen, "sync"]
    assert seen["chat"] == 2006
    assert seen["chat_stream"] == "Hello there, how can I help you today?"
    assert seen["messages_stream"] == "Hello!"
    assert seen["speech_bytes"] == 2058
    assert seen["batch_anthropic"] == 2
    assert seen["gemini_stream"] == 3
    assert seen["gemini_gzip"] == 1250
    assert seen["upstream_error"] == 500
    assert seen["chat_stream_cut"] in ("APIConnectionError", "RemoteProtocolError")


@pytest.mark.parametrize("gen", GENERATIONS)
def test_transport_stats_count_what_happened(run: dict[str, Any], gen: str) -> None:
    stats = run["seen"][gen, "sync"]["stats"]
    sync_events = expected_count("sync")
    assert stats["metered"] + stats["azure_metered"] == sync_events
    assert stats["estimated"] == 3  # chat_stream_cut, chat_stream_optout, messages_stream_cut
    assert (stats["refused"], stats["upstream_errors"], stats["lost"], stats["unmetered"]) == (2, 1, 0, 0)
    assert stats["errors"] == {}
