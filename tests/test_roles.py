"""Roles: one history writer (`up --role history`) and meter workers (`up --role meter`) on the
same topics: the partitions spread over the meters, ClickHouse holds each event once, a budget
crossing gives one `blocked`, and a kill -9 of a meter moves its partitions to the other with
nothing lost or doubled."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import stat
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from producers import SyncEmitter
from spendstream.settings import Settings
from spendstream.wire import default_codec
from stream_processors.history import RemoteHistory, write_token_file
from tests.conftest import Worker, free_port, start_history, start_meter
from tests.test_budgets_pipeline import budgets
from tests.test_pipeline import read_all

pytestmark = pytest.mark.integration

PARTITIONS = 8
PROJECTS = [f"r{i}" for i in range(12)]
OVER = "r0"  # the one project whose budget is crossed, once
USD_PER_EVENT = Decimal("0.001")  # 100 gpt-4o output tokens at $10 per million
RATE = 300  # events/s, round robin over PROJECTS
EVENTS = 6_000  # 20 s of load
LAST = 120  # events sent after the check, for the history writer's stop
KILL_AT = 2_400  # the event after which one meter worker is killed (kill -9)
OVER_LIMIT = "0.3"  # r0 (500 events of the 6,000) crosses it at its 301st event: after the kill
BUDGETS = "budgets:\n" + "".join(
    f'  project:{p}: {{daily: "{OVER_LIMIT if p == OVER else 1000}"}}\n' for p in PROJECTS
)


def partition_of(project: str) -> int:
    """Where the emitter's producer puts a project's events (Kafka's default partitioner)."""
    return (murmur2(project.encode()) & 0x7FFFFFFF) % PARTITIONS


@pytest.fixture(scope="module")
def history(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    h = start_history(
        kafka,
        tmp_path_factory.mktemp("roles"),
        BUDGETS,
        SPENDSTREAM_PARTITIONS=str(PARTITIONS),
        # The sink inserts on /flush (wait_rows) or on SIGTERM only: the last test checks the latter.
        SPENDSTREAM_SINK_MAX_SECONDS="600",
    )
    yield h
    h.stop()


def test_the_history_writer_wants_its_token_and_a_meter_without_one_says_what_to_set(
    history: Worker,
) -> None:
    token_file = Path(history.env["SPENDSTREAM_STATE_DIR"]) / "history.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40
    assert token not in history.log.read_text()  # never logged
    base = f"http://127.0.0.1:{history.port}"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # open: a probe needs no token
    refused = httpx.post(f"{base}/sql", json={"query": "SELECT 1"}, timeout=10)
    assert refused.status_code == 401
    assert "SPENDSTREAM_HISTORY_TOKEN" in refused.json()["error"]
    assert history.sql("SELECT 1") == [[1]]

    # A meter worker of its own topics and group (it must not meter the next test's events).
    alone = start_meter(
        history,
        "meter-alone",
        SPENDSTREAM_HISTORY_URL="",
        SPENDSTREAM_TOPIC_PREFIX="alone.",
        SPENDSTREAM_WORKER_ID="spendstream-alone",
        SPENDSTREAM_WEB_BIND="0.0.0.0",  # reachable from other hosts, with no token to ask for
    )
    try:
        health = alone.health()
        assert health["status"] == "ok"  # enforcement does not depend on a writer
        answer = httpx.post(f"http://127.0.0.1:{alone.port}/sql", json={"query": "SELECT 1"}, timeout=10)
        assert answer.status_code == 503
        assert "SPENDSTREAM_HISTORY_URL" in answer.json()["error"]
        out = alone.cli("sql", "SELECT 1", check=False)
        assert out.returncode != 0
        assert "SPENDSTREAM_HISTORY_URL" in out.stdout + out.stderr
        remote = f"http://{host_address()}:{alone.port}"
        assert httpx.get(f"{remote}/health", timeout=10).status_code == 200
        answer = httpx.get(f"{remote}/budgets", timeout=10)
        assert answer.status_code == 403
        assert "set SPENDSTREAM_HISTORY_TOKEN on it" in answer.json()["error"]
    finally:
        alone.stop()


def host_address() -> str:
    """This host's address on its network (not loopback): requests from it are another host's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("203.0.113.1", 9))  # UDP: nothing is sent, the route picks the address
        address: str = s.getsockname()[0]
    assert not ipaddress.ip_address(address).is_loopback, f"no address but loopback: {address}"
    return address


def test_a_worker_bound_beyond_loopback_answers_other_hosts_with_the_token_only(history: Worker) -> None:
    """SPENDSTREAM_WEB_BIND=0.0.0.0 (a Prometheus scraping every replica): /health and /metrics
    answer anyone; /budgets and the history writer's /sql only this host or the token's bearer."""
    token = history.headers["Authorization"].removeprefix("Bearer ")
    meter = start_meter(
        history,
        "meter-bound",
        SPENDSTREAM_HISTORY_TOKEN=token,
        SPENDSTREAM_TOPIC_PREFIX="bound.",
        SPENDSTREAM_WORKER_ID="spendstream-bound",
        SPENDSTREAM_WEB_BIND="0.0.0.0",
    )
    try:
        remote, local = f"http://{host_address()}:{meter.port}", f"http://127.0.0.1:{meter.port}"
        query = {"query": "SELECT 1"}
        answers = {
            "health": httpx.get(f"{remote}/health", timeout=10).status_code,
            "metrics": httpx.get(f"{remote}/metrics", timeout=10).status_code,
            "budgets": httpx.get(f"{remote}/budgets", timeout=10).status_code,
            "budgets, token": httpx.get(f"{remote}/budgets", headers=history.headers, timeout=10).status_code,
            "sql": httpx.post(f"{remote}/sql", json=query, timeout=10).status_code,
            "sql, wrong token": httpx.post(
                f"{remote}/sql", json=query, headers={"Authorization": "Bearer x"}, timeout=10
            ).status_code,
            "flush": httpx.post(f"{remote}/flush", timeout=10).status_code,
            "sql, this host": httpx.post(f"{local}/sql", json=query, timeout=30).status_code,
        }
        assert answers == {
            "health": 200,
            "metrics": 200,
            "budgets": 401,
            "budgets, token": 200,
            "sql": 401,
            "sql, wrong token": 401,
            "flush": 401,
            "sql, this host": 200,
        }
        answer = httpx.post(f"{remote}/sql", json=query, headers=history.headers, timeout=30)
        assert (answer.status_code, answer.json()["rows"]) == (200, [[1]])
    finally:
        meter.stop()


def owners(*workers: Worker) -> list[list[int]]:
    return [w.health()["partitions"] for w in workers]


def wait_owners(workers: tuple[Worker, ...], want: list[set[int]], timeout: float = 60) -> float:
    """Poll /health until the workers own `want` (their usage.raw partitions, in order); returns
    the time.time() it was first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if [set(p) for p in owners(*workers)] == want:
            return time.time()
        time.sleep(0.1)
    raise AssertionError(f"partitions {owners(*workers)}, wanted {want}")


def test_two_meter_workers_share_the_partitions_and_one_takes_over_after_a_kill_9(
    kafka: str, history: Worker
) -> None:
    token = history.headers["Authorization"].removeprefix("Bearer ")
    with ThreadPoolExecutor(2) as starting:  # both at once: a start is mostly waiting
        started = [
            starting.submit(start_meter, history, "meter-a"),  # the token from the state dir's history.token
            starting.submit(
                start_meter, history, "meter-b", SPENDSTREAM_HISTORY_TOKEN=token
            ),  # as on another host
        ]
    a, b = (f.result() for f in started)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            split = [set(p) for p in owners(a, b)]
            if all(split) and split[0] | split[1] == set(range(PARTITIONS)) and not split[0] & split[1]:
                break
            time.sleep(0.2)
        assert all(split), split
        assert split[0] | split[1] == set(range(PARTITIONS)), split
        victim, survivor = (a, b) if partition_of(OVER) in split[0] else (b, a)
        moved = set(victim.health()["partitions"])
        moved_projects = [p for p in PROJECTS if partition_of(p) in moved]
        assert OVER in moved_projects

        sent = dict.fromkeys(PROJECTS, 0)
        with SyncEmitter(bootstrap_servers=kafka, service="roles", topic=history.topics.usage_raw) as em:
            start = time.monotonic()
            for i in range(EVENTS):
                if i == KILL_AT:
                    em.flush()
                    counted = [sum(w.health()["events"].values()) for w in (victim, survivor)]
                    killed_at = time.time()
                    victim.process.kill()  # kill -9, mid-stream
                    victim.process.wait()
                project = PROJECTS[i % len(PROJECTS)]
                em.emit(project=project, provider="openai", model="gpt-4o", input_tokens=0, output_tokens=100)
                sent[project] += 1
                lag = start + (i + 1) / RATE - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            em.flush()
            delivered = em.sent_events
        assert delivered == EVENTS
        assert all(c > 0 for c in counted), counted  # both meter workers were metering before the kill
        assigned_at = wait_owners((survivor,), [set(range(PARTITIONS))])

        total = "SELECT count(), uniqExact(event_id), toString(sum(cost_usd)) FROM usage_events FINAL"
        found = history.wait_rows(f"{total} HAVING count() >= {EVENTS}", 1, timeout=90)
        # raw: with the copies of events a meter priced twice around the kill, which FINAL collapses
        raw: int = history.sql("SELECT count() FROM usage_events")[0][0]  # type: ignore[assignment]
        stored, distinct, usd = found[0]
        assert (stored, distinct, Decimal(str(usd))) == (EVENTS, EVENTS, EVENTS * USD_PER_EVENT), found
        per_project = {
            str(p): (n, Decimal(str(usd)))
            for p, n, usd in history.sql(
                "SELECT project, count(), toString(sum(cost_usd)) FROM usage_events FINAL GROUP BY project"
            )
        }
        assert per_project == {p: (n, n * USD_PER_EVENT) for p, n in sent.items()}

        # Enforcement resumed on the moved partitions: the survivor's first event of them.
        first_us = history.sql(
            "SELECT toUnixTimestamp64Micro(min(priced_at)) FROM usage_events FINAL WHERE project IN ("
            + ", ".join(f"'{p}'" for p in moved_projects)
            + f") AND priced_at > fromUnixTimestamp64Micro({int(killed_at * 1e6)})"
        )[0][0]
        takeover = int(first_us) / 1e6 - killed_at  # type: ignore[call-overload]

        # The budgets the survivor holds now: every project's spend exact, none counted twice.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            spend = {s: Decimal(r["spend_usd"]) for (s, _), r in budgets(survivor).items()}
            if spend == {f"project:{p}": n * USD_PER_EVENT for p, n in sent.items()}:
                break
            time.sleep(0.5)
        assert spend == {f"project:{p}": n * USD_PER_EVENT for p, n in sent.items()}
        codec = default_codec()
        control = asyncio.run(read_all(kafka, history.topics.spend_control, idle=1.5))
        blocked = Counter(
            s["scope"] for s in (codec.decode(v)[1] for _, v in control) if s["state"] == "blocked"
        )
        assert blocked == {f"project:{OVER}": 1}

        # `spendstream sql` against a meter worker: the history writer's answer.
        assert survivor.cli(
            "sql", "SELECT count() FROM usage_events FINAL", "--format", "csv"
        ).stdout.split() == [
            "count()",
            str(EVENTS),
        ]
        print(
            f"\n2 meter workers + 1 history writer, {PARTITIONS} partitions, {RATE} events/s: "
            f"kill -9 of the meter owning {sorted(moved)} after {KILL_AT} events "
            f"(counted before: {counted[0]} by it, {counted[1]} by the other); "
            f"partitions reassigned after {assigned_at - killed_at:.1f} s, metering resumed on them after "
            f"{takeover:.1f} s; sent {EVENTS}, stored {stored} (distinct ids {distinct}, "
            f"{raw - EVENTS} duplicate rows collapsed by FINAL), lost {EVENTS - stored}, "
            f"doubled 0 (count = distinct ids; every project's budget spend exact), sum ${usd}; "
            f"blocked signals: {dict(blocked)}"
        )

        # SIGTERM: the history writer inserts what its sink holds before it exits.
        before = sum(survivor.health()["events"].values())
        with SyncEmitter(bootstrap_servers=kafka, service="roles", topic=history.topics.usage_raw) as em:
            for i in range(LAST):
                em.emit(
                    project=PROJECTS[i % len(PROJECTS)], provider="openai", model="gpt-4o", output_tokens=100
                )
        deadline = time.monotonic() + 30
        while sum(survivor.health()["events"].values()) < before + LAST and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the sink consumes them (it holds them: no insert for SPENDSTREAM_SINK_MAX_SECONDS)
        inserted = history.health()["sink_rows_written"]  # the LAST events are held, not inserted
        assert history.stop() == 0
        logged = history.log.read_text()
        assert f"history writer stopped: {inserted + LAST} rows written" in logged
        assert token not in logged
        offline = replace(history, env={**history.env, "SPENDSTREAM_WEB_PORT": str(free_port())})
        stored_now = offline.cli("sql", "SELECT count() FROM usage_events FINAL", "--format", "csv").stdout
        assert stored_now.split() == ["count()", str(EVENTS + LAST)]  # read from chDB itself: nothing answers
    finally:
        b.stop()
        a.stop()


def test_the_token_file_is_new_per_start_private_and_read_at_each_request(tmp_path: Path) -> None:
    token_file = tmp_path / "history.token"
    token_file.write_text("stale")
    token_file.chmod(0o644)  # left by someone else: rewritten private all the same
    first = write_token_file(token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    remote = RemoteHistory("http://127.0.0.1:6067/", None, token_file)
    assert remote.url == "http://127.0.0.1:6067"
    assert remote.headers == {"Authorization": f"Bearer {first}"}
    second = write_token_file(token_file)  # the writer restarted: its meters need no restart
    assert second != first
    assert remote.headers == {"Authorization": f"Bearer {second}"}
    assert [p.name for p in tmp_path.iterdir()] == ["history.token"]  # no temporary file left
    assert RemoteHistory("http://h:1", "fixed", token_file).headers == {"Authorization": "Bearer fixed"}
    assert RemoteHistory("http://h:1", None, tmp_path / "missing").headers == {}  # 401 says what to set


def test_history_url_must_be_http() -> None:
    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        Settings(history_url="127.0.0.1:6067")
    assert Settings(history_url="http://history:6067/").history_url == "http://history:6067"
