"""Meters default to 0, end to end: an event that carries only its own meter is priced and stored
like any other, and one that carries no usage at all is dead-lettered with the reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from producers import SyncEmitter, build_event
from spendstream.wire import default_codec
from stream_processors.feeds import publish
from tests.conftest import REPO, start_worker
from tests.test_emitter_validation import NO_USAGE

pytestmark = pytest.mark.integration


def price(event: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """`spendstream price --format json --json EVENT`, offline (no broker)."""
    return subprocess.run(
        [sys.executable, "-m", "spendstream", "price", "--format", "json", "--json", json.dumps(event)],
        env={"PATH": "/usr/bin:/bin", "SPENDSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_price_cli_takes_one_meter_and_refuses_none_in_one_line() -> None:
    whisper = price({"provider": "openai", "model": "whisper-1", "audio_seconds": "90.5"})
    assert whisper.returncode == 0, whisper.stderr
    body = json.loads(whisper.stdout)
    assert (body["total_usd"], body["itemised"]) == ("0.00905", {"audio_seconds": "0.00905"})
    nothing: list[dict[str, object]] = [
        {"provider": "openai", "model": "gpt-4o"},
        {"provider": "openai", "model": "gpt-4o", "input_tokens": 0, "output_tokens": 0},
    ]
    for event in nothing:
        refused = price(event)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
        assert "Traceback" not in refused.stderr
        assert len(lines) == 1, refused.stderr  # one line, however wide the terminal
        assert lines[0] == f"error: {NO_USAGE}"


def test_whisper_and_tts_events_without_tokens_are_stored_priced_and_no_usage_is_dead_lettered(
    kafka: str, tmp_path: Path
) -> None:
    worker = start_worker(kafka, tmp_path, "budgets: {}\n")
    try:
        with SyncEmitter(bootstrap_servers=kafka, service="voice", topic=worker.topics.usage_raw) as em:
            whisper = em.emit(project="voice", provider="openai", model="whisper-1", audio_seconds="90.5")
            tts = em.emit(project="voice", provider="openai", model="tts-1", characters=1000)
        # another client's event with no usage at all: the emitter would refuse it, the meter must too
        empty = {
            **build_event(service="raw", project="voice", provider="openai", model="gpt-4o", input_tokens=1),
            "input_tokens": 0,
        }
        data = default_codec().encode("UsageEvent", empty)
        asyncio.run(publish(kafka, worker.topics.usage_raw, [(b"voice", data)]))
        dead = worker.wait_rows("SELECT reason, detail, payload FROM dead_letters FINAL", 1)
        rows = worker.wait_rows(
            "SELECT toString(event_id), model, input_tokens, output_tokens, toString(audio_seconds), "
            "characters, toString(cost_usd), pricing_status, usage_source FROM usage_events FINAL "
            "WHERE project = 'voice' ORDER BY model",
            2,
        )
        worker.flush()
        stored = worker.sql("SELECT count() FROM usage_events FINAL")[0][0]
        letters = worker.sql("SELECT count() FROM dead_letters FINAL")[0][0]
    finally:
        worker.stop()
    # sent: 2 events by the emitter, 1 raw; found: the 2 priced, the raw one dead-lettered, nothing else
    assert rows == [
        [tts, "tts-1", 0, 0, "0", 1000, "0.015", "priced", "reported"],
        [whisper, "whisper-1", 0, 0, "90.5", 0, "0.00905", "priced", "reported"],
    ]
    assert (stored, letters) == (2, 1)
    assert [(r[0], r[1]) for r in dead] == [("invalid_event", NO_USAGE)]
    assert dead[0][2] == data.hex()  # the message as it was sent (hex in the dead_letters table)
