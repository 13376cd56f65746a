"""A gateway through a broker outage: calls keep being served with the keys it knows, and every call
is still metered exactly once (the emitter keeps the events and sends them when Kafka is back). Its
own broker, stopped and started."""

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

import httpx
import pytest

from spendstream.topics import Topics, ensure_topics
from tests.conftest import REPO, own_broker
from tests.providers.replay import ReplayServer
from tests.test_gateway import MSGS, start_gateway
from tests.test_instrument_sdk import consume

pytestmark = pytest.mark.integration


def call(url: str, key: str, case: str) -> int:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MSGS},
        headers={"authorization": f"Bearer {key}", "x-spendstream-tags": f"case={case}"},
        timeout=30,
    ).status_code


def test_a_broker_outage_loses_no_call_and_meters_each_once(tmp_path: Path) -> None:
    with own_broker("gateway-outage", 120) as broker, ReplayServer() as replay:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        topics = Topics(prefix)
        asyncio.run(ensure_topics(broker.bootstrap, topics, 4))  # SPENDSTREAM_PARTITIONS default
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
        env |= {"SPENDSTREAM_BOOTSTRAP_SERVERS": broker.bootstrap, "SPENDSTREAM_TOPIC_PREFIX": prefix}
        created = subprocess.run(
            [
                sys.executable,
                "-m",
                "spendstream",
                "keys",
                "create",
                "--project",
                "outage",
                "--format",
                "json",
            ],
            env={**env, "SPENDSTREAM_STATE_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["key"]
        gateway = start_gateway(env, replay, tmp_path, "gateway")
        try:
            deadline = time.monotonic() + 10
            while call(gateway.url, key, "before") != 200:  # the key reaches the gateway
                assert time.monotonic() < deadline
                time.sleep(0.1)
            before = [call(gateway.url, key, "before") for _ in range(19)]

            broker.stop()
            during = [call(gateway.url, key, "during") for _ in range(30)]
            time.sleep(10)  # a longer outage: the producer's requests time out meanwhile
            late = [call(gateway.url, key, "during") for _ in range(10)]
            health = gateway.health()  # still serving (200), but says Kafka is away
            assert (health["status"], health["rate_limits_fleet_wide"]) == ("degraded", False)
            assert health["emitter"]["buffered"] >= 40  # held, not dropped
            broker.start(timeout=120)
            deadline = time.monotonic() + 60
            while gateway.health()["status"] != "ok":
                assert time.monotonic() < deadline, (gateway.health(), gateway.log.read_text()[-6000:])
                time.sleep(0.5)
            after = [call(gateway.url, key, "after") for _ in range(10)]

            # sent: 20 + 40 + 10 calls, all served (known key, fail-open budgets with a warning)
            assert (before + during + late + after).count(200) == 69
            events: list[dict[str, Any]] = asyncio.run(
                consume(broker.bootstrap, topics.usage_raw, 70, wait=90)
            )
        finally:
            gateway.process.terminate()
            gateway.process.wait(timeout=60)
    cases = [e["tags"].get("case") for e in events]
    # found: every call metered once, none lost, none doubled
    assert (cases.count("before"), cases.count("during"), cases.count("after")) == (20, 40, 10)
    assert len({e["event_id"] for e in events}) == 70
    assert {(e["project"], e["service"], e["usage_source"]) for e in events} == {
        ("outage", "gateway", "reported")
    }
