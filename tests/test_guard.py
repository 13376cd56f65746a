"""Guards in another process than the worker see a budget crossing and refuse calls."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from producers import Guard, ScopeState, SyncEmitter, SyncGuard
from spendstream.errors import BudgetExceeded
from tests.conftest import Worker, module_worker

pytestmark = pytest.mark.integration

BUDGETS = """
budgets:
  project:capped: {daily: "1.00"}
  project:free:   {daily: "1000"}
"""


worker = module_worker("guard", BUDGETS)


def spend(kafka: str, worker: Worker, project: str, usd_per_event: str, n: int) -> None:
    # gpt-4o-mini: $0.60 per 1M output tokens -> tokens for the wanted amount
    tokens = int(Decimal(usd_per_event) / Decimal("0.60") * 1_000_000)
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as em:
        for _ in range(n):
            em.emit(
                project=project, provider="openai", model="gpt-4o-mini", input_tokens=0, output_tokens=tokens
            )


def test_sync_guard_refuses_a_blocked_project_and_lets_others_through(kafka: str, worker: Worker) -> None:
    heard: list[ScopeState] = []

    def broken(state: ScopeState) -> None:
        raise RuntimeError("a subscriber's bug")

    with (
        SyncGuard(
            bootstrap_servers=kafka, topic=worker.topics.spend_control, on_signal=heard.append
        ) as guard,
        SyncGuard(bootstrap_servers=kafka, topic=worker.topics.spend_control, on_signal=broken) as other,
    ):
        assert guard.healthy
        guard.check(project="capped", team="t", user="u", model="gpt-4o-mini")  # not blocked yet
        spend(kafka, worker, "capped", "0.30", 4)  # $1.20 > $1.00
        spend(kafka, worker, "free", "0.30", 4)
        deadline = time.monotonic() + 30
        while guard.state("project:capped") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(BudgetExceeded) as refused:
            guard.check(project="capped", model="gpt-4o-mini")
        err = refused.value
        assert (err.scope, err.reason, err.limit_usd) == ("project:capped", "budget_exceeded", Decimal("1"))
        assert err.spend_usd >= Decimal("1.00")
        assert err.window_end is not None
        assert err.window_end.hour == 0  # blocked until the end of the UTC day
        guard.check(project="free", model="gpt-4o-mini")  # other projects pass
        assert guard.state("project:free") is None
        # on_signal heard the same signal the check used; a callback that raises stops nothing
        assert [s for s in heard if s.scope == "project:capped"][-1] == guard.state("project:capped")
        deadline = time.monotonic() + 30
        while other.state("project:capped") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(BudgetExceeded):
            other.check(project="capped")


def test_a_new_guard_learns_the_current_state_from_the_compacted_topic(kafka: str, worker: Worker) -> None:
    async def run() -> None:
        async with Guard(bootstrap_servers=kafka, topic=worker.topics.spend_control) as guard:
            assert guard.healthy
            with pytest.raises(BudgetExceeded, match="project:capped is blocked"):
                guard.check(project="capped")

    time.sleep(0.5)
    asyncio.run(run())


def test_fail_open_by_default_and_closed_on_request() -> None:
    async def run() -> None:
        async with Guard(bootstrap_servers="127.0.0.1:1", ready_timeout=1) as open_guard:
            assert not open_guard.healthy
            open_guard.check(project="anything")  # fails open: allowed (and logged)
        async with Guard(bootstrap_servers="127.0.0.1:1", ready_timeout=1, fail_open=False) as closed_guard:
            with pytest.raises(BudgetExceeded, match="control_unavailable"):
                closed_guard.check(project="anything")

    asyncio.run(run())


def test_an_emitter_given_a_guard_refuses_before_the_call(kafka: str, worker: Worker) -> None:
    with (
        SyncGuard(bootstrap_servers=kafka, topic=worker.topics.spend_control) as guard,
        SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw, guard=guard) as em,
    ):
        with pytest.raises(BudgetExceeded, match="project:capped"):
            em.check(project="capped", model="gpt-4o-mini")
        em.check(project="free")  # allowed
    with SyncEmitter(bootstrap_servers=kafka, service="t", topic=worker.topics.usage_raw) as unguarded:
        unguarded.check(project="capped")  # no guard: nothing is refused
