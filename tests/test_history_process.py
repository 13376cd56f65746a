"""The history process (sink, /sql) lives beside the worker: restarted when it dies alone, gone
when the worker dies, even by kill -9 (a restarted worker must be able to open chDB again)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from producers import build_event
from spendstream.wire import default_codec
from stream_processors.feeds import publish
from tests.conftest import Worker, start_worker


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait for a reaper that never comes in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def emit(kafka: str, w: Worker, n: int) -> None:
    codec = default_codec()
    events = [
        build_event(
            service="h", project="h", provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=0
        )
        for _ in range(n)
    ]
    asyncio.run(publish(kafka, w.topics.usage_raw, [(b"h", codec.encode("UsageEvent", e)) for e in events]))


def test_history_process_is_restarted_alone_and_dies_with_the_worker(kafka: str, tmp_path: Path) -> None:
    w = start_worker(kafka, tmp_path / "h", 'budgets:\n  project:h: {daily: "100"}\n')
    count = "SELECT count() FROM usage_events FINAL WHERE project = 'h'"
    try:
        first = w.health()
        history = first["history_pid"]
        assert first["status"] == "ok"
        assert isinstance(history, int)
        assert history != w.process.pid
        assert running(history)

        emit(kafka, w, 25)
        assert w.wait_rows(count + " HAVING count() = 25", 1) == [[25]]

        os.kill(history, signal.SIGKILL)  # the sink dies alone, maybe holding unflushed rows
        while running(history):
            time.sleep(0.01)
        down = httpx.post(f"http://127.0.0.1:{w.port}/sql", json={"query": count}, timeout=10)
        assert down.status_code == 503  # until the restart: a clear answer, not a hang or a 500
        assert "the history process (ClickHouse) does not answer" in down.json()["error"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = w.health()
            if now["status"] == "ok" and now["history_pid"] not in (None, history):
                break
            time.sleep(0.5)
        assert now["status"] == "ok", now
        assert now["history_pid"] not in (None, history), now
        assert "restarting it" in w.log.read_text()

        emit(kafka, w, 25)  # the new sink resumes from the committed offsets: nothing lost, no duplicate
        assert w.wait_rows(count + " HAVING count() = 50", 1) == [[50]]
        assert w.sql("SELECT toString(sum(cost_usd)) FROM usage_events FINAL WHERE project = 'h'") == [
            ["0.125"]  # 50 x 1,000 gpt-4o input tokens at $2.50 per million
        ]

        replacement = now["history_pid"]
        w.process.send_signal(signal.SIGKILL)
        w.process.wait()
        deadline = time.monotonic() + 30
        while running(replacement) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(replacement), "the history process outlived a kill -9 of its worker"
    finally:
        w.stop()
