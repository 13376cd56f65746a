"""The budget stage: `spend.deltas` and `budgets` in; `spend.control` signals and dead letters out.

Pure logic (no Kafka): `app.py`'s budget agent feeds it each message and sends what it returns.
The two tables it keeps are any mappings; in the worker they are Faust tables, co-partitioned
with both input topics by scope, so every scope has exactly one writer:

    scopes: scope -> BudgetState as JSON text (spend per window and minute, applied source
            offsets, last signal; see budgets.dump_state)
    specs:  scope -> the BudgetSpec record in force (signature verified)

A member scope (`user:alice`, `team:data`, `key:k1`, `project:p`) without a spec of its own is
decided by its kind's template (`user:*` ...), read from `feed_specs` (the budget feed's view of the
whole topic, so every worker knows every template whichever partition holds it). A member's own
spec wins. When a template changes (also: once after a start), every member this worker holds is
re-decided through a zero delta, so lowering `user:*` blocks the members already above it.

Guarantees (docs/budgets.md): a scope applies each usage.raw message once (its deltas name their
source offset); exactly one ControlSignal per change of (state, reason, level, window), numbered
per scope, signed when the worker has a key; a record that is unsigned, forged, replayed or
invalid changes nothing and is dead-lettered with the reason; a failure on one scope (a bug)
costs that scope's deltas of that message only.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, defaultdict
from collections.abc import Container, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from spendstream.signing import Signer, Verifier, encode_control
from spendstream.wire import Codec
from stream_processors.budgets import (
    LONG_MAX,
    MINUTE_US,
    SEVERITY,
    TEMPLATES,
    BudgetState,
    Decision,
    Spec,
    apply_deltas,
    burn_per_minute,
    decide,
    deltas_problem,
    dump_state,
    forecast_crossing,
    fresh_deltas,
    late_in_windows_like,
    load_state,
    new_state,
    template_of,
    window_end_us,
)
from stream_processors.feeds import budget_rejection
from stream_processors.meter import DeadLetter, partition_for

__all__ = ["BudgetResult", "BudgetStage"]

log = logging.getLogger(__name__)

# Zero deltas per spend.deltas message of a tick: a sweep of 100,000 members is cut into messages
# the budget agent handles in well under a second each, so real spend is not held up behind it.
MAX_DELTAS_PER_TICK = 10_000
# Members of a template `budget list` shows, most severe first (the rest are counted).
MAX_MEMBER_ROWS = 100


@dataclass
class BudgetResult:
    signals: list[tuple[bytes, bytes]] = field(default_factory=list)  # (scope, ControlSignal message)
    dead: list[DeadLetter] = field(default_factory=list)
    metrics: Counter[str] = field(default_factory=Counter)
    # scope -> its new state: written to the table by BudgetStage.keep once the signals are on the broker
    states: dict[str, str] = field(default_factory=dict)


def _due(decision: Decision, spec: Spec | None, now_us: int) -> int:
    """When a scope that is not ok must be re-decided although no spend and no spec arrives.

    With calendar limits only (no rolling window, no runaway rule), a limit reached or a warn level
    can only lift when its window ends: spend within a window only grows, a lower decision (another
    limit's warn, a forecast) ranks below it, and a changed spec or template re-decides the scope
    anyway. Those wait for the window's end, a manual block for ever; everything else (rolling windows, runaway cool-downs,
    forecasts, which move with the clock) is re-decided every tick. So 10,000 blocked members cost
    the ticks nothing until their day ends.
    """
    calendar_only = (
        spec is not None
        and spec.runaway_multiplier == 0
        and spec.runaway_pico_per_minute is None
        and all(lim.rolling_minutes is None for lim in spec.limits)
    )
    if decision.reason == "manual":  # lifted by a changed spec or template only
        return LONG_MAX
    if calendar_only and decision.reason in ("budget_exceeded", "threshold") and decision.window.end_us:
        return decision.window.end_us
    return now_us


def _same_spec(kept: Mapping[str, Any] | None, record: Mapping[str, Any] | None) -> bool:
    """The same budget, but for when it was published and its signature: `spendstream up`
    re-imports the budgets file on every start, and re-deciding 100,000 members of an unchanged
    template then held a restarted worker's first decisions back by seconds."""
    if kept is None or record is None:
        return False
    ignored = ("updated_at", "signature")
    return {k: v for k, v in kept.items() if k not in ignored} == {
        k: v for k, v in record.items() if k not in ignored
    }


