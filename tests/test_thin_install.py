"""`pip install spendstream` is the thin client: built as a wheel, installed alone into a fresh
virtualenv, it emits to the real broker without faust, chDB, numpy, pydantic or the CLI stack."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spendstream.topics import Topics, ensure_topics
from spendstream.wire import default_codec
from tests.conftest import REPO
from tests.test_pipeline import read_all

pytestmark = pytest.mark.integration

SERVER_ONLY = (
    "faust",
    "mode",
    "chdb",
    "clickhouse_connect",
    "numpy",
    "pydantic",
    "pydantic_settings",
    "typer",
    "yaml",
)

CLIENT = f"""
import json, sys, time
started = time.perf_counter()
from producers import SyncEmitter, SyncGuard, BudgetExceeded
from producers.instrument import MeteringTransport
imported = time.perf_counter() - started
bootstrap, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = []
with SyncEmitter(bootstrap_servers=bootstrap, service="thin", topic=topic) as em:
    for _ in range(n):
        ids.append(em.emit(project="thin", provider="openai", model="gpt-4o", input_tokens=10, output_tokens=5))
    em.flush(timeout=60)
heavy = sorted(m for m in {SERVER_ONLY!r} if m in sys.modules)
print(json.dumps({{"ids": ids, "import_s": imported, "heavy": heavy}}))
"""


def test_the_base_package_emits_to_kafka_without_the_server_stack(kafka: str, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        timeout=300,
    )
    [wheel] = wheels.glob("spendstream-*.whl")
    venv = tmp_path / "thin"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    site = next((venv / "lib").glob("python3*/site-packages"))
    size_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6

    topics = Topics(f"thin{uuid.uuid4().hex[:6]}.")
    asyncio.run(ensure_topics(kafka, topics, 4))
    out = subprocess.run(
        [venv / "bin" / "python", "-c", CLIENT, kafka, topics.usage_raw, "300"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: only the installed wheel is importable
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    codec = default_codec()
    found = [
        e["event_id"]
        for _, v in asyncio.run(read_all(kafka, topics.usage_raw))
        for e in codec.decode(v)[1]["events"]
    ]
    cli = subprocess.run([venv / "bin" / "spendstream", "--help"], capture_output=True, text=True, timeout=60)
    print(
        f"thin install: {size_mb:.0f} MB of site-packages, `import producers` {report['import_s'] * 1000:.0f} ms, "
        f"sent 300, found {len(found)} on usage.raw"
    )
    assert report["heavy"] == []  # nothing of the server side was imported
    assert sorted(found) == sorted(report["ids"])
    assert len(found) == 300
    assert size_mb < 150, f"{size_mb:.0f} MB"  # everything in one distribution was 1,010 MB
    assert cli.returncode == 1
    assert "needs the server extra" in cli.stderr
    assert "pip install 'spendstream[server]'" in cli.stderr
