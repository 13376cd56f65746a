"""Pricing engine throughput: events priced per second on one core, exact and effective-dated.

    .venv/bin/python bench/pricing.py [--events 300000]

Baseline in the same run: the common float pattern (one dict lookup by model, tokens x float
price per token, no dates, no tiers, no cliffs). Target from the issue: >= 200,000 events/s.
Writes bench/results/pricing.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

from stream_processors.pricing import Catalogue, parse_instant

MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "o3"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("anthropic", "claude-haiku-4-5-20251001"),
    ("google", "gemini-2.5-pro"),
    ("google", "gemini-2.5-flash"),
    ("bedrock", "global.anthropic.claude-sonnet-4-5-20250929-v1:0"),
]


def workload(n: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    start = parse_instant("2025-06-01")
    events = []
    for i in range(n):
        provider, model = rng.choice(MODELS)
        events.append(
            {
                "provider": provider,
                "model": model,
                "event_time": start + i * 50_000_000,
                "service_tier": "standard",
                "region": "global",
                "input_tokens": rng.randrange(20_000),
                "cached_input_tokens": rng.randrange(5_000),
                "cache_write_tokens": rng.randrange(100),
                "cache_write_1h_tokens": 0,
                "output_tokens": rng.randrange(2_000),
                "reasoning_tokens": 0,
                "input_audio_tokens": 0,
                "output_audio_tokens": 0,
                "audio_seconds": b"\x00",
                "characters": 0,
                "images": 0,
                "requests": 0,
            }
        )
    return events


def rate(fn: Any, events: list[dict[str, Any]], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for e in events:
            fn(e)
        best = min(best, time.perf_counter() - started)
    return len(events) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    catalogue = Catalogue.load()
    events = workload(args.events)
    floats = {m: (2.5e-06, 1.25e-06, 1e-05) for _, m in MODELS}  # the naive float table

    def naive(e: dict[str, Any]) -> float:
        p = floats[e["model"]]
        return e["input_tokens"] * p[0] + e["cached_input_tokens"] * p[1] + e["output_tokens"] * p[2]

    baseline = rate(naive, events)
    engine = rate(catalogue.price, events)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        "events": args.events,
        "catalogue_cards": len(catalogue),
        "engine_events_per_s": round(engine),
        "naive_float_events_per_s": round(baseline),
        "ratio_engine_to_naive": round(engine / baseline, 3),
        "target_events_per_s": 200_000,
        "target_met": engine >= 200_000,
    }
    out = Path(__file__).parent / "results" / "pricing.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"pricing engine: {engine:,.0f} events/s on one core ({len(catalogue)} cards, exact, effective-dated)"
    )
    print(
        f"naive float lookup (same run): {baseline:,.0f} events/s -> engine is {engine / baseline:.2f}x of it"
    )
    print(f"target >= 200,000 events/s: {'met' if engine >= 200_000 else 'NOT met'}   ({out})")


if __name__ == "__main__":
    main()
