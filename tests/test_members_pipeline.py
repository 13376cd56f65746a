"""Budgets per member and per gateway key, and cache hits, through the real worker: a `user:*`
template blocks only the member that crossed, a member's own budget wins, a `key:<id>` budget
blocks that key at a Guard, and a call served from the cache costs $0 with its list price saved."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import httpx
import pytest

from producers import SyncEmitter, SyncGuard
from spendstream.errors import BudgetExceeded
from spendstream.usage import KEY_TAG
from tests.conftest import Worker, module_worker
from tests.test_budgets_pipeline import signals, tokens, wait_signal

pytestmark = pytest.mark.integration

worker = module_worker("members", "budgets:\n  user:carol: {daily: '100'}\n")


def emit(kafka: str, worker: Worker, calls: list[dict[str, Any]]) -> None:
    """One call per entry: `usd` of gpt-4o output, the rest as emit() arguments."""
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as em:
        for call in calls:
            extra = {k: v for k, v in call.items() if k != "usd"}
            em.emit(provider="openai", model="gpt-4o", output_tokens=tokens(call["usd"]), **extra)


def rows_when(worker: Worker, ready: Any, timeout: float = 30) -> dict[str, dict[str, Any]]:
    """/budgets rows by scope, once `ready(rows)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = httpx.get(f"http://127.0.0.1:{worker.port}/budgets", timeout=10).json()["budgets"]
        rows = {r["scope"]: r for r in got}
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_a_user_template_blocks_only_the_member_that_crossed(kafka: str, worker: Worker) -> None:
    worker.cli("budget", "set", "user:*", "5", "--window", "daily")
    time.sleep(1)  # the meter learns the template from the budgets topic
    emit(
        kafka,
        worker,
        [
            {"project": "m1", "user": "bob", "usd": "2"},
            {"project": "m1", "user": "carol", "usd": "6"},  # her own $100 budget wins
            {"project": "m1", "user": "alice", "usd": "3"},
            {"project": "m2", "user": "alice", "usd": "3"},  # another project, same member
        ],
    )
    blocked = wait_signal(kafka, worker, "user:alice", "blocked")
    assert (blocked["reason"], blocked["spend_pico_usd"], blocked["limit_pico_usd"]) == (
        "budget_exceeded",
        6 * 10**12,
        5 * 10**12,
    )
    rows = rows_when(worker, lambda r: {"user:bob", "user:carol"} <= set(r))
    assert {s: Decimal(rows[s]["spend_usd"]) for s in ("user:alice", "user:bob", "user:carol")} == {
        "user:alice": 6,
        "user:bob": 2,
        "user:carol": 6,
    }
    assert (rows["user:*"]["state"], rows["user:*"]["reason"]) == (
        "template",
        "2 members with spend, 1 blocked",
    )
    assert (rows["user:carol"]["limit_usd"], rows["user:carol"]["state"]) == ("100.000000000000", "ok")
    alice = [s["state"] for s in signals(kafka, worker, "user:alice")]
    assert alice in (["blocked"], ["warn", "blocked"])  # 60% then 120%, or both in one take
    assert signals(kafka, worker, "user:bob") == signals(kafka, worker, "user:carol") == []  # 40%, 6%
    listed = worker.cli("budget", "list").stdout
    assert all(text in listed for text in ("user:*", "template", "user:alice"))
    with SyncGuard(bootstrap_servers=kafka, topic=worker.topics.spend_control) as guard:
        with pytest.raises(BudgetExceeded, match="user:alice is blocked"):
            guard.check(project="m3", user="alice")
        guard.check(project="m3", user="bob")
        guard.check(project="m3", user="carol")
    refused = worker.cli("budget", "set", "user:a*", "5", check=False)
    assert refused.returncode != 0
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "'*' stands alone, as a template giving every member its own budget: user:*, team:*" in error


def test_a_key_budget_blocks_that_key_at_a_guard(kafka: str, worker: Worker) -> None:
    worker.cli("budget", "set", "key:k1", "1", "--window", "daily")
    time.sleep(1)
    emit(
        kafka,
        worker,
        [
            {"project": "gw", "usd": "0.75", "tags": {KEY_TAG: "k1"}},
            {"project": "gw", "usd": "0.75", "tags": {KEY_TAG: "k2"}},  # no budget: not tracked
            {"project": "gw", "usd": "0.5", "tags": {KEY_TAG: "k1"}},
        ],
    )
    blocked = wait_signal(kafka, worker, "key:k1", "blocked")
    assert (blocked["spend_pico_usd"], blocked["limit_pico_usd"]) == (125 * 10**10, 10**12)
    rows = rows_when(worker, lambda r: "key:k1" in r)
    assert "key:k2" not in rows
    with SyncGuard(bootstrap_servers=kafka, topic=worker.topics.spend_control) as guard:
        with pytest.raises(BudgetExceeded, match="key:k1 is blocked") as refused:
            guard.check(project="gw", key="k1")
        assert (refused.value.scope, refused.value.limit_usd) == ("key:k1", Decimal(1))
        guard.check(project="gw", key="k2")
        guard.check(project="gw")


def test_a_cache_hit_costs_nothing_saves_its_list_price_and_moves_no_budget(
    kafka: str, worker: Worker
) -> None:
    worker.cli("budget", "set", "project:cached", "100", "--window", "daily")
    calls = [{"project": "cached", "usd": "1.23", "tags": {"n": str(i)}} for i in range(3)]
    hits = [{**c, "usage_source": "cache", "tags": {"n": f"hit{i}"}} for i, c in enumerate(calls)]
    emit(kafka, worker, calls + hits)
    stored = worker.wait_rows(
        "SELECT usage_source, count(), toString(sum(cost_usd)), toString(sum(saved_usd)), sum(output_tokens) "
        "FROM usage_events FINAL WHERE project = 'cached' GROUP BY usage_source ORDER BY usage_source",
        2,
    )
    assert stored == [
        ["cache", 3, "0", "3.69", 3 * tokens("1.23")],
        ["reported", 3, "3.69", "0", 3 * tokens("1.23")],
    ]
    row = rows_when(worker, lambda r: "project:cached" in r)["project:cached"]
    assert Decimal(row["spend_usd"]) == Decimal("3.69")  # the three paid calls only
