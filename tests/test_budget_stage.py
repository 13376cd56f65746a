"""The budget stage on real Avro bytes, with plain dicts for its tables: specs, crossings, exactly
once per source message, forged records, old changelog records, and the rows `budget list` shows."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import event, given, settings
from hypothesis import strategies as st

from spendstream.signing import Signer, Verifier, encode_control
from spendstream.wire import default_codec
from stream_processors import app
from stream_processors.budget_stage import BudgetResult, BudgetStage, _due
from stream_processors.budgets import MINUTE_US, Spec, apply_deltas, decide, load_state, make_limit
from stream_processors.meter import partition_for

CODEC = default_codec()
NOW = int(datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()) * 1_000_000
USD = 10**12
ALL = range(8)  # every partition of stage(): one worker owns them all


class KeptStage(BudgetStage):
    """The stage as the budget agent drives it: each result's states kept once its signals are sent."""

    def on_budget(self, key: bytes | None, value: bytes | None, partition: int, now_us: int) -> BudgetResult:
        result = super().on_budget(key, value, partition, now_us)
        self.keep(result)
        return result

    def on_deltas(self, value: bytes | None, partition: int, now_us: int) -> BudgetResult:
        result = super().on_deltas(value, partition, now_us)
        self.keep(result)
        return result


def stage(
    signer: Signer | None = None, verifier: Verifier | None = None, feed_specs: dict[str, Spec] | None = None
) -> BudgetStage:
    scopes: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    return KeptStage(
        CODEC,
        scopes,
        specs,
        grace_us=3600 * 10**6,
        signer=signer,
        verifier=verifier or Verifier(),
        partitions=8,
        feed_specs=feed_specs,
    )


def spec_message(scope: str, usd: str, signer: Signer | None = None, at: int = NOW) -> bytes:
    record = Spec(scope, (make_limit(scope, "daily", usd),)).to_record(at)
    return encode_control(CODEC, "BudgetSpec", scope.encode(), record, signer)


def deltas(scope: str, usd: int, offset: int, partition: int = 0) -> bytes:
    delta = {
        "scope": scope,
        "minute": NOW // MINUTE_US,
        "pico_usd": usd * USD,
        "events": 1,
        "source_partition": partition,
        "source_offset": offset,
    }
    return CODEC.encode("SpendDeltaBatch", {"deltas": [delta]})


def test_a_crossing_signals_once_and_a_redelivered_message_counts_once() -> None:
    s = stage()
    assert s.on_budget(b"project:a", spec_message("project:a", "10"), 0, NOW).signals == []  # ok, as before
    first = s.on_deltas(deltas("project:a", 6, offset=1), 0, NOW)
    [(_, warn)] = first.signals
    warned = CODEC.decode(warn)[1]
    assert (warned["state"], warned["level"], warned["sequence"]) == ("warn", 50, 1)
    crossed = s.on_deltas(deltas("project:a", 5, offset=2), 0, NOW)
    [(key, blocked)] = crossed.signals
    signal = CODEC.decode(blocked)[1]
    assert (key, signal["state"], signal["reason"], signal["sequence"]) == (
        b"project:a",
        "blocked",
        "budget_exceeded",
        2,
    )
    assert signal["spend_pico_usd"] == 11 * USD
    again = s.on_deltas(deltas("project:a", 5, offset=2), 0, NOW)  # re-delivered after a restart
    assert (again.signals, again.metrics["deltas|duplicate"]) == ([], 1)
    assert load_state(s.scopes["project:a"])["window_spend"]["day:2026-12-01@UTC"] == 11 * USD
    [row] = s.rows({"project:a": s.spec_of("project:a")}, NOW, ALL)  # type: ignore[dict-item]
    assert (row["spend_usd"], row["limit_usd"], row["state"], row["percent"]) == (
        "11.000000000000",
        "10.000000000000",
        "blocked",
        110.0,
    )


