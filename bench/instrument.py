"""Instrumentation benchmark: what MeteringTransport adds to a non-streaming provider call.

    .venv/bin/python bench/instrument.py [--calls 3000] [--warmup 300]

Measured in one run, interleaved call by call (baseline, instrumented, baseline, ...):

- loopback: an `httpx2.Client` posting to the replay server on 127.0.0.1 (tests/providers/replay.py:
  a real HTTP/1.1 server, keep-alive) with and without `MeteringTransport`, for OpenAI Chat
  Completions, Anthropic Messages, Gemini generateContent and OpenAI Embeddings bodies. Per call:
  perf_counter_ns around `client.post(...)` including reading the body. The instrumented client
  emits through a real `SyncEmitter` to the bench broker; every event is read back at the end.
- isolated: the same two clients over an in-process `httpx2.MockTransport` that answers the same
  bytes at once, so the difference is the metering code alone (no socket noise).
- stream: one OpenAI chat stream (7 SSE events) end to end, both ways (information only).

Overhead figures are p50/p99 of the instrumented client minus p50/p99 of the baseline (the issue's
target: < 1 ms at p99), and the ratio instrumented / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx2
from _common import (
    BOOTSTRAP,
    bench_broker,
    code,
    create_topics,
    machine,
    new_run_id,
    percentiles_us,
    read_topic,
    say,
    write_result,
)

from producers import SyncEmitter
from producers.instrument import MeteringTransport
from spendstream.wire import default_codec
from tests.providers.replay import ReplayServer, fixture

ENDPOINTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "openai_chat": (
        "/v1/chat/completions",
        {"model": "o3", "messages": [{"role": "user", "content": "Hi"}]},
        "openai_chat.json",
    ),
    "anthropic_messages": (
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5-20250929",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        "anthropic_messages.json",
    ),
    "gemini_generate": (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"contents": [{"parts": [{"text": "Hi"}]}]},
        "gemini_generate.json",
    ),
    "openai_embeddings": (
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": "Hi"},
        "openai_embeddings.json",
    ),
}
STREAM = (
    "/v1/chat/completions",
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
)


def read_stream(client: httpx2.Client, url: str, body: dict[str, Any]) -> bytes:
    with client.stream("POST", url, json=body) as response:
        return b"".join(response.iter_bytes())


def timed(call: Callable[[], Any]) -> int:
    t0 = time.perf_counter_ns()
    call()
    return time.perf_counter_ns() - t0


def interleaved(
    base: Callable[[], Any], inst: Callable[[], Any], n: int, warmup: int
) -> tuple[list[int], list[int]]:
    for _ in range(warmup):
        base()
        inst()
    b: list[int] = []
    i: list[int] = []
    gc.collect()
    for k in range(n):
        if k % 2:
            b.append(timed(base))
            i.append(timed(inst))
        else:
            i.append(timed(inst))
            b.append(timed(base))
    return b, i


def compare(b: list[int], i: list[int]) -> dict[str, Any]:
    pb, pi = percentiles_us(b), percentiles_us(i)
    return {
        "baseline_us": pb,
        "instrumented_us": pi,
        "overhead_p50_us": round(pi["p50"] - pb["p50"], 1),
        "overhead_p99_us": round(pi["p99"] - pb["p99"], 1),
        "ratio_p50": round(pi["p50"] / pb["p50"], 3),
        "ratio_p99": round(pi["p99"] / pb["p99"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    run_id = new_run_id("instrument")
    result: dict[str, Any] = {
        "benchmark": "instrument",
        "machine": machine(),
        "code": code(),
        "calls": args.calls,
    }
    with bench_broker(run_id), ReplayServer() as server:
        (topics,) = asyncio.run(create_topics([f"{run_id}."], partitions=4))
        with SyncEmitter(
            bootstrap_servers=BOOTSTRAP, service="bench-instrument", topic=topics.usage_raw
        ) as emitter:
            transport = MeteringTransport(emitter=emitter, project="bench")
            plain = httpx2.Client()
            metered = httpx2.Client(transport=transport)
            loopback: dict[str, Any] = {}
            for name, (path, body, _) in ENDPOINTS.items():
                url = f"{server.url}{path}"
                b, i = interleaved(
                    lambda url=url, body=body: plain.post(url, json=body).read(),  # type: ignore[misc]
                    lambda url=url, body=body: metered.post(url, json=body).read(),  # type: ignore[misc]
                    args.calls,
                    args.warmup,
                )
                loopback[name] = compare(b, i)
                say(f"loopback {name:20s} {fmt(loopback[name])}")
            path, body = STREAM
            url = f"{server.url}{path}"
            b, i = interleaved(
                lambda: read_stream(plain, url, body),
                lambda: read_stream(metered, url, body),
                max(args.calls // 3, 100),
                50,
            )
            stream = compare(b, i)
            say(f"loopback {'openai_chat_stream':20s} {fmt(stream)}")

            isolated: dict[str, Any] = {}
            for name, (path, body, fix) in ENDPOINTS.items():
                payload = fixture(fix)

                def answer(request: httpx2.Request, payload: bytes = payload) -> httpx2.Response:
                    return httpx2.Response(200, content=payload, headers={"content-type": "application/json"})

                mock_plain = httpx2.Client(transport=httpx2.MockTransport(answer))
                mock_metered = httpx2.Client(
                    transport=MeteringTransport(
                        emitter=emitter, project="bench", transport=httpx2.MockTransport(answer)
                    )
                )
                url = f"http://api.example.invalid{path}"
                b, i = interleaved(
                    lambda c=mock_plain, url=url, body=body: c.post(url, json=body).read(),  # type: ignore[misc]
                    lambda c=mock_metered, url=url, body=body: c.post(url, json=body).read(),  # type: ignore[misc]
                    args.calls,
                    args.warmup,
                )
                isolated[name] = compare(b, i)
                say(f"isolated {name:20s} {fmt(isolated[name])}")
            emitter.flush()
            stats = dict(vars(transport.stats))
        codec = default_codec()
        delivered = sum(
            len(codec.decode(v)[1]["events"]) for _, v in asyncio.run(read_topic(topics.usage_raw))
        )
        delivered -= len(ENDPOINTS) * (args.calls + args.warmup)  # the isolated clients' events
    expected_loopback = len(ENDPOINTS) * (args.calls + args.warmup) + max(args.calls // 3, 100) + 50
    result |= {
        "loopback": loopback,
        "loopback_stream": stream,
        "isolated": isolated,
        "transport_stats": stats,
        "events_delivered": delivered,
        "events_expected": expected_loopback,  # the isolated clients emit too, to other transports' stats
        "worst_overhead_p99_us": max(v["overhead_p99_us"] for v in loopback.values()),
    }
    say(f"events delivered {delivered} of {result['events_expected']}; transport stats {stats}")
    say(f"worst loopback p99 overhead: {result['worst_overhead_p99_us']} us (target < 1000 us)")
    say(f"wrote {write_result('instrument', result)}")


def fmt(c: dict[str, Any]) -> str:
    return (
        f"baseline p50 {c['baseline_us']['p50']:7.1f} p99 {c['baseline_us']['p99']:7.1f} us | "
        f"instrumented p50 {c['instrumented_us']['p50']:7.1f} p99 {c['instrumented_us']['p99']:7.1f} us | "
        f"+{c['overhead_p50_us']} / +{c['overhead_p99_us']} us, x{c['ratio_p50']} / x{c['ratio_p99']}"
    )


if __name__ == "__main__":
    main()
