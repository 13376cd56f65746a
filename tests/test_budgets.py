"""Windows by event time in the budget's time zone, rolling windows, grace, and the decision rule."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.errors import ConfigError
from stream_processors.budgets import (
    MINUTE_US,
    Limit,
    Spec,
    apply_deltas,
    calendar_window,
    decide,
    fresh_deltas,
    late_in_windows_like,
    load_specs,
    make_limit,
    new_state,
    parse_scope,
    scopes_for_event,
    template_of,
    utc_from_micros,
)

USD = 10**12
BERLIN = "Europe/Berlin"


def us(dt: datetime) -> int:
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def minute(dt: datetime) -> int:
    return us(dt) // MINUTE_US


def spec(scope: str = "project:p", **limits: Any) -> Spec:
    return Spec(scope, tuple(make_limit(scope, w, a) for w, a in limits.items()))


def test_utc_day_and_month_boundaries() -> None:
    assert (
        calendar_window("daily", "UTC", minute(datetime(2026, 11, 27, 23, 59, tzinfo=UTC))).id
        == "day:2026-11-27@UTC"
    )
    assert (
        calendar_window("daily", "UTC", minute(datetime(2026, 11, 28, tzinfo=UTC))).id == "day:2026-11-28@UTC"
    )
    w = calendar_window("monthly", "UTC", minute(datetime(2026, 12, 1, tzinfo=UTC)))  # exactly at midnight
    assert (w.id, w.start_us) == ("month:2026-12@UTC", us(datetime(2026, 12, 1, tzinfo=UTC)))


def test_berlin_month_on_the_last_day_when_utc_is_already_next_month() -> None:
    # 2026-11-30 23:30 UTC is 2026-12-01 00:30 in Berlin (UTC+1): December there, November in UTC
    at = minute(datetime(2026, 11, 30, 23, 30, tzinfo=UTC))
    berlin, utc = calendar_window("monthly", BERLIN, at), calendar_window("monthly", "UTC", at)
    assert (berlin.id, utc.id) == ("month:2026-12@Europe/Berlin", "month:2026-11@UTC")
    assert utc_from_micros(berlin.start_us) == datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    # 22:59 UTC on Nov 30 is still November in Berlin
    assert (
        calendar_window("monthly", BERLIN, minute(datetime(2026, 11, 30, 22, 59, tzinfo=UTC))).id
        == "month:2026-11@Europe/Berlin"
    )


def test_dst_days_have_23_and_25_hours() -> None:
    spring = calendar_window("daily", BERLIN, minute(datetime(2026, 3, 29, 12, tzinfo=UTC)))
    autumn = calendar_window("daily", BERLIN, minute(datetime(2026, 10, 25, 12, tzinfo=UTC)))
    assert (spring.end_us - spring.start_us) // 3_600_000_000 == 23
    assert (autumn.end_us - autumn.start_us) // 3_600_000_000 == 25
    assert spring.id == "day:2026-03-29@Europe/Berlin"


def test_weeks_are_iso_weeks_starting_monday() -> None:
    w = calendar_window("weekly", "UTC", minute(datetime(2026, 11, 27, tzinfo=UTC)))  # a Friday
    assert (w.id, utc_from_micros(w.start_us).weekday()) == ("week:2026-W48@UTC", 0)
    assert w.end_us - w.start_us == 7 * 86_400_000_000


instants = st.datetimes(
    min_value=datetime(2001, 1, 1),  # noqa: DTZ001 (hypothesis takes naive bounds)
    max_value=datetime(2099, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
zones = st.sampled_from(
    ["UTC", BERLIN, "America/New_York", "Asia/Kolkata", "Pacific/Chatham", "Australia/Lord_Howe"]
)


@settings(max_examples=300, deadline=None)
@given(t=instants, period=st.sampled_from(["daily", "weekly", "monthly"]), tz=zones)
def test_windows_contain_the_instant_and_tile(t: datetime, period: str, tz: str) -> None:
    m = minute(t)
    w = calendar_window(period, tz, m)
    assert w.start_us <= m * MINUTE_US < w.end_us
    assert calendar_window(period, tz, w.end_us // MINUTE_US).start_us == w.end_us
    assert calendar_window(period, tz, w.start_us // MINUTE_US - 1).end_us == w.start_us
    local = utc_from_micros(w.start_us).astimezone(ZoneInfo(tz))
    assert (local.hour, local.minute) == (0, 0) or tz == "Australia/Lord_Howe"  # half-hour DST zone at 2am


@settings(max_examples=300, deadline=None)
@given(deltas=st.lists(st.integers(min_value=0, max_value=10**11), max_size=40), limit=st.integers(1, 10**12))
def test_exactly_one_blocked_decision_change_when_spend_reaches_the_limit(
    deltas: list[int], limit: int
) -> None:
    s = Spec("project:p", (Limit("daily", "UTC", limit, (), "hard"),))
    now = us(datetime(2026, 6, 1, 12, tzinfo=UTC))
    state, changes, total = new_state(), [], 0
    for d in deltas:
        apply_deltas(state, [(now // MINUTE_US, d)], s, now, 0)
        total += d
        decision = decide(state, s, now)
        if decision.key != state["last_signal"]:
            changes.append(decision.state)
            state["last_signal"] = decision.key
    assert changes == (["blocked"] if total >= limit else [])


def test_warn_levels_then_block_then_raise_unblocks() -> None:
    s = spec(daily="10")
    now = us(datetime(2026, 6, 1, 12, tzinfo=UTC))
    state = new_state()
    seen = []
    for usd in (4, 2, 3, 1):  # 4 -> 6 (50 %) -> 9 (80 %) -> 10 (limit)
        apply_deltas(state, [(now // MINUTE_US, usd * USD)], s, now, 0)
        d = decide(state, s, now)
        seen.append((d.state, d.reason, d.level))
    assert seen == [
        ("ok", "within_budget", 0),
        ("warn", "threshold", 50),
        ("warn", "threshold", 80),
        ("blocked", "budget_exceeded", 100),
    ]
    raised = spec(daily="100")
    assert decide(state, raised, now).state == "ok"  # a raised budget unblocks at once
    assert decide(state, None, now).state == "ok"  # and so does a removed one


def test_a_new_window_unblocks_at_its_start() -> None:
    s = spec(daily="1")
    day1 = us(datetime(2026, 6, 1, 23, 59, tzinfo=UTC))
    state = new_state()
    apply_deltas(state, [(day1 // MINUTE_US, 2 * USD)], s, day1, 0)
    assert decide(state, s, day1).state == "blocked"
    assert decide(state, s, day1 + 2 * MINUTE_US).state == "ok"


def test_soft_mode_warns_at_the_limit() -> None:
    s = Spec("project:p", (make_limit("project:p", "daily", "1", mode="soft"),))
    now = us(datetime(2026, 6, 1, 12, tzinfo=UTC))
    state = new_state()
    apply_deltas(state, [(now // MINUTE_US, 5 * USD)], s, now, 0)
    d = decide(state, s, now)
    assert (d.state, d.reason, d.level, d.mode) == ("warn", "threshold", 100, "soft")


def test_rolling_window_forgets_old_spend() -> None:
    s = spec(**{"rolling:60m": "10"})
    t0 = us(datetime(2026, 6, 1, 12, tzinfo=UTC))
    state = new_state()
    apply_deltas(state, [(t0 // MINUTE_US, 6 * USD)], s, t0, 0)
    t1 = t0 + 30 * MINUTE_US
    apply_deltas(state, [(t1 // MINUTE_US, 5 * USD)], s, t1, 0)
    assert decide(state, s, t1).state == "blocked"  # 11 within the last hour
    t2 = t0 + 61 * MINUTE_US
    assert decide(state, s, t2).state == "warn"  # 5 left in the window: 50 %


def test_late_events_inside_grace_count_outside_are_flagged() -> None:
    s = spec(daily="100")
    now = us(datetime(2026, 6, 2, 0, 30, tzinfo=UTC))
    yesterday = minute(datetime(2026, 6, 1, 23, 50, tzinfo=UTC))
    state = new_state()
    assert apply_deltas(state, [(yesterday, 7 * USD)], s, now, 3600 * 10**6) == 0  # within 1 h grace
    assert state["window_spend"]["day:2026-06-01@UTC"] == 7 * USD
    much_later = now + 2 * 3600 * 10**6
    assert apply_deltas(state, [(yesterday, 3 * USD)], s, much_later, 3600 * 10**6) == 3 * USD
    assert state["window_spend"]["day:2026-06-01@UTC"] == 7 * USD
    assert state["late_spend"]["day:2026-06-01@UTC"] == 3 * USD


def test_runaway_against_the_scopes_own_baseline_and_a_ceiling() -> None:
    s = Spec("project:etl", (make_limit("project:etl", "monthly", "100000"),), runaway_multiplier=10)
    start = us(datetime(2026, 6, 1, 12, tzinfo=UTC))
    state = new_state()
    for i in range(60):  # an hour of steady $0.10/min
        apply_deltas(state, [(start // MINUTE_US + i, USD // 10)], s, start + i * MINUTE_US, 0)
    now = start + 60 * MINUTE_US
    assert decide(state, s, now).state == "ok"
    for i in range(3):  # then $5/min: 10x the 5-minute baseline within 3 minutes
        apply_deltas(state, [(now // MINUTE_US + i, 5 * USD)], s, now + i * MINUTE_US, 0)
    d = decide(state, s, now + 2 * MINUTE_US)
    assert (d.state, d.reason) == ("blocked", "runaway")
    ceiling = Spec("project:etl", runaway_pico_per_minute=USD)  # $1/min ceiling
    assert decide(state, ceiling, now + 2 * MINUTE_US).reason == "runaway"
    assert decide(state, ceiling, now + 20 * MINUTE_US).state == "ok"  # cooled down


def test_forecast_warns_with_the_projected_date() -> None:
    s = spec(monthly="1000")
    start = us(datetime(2026, 6, 1, 0, 0, tzinfo=UTC))
    state = new_state()
    for i in range(30):  # $1/min: $1440/day, the monthly $1000 is gone in ~16.7 hours
        apply_deltas(state, [(start // MINUTE_US + i, USD)], s, start + i * MINUTE_US, 0)
    now = start + 29 * MINUTE_US
    d = decide(state, s, now)
    assert (d.state, d.reason) == ("warn", "forecast")
    projected = utc_from_micros(d.projected_at_us)
    assert datetime(2026, 6, 1, 16, 0, tzinfo=UTC) < projected < datetime(2026, 6, 1, 17, 30, tzinfo=UTC)


def test_manual_block_is_the_strongest_reason() -> None:
    s = Spec(
        "team:data", (make_limit("team:data", "daily", "1"),), manual_block=True, manual_reason="incident 42"
    )
    d = decide(new_state(), s, us(datetime(2026, 6, 1, tzinfo=UTC)))
    assert (d.state, d.reason) == ("blocked", "manual")


def test_event_scopes_include_model_filters() -> None:
    got = scopes_for_event("checkout", "commerce", "u1", "gpt-4o-mini", ["gpt-4o*", "claude-*"])
    assert got == ["org", "project:checkout", "team:commerce", "user:u1", "project:checkout/model:gpt-4o*"]
    assert scopes_for_event("x", None, None, "m") == ["org", "project:x"]


def test_budget_file_short_and_long_forms(tmp_path: Path) -> None:
    y = tmp_path / "b.yaml"
    y.write_text(
        'budgets:\n  project:checkout: {daily: "50.25", monthly: 1000}\n'
        '  team:data:\n    limits: [{window: monthly, tz: Europe/Berlin, limit: "5000", warn: [90], mode: soft}]\n'
        '    runaway: {multiplier: 10, usd_per_minute: "2.5"}\n'
    )
    specs = {s.scope: s for s in load_specs(y)}
    assert [(lim.window, lim.limit_pico) for lim in specs["project:checkout"].limits] == [
        ("daily", 50_250_000_000_000),
        ("monthly", 1000 * USD),
    ]
    data = specs["team:data"]
    assert (data.limits[0].tz, data.limits[0].warn, data.limits[0].mode) == (BERLIN, (90,), "soft")
    assert (data.runaway_multiplier, data.runaway_pico_per_minute) == (10, 2_500_000_000_000)
    assert Spec.from_record(data.to_record(0)) == data  # the Avro record round-trips


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("budgets: [1, 2]", "top-level 'budgets' mapping"),
        ("budgets:\n  checkout: {daily: 1}", "must be org, team:<id>"),
        ("budgets:\n  project:a: {yearly: 1}", "unknown keys"),
        ("budgets:\n  project:a: {daily: -5}", "must be positive"),
        ("budgets:\n  project:a: {daily: abc}", "not a decimal amount"),
        ("budgets:\n  project:a: {}", "needs limits"),
        ("budgets:\n  project:a: {limits: [{window: daily, limit: 1, tz: Mars/Olympus}]}", "IANA name"),
        ("budgets:\n  project:a: {limits: [{window: daily, limit: 1, warn: [150]}]}", "between 1 and 99"),
        ("budgets: {project:a: [", "is not valid"),
    ],
)
def test_bad_budget_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_specs(path)


def test_unquoted_decimals_are_read_exactly_never_as_floats(tmp_path: Path) -> None:
    y = tmp_path / "b.yaml"
    y.write_text("budgets:\n  project:a: {daily: 0.1, monthly: 12.000000000001}\n")
    t = tmp_path / "b.toml"
    t.write_text('[budgets."project:a"]\ndaily = 0.1\n')
    (yaml_spec,) = load_specs(y)
    assert [lim.limit_pico for lim in yaml_spec.limits] == [100_000_000_000, 12_000_000_000_001]
    assert [lim.limit_pico for lim in load_specs(t)[0].limits] == [100_000_000_000]
    with pytest.raises(ConfigError, match="amount must be USD"):
        make_limit("project:a", "daily", 0.1)  # a float from code is refused, not rounded


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.lists(st.tuples(st.integers(0, 3), st.integers(1, 10**9)), min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 30), max_size=10),
    recuts=st.lists(st.integers(0, 30), max_size=10),
    crash_at=st.integers(0, 40),
    commit_lag=st.lists(st.integers(0, 5), min_size=3, max_size=3),
)
def test_fresh_deltas_apply_each_usage_message_once_across_a_crash_and_replay(
    messages: list[tuple[int, list[tuple[int, int]]]],
    cuts: list[int],
    recuts: list[int],
    crash_at: int,
    commit_lag: list[int],
) -> None:
    """The meter takes usage.raw messages in per-partition order into batches of any size; the
    worker dies after `crash_at` batches reached the budget agent, its committed offsets lagging
    behind; the restarted meter re-reads from them and cuts different batches. The scope must
    count every message's spend exactly once."""
    offsets = [0, 0, 0]
    stream = []  # (partition, offset, deltas) in the order the meter handles them
    for partition, deltas in messages:
        stream.append((partition, offsets[partition], deltas))
        offsets[partition] += 1

    def batches(
        items: list[tuple[int, int, list[tuple[int, int]]]], at: list[int]
    ) -> list[list[dict[str, int]]]:
        bounds = sorted({min(c, len(items)) for c in at} | {0, len(items)})
        return [
            [
                {"source_partition": p, "source_offset": o, "minute": m, "pico_usd": pico}
                for p, o, ds in items[a:b]
                for m, pico in ds
            ]
            for a, b in itertools.pairwise(bounds)
        ]

    before = batches(stream, cuts)
    applied: dict[str, int] = {}
    total, duplicates = 0, 0
    delivered = before[: min(crash_at, len(before))]
    for batch in delivered:
        fresh, dup = fresh_deltas(applied, batch)
        total += sum(pico for _, pico in fresh)
        duplicates += dup
    # committed offsets: at most what was delivered, lagging by commit_lag messages
    seen = {
        p: max((d["source_offset"] for b in delivered for d in b if d["source_partition"] == p), default=-1)
        for p in range(3)
    }
    committed = {p: max(0, seen[p] + 1 - commit_lag[p]) for p in range(3)}
    replay = [(p, o, ds) for p, o, ds in stream if o >= committed[p]]
    redelivered = sum(len(ds) for p, o, ds in replay if o <= seen[p])
    for batch in batches(replay, recuts):
        fresh, dup = fresh_deltas(applied, batch)
        total += sum(pico for _, pico in fresh)
        duplicates += dup
    assert total == sum(pico for _, deltas in messages for _, pico in deltas)
    assert duplicates == redelivered