class BudgetStage:
    def __init__(
        self,
        codec: Codec,
        scopes: MutableMapping[str, Any],
        specs: MutableMapping[str, Any],
        *,
        grace_us: int,
        signer: Signer | None,
        verifier: Verifier,
        partitions: int,
        feed_specs: Mapping[str, Spec] | None = None,
    ) -> None:
        self.codec = codec
        self.scopes = scopes
        self.specs = specs
        self.partitions = partitions
        self.feed_specs = feed_specs if feed_specs is not None else {}  # scope -> Spec, the whole topic
        self._templates_seen: dict[str, Spec | None] | None = None  # as the last tick saw them
        self._templates_replaced: set[str] = set()  # template records this stage applied
        self.grace_us = grace_us
        self.signer = signer
        self.verifier = verifier
        self.key_id = signer.key_id if signer else ""
        # scopes not ok -> (partition, when a tick must re-decide them: see _due)
        self.attention: dict[str, tuple[int, int]] = {}
        self._parsed: dict[tuple[str, int], Spec] = {}

    def spec_of(self, scope: str) -> Spec | None:
        """The scope's own spec, else its kind's template (None: no budget)."""
        return self.own_spec(scope) or self.feed_specs.get(template_of(scope) or "")

    def own_spec(self, scope: str) -> Spec | None:
        """The scope's spec: as this stage applied it, or, before the stage has read the scope's
        record (the two input topics are not ordered), as the budget feed has it, so a member
        with its own budget is never decided by the template meanwhile."""
        record = self.specs.get(scope)
        if record is None:
            return self.feed_specs.get(scope)
        if record.get("removed"):
            return None
        cache_key = (scope, int(record.get("updated_at", 0)))
        spec = self._parsed.get(cache_key)
        if spec is None:
            spec = self._parsed[cache_key] = Spec.from_record(record)
        return spec

    def on_budget(self, key: bytes | None, value: bytes | None, partition: int, now_us: int) -> BudgetResult:
        """A `budgets` record: validated and verified, it replaces the scope's spec and re-decides."""
        result = BudgetResult()
        scope = (key or b"").decode("utf-8", "replace")
        try:
            record = self.codec.decode(value)[1] if value else None
            if record is not None:
                Spec.from_record(record)  # validate before it decides anything
        except Exception as exc:
            result.dead.append(DeadLetter("invalid_budget", str(exc), value or b""))
            return result
        kept = self.specs.get(scope)
        why = budget_rejection(self.verifier, key, value, record, kept and kept["updated_at"])
        if why is not None:  # unsigned, forged, a tombstone or a replay: changes nothing
            result.metrics[f"control_rejected|{why}"] += 1
            detail = f"{why} budget for {scope!r} ignored: only specs signed with a key in SPENDSTREAM_VERIFY_KEYS count"
            result.dead.append(DeadLetter(f"budget_{why}", detail, value or b""))
            return result
        if scope in TEMPLATES and not _same_spec(kept, record):
            self._templates_replaced.add(scope)  # its members are re-decided by the next tick
        if record is None:
            self.specs.pop(scope, None)
        else:  # kept, removed too: its updated_at is the scope's replay horizon
            self.specs[scope] = {k: v for k, v in record.items() if k != "signature"}
        state = load_state(self.scopes.get(scope))
        self._decide(scope, state, partition, now_us, result)
        result.states[scope] = dump_state(state)
        return result

    def on_deltas(self, value: bytes | None, partition: int, now_us: int) -> BudgetResult:
        """A `spend.deltas` message: each scope applies the deltas of source messages it has not
        applied yet, then re-decides; the state is written only when something changed."""
        result = BudgetResult()
        try:
            name, batch = self.codec.decode(value or b"")
            problem = deltas_problem(name, batch, now_us)
        except Exception as exc:
            name, problem = "undecodable", str(exc)
        if problem is not None:
            reason = "undecodable" if name == "undecodable" else "invalid_delta"
            result.dead.append(DeadLetter(reason, problem, value or b""))
            return result
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for d in batch["deltas"]:
            grouped[d["scope"]].append(d)
        for scope, deltas in grouped.items():
            state = load_state(self.scopes.get(scope))
            try:
                fresh, duplicates = fresh_deltas(state["applied_offsets"], deltas)
                if duplicates:
                    result.metrics["deltas|duplicate"] += duplicates  # re-delivered after a restart
                late = apply_deltas(state, fresh, self.spec_of(scope), now_us, self.grace_us)
                if late:
                    result.metrics["late_pico_usd|beyond_grace"] += late
                signalled = self._decide(scope, state, partition, now_us, result)
            except Exception as exc:  # a bug costs this scope's deltas of this message, never the stage
                log.exception("budget stage: %s failed", scope)
                result.dead.append(DeadLetter("processing_error", f"{scope}: {exc!r}"[:1000], value or b""))
                continue
            if signalled or fresh:
                result.states[scope] = dump_state(state)  # a tick that changes nothing writes no changelog
        return result

    def keep(self, result: BudgetResult) -> None:
        """Write the states `result` decided, once its signals are acknowledged by the broker.

        A state records the last signal it sent (`last_signal`, `sequence`): written first, its
        changelog record could reach the broker and the signal not (a worker killed between the
        two; they are separate produce requests). The restarted worker restored that state, found
        the re-read deltas applied and the decision unchanged, and the signal was lost for good.
        In this order a kill between the two at worst sends the same signal again, with the same
        sequence number (the state before it is re-read and decides it again)."""
        for scope, state in result.states.items():
            self.scopes[scope] = state

    def ticks(self, now_us: int) -> list[tuple[int, list[dict[str, Any]]]]:
        """(partition, zero deltas) messages: for every scope that is not ok, and for every member
        of a template that changed since the last tick. Fed back through spend.deltas, they
        re-decide the scope, so a new window, a cooled-down rate or a new template takes effect."""
        by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
        minute = now_us // MINUTE_US
        swept = list(self._members_of_changed_templates())
        due = {scope: partition for scope, (partition, at) in self.attention.items() if at <= now_us}
        for scope in swept:
            due[scope] = partition_for(scope, self.partitions)
        for scope, partition in due.items():
            by_partition[partition].append(
                {
                    "scope": scope,
                    "minute": minute,
                    "pico_usd": 0,
                    "events": 0,
                    "source_partition": -1,
                    "source_offset": -1,
                }
            )
        return [
            (partition, deltas[i : i + MAX_DELTAS_PER_TICK])
            for partition, deltas in by_partition.items()
            for i in range(0, len(deltas), MAX_DELTAS_PER_TICK)
        ]

    def _members_of_changed_templates(self) -> Iterator[str]:
        """Members of the templates that changed since the last tick: in the budget feed (every
        worker sees every template), or by a template record this stage applied (also one that
        changed while the worker was down, read again after the start). The first tick after a start
        re-decides nothing: it re-builds `attention` from the stored states instead (cheap)."""
        current = {t: self.feed_specs.get(t) for t in TEMPLATES}
        if self._templates_seen is None:
            self._templates_seen = current
            self._resume_attention()
        changed = {t for t in TEMPLATES if current[t] != self._templates_seen[t]} | self._templates_replaced
        self._templates_seen, self._templates_replaced = current, set()
        if changed:
            for scope in list(self.scopes.keys()):
                if template_of(scope) in changed and self.own_spec(scope) is None:
                    yield scope

    def _resume_attention(self) -> None:
        """After a start: every stored scope whose last signal was not ok, due at once (rolling
        windows, runaway) or at its calendar window's end, without re-deciding it now."""
        for scope in list(self.scopes.keys()):
            stored = self.scopes.get(scope)
            if isinstance(stored, str) and '"last_signal"' not in stored:
                continue  # dump_state leaves the first ok signal out: nothing to watch
            state, _, _, window = load_state(stored)["last_signal"]
            if state != "ok":
                self.attention[scope] = (partition_for(scope, self.partitions), window_end_us(window))

    def members(self, template: str) -> Iterator[tuple[str, BudgetState]]:
        """The member scopes of `template` this worker holds that have no spec of their own."""
        for scope in list(self.scopes.keys()):
            if template_of(scope) == template and self.own_spec(scope) is None:
                yield scope, load_state(self.scopes.get(scope))

    def rows(self, specs: Mapping[str, Spec], now_us: int, owned: Container[int]) -> list[dict[str, Any]]:
        """Every budget in `specs` with its current window, spend and state (what `budget list`
        shows), for the scopes this worker owns (their spend.deltas partition is in `owned`; the
        others' spend is another worker's, never shown as $0 here); money as exact decimal strings.
        A template is one row per window (state `template`, reason: how many of this worker's
        members, how many blocked), followed by its members with spend in the window, most severe
        and highest first, at most MAX_MEMBER_ROWS."""
        rows = []
        for scope, spec in sorted(specs.items()):
            if scope not in TEMPLATES:
                if partition_for(scope, self.partitions) in owned:
                    rows += self._scope_rows(scope, spec, load_state(self.scopes.get(scope)), now_us)
                continue
            members = [
                m
                for m in self._top_members(scope, spec, now_us)
                if partition_for(m[1], self.partitions) in owned
            ]
            blocked = sum(1 for _, _, state in members if state["last_signal"][0] == "blocked")
            summary = f"{len(members)} members with spend, {blocked} blocked"
            for row in self._scope_rows(scope, spec, new_state(), now_us):
                rows.append({**row, "spend_usd": "", "percent": 0, "state": "template", "reason": summary})
            shown = heapq.nlargest(MAX_MEMBER_ROWS, members, key=lambda m: m[0])
            rows += [
                row for _, member, state in shown for row in self._scope_rows(member, spec, state, now_us)
            ]
        return rows

    def _top_members(
        self, template: str, spec: Spec, now_us: int
    ) -> list[tuple[tuple[int, int, str], str, BudgetState]]:
        """((severity, highest spend per limit in parts per million, inverted scope), scope, state)
        of the template's members with spend in a current window."""
        windows = [(lim, lim.current(now_us)) for lim in spec.limits]
        found = []
        for member, state in self.members(template):
            share = 0
            for lim, win in windows:
                if lim.rolling_minutes is None:
                    spend = state["window_spend"].get(win.id, 0)
                else:
                    first = win.start_us // MINUTE_US
                    spend = sum(v for k, v in state["minute_spend"].items() if int(k) >= first)
                share = max(share, spend * 1_000_000 // lim.limit_pico + (spend > 0))
            if share:
                order = "".join(chr(0x10FFFF - ord(c)) for c in member)  # nlargest: A before B
                found.append(((SEVERITY[state["last_signal"][0]], share, order), member, state))
        return found

    @staticmethod
    def _scope_rows(scope: str, spec: Spec, state: BudgetState, now_us: int) -> list[dict[str, Any]]:
        spent, minutes = burn_per_minute(state["minute_spend"], now_us // MINUTE_US)
        signal = {
            "state": state["last_signal"][0],
            "reason": state["last_signal"][1],
            # the last hour's burn rate (see burn_per_minute), to the pico-USD
            "burn_usd_per_hour": str(Decimal(spent * 60 // minutes).scaleb(-12)) if minutes else "0",
        }
        rows = []
        for lim in spec.limits:
            win = lim.current(now_us)
            if lim.rolling_minutes is None:
                spend = state["window_spend"].get(win.id, 0)
            else:
                first = win.start_us // MINUTE_US
                spend = sum(v for k, v in state["minute_spend"].items() if int(k) >= first)
            rows.append(
                {
                    "scope": scope,
                    "window": win.id,
                    "window_end": win.end_us,
                    "mode": lim.mode,
                    "spend_usd": str(Decimal(spend).scaleb(-12)),
                    "limit_usd": str(Decimal(lim.limit_pico).scaleb(-12)),
                    "percent": round(spend * 100 / lim.limit_pico, 1),
                    "warn_percent": list(lim.warn),
                    "projected_at": 0
                    if lim.rolling_minutes is not None
                    else forecast_crossing(state["minute_spend"], now_us, spend, lim.limit_pico, win.end_us),
                    **signal,
                    "late_usd": str(Decimal(late_in_windows_like(state["late_spend"], win.id)).scaleb(-12)),
                }
            )
        if not spec.limits:
            rows.append(
                {
                    "scope": scope,
                    "window": "",
                    "window_end": 0,
                    "mode": "",
                    "spend_usd": "",
                    "limit_usd": "",
                    "percent": 0,
                    "warn_percent": [],
                    "projected_at": 0,
                    **signal,
                    "late_usd": "0",
                }
            )
        return rows

    def _decide(
        self, scope: str, state: BudgetState, partition: int, now_us: int, result: BudgetResult
    ) -> bool:
        """One ControlSignal per change of (state, reason, level, window), and once more, re-signed,
        when the worker's signing key changed since the scope's last signal (so after a rotation
        Guards can drop the old key)."""
        spec = self.spec_of(scope)
        decision: Decision = decide(state, spec, now_us)
        if decision.state == "ok":
            self.attention.pop(scope, None)
        else:
            self.attention[scope] = (partition, _due(decision, spec, now_us))
        if decision.key == state["last_signal"] and (
            state["sequence"] == 0 or state["signed_by"] == self.key_id
        ):
            return False
        state["last_signal"], state["signed_by"] = decision.key, self.key_id
        state["sequence"] += 1
        signal = {
            "scope": scope,
            "state": decision.state,
            "reason": decision.reason,
            "window": decision.window.id,
            "window_start": decision.window.start_us,
            "window_end": decision.window.end_us,
            "spend_pico_usd": min(decision.spend_pico, LONG_MAX),  # an Avro long; $9.2M+ saturates
            "limit_pico_usd": decision.limit_pico,
            "decided_at": now_us,
            "sequence": state["sequence"],
            "level": decision.level,
            "mode": decision.mode,
            "projected_at": decision.projected_at_us,
        }
        key = scope.encode()
        result.signals.append((key, encode_control(self.codec, "ControlSignal", key, signal, self.signer)))
        result.metrics[f"signals|{decision.state}"] += 1
        log.info(
            "signal %s %s (%s %s): spend %d of %d pico-USD",
            scope,
            decision.state,
            decision.reason,
            decision.window.id,
            decision.spend_pico,
            decision.limit_pico,
        )
        return True