def test_a_state_is_written_only_when_kept_so_a_signal_never_sent_is_decided_again() -> None:
    """The budget agent keeps a result's states once its signals are acknowledged: a worker killed
    before that restarts from the state before, and the re-read deltas decide the signal again,
    with the same sequence number; once kept, a re-read changes nothing."""
    s = stage()
    s.on_budget(b"project:a", spec_message("project:a", "10"), 0, NOW)
    crossing = deltas("project:a", 11, offset=1)
    decided = BudgetStage.on_deltas(s, crossing, 0, NOW)  # decided, its signal lost with the worker
    assert load_state(s.scopes["project:a"])["sequence"] == 0  # nothing written yet
    again = BudgetStage.on_deltas(s, crossing, 0, NOW)  # read again after the restart
    assert again.signals == decided.signals  # the same signal, the same sequence
    assert CODEC.decode(again.signals[0][1])[1]["sequence"] == 1
    s.keep(again)
    assert load_state(s.scopes["project:a"])["window_spend"]["day:2026-12-01@UTC"] == 11 * USD
    assert s.on_deltas(crossing, 0, NOW).signals == []  # kept: a re-read is a duplicate, no signal


def test_a_calendar_block_is_ticked_at_its_windows_end_and_a_rolling_one_every_tick() -> None:
    s = stage()
    s.on_budget(b"project:a", spec_message("project:a", "10"), 0, NOW)
    rolling = Spec("project:r", (make_limit("project:r", "rolling:60m", "10"),)).to_record(NOW)
    s.on_budget(b"project:r", encode_control(CODEC, "BudgetSpec", b"project:r", rolling, None), 0, NOW)
    s.on_deltas(member_deltas({"project:a": 11, "project:r": 11}, 1), 0, NOW)
    [(_, tick_deltas)] = s.ticks(NOW)
    assert [d["scope"] for d in tick_deltas] == ["project:r"]  # a daily block cannot lift before midnight
    tick = CODEC.encode("SpendDeltaBatch", {"deltas": tick_deltas})
    assert s.on_deltas(tick, 0, NOW).signals == []  # nothing changed: no signal, no write
    midnight = NOW + 12 * 3600 * 10**6
    at_midnight = [d for _, deltas in s.ticks(midnight) for d in deltas]
    assert sorted(d["scope"] for d in at_midnight) == ["project:a", "project:r"]
    tick = CODEC.encode("SpendDeltaBatch", {"deltas": at_midnight})
    assert decoded(s.on_deltas(tick, 0, midnight)) == [
        ("project:a", "ok", "within_budget", 0),
        ("project:r", "ok", "within_budget", 0),
    ]
    assert s.attention == {}


def test_forged_and_invalid_records_change_nothing_and_say_why() -> None:
    operator = Signer(Ed25519PrivateKey.generate())
    s = stage(signer=operator, verifier=Verifier([operator.public_key]))
    assert s.on_budget(b"project:a", spec_message("project:a", "10", operator), 0, NOW).dead == []
    forged = s.on_budget(b"project:a", spec_message("project:a", "1000"), 0, NOW + 1)  # unsigned
    assert [d.reason for d in forged.dead] == ["budget_unsigned"]
    assert forged.metrics == {"control_rejected|unsigned": 1}
    assert s.spec_of("project:a").limits[0].limit_pico == 10 * USD  # type: ignore[union-attr]
    bad = s.on_deltas(
        CODEC.encode(
            "SpendDeltaBatch",
            {
                "deltas": [
                    {
                        "scope": "project:a",
                        "minute": 1,
                        "pico_usd": -5,
                        "events": 1,
                        "source_partition": 0,
                        "source_offset": 3,
                    }
                ]
            },
        ),
        0,
        NOW,
    )
    assert [d.reason for d in bad.dead] == ["invalid_delta"]
    assert [d.reason for d in s.on_deltas(b"\x00junk", 0, NOW).dead] == ["undecodable"]
    crossed = s.on_deltas(deltas("project:a", 11, offset=4), 0, NOW)
    [(_, signed)] = crossed.signals
    assert CODEC.decode(signed)[1]["key_id"] == operator.key_id  # the worker signs its signals


