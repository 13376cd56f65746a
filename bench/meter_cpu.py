"""Meter stage CPU per event against Avro decoding alone, for this checkout and other commits,
interleaved: the figure that survives a busy machine (CPU seconds, not elapsed ones).

    PYTHONPATH=. .venv/bin/python -m bench.meter_cpu [--events 20000] [--rounds 3] [--compare REF ...]

Each round runs, in a fresh interpreter per checkout (`git archive REF` for the others, into a
temporary folder), on the same N events (8 projects, 500 per UsageBatch):

- **decode** (the baseline): `default_codec().decode` of every usage.raw message;
- **meter**: what the meter does per take of 20 messages without Faust: `process_many`, the
  output coalesced in a `MeterBatch`, every PricedBatch (with the meter's `PricedBatchWriter`
  where the checkout has one) and SpendDeltaBatch encoded.

Best of 5 repetitions per run, `time.process_time()`; no Kafka. `--no-gc-pause` measures this
checkout with the meter's `cyclic_gc_paused` turned off, to attribute that change on its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import REPO, say, write_result

MEASURE = r"""
import contextlib, json, sys, time
root, n, no_pause = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
sys.path[:0] = [root, root + "/bench"]
from _common import usage_calls
from producers import build_event
from spendstream.wire import default_codec
import stream_processors.meter as meter
from stream_processors.pricing import Catalogue
if no_pause:
    meter.cyclic_gc_paused = contextlib.nullcontext
codec, catalogue = default_codec(), Catalogue.load()
v5 = any(f["name"] == "sources" for f in codec._current["PricedBatch"].parsed["fields"])
try:  # the meter's own PricedBatch writer, where the checkout has one
    from stream_processors.priced_writer import PricedBatchWriter
    encode_sources = PricedBatchWriter(codec).write
except ImportError:
    encode_sources = lambda sources: codec.encode("PricedBatch", {"sources": sources})
by_project = {}
for call in usage_calls(n, 8):
    by_project.setdefault(call["project"], []).append(build_event(service="bench", **call))
messages = [
    (0, p.encode(), codec.encode("UsageBatch", {"events": events[i : i + 500]}))
    for p, events in by_project.items()
    for i in range(0, len(events), 500)
]
def once():
    stage, now = meter.MeterStage(catalogue, codec), time.time_ns() // 1000
    started = time.process_time()
    for _, _, value in messages:
        codec.decode(value)
    decoded = time.process_time()
    for i in range(0, len(messages), 20):
        batch = meter.MeterBatch(4)
        for j, result in enumerate(stage.process_many(messages[i : i + 20], now)):
            batch.add(result, 0, i + j)
        for _, priced in batch.priced_batches():
            encode_sources(priced) if v5 else codec.encode("PricedBatch", {"events": priced})
        for _, deltas in batch.delta_batches():
            codec.encode("SpendDeltaBatch", {"deltas": deltas})
    return decoded - started, time.process_time() - decoded
decode, metered = (min(x) for x in zip(*[once() for _ in range(5)]))
print(json.dumps({"decode_us": decode / n * 1e6, "meter_us": metered / n * 1e6, "priced_batch_v5": v5}))
"""


def checkout(ref: str, into: Path) -> Path:
    folder = into / ref.replace("/", "_")
    folder.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def measure(root: Path, events: int, no_pause: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), str(events), "1" if no_pause else "0"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", nargs="*", default=[], help="other commits to measure alongside")
    parser.add_argument("--no-gc-pause", action="store_true", help="also this checkout without the GC pause")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spendstream-meter-cpu-") as tmp:
        runs: list[tuple[str, Path, bool]] = [(ref, checkout(ref, Path(tmp)), False) for ref in args.compare]
        if args.no_gc_pause:
            runs.append(("this checkout, GC pause off", REPO, True))
        runs.append(("this checkout", REPO, False))
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in runs}
        for r in range(args.rounds):
            for label, root, no_pause in runs:
                rounds[label].append(measure(root, args.events, no_pause))
                m = rounds[label][-1]
                say(
                    f"round {r + 1} {label:32} decode {m['decode_us']:5.1f} us/event  meter "
                    f"{m['meter_us']:5.1f} us/event  ratio {m['decode_us'] / m['meter_us']:.3f}"
                )
    result: dict[str, Any] = {"events": args.events, "rounds": rounds, "summary": {}}
    say("")
    say(
        f"Meter stage CPU per event, {args.events:,} events, best of 5 per run, {args.rounds} interleaved rounds:"
    )
    for label, ms in rounds.items():
        ratios = sorted(m["decode_us"] / m["meter_us"] for m in ms)
        meter_us = sorted(m["meter_us"] for m in ms)
        median = len(ms) // 2
        result["summary"][label] = {
            "meter_us_per_event_median": round(meter_us[median], 2),
            "ratio_decode_to_meter_median": round(ratios[median], 3),
            "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        }
        say(
            f"  {label:32} meter {meter_us[median]:5.1f} us/event (median), {1e6 / meter_us[median]:,.0f} "
            f"events per CPU second; decode/meter {ratios[median]:.3f}x (range {ratios[0]:.3f}-{ratios[-1]:.3f})"
        )
    say(f"results: {write_result('meter_cpu', result)}")


if __name__ == "__main__":
    main()
