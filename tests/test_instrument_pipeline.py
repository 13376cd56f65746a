"""End to end: an application that changed one line (its SDK's http_client) shows up priced in
ClickHouse, streams included, and a cut stream is priced on its flagged estimate."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from producers import SyncEmitter
from producers.instrument import MeteringTransport
from tests.conftest import Worker, module_worker
from tests.providers.replay import ReplayServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning"),
]
CLAUDE = "claude-sonnet-4-5-20250929"


worker = module_worker("instrument", "budgets: {}\n")


def test_instrumented_calls_are_priced_in_clickhouse(kafka: str, worker: Worker) -> None:
    with (
        ReplayServer() as server,
        SyncEmitter(bootstrap_servers=kafka, service="e2e", topic=worker.topics.usage_raw) as emitter,
    ):
        http = httpx2.Client(transport=MeteringTransport(emitter=emitter, project="e2e-shop"))
        claude = anthropic.Anthropic(base_url=server.url, api_key="k", http_client=http, max_retries=0)
        gpt = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", http_client=http, max_retries=0)
        msgs: Any = [{"role": "user", "content": "Say hello"}]
        claude.messages.create(
            model=CLAUDE, max_tokens=64, messages=msgs, extra_headers={"X-Spendstream-Tags": "case=messages"}
        )
        with claude.messages.stream(
            model=CLAUDE, max_tokens=64, messages=msgs, extra_headers={"X-Spendstream-Tags": "case=stream"}
        ) as stream:
            assert "".join(stream.text_stream) == "Hello!"
        with pytest.raises(Exception):  # noqa: B017, PT011 - the SDK's own error for a dropped connection
            for _ in gpt.chat.completions.create(
                model="gpt-4o-mini",
                messages=msgs,
                stream=True,
                extra_headers={"X-Spendstream-Tags": "case=cut", "x-replay-cut": "3"},
            ):
                pass
        emitter.flush()
    got = worker.wait_rows(
        "SELECT tags['case'], usage_source, toString(cost_usd), pricing_status, input_tokens, output_tokens "
        "FROM usage_events FINAL WHERE project = 'e2e-shop' ORDER BY tags['case']",
        3,
    )
    by_case = {r[0]: [r[1], Decimal(r[2]), *r[3:]] for r in got}
    assert set(by_case) == {"cut", "messages", "stream"}
    # 50 x $3 + 1800 cache reads x $0.30 + 1548 5m writes x $3.75 + 500 1h writes x $6 + 503 x $15, per M
    assert by_case["messages"][:3] == ["reported", Decimal("0.01704"), "priced"]
    # the stream: 25 input x $3 + 15 output x $15, per M
    assert by_case["stream"][:3] == ["reported", Decimal("0.0003"), "priced"]
    usage_source, cost, status, input_tokens, output_tokens = by_case["cut"]
    assert (usage_source, status, input_tokens, output_tokens) == ("estimated", "priced", 3, 7)
    assert cost > 0  # priced on the estimate, never $0


def test_a_project_blocked_on_spend_control_is_refused_before_any_bytes_go_upstream(
    kafka: str, worker: Worker
) -> None:
    """The real chain: operator block -> worker -> spend.control -> a Guard in this process -> 429."""
    import subprocess
    import sys

    from producers import SyncGuard
    from tests.conftest import REPO

    block = subprocess.run(
        [sys.executable, "-m", "spendstream", "block", "project:e2e-blocked", "--reason", "runaway script"],
        env=worker.env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert block.returncode == 0, block.stderr
    with (
        ReplayServer() as server,
        SyncEmitter(bootstrap_servers=kafka, service="e2e", topic=worker.topics.usage_raw) as emitter,
        SyncGuard(bootstrap_servers=kafka, topic=worker.topics.spend_control) as guard,
    ):
        deadline = time.monotonic() + 30
        while (s := guard.state("project:e2e-blocked")) is None or s.state != "blocked":
            assert time.monotonic() < deadline, "the block never reached the guard"
            time.sleep(0.05)
        http = httpx2.Client(transport=MeteringTransport(emitter=emitter, project="e2e-blocked", guard=guard))
        gpt = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", http_client=http, max_retries=0)
        with pytest.raises(openai.RateLimitError) as refused:
            gpt.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        body = refused.value.body
        assert isinstance(body, dict)
        assert "project:e2e-blocked" in str(body)
        assert "manual" in str(body)
        assert server.requests == []  # nothing reached the provider
        other = httpx2.Client(transport=MeteringTransport(emitter=emitter, project="e2e-free", guard=guard))
        ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", http_client=other, max_retries=0)
        ok.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert len(server.requests) == 1