def test_a_state_from_an_older_changelog_with_short_keys_carries_on() -> None:
    s = stage()
    s.on_budget(b"project:a", spec_message("project:a", "10"), 0, NOW)
    day = "day:2026-12-01@UTC"
    s.scopes["project:a"] = {
        "w": {day: 9 * USD},
        "late": {},
        "m": {},
        "applied": {"0": 7},
        "sig": ["warn", "threshold", 80, day],
        "seq": 4,
    }
    assert s.on_deltas(deltas("project:a", 1, offset=7), 0, NOW).signals == []  # offset 7 was applied
    [(_, blocked)] = s.on_deltas(deltas("project:a", 1, offset=8), 0, NOW).signals
    assert (CODEC.decode(blocked)[1]["sequence"], load_state(s.scopes["project:a"])["window_spend"][day]) == (
        5,
        10 * USD,
    )


def member_deltas(spend: dict[str, int], offset: int) -> bytes:
    """One usage.raw message's deltas: USD per member scope."""
    return CODEC.encode(
        "SpendDeltaBatch",
        {
            "deltas": [
                {
                    "scope": scope,
                    "minute": NOW // MINUTE_US,
                    "pico_usd": usd * USD,
                    "events": 1,
                    "source_partition": 0,
                    "source_offset": offset,
                }
                for scope, usd in spend.items()
            ]
        },
    )


def decoded(result: Any) -> list[tuple[str, str, str, int]]:
    return [
        (s["scope"], s["state"], s["reason"], s["limit_pico_usd"])
        for s in (CODEC.decode(v)[1] for _, v in result.signals)
    ]


def test_a_template_gives_every_member_its_own_budget_and_an_own_spec_wins() -> None:
    templates = {"user:*": Spec("user:*", (make_limit("user:*", "daily", "10"),))}
    s = stage(feed_specs=templates)
    s.on_budget(b"user:carol", spec_message("user:carol", "100"), 0, NOW)  # carol's own budget
    first = s.on_deltas(member_deltas({"user:alice": 6, "user:bob": 2, "user:carol": 11}, 1), 0, NOW)
    assert decoded(first) == [("user:alice", "warn", "threshold", 10 * USD)]
    second = s.on_deltas(member_deltas({"user:alice": 5, "user:bob": 2, "user:carol": 11}, 2), 0, NOW)
    assert decoded(second) == [("user:alice", "blocked", "budget_exceeded", 10 * USD)]  # bob and carol ok
    assert set(s.attention) == {"user:alice"}
    rows = s.rows({"user:*": templates["user:*"], "user:carol": s.spec_of("user:carol")}, NOW, ALL)  # type: ignore[dict-item]
    assert [(r["scope"], r["spend_usd"], r["state"], r["reason"]) for r in rows] == [
        ("user:*", "", "template", "2 members with spend, 1 blocked"),
        ("user:alice", "11.000000000000", "blocked", "budget_exceeded"),
        ("user:bob", "4.000000000000", "ok", "within_budget"),
        ("user:carol", "22.000000000000", "ok", "within_budget"),
    ]


def test_budget_rows_show_only_the_scopes_of_the_partitions_this_worker_owns() -> None:
    """With several workers a scope's spend lives in one of them: another lists it not at all,
    never at $0 (that would read as 'nothing spent')."""
    templates = {"user:*": Spec("user:*", (make_limit("user:*", "daily", "10"),))}
    s = stage(feed_specs=templates)
    s.on_budget(b"project:a", spec_message("project:a", "10"), partition_for("project:a", 8), NOW)
    s.on_deltas(deltas("project:a", 3, offset=1), partition_for("project:a", 8), NOW)
    s.on_deltas(member_deltas({"user:alice": 1, "user:bob": 2}, 1), 0, NOW)
    specs = {"project:a": s.spec_of("project:a"), "user:*": templates["user:*"]}
    mine = {partition_for("project:a", 8), partition_for("user:bob", 8)} - {partition_for("user:alice", 8)}
    assert partition_for("user:alice", 8) not in mine  # the names above hash apart; the test needs it
    listed = [(r["scope"], r["spend_usd"]) for r in s.rows(specs, NOW, mine)]  # type: ignore[arg-type]
    assert listed == [("project:a", "3.000000000000"), ("user:*", ""), ("user:bob", "2.000000000000")]
    others = [(r["scope"], r["spend_usd"]) for r in s.rows(specs, NOW, set(ALL) - mine)]  # type: ignore[arg-type]
    assert others == [("user:*", ""), ("user:alice", "1.000000000000")]