def test_fresh_deltas_ticks_move_nothing_and_v1_deltas_count() -> None:
    applied = {"0": 5}
    tick = {"source_partition": -1, "source_offset": -1, "minute": 1, "pico_usd": 0}
    v1 = {"source_partition": -1, "source_offset": -1, "minute": 1, "pico_usd": 7}  # from a v1 batch
    assert fresh_deltas(applied, [tick, v1]) == ([(1, 7)], 0)
    assert applied == {"0": 5}


def test_templates_are_the_only_scopes_with_a_star_and_members_find_theirs() -> None:
    for template in ("user:*", "team:*", "key:*", "project:*"):
        assert parse_scope(template) == template
    for bad in ("user:a*", "team:**", "project:*/model:gpt-4o", "org:*", "*"):
        with pytest.raises(ConfigError) as refused:
            parse_scope(bad)
        assert "\n" not in str(refused.value)
    assert parse_scope("project:p/model:gpt-4o*") == "project:p/model:gpt-4o*"  # a glob, not a template
    assert [template_of(s) for s in ("user:ann", "key:k1", "project:p", "team:t")] == [
        "user:*",
        "key:*",
        "project:*",
        "team:*",
    ]
    assert [template_of(s) for s in ("org", "user:*", "project:p/model:gpt-4o*")] == [None, None, None]
    assert scopes_for_event("x", None, "u", "m", (), key="k1") == ["org", "project:x", "user:u", "key:k1"]


def test_late_dollars_count_once_though_late_for_their_day_and_their_month() -> None:
    # 2026-11-26 is late for its day and, two days into December with a 1-day grace, for November
    s = spec(daily="100")
    now = us(datetime(2026, 12, 3, 3, 1, tzinfo=UTC))
    week_ago = minute(datetime(2026, 11, 26, 3, 1, tzinfo=UTC))
    state = new_state()
    assert apply_deltas(state, [(week_ago, 3 * USD)], s, now, 86_400 * 10**6) == 3 * USD
    assert state["late_spend"] == {"day:2026-11-26@UTC": 3 * USD, "month:2026-11@UTC": 3 * USD}
    assert late_in_windows_like(state["late_spend"], "day:2026-12-03@UTC") == 3 * USD
    assert late_in_windows_like(state["late_spend"], "month:2026-12@UTC") == 3 * USD
    assert late_in_windows_like(state["late_spend"], "day:2026-12-03@Europe/Paris") == 0
    assert late_in_windows_like(state["late_spend"], "rolling:60") == 3 * USD  # the UTC days'
