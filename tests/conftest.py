"""Shared fixtures: the real Kafka broker (started here, never skipped) and worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from spendstream.cli.kafka_local import LocalCluster, LocalKafka
from spendstream.topics import Topics

REPO = Path(__file__).resolve().parent.parent
# Not the default 9092, so a developer's own broker keeps running; override to run two sessions at once.
TEST_KAFKA_PORT = int(os.environ.get("SPENDSTREAM_TEST_KAFKA_PORT", "19092"))


@contextmanager
def own_broker(name: str, port_offset: int, heap: str = "256m", **options: Any) -> Iterator[LocalKafka]:
    """A fresh single-node KRaft broker in .spendstream/test/<name> (jars cached in ~/.m2) on
    TEST_KAFKA_PORT + port_offset (+ 1: its controller), stopped on exit. Keep the ports below
    32768: above, Linux hands them to outgoing connections and a restart can find one taken."""
    broker = LocalKafka(
        REPO / ".spendstream" / "test" / name,
        port=TEST_KAFKA_PORT + port_offset,
        controller_port=TEST_KAFKA_PORT + port_offset + 1,
        heap=heap,
        **options,
    )
    broker.wipe()
    broker.start(timeout=180, progress=lambda m: print(f"[{name}] {m}", file=sys.stderr))
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def own_cluster(name: str, port_offset: int, brokers: int = 3, heap: str = "256m") -> Iterator[LocalCluster]:
    """A fresh local KRaft cluster of `brokers` nodes in .spendstream/test/<name>/kafka (so that
    SPENDSTREAM_STATE_DIR=.spendstream/test/<name> points the CLI at it), stopped on exit.
    Node i (1..brokers) listens on TEST_KAFKA_PORT + port_offset + 2*(i-1) and its controller on
    the port after; `.bootstrap` lists every node, `.stop_node(i)` / `.start_node(i)` stop one
    (SIGTERM: controlled shutdown; `kill=True`: SIGKILL, a crash) and bring it back."""
    cluster = LocalCluster(
        REPO / ".spendstream" / "test" / name / "kafka",
        brokers=brokers,
        port=TEST_KAFKA_PORT + port_offset,
        controller_port=TEST_KAFKA_PORT + port_offset + 1,
        heap=heap,
    )
    cluster.wipe()
    cluster.start(timeout=180, progress=lambda m: print(f"[{name}] {m}", file=sys.stderr))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """The broker of the whole test session."""
    with own_broker("kafka", 0, heap="512m") as broker:
        yield broker.bootstrap


@dataclass
class RedisServer:
    """A Debian `redis-server` of one test on 127.0.0.1:`port`, no persistence; stop() kills it
    (SIGKILL, as a crash would), start() starts it again, empty, on the same port."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"redis-server did not start on {self.port}:\n{self.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test, on TEST_KAFKA_PORT + 400 (below 32768, one per session)."""
    server = RedisServer(TEST_KAFKA_PORT + 400, tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    """A `spendstream up` process: the worker (role all or meter) on its web port, or the history
    writer (role history) on its history port, with its token in `headers`."""

    env: dict[str, str]
    port: int
    topics: Topics
    process: subprocess.Popen[bytes]
    log: Path
    role: str = "all"
    headers: dict[str, str] = field(default_factory=dict)

    def sql(self, query: str) -> list[list[object]]:
        response = httpx.post(
            f"http://127.0.0.1:{self.port}/sql", json={"query": query}, headers=self.headers, timeout=60
        )
        assert response.status_code == 200, response.text
        rows: list[list[object]] = response.json()["rows"]
        return rows

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json()
        return body

    def flush(self) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/flush", headers=self.headers, timeout=60).raise_for_status()

    def wait_rows(self, query: str, n: int, timeout: float = 90) -> list[list[Any]]:
        """Flush the sink and run `query` until it returns at least `n` rows (or time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            found = self.sql(query)
            if len(found) >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`spendstream <args>` against this worker (its settings, a wide terminal); with `check`,
        a non-zero exit fails the test with what the command printed."""
        out = subprocess.run(
            [sys.executable, "-m", "spendstream", *args],
            env={**self.env, "COLUMNS": "250"},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        if check:
            assert out.returncode == 0, out.stderr + out.stdout
        return out

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # never leave a worker behind
            self.process.wait()
            raise


def start_worker(bootstrap: str, state_dir: Path, budgets: str, **extra: str) -> Worker:
    """`spendstream up` as a separate process on fresh topics and a fresh embedded ClickHouse."""
    port = free_port()
    env = _fresh_env(bootstrap, state_dir, budgets, SPENDSTREAM_WEB_PORT=str(port), **extra)
    return _spawn(env, port, Topics(env["SPENDSTREAM_TOPIC_PREFIX"]), state_dir / "worker.log")


def _fresh_env(bootstrap: str, state_dir: Path, budgets: str, **extra: str) -> dict[str, str]:
    """The environment of a `spendstream up` on fresh topics (a new prefix and worker id) and a
    fresh state dir holding `budgets` as its budgets file; none of the caller's SPENDSTREAM_*."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    budgets_file = state_dir / "budgets.yaml"
    state_dir.mkdir(parents=True, exist_ok=True)
    budgets_file.write_text(budgets)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env.update(
        {
            "SPENDSTREAM_BOOTSTRAP_SERVERS": bootstrap,
            "SPENDSTREAM_STATE_DIR": str(state_dir),
            "SPENDSTREAM_TOPIC_PREFIX": prefix,
            "SPENDSTREAM_WORKER_ID": f"spendstream-{prefix.rstrip('.')}",
            "SPENDSTREAM_BUDGETS_FILE": str(budgets_file),
            **extra,
        }
    )
    return env


def start_history(bootstrap: str, state_dir: Path, budgets: str = "budgets: {}\n", **extra: str) -> Worker:
    """`spendstream up --role history` (the sink and the queries alone) on fresh topics and a fresh
    embedded ClickHouse; `.port` is its history port, `.headers` carry the token it wrote to
    `<state_dir>/history.token`. Start meter workers on it with `start_meter(history)`."""
    port = free_port()
    env = _fresh_env(bootstrap, state_dir, budgets, SPENDSTREAM_HISTORY_PORT=str(port), **extra)
    return _spawn(env, port, Topics(env["SPENDSTREAM_TOPIC_PREFIX"]), state_dir / "history.log", "history")


def start_meter(history: Worker, name: str = "meter", **extra: str) -> Worker:
    """`spendstream up --role meter` on `history`'s topics, state dir and budgets file, on a web port
    of its own, forwarding /sql, /reprice and /flush to `history` (SPENDSTREAM_HISTORY_URL; the token
    from the state dir's history.token, or SPENDSTREAM_HISTORY_TOKEN in `extra`). An empty value in
    `extra` unsets that setting: SPENDSTREAM_HISTORY_URL="" starts a meter worker without a writer."""
    port = free_port()
    env = {
        **history.env,
        "SPENDSTREAM_WEB_PORT": str(port),
        "SPENDSTREAM_HISTORY_URL": f"http://127.0.0.1:{history.port}",
        **extra,
    }
    env = {k: v for k, v in env.items() if v}
    log = history.log.with_name(f"{name}.log")
    return _spawn(env, port, history.topics, log, "meter")


def module_worker(name: str, budgets: str, fixture: str = "worker", **extra: str) -> Any:
    """A module-scoped fixture (named `fixture`): one worker (fresh topics, fresh embedded
    ClickHouse) for the tests of a module, stopped after them. `worker = module_worker("guard", BUDGETS)`."""

    @pytest.fixture(scope="module", name=fixture)
    def worker(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
        w = start_worker(kafka, tmp_path_factory.mktemp(name), budgets, **extra)
        yield w
        w.stop()

    return worker


def restart_worker(worker: Worker, *, kill: bool = False) -> Worker:
    """Stop `worker` (SIGTERM, or SIGKILL with kill=True) and start it again on the same topics,
    state and port: what an operator's restart or a crash does. Returns `worker`, now the new process."""
    if kill:
        worker.process.kill()
        worker.process.wait()
    else:
        worker.stop()
    restarted = _spawn(
        worker.env,
        worker.port,
        worker.topics,
        worker.log.with_name(f"{worker.log.stem}-restarted.log"),
        worker.role,
    )
    worker.process, worker.log, worker.headers = (
        restarted.process,
        restarted.log,
        restarted.headers,
    )  # fixtures holding it stop the new one
    return worker


def _spawn(env: dict[str, str], port: int, topics: Topics, log: Path, role: str = "all") -> Worker:
    """`spendstream up --role <role>` as a child process; returns once its /health answers."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "up", "--role", role],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    worker = Worker(env, port, topics, process, log, role)
    wait_healthy(process, f"http://127.0.0.1:{port}/health", log, f"worker ({role})", timeout=120)
    if role == "history":  # the token of this start
        token_file = Path(env["SPENDSTREAM_STATE_DIR"]) / "history.token"
        token = env.get("SPENDSTREAM_HISTORY_TOKEN") or token_file.read_text().strip()
        worker.headers = {"Authorization": f"Bearer {token}"}
    return worker


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path, what: str, timeout: float) -> None:
    """Return once `url` answers 200; AssertionError with the end of `log` if `process` exits or
    `timeout` passes first (then the process is killed: never left behind)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"{what} not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


async def describe_partitions(bootstrap: str, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Partitions per topic, once the metadata knows them all (a moment after creation)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(50):
            described: list[dict[str, Any]] = await admin.describe_topics(names)
            if all(t["partitions"] for t in described):
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    return {t["topic"]: t["partitions"] for t in described}


async def topic_configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    """Every config of each topic, as the broker reports it (its defaults included)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for res in response.to_object()["resources"]:
            assert res["error_code"] == 0, res
            out[res["resource_name"]] = {e["config_names"]: e["config_value"] for e in res["config_entries"]}
    return out