def test_a_changed_template_re_decides_every_member_through_the_next_tick() -> None:
    templates = {"team:*": Spec("team:*", (make_limit("team:*", "daily", "10"),))}
    s = stage(feed_specs=templates)
    assert s.on_deltas(member_deltas({"team:a": 4, "team:b": 1}, 1), 0, NOW).signals == []
    assert s.ticks(NOW) == []  # the first tick after a start takes the templates as they are
    templates["team:*"] = Spec("team:*", (make_limit("team:*", "daily", "3"),))  # lowered below team:a
    swept = s.ticks(NOW)
    assert {(partition_for(d["scope"], 8), p) for p, deltas in swept for d in deltas} == {
        (p, p)
        for p, _ in swept  # each zero delta goes to its scope's own partition
    }
    signals = [
        signal
        for p, deltas in swept
        for signal in decoded(s.on_deltas(CODEC.encode("SpendDeltaBatch", {"deltas": deltas}), p, NOW))
    ]
    assert signals == [("team:a", "blocked", "budget_exceeded", 3 * USD)]
    assert s.ticks(NOW) == []  # unchanged: nothing to re-decide
    s.on_budget(b"team:*", spec_message("team:*", "2"), 0, NOW)  # e.g. read again after a restart
    assert sorted(d["scope"] for _, deltas in s.ticks(NOW) for d in deltas) == ["team:a", "team:b"]
    s.on_budget(b"team:*", spec_message("team:*", "2", at=NOW + 1), 0, NOW)  # re-imported unchanged
    assert s.ticks(NOW) == []  # (`spendstream up` publishes the budgets file at every start)


