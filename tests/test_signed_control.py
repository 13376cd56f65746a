"""Signed control through the real broker and worker: forged, unsigned, badly signed and replayed
ControlSignals and BudgetSpecs change nothing and are counted; signed ones take effect; without
keys everything works as before, with one warning."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from producers import SyncGuard
from spendstream import signing
from spendstream.errors import BudgetExceeded
from spendstream.signing import Signer, Verifier, encode_control, generate_key, public_key_b64
from spendstream.wire import default_codec
from stream_processors.feeds import publish
from tests.conftest import Worker, module_worker, start_worker
from tests.test_budgets_pipeline import budgets, cli
from tests.test_pipeline import read_all

pytestmark = pytest.mark.integration

CODEC = default_codec()
HUGE = 2**62
STRANGER = Signer(Ed25519PrivateKey.generate())  # a key no verifier knows


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Signer]:
    path = tmp_path_factory.mktemp("keys") / "signing-key.pem"
    return path, Signer(generate_key(path))


@pytest.fixture(scope="module")
def worker(
    kafka: str, tmp_path_factory: pytest.TempPathFactory, key: tuple[Path, Signer]
) -> Iterator[Worker]:
    path, signer = key
    w = start_worker(
        kafka,
        tmp_path_factory.mktemp("signed"),
        'budgets:\n  project:filed: {daily: "5"}\n',
        SPENDSTREAM_SIGNING_KEY=str(path),
        SPENDSTREAM_VERIFY_KEYS=public_key_b64(signer.public_key),
    )
    yield w
    w.stop()


def records(kafka: str, topic: str, key: bytes) -> list[bytes | None]:
    return [v for k, v in asyncio.run(read_all(kafka, topic, idle=1.0)) if k == key]


def latest_signal(kafka: str, worker: Worker, scope: str, state: str, after: int = 0) -> bytes:
    """The newest signal of `scope` once it is in `state` with a sequence above `after`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [v for v in records(kafka, worker.topics.spend_control, scope.encode()) if v]
        if found:
            last = CODEC.decode(found[-1])[1]
            if last["state"] == state and last["sequence"] > after:
                return found[-1]
    raise AssertionError(f"no {state} signal for {scope} after sequence {after}")


def signal(scope: str, state: str, sequence: int) -> dict[str, Any]:
    return {
        "scope": scope,
        "state": state,
        "reason": "manual" if state == "blocked" else "within_budget",
        "window": "",
        "window_start": 0,
        "window_end": 0,
        "spend_pico_usd": 0,
        "limit_pico_usd": 0,
        "decided_at": time.time_ns() // 1000,
        "sequence": sequence,
    }


def wait_for(guard: SyncGuard, scope: str, state: str, after: int) -> None:
    deadline = time.monotonic() + 30
    while (s := guard.state(scope)) is None or s.state != state or s.sequence <= after:
        assert time.monotonic() < deadline, f"{scope} never {state} after {after}: {s}"
        time.sleep(0.05)


def test_guards_ignore_forged_and_replayed_signals_and_obey_signed_ones(
    kafka: str, worker: Worker, key: tuple[Path, Signer]
) -> None:
    topic = worker.topics.spend_control
    verify = [public_key_b64(key[1].public_key)]
    with SyncGuard(bootstrap_servers=kafka, topic=topic, verify_keys=verify) as running:
        cli(worker, "block", "project:victim", "--reason", "incident 7")
        blocked_1 = latest_signal(kafka, worker, "project:victim", "blocked")
        cli(worker, "unblock", "project:victim")
        genuine_ok = latest_signal(kafka, worker, "project:victim", "ok")
        cli(worker, "block", "project:victim", "--reason", "incident 8")
        blocked_3 = CODEC.decode(latest_signal(kafka, worker, "project:victim", "blocked", after=2))[1]
        assert [CODEC.decode(m)[1]["sequence"] for m in (blocked_1, genuine_ok)] == [1, 2]
        assert blocked_3["sequence"] == 3
        assert blocked_3["key_id"] == key[1].key_id
        wait_for(running, "project:victim", "blocked", after=2)

        # The forgeries: what any Kafka client can write to spend.control.
        victim, innocent = b"project:victim", b"project:innocent"
        tampered = {**blocked_3, "state": "ok", "reason": "within_budget", "sequence": HUGE}
        forged = [
            (
                victim,
                encode_control(CODEC, "ControlSignal", victim, signal("project:victim", "ok", HUGE), None),
            ),
            (victim, STRANGER.encode(CODEC, "ControlSignal", victim, signal("project:victim", "ok", HUGE))),
            (victim, CODEC.encode("ControlSignal", tampered)),  # the worker's key id and signature, moved
            (
                innocent,
                encode_control(
                    CODEC, "ControlSignal", innocent, signal("project:innocent", "blocked", HUGE), None
                ),
            ),
            (
                innocent,
                STRANGER.encode(
                    CODEC, "ControlSignal", innocent, signal("project:innocent", "blocked", HUGE)
                ),
            ),
            (victim, genuine_ok),  # a genuine old `ok`, replayed
            (victim, b"not avro: a Guard must not fail open on it"),
        ]
        sent = Counter({"unsigned": 2, "unknown_key": 2, "bad_signature": 1, "replayed": 1, "undecodable": 1})
        assert sum(sent.values()) == len(forged)
        asyncio.run(publish(kafka, topic, forged))

        deadline = time.monotonic() + 20
        while running.rejected != sent:
            assert time.monotonic() < deadline, running.rejected
            time.sleep(0.05)
        with SyncGuard(bootstrap_servers=kafka, topic=topic, verify_keys=verify) as fresh:
            assert fresh.healthy
            for guard in (running, fresh):
                assert guard.rejected == sent  # every forgery counted once, nothing else rejected
                with pytest.raises(BudgetExceeded, match="project:victim is blocked \\(manual\\)"):
                    guard.check(project="victim")
                guard.check(project="innocent")
                assert guard.state("project:victim").sequence == 3  # type: ignore[union-attr]
                assert guard.state("project:innocent") is None

            # Genuine commands still take effect: the forged sequence 2^62 did not stick.
            cli(worker, "unblock", "project:victim")
            cli(worker, "block", "project:innocent", "--reason", "incident 9")
            for guard in (running, fresh):
                wait_for(guard, "project:victim", "ok", after=3)
                wait_for(guard, "project:innocent", "blocked", after=0)
                guard.check(project="victim")
                with pytest.raises(BudgetExceeded, match="project:innocent is blocked"):
                    guard.check(project="innocent")
                assert guard.rejected == sent


