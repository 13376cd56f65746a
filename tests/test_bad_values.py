"""Bad values are refused at every input, each with one line: the CLI publishes nothing, and a bad
record another client put on the `budgets` topic is dead-lettered by the worker, which carries on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.errors import ConfigError
from spendstream.signing import generate_key
from spendstream.topics import Topics
from spendstream.wire import default_codec
from stream_processors.budgets import MAX_LIMIT_USD, Spec, make_limit, usd_to_pico_checked
from stream_processors.feeds import publish, read_compacted
from tests.conftest import REPO, free_port, start_worker

EVENT = {"provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 0}


def spendstream(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_env(kafka: str, state_dir: Path, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env.update(
        SPENDSTREAM_BOOTSTRAP_SERVERS=kafka,
        SPENDSTREAM_TOPIC_PREFIX=prefix,
        SPENDSTREAM_STATE_DIR=str(state_dir),
        SPENDSTREAM_WEB_PORT=str(free_port()),
    )
    return env


BAD_CLI_VALUES = [
    # 1. amounts beyond the maximum (or not amounts)
    (("budget", "set", "project:x", "1e400"), "'1e400' is more than the maximum of 9,000,000 USD"),
    (("budget", "set", "project:x", "9000000.000001"), "is more than the maximum of 9,000,000 USD"),
    (("budget", "set", "project:x", "NaN"), "'NaN' must be positive"),
    (("budget", "runaway", "project:x", "--usd-per-minute", "1e400"), "maximum of 1,800,000 USD"),
    (("budget", "runaway", "project:x", "--multiplier", "-1"), "multiplier must be 0 (off) to 1,000"),
    # 2. zero-length (and endless) windows
    (("budget", "set", "project:x", "10", "--window", "rolling:0m"), "rolling window is 1 minute to 31 days"),
    (("budget", "set", "project:x", "10", "--window", "rolling:0d"), "rolling window is 1 minute to 31 days"),
    (
        ("budget", "set", "project:x", "10", "--window", "rolling:32d"),
        "rolling window is 1 minute to 31 days",
    ),
    # 3. empty reasons, 4. unreasonably long ones
    (("block", "project:x", "--reason", ""), "--reason says why project:x is blocked"),
    (("block", "project:x", "--reason", "  \t "), "--reason says why project:x is blocked"),
    (("block", "project:x", "--reason", "x" * 501), "1 to 500 characters"),
    # 5. non-numeric meters, 6. events missing provider or model
    (
        ("price", "--json", json.dumps({**EVENT, "audio_seconds": "x"})),
        "audio_seconds must be a decimal number",
    ),
    (
        ("price", "--json", json.dumps({**EVENT, "input_tokens": "12"})),
        "input_tokens must be an integer count",
    ),
    (
        (
            "price",
            "--json",
            '{"provider": "openai", "model": "gpt-4o", "input_tokens": 1.5, "output_tokens": 0}',
        ),
        "input_tokens must be an integer count, got Decimal('1.5')",
    ),
    (("price", "--json", json.dumps({**EVENT, "tags": "x"})), "tags must be an object of strings"),
    (("price", "--json", json.dumps({**EVENT, "event_time": "yesterday"})), "event_time must be an ISO 8601"),
    (
        ("price", "--json", json.dumps({k: v for k, v in EVENT.items() if k != "provider"})),
        "missing ['provider']",
    ),
    (("price", "--json", json.dumps({k: v for k, v in EVENT.items() if k != "model"})), "missing ['model']"),
]


def test_bad_cli_values_are_refused_in_one_line_and_nothing_is_published(kafka: str, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    generate_key(tmp_path / "operator.pem")  # a signed deployment: no unauthenticated-plane warning
    env = {**cli_env(kafka, tmp_path, prefix), "SPENDSTREAM_SIGNING_KEY": str(tmp_path / "operator.pem")}
    good = spendstream(env, "budget", "set", "project:good", "9000000", "--window", "rolling:31d")
    assert good.returncode == 0, good.stderr
    refused = 0
    for args, message in BAD_CLI_VALUES:
        result = spendstream(env, *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: "), (args, result.stderr)
        assert message in lines[0], (args, lines[0])
        assert result.stdout == ""
        refused += 1
    assert refused == len(BAD_CLI_VALUES) == 18
    on_topic = asyncio.run(read_compacted(kafka, Topics(prefix).budgets, default_codec()))
    assert list(on_topic) == [b"project:good"]  # the 18 refusals published nothing
    record = on_topic[b"project:good"]
    assert record is not None
    assert Spec.from_record(record).limits[0].limit_pico == 9_000_000 * 10**12


def bad_records(now: int) -> dict[str, dict[str, Any]]:
    """BudgetSpec records another client could publish: each one bad value, valid Avro."""
    base = Spec("project:base", (make_limit("project:base", "daily", "10"),)).to_record(now)
    limit = base["limits"][0]
    return {
        "project:huge": {**base, "limits": [{**limit, "limit_usd": "1e400"}]},
        "project:zero": {**base, "limits": [{**limit, "window": "rolling:0m"}]},
        "project:runaway": {**base, "runaway_usd_per_minute": "1e400"},
        "project:multiplier": {**base, "runaway_multiplier": 2_000_000_000},
        "project:reason": {**base, "manual_block": True, "manual_reason": "x" * 10_000},
    }


def test_bad_budget_records_on_the_topic_are_dead_lettered_and_list_still_works(
    kafka: str, tmp_path: Path
) -> None:
    w = start_worker(kafka, tmp_path / "w", 'budgets:\n  project:good: {daily: "100"}\n')
    env = {**w.env, "COLUMNS": "200"}  # rich tables wrap at 80 columns off a terminal
    codec = default_codec()
    try:
        bad = bad_records(time.time_ns() // 1000)
        records = [
            (scope.encode(), codec.encode("BudgetSpec", {**r, "scope": scope})) for scope, r in bad.items()
        ]
        asyncio.run(publish(kafka, w.topics.budgets, records))
        # Every bad record is dead-lettered (by the budget feed and the budget agent: count records).
        found = w.wait_rows(
            "SELECT uniqExact(source_partition, source_offset) FROM dead_letters "
            "WHERE reason = 'invalid_budget' HAVING uniqExact(source_partition, source_offset) = 5",
            1,
        )
        assert found == [[5]]
        assert w.process.poll() is None
        assert w.health()["status"] == "ok"
        assert w.health()["budgets"] == 1  # project:good only

        listed = spendstream(env, "budget", "list")
        assert listed.returncode == 0, listed.stderr
        assert "project:good" in listed.stdout
        assert not any(scope in listed.stdout for scope in bad)

        changed = spendstream(env, "budget", "set", "project:other", "5")  # reads the topic first
        assert changed.returncode == 0, changed.stderr
        warnings = [line for line in changed.stderr.splitlines() if line.startswith("warning: skipped")]
        assert len(warnings) == 5
        deadline = time.monotonic() + 30
        while "project:other" not in spendstream(env, "budget", "list").stdout:  # applied by the worker
            assert time.monotonic() < deadline, "project:other never listed"
            time.sleep(0.5)
    finally:
        w.stop()


@given(st.decimals(min_value=0, max_value=MAX_LIMIT_USD * 10, places=12, allow_nan=False))
def test_amounts_within_the_bounds_are_exact_and_the_rest_refused(usd: Any) -> None:
    if 0 < usd <= MAX_LIMIT_USD:
        assert usd_to_pico_checked("t", str(usd)) == int(usd * 10**12)
        assert usd_to_pico_checked("t", str(usd)) < 2**63  # fits a ControlSignal's long
    else:
        with pytest.raises(ConfigError):
            usd_to_pico_checked("t", str(usd))