def test_rows_carry_the_burn_rate_and_the_forecast_the_dashboard_shows() -> None:
    s = stage()
    record = Spec("project:b", (make_limit("project:b", "monthly", "1000"),)).to_record(NOW)
    s.on_budget(b"project:b", encode_control(CODEC, "BudgetSpec", b"project:b", record, None), 0, NOW)
    for i, minute in enumerate(range(NOW // MINUTE_US - 19, NOW // MINUTE_US + 1)):  # $1 a minute for 20 min
        delta = {
            "scope": "project:b",
            "minute": minute,
            "pico_usd": USD,
            "events": 1,
            "source_partition": 0,
            "source_offset": i,
        }
        s.on_deltas(CODEC.encode("SpendDeltaBatch", {"deltas": [delta]}), 0, NOW)
    [row] = s.rows({"project:b": s.spec_of("project:b")}, NOW, ALL)  # type: ignore[dict-item]
    assert row["spend_usd"] == "20.000000000000"
    assert row["burn_usd_per_hour"] == "60.000000000000"
    assert row["warn_percent"] == [50, 80]
    assert row["projected_at"] == NOW + 980 * MINUTE_US  # ($1000 - $20) at $1 a minute
    assert row["state"] == "warn"  # the worker forecast the same crossing
    assert row["reason"] == "forecast"


def test_after_a_start_the_stored_blocks_are_watched_again_without_re_deciding_them() -> None:
    """The first tick re-builds `attention` from the recovered table: a daily block is due at its
    day's end, a runaway (rolling) block at once; an ok scope costs nothing."""
    first = stage()
    first.on_budget(b"project:a", spec_message("project:a", "10"), 0, NOW)
    first.on_deltas(member_deltas({"project:a": 11, "project:b": 1}, 1), 0, NOW)
    restarted = stage()
    restarted.scopes.update(first.scopes)  # what Faust recovers from the changelog
    restarted.specs.update(first.specs)
    assert restarted.ticks(NOW) == []
    midnight = NOW + 12 * 3600 * 10**6
    assert restarted.attention == {"project:a": (partition_for("project:a", 8), midnight)}


def test_an_own_budget_the_stage_has_not_read_yet_still_wins_over_the_template() -> None:
    """Deltas and budgets are two topics: a member's deltas may come before the stage applied its
    spec. The budget feed has it (the meter prices nothing before the feed caught up)."""
    carol = Spec("user:carol", (make_limit("user:carol", "daily", "100"),))
    s = stage(
        feed_specs={"user:*": Spec("user:*", (make_limit("user:*", "daily", "5"),)), "user:carol": carol}
    )
    result = s.on_deltas(member_deltas({"user:carol": 6, "user:dan": 6}, 1), 0, NOW)
    assert decoded(result) == [("user:dan", "blocked", "budget_exceeded", 5 * USD)]  # carol: 6 of her 100
    assert s.spec_of("user:carol") == carol
    s.on_budget(b"user:carol", spec_message("user:carol", "1"), 0, NOW)  # the stage's own record rules
    assert s.spec_of("user:carol").limits[0].limit_pico == USD  # type: ignore[union-attr]


LIMITS = st.lists(
    st.tuples(
        st.sampled_from(["daily", "weekly", "monthly"]),
        st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
        st.integers(1, 100),  # USD
        st.sampled_from([(50, 80), (90,), ()]),
        st.sampled_from(["hard", "soft"]),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda lim: (lim[0], lim[1]),
)


@settings(max_examples=200, deadline=None)
@given(
    limits=LIMITS,
    spends=st.lists(st.tuples(st.integers(0, 180), st.integers(0, 60)), max_size=12),  # (minutes ago, USD)
    now_minute=st.integers(29_300_000, 29_800_000),
    later=st.floats(0, 1),
)
def test_a_scope_ticked_only_at_its_windows_end_would_not_have_changed_before(
    limits: list[tuple[str, str, int, tuple[int, ...], str]],
    spends: list[tuple[int, int]],
    now_minute: int,
    later: float,
) -> None:
    """With calendar limits only, a block or warn that waits for its window's end (_due) decides
    the same at any instant before it, when no spend and no spec arrives: the ticks skip nothing."""
    spec = Spec(
        "user:u", tuple(make_limit("user:u", w, usd, tz, warn, mode) for w, tz, usd, warn, mode in limits)
    )
    now = now_minute * MINUTE_US + 17_000_000
    state = load_state(None)
    apply_deltas(state, [(now_minute - ago, usd * USD) for ago, usd in spends], spec, now, 3_600_000_000)
    decision = decide(state, spec, now)
    due = _due(decision, spec, now)
    event(f"{decision.state} {decision.reason}, ticked {'at its window end' if due > now else 'every tick'}")
    if decision.state != "ok" and due > now:
        assert due == decision.window.end_us
        at = now + int((due - 1 - now) * later)
        assert decide(state, spec, at).key == decision.key


def test_a_signal_the_broker_did_not_take_is_sent_again_and_none_is_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The budget agent's `deliver`: b's first delivery fails (the producer gave up), c's first send
    raises (no metadata); both are sent again, a is not, and the agent goes on only then."""
    monkeypatch.setattr(app, "SIGNAL_RETRY_SECONDS", 0.01)
    attempts: Counter[bytes] = Counter()
    acknowledged: list[bytes] = []

    async def send(*, key: bytes, value: bytes) -> asyncio.Future[None]:
        attempts[key] += 1
        if key == b"project:c" and attempts[key] == 1:
            raise KafkaTimeoutError("no metadata")
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key == b"project:b" and attempts[key] == 1:
            delivery.set_exception(KafkaTimeoutError("expired"))
        else:
            acknowledged.append(key)
            delivery.set_result(None)
        return delivery

    signals = [(b"project:a", b"1"), (b"project:b", b"2"), (b"project:c", b"3")]
    asyncio.run(app.deliver(send, signals))
    assert attempts == {b"project:a": 1, b"project:b": 2, b"project:c": 2}
    assert acknowledged == [b"project:a", b"project:c", b"project:b"]  # c's retry is sent first
    assert "2 kill-switch signal(s) not acknowledged" in caplog.text
