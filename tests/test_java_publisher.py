"""The Java example (examples/java: Apache Avro's BinaryMessageEncoder + kafka-clients) against the
real broker and worker: its bytes are the Python codec's bytes, and its events are priced, stored
and counted in budgets exactly like events from Python."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendstream.wire import MAGIC, default_codec
from stream_processors.pricing import Catalogue, pico_to_usd
from tests.conftest import REPO, Worker, module_worker
from tests.test_budgets_pipeline import budgets
from tests.test_pipeline import read_all

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "java"
JAR = "spendstream-java-example.jar"
COUNT = 200
PROJECT = "java"


def example_jar() -> Path:
    """The example's runnable jar, built once per version of its sources (cached under .spendstream/java/).

    The build runs in a copy of the sources (the example folder stays clean) with Maven offline when
    ~/.m2 already holds everything, else online: the first run on a fresh machine downloads Avro and
    the Maven plugins from Maven Central.
    """
    digest = hashlib.sha256()
    for path in sorted([EXAMPLE / "pom.xml", *(EXAMPLE / "src").rglob("*")]):
        if path.is_file():
            digest.update(path.relative_to(EXAMPLE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    cache = REPO / ".spendstream" / "java" / digest.hexdigest()[:16]
    if (cache / JAR).is_file():
        return cache / JAR
    build = cache.with_name(f"build-{uuid.uuid4().hex[:8]}")
    shutil.copytree(EXAMPLE, build, ignore=shutil.ignore_patterns("target"))
    try:
        offline = subprocess.run(
            ["mvn", "-B", "-q", "-o", "package"], cwd=build, capture_output=True, text=True, timeout=300
        )
        if offline.returncode != 0:
            online = subprocess.run(
                ["mvn", "-B", "-q", "package"], cwd=build, capture_output=True, text=True, timeout=900
            )
            assert online.returncode == 0, (
                f"mvn package failed:\n{online.stdout[-4000:]}{online.stderr[-2000:]}"
            )
        cache.mkdir(parents=True, exist_ok=True)
        (build / "target" / JAR).replace(cache / JAR)  # atomic: a half-written jar is never cached
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return cache / JAR


worker = module_worker("java", f'budgets:\n  project:{PROJECT}: {{monthly: "1000"}}\n')


def test_java_events_decode_and_are_priced_stored_and_counted_like_python(kafka: str, worker: Worker) -> None:
    jar = example_jar()
    schema = REPO / "schemas" / "dev.spendstream.UsageEvent.avsc"
    out = subprocess.run(
        ["java", "-jar", str(jar), kafka, worker.topics.usage_raw, PROJECT, str(COUNT), str(schema)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    sent = out.stdout.split()  # the acknowledged event_ids, in the order sent
    assert len(sent) == len(set(sent)) == COUNT
    assert f"sent {COUNT} events for project {PROJECT}" in out.stderr

    # The Java bytes, read back from usage.raw: the single-object header carries the fingerprint of
    # the same schema file the Python codec uses, and the body decodes and re-encodes byte for byte.
    codec = default_codec()
    messages = asyncio.run(read_all(kafka, worker.topics.usage_raw, idle=1.5))
    assert len(messages) == COUNT
    assert {key for key, _ in messages} == {PROJECT.encode()}
    assert {value[:10] for _, value in messages} == {MAGIC + codec.fingerprint("UsageEvent")}
    events: dict[str, dict[str, Any]] = {}
    for _, value in messages:
        name, event = codec.decode(value)
        assert name == "UsageEvent"
        assert codec.encode("UsageEvent", event) == value
        events[event["event_id"]] = event
    assert set(events) == set(sent)
    for i, event_id in enumerate(sent):  # what PublishUsage.java writes for its i-th event
        event = events[event_id]
        assert (event["provider"], event["model"], event["service"], event["tags"]) == (
            "openai",
            "gpt-4o",
            "java-example",
            {"lang": "java"},
        )
        assert (event["input_tokens"], event["cached_input_tokens"], event["output_tokens"]) == (
            1000 + i,
            512 if i % 4 == 0 else 0,
            200 + i,
        )
        assert event["team"] is None
        assert abs(event["event_time"] / 1e6 - time.time()) < 300

    # Priced and stored exactly as the Python pricing engine prices the same events.
    catalogue = Catalogue.load()
    expected = {event_id: catalogue.price(event) for event_id, event in events.items()}
    rows = worker.wait_rows(
        "SELECT toString(event_id), toString(cost_usd), pricing_status, price_card FROM usage_events FINAL "
        f"WHERE project = '{PROJECT}'",
        COUNT,
    )
    assert len(rows) == COUNT
    assert {r[0] for r in rows} == set(sent)
    for event_id, cost_usd, status, card in rows:
        priced = expected[event_id]
        assert priced.status == "priced"
        assert priced.card is not None
        assert priced.cost_pico is not None
        assert (Decimal(cost_usd), status, card) == (pico_to_usd(priced.cost_pico), "priced", priced.card.id)
    total = pico_to_usd(sum(p.cost_pico or 0 for p in expected.values()))
    assert total > 0

    # ... counted once in the project's budget ...
    deadline = time.monotonic() + 30
    while (spend := Decimal(budgets(worker)[(f"project:{PROJECT}", "month")]["spend_usd"] or 0)) != total:
        assert time.monotonic() < deadline, f"budget spend {spend}, expected {total}"
        time.sleep(0.5)

    # ... and nothing dead-lettered.
    assert asyncio.run(read_all(kafka, worker.topics.usage_dlq, idle=1.5)) == []
    assert worker.sql("SELECT count() FROM dead_letters FINAL") == [[0]]
