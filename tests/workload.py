"""A deterministic workload sent through the public SyncEmitter from its own process.

    python tests/workload.py BOOTSTRAP TOPIC EVENTS OUT.json

Writes the expected cost per project to OUT.json, computed independently of the pricer: decimal
arithmetic on the published per-million prices below.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from decimal import Decimal

from producers import SyncEmitter

# USD per 1M tokens: (input, cached input, output), as published (see stream_processors/prices.toml).
PUBLISHED = {
    ("openai", "gpt-4o"): ("2.50", "1.25", "10.00"),
    ("openai", "gpt-4o-mini"): ("0.15", "0.075", "0.60"),
    ("anthropic", "claude-sonnet-4-20250514"): ("3.00", "0.30", "15.00"),
    ("google", "gemini-2.5-pro"): ("1.25", "0.125", "10.00"),
}
PROJECTS = ["alpha", "beta", "gamma", "over"]


def main(bootstrap: str, topic: str, events: int, out: str) -> None:
    rng = random.Random(42)
    cost: dict[str, Decimal] = dict.fromkeys(PROJECTS, Decimal(0))
    count: Counter[str] = Counter()
    models = list(PUBLISHED)
    with SyncEmitter(bootstrap_servers=bootstrap, service="workload", topic=topic) as emitter:
        for _ in range(events):
            project = rng.choice(PROJECTS)
            provider, model = rng.choice(models)
            inp, cached, out_ = rng.randint(0, 20_000), rng.randint(0, 5_000), rng.randint(1, 2_000)
            emitter.emit(
                project=project,
                team="t",
                provider=provider,
                model=model,
                input_tokens=inp,
                cached_input_tokens=cached,
                output_tokens=out_,
            )
            rates = [Decimal(p) for p in PUBLISHED[(provider, model)]]
            cost[project] += (inp * rates[0] + cached * rates[1] + out_ * rates[2]) / 1_000_000
            count[project] += 1
        emitter.flush()
        sent = emitter.sent_events
    assert sent == events, (sent, events)
    with open(out, "w") as f:
        json.dump({p: {"usd": str(cost[p]), "events": count[p]} for p in PROJECTS}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