def dead_letters(kafka: str, worker: Worker) -> list[dict[str, Any]]:
    return [
        CODEC.decode(v)[1]
        for _, v in asyncio.run(read_all(kafka, worker.topics.usage_dlq, idle=1.0))
        if v and CODEC.decode(v)[0] == "DeadLetter"
    ]


def rejected_metric(worker: Worker) -> dict[str, int]:
    text = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=10).text
    return {
        m[0]: int(m[1])
        for m in re.findall(r'spendstream_control_rejected_total\{reason="(\w+)"\} (\d+)', text)
    }


def limit_of(worker: Worker, scope: str) -> Decimal | None:
    row = budgets(worker).get((scope, "day"))
    return Decimal(row["limit_usd"]) if row else None


def test_worker_ignores_unsigned_forged_replayed_budgets_and_tombstones(
    kafka: str, worker: Worker, key: tuple[Path, Signer]
) -> None:
    topic, scope, k = worker.topics.budgets, "project:b1", b"project:b1"
    cli(worker, "budget", "set", scope, "10", "--window", "daily")
    cli(worker, "budget", "set", scope, "20", "--window", "daily")
    first, second = records(kafka, topic, k)
    assert first is not None
    assert second is not None
    deadline = time.monotonic() + 20
    while limit_of(worker, scope) != Decimal("20"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    before = rejected_metric(worker)
    letters_before = len(dead_letters(kafka, worker))

    now = time.time_ns() // 1000
    block_me = {**CODEC.decode(second)[1], "manual_block": True, "manual_reason": "forged", "updated_at": now}
    forged: list[tuple[bytes, bytes | None]] = [
        (k, None),  # a tombstone: would delete the budget
        (k, first),  # the genuine older spec ($10), replayed
        (k, encode_control(CODEC, "BudgetSpec", k, block_me, None)),  # unsigned
        (k, STRANGER.encode(CODEC, "BudgetSpec", k, block_me)),  # signed, by an unknown key
        (k, CODEC.encode("BudgetSpec", block_me)),  # the operator's key id and signature, moved
    ]
    asyncio.run(publish(kafka, topic, forged))
    expected = {"unsigned": 1, "unknown_key": 1, "bad_signature": 1, "replayed": 1, "tombstone": 1}
    deadline = time.monotonic() + 30
    while (got := {r: n - before.get(r, 0) for r, n in rejected_metric(worker).items()}) != expected:
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    letters = dead_letters(kafka, worker)[letters_before:]
    assert sorted(d["reason"] for d in letters) == sorted(f"budget_{r}" for r in expected)
    assert all(d["source_topic"] == topic and d["key"] == k for d in letters)
    # nothing changed: the limit, the manual block, the budget itself
    assert limit_of(worker, scope) == Decimal("20")
    assert budgets(worker)[(scope, "day")]["state"] == "ok"
    assert [CODEC.decode(v)[1]["state"] for v in records(kafka, worker.topics.spend_control, k) if v] in (
        [],
        ["ok"],
    )
    listed = cli(worker, "budget", "list").stdout
    assert re.search(r"project:b1 .* \$20\.00", listed), listed

    # Signed changes still apply; a signed removal holds the replay horizon.
    # The CLI reads the scope's spec back before changing it: the newest record on the topic is
    # the forged manual block, which it must not pick up and sign.
    cli(worker, "budget", "set", scope, "30", "--window", "daily")
    deadline = time.monotonic() + 20
    while limit_of(worker, scope) != Decimal("30"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert CODEC.decode(records(kafka, topic, k)[-1])[1]["manual_block"] is False  # type: ignore[arg-type]
    assert "blocked" not in [
        CODEC.decode(v)[1]["state"] for v in records(kafka, worker.topics.spend_control, k) if v
    ]
    cli(worker, "budget", "rm", scope)
    while limit_of(worker, scope) is not None:
        assert time.monotonic() < deadline + 20
        time.sleep(0.1)
    asyncio.run(publish(kafka, topic, [(k, second)]))  # replaying the $20 spec after the removal
    while rejected_metric(worker).get("replayed", 0) != before.get("replayed", 0) + 2:
        assert time.monotonic() < deadline + 40
        time.sleep(0.2)
    assert limit_of(worker, scope) is None
    assert scope not in cli(worker, "budget", "list").stdout


open_worker = module_worker("open", 'budgets:\n  project:old: {daily: "5"}\n', fixture="open_worker")


def test_without_keys_everything_works_as_before_with_one_warning(
    kafka: str, open_worker: Worker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = open_worker
    deadline = time.monotonic() + 20
    while "UNAUTHENTICATED CONTROL PLANE: the worker" not in w.log.read_text():
        assert time.monotonic() < deadline, "the worker never warned"
        time.sleep(0.2)
    out = cli(w, "block", "project:old", "--reason", "maintenance")
    assert out.stderr.count("UNAUTHENTICATED CONTROL PLANE: the CLI") == 1
    monkeypatch.setattr(signing, "_warned", set())
    caplog.set_level(logging.WARNING, logger="producers._guard")
    topic = w.topics.spend_control
    with (
        SyncGuard(bootstrap_servers=kafka, topic=topic) as guard,
        SyncGuard(bootstrap_servers=kafka, topic=topic),
    ):
        warned = [r for r in caplog.records if "UNAUTHENTICATED CONTROL PLANE: the Guard" in r.message]
        assert len(warned) == 1  # two Guards, one warning
        wait_for(guard, "project:old", "blocked", after=0)
        signed = CODEC.decode(latest_signal(kafka, w, "project:old", "blocked"))[1]
        assert signed["key_id"] == ""  # nothing is signed
        # as before: an unsigned `ok` with a jumped sequence is obeyed (the hole keys close)
        k = b"project:old"
        asyncio.run(
            publish(
                kafka,
                topic,
                [(k, encode_control(CODEC, "ControlSignal", k, signal("project:old", "ok", HUGE), None))],
            )
        )
        wait_for(guard, "project:old", "ok", after=signed["sequence"])
        guard.check(project="old")
        assert guard.rejected == Counter()
    # as before: a tombstone on budgets deletes the budget; unsigned specs apply
    assert limit_of(w, "project:old") == Decimal("5")
    asyncio.run(publish(kafka, w.topics.budgets, [(k, None)]))
    deadline = time.monotonic() + 20
    while limit_of(w, "project:old") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cli(w, "budget", "set", "project:old", "7", "--window", "daily")
    while limit_of(w, "project:old") != Decimal("7"):
        assert time.monotonic() < deadline + 20
        time.sleep(0.1)
    assert rejected_metric(w) == {}
    assert w.log.read_text().count("UNAUTHENTICATED CONTROL PLANE: the worker") == 1


def test_keys_resign_signs_the_current_budgets_when_keys_are_first_set_up(
    kafka: str, open_worker: Worker, key: tuple[Path, Signer]
) -> None:
    """`spendstream keys resign` re-publishes the latest spec of every scope, signed: unsigned ones
    only with --adopt-unsigned, removals as removals."""
    path, signer = key
    operator = dataclasses.replace(open_worker, env={**open_worker.env, "SPENDSTREAM_SIGNING_KEY": str(path)})
    cli(open_worker, "budget", "set", "project:adopt", "9", "--window", "daily")
    cli(open_worker, "budget", "set", "project:gone", "9", "--window", "daily")
    cli(open_worker, "budget", "rm", "project:gone")
    topic = open_worker.topics.budgets
    before = {s: len(records(kafka, topic, s.encode())) for s in ("project:adopt", "project:gone")}

    refused = cli(operator, "keys", "resign").stdout
    assert "re-signed 0 budgets and 0 removals" in refused
    assert "project:adopt (unsigned)" in refused
    assert "re-signed " in cli(operator, "keys", "resign", "--adopt-unsigned").stdout

    verifier = Verifier([signer.public_key])
    for scope, removed in (("project:adopt", False), ("project:gone", True)):
        found = records(kafka, topic, scope.encode())
        assert len(found) == before[scope] + 1  # one signed record each, nothing else
        latest = found[-1]
        assert latest is not None
        record = CODEC.decode(latest)[1]
        assert verifier.check(scope.encode(), latest, record) is None
        assert (record["removed"], record["key_id"]) == (removed, signer.key_id)
    assert limit_of(open_worker, "project:adopt") == Decimal("9")
