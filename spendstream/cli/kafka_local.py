"""The project's own Kafka: one KRaft node, or a cluster of several, on 127.0.0.1, from Maven jars.

Kafka is packaged neither in Debian nor on PyPI, so `LocalKafka.fetch` copies the broker's jars
(the pom in `deploy/kafka/`) into `home/lib` with Maven, and `LocalKafka.start` formats
`home/data` once and launches `java ... kafka.Kafka server.properties` as a detached process
(its own session), so the broker outlives the command that started it. For tests of Kafka
security, `scram_users` makes its client listener SASL/SCRAM-SHA-256 and `tls` makes it TLS
(SASL_PLAINTEXT, SSL or SASL_SSL; `deploy/kafka/*.properties.template`). Everything lives in `home`:

    home/lib/          jars (+ `.complete`, the fingerprint of the pom they came from)
    home/data/         KRaft log dir (`meta.properties` holds the cluster id)
    home/logs/         server.log (log4j) and stdout.log (the JVM's own output)
    home/broker.pid    pid of the running broker

`LocalCluster` runs `brokers` such nodes (`spendstream kafka start --brokers 3`), each a combined
broker + controller in its own process, all voters of one controller quorum, sharing the jars:

    home/lib/                   jars, as above
    home/node-<id>/             one node's data/, logs/, server.properties and broker.pid (id 1..N)

Node `id` listens on `port + 2 * (id - 1)` (clients) and `controller_port + 2 * (id - 1)`
(controller): with the defaults 9092/9093, node 1 is 9092/9093, node 2 9094/9095, node 3 9096/9097.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from spendstream.contracts import contract_dir
from spendstream.errors import KafkaLocalError
from spendstream.topics import replication_for

__all__ = [
    "KAFKA_VERSION",
    "ClusterStart",
    "ClusterStatus",
    "LocalCluster",
    "LocalKafka",
    "NodeStatus",
    "StartResult",
    "Status",
]

KAFKA_VERSION = "3.9.1"
_READY_LINE = "Kafka Server started"
_INSTALL_HINT = "install OpenJDK 17+ and Maven 3.8+, e.g. apt-get install openjdk-17-jre-headless maven"
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
_SCRAM_TEXT = re.compile(r"[A-Za-z0-9._-]+")

log = logging.getLogger(__name__)

# Brokers started by this process, kept so that they are reaped (no zombie) when stopped.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _quiet(message: str) -> None:
    """Default progress callback: say nothing."""


@dataclass(frozen=True)
class StartResult:
    """What `LocalKafka.start` did."""

    pid: int
    bootstrap: str
    already_running: bool
    formatted: bool  # the data dir was formatted by this call (a new, empty cluster)
    seconds: float  # from the call to a ready broker

    def describe(self) -> str:
        if self.already_running:
            return f"Kafka already running at {self.bootstrap} (pid {self.pid})"
        return f"Kafka ready at {self.bootstrap} in {self.seconds:.1f}s (pid {self.pid})"


@dataclass(frozen=True)
class Status:
    """The local broker as seen from its home directory."""

    running: bool
    pid: int | None
    bootstrap: str
    cluster_id: str | None
    version: str = KAFKA_VERSION


@dataclass(frozen=True)
class _Launch:
    pid: int
    log_offset: int | None  # where its server.log stood at launch; None: it was running already
    formatted: bool


@dataclass(frozen=True)
class NodeStatus:
    """One node of a local cluster: its process, and what the cluster's metadata says of it."""

    node_id: int
    pid: int | None
    port: int
    controller_port: int
    running: bool
    leaders: int | None = None  # partitions it leads (None: metadata not available)
    under_replicated: int | None = None  # of those, partitions with fewer in-sync replicas than replicas


@dataclass(frozen=True)
class ClusterStatus:
    """A local cluster as seen from its home directory and, if any node answers, its metadata."""

    nodes: tuple[NodeStatus, ...]
    bootstrap: str
    cluster_id: str | None
    quorum_leader: int | None  # the active controller, from the nodes' quorum-state files
    version: str = KAFKA_VERSION

    @property
    def running(self) -> bool:
        """Every node runs (a half-started cluster is not running: see `nodes`)."""
        return all(n.running for n in self.nodes)


@dataclass(frozen=True)
class ClusterStart:
    """What `LocalCluster.start` did, per node."""

    nodes: tuple[StartResult, ...]
    bootstrap: str
    seconds: float

    @property
    def already_running(self) -> bool:
        return all(n.already_running for n in self.nodes)

    @property
    def formatted(self) -> bool:
        return any(n.formatted for n in self.nodes)

    def describe(self) -> str:
        pids = ", ".join(f"node {i} pid {n.pid}" for i, n in enumerate(self.nodes, 1))
        if self.already_running:
            return f"Kafka cluster already running at {self.bootstrap} ({pids})"
        started = [str(i) for i, n in enumerate(self.nodes, 1) if not n.already_running]
        which = "" if len(started) == len(self.nodes) else f" (started node {', '.join(started)})"
        return (
            f"Kafka cluster of {len(self.nodes)} ready at {self.bootstrap} in {self.seconds:.1f}s"
            f"{which} ({pids})"
        )


@dataclass(frozen=True)
class LocalKafka:
    """A single-node broker kept in `home` (usually `Settings.kafka_dir`), or one node of a
    `LocalCluster` (then `node_id`, the quorum's `voters` and the cluster's shared `lib` are set)."""

    home: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    node_id: int = 1
    # (node id, controller port) of every voter of the controller quorum; empty: this node alone.
    voters: tuple[tuple[int, int], ...] = ()
    lib_dir: Path | None = None  # the jars; None: home/lib
    # (name, password) pairs: non-empty, the client listener is SASL_PLAINTEXT with SCRAM-SHA-256
    # and these are its users (created when the data dir is formatted; the first is the broker's own).
    scram_users: tuple[tuple[str, str], ...] = ()
    # (keystore, ca): non-None, the client listener is TLS; keystore = the broker's PEM key and
    # certificate chain (valid for IP 127.0.0.1), ca = the PEM CA that signed it.
    tls: tuple[Path, Path] | None = None

    @property
    def security_protocol(self) -> str:
        """What clients must speak: PLAINTEXT, SASL_PLAINTEXT, SSL or SASL_SSL."""
        return ("SASL_" if self.scram_users else "") + ("SSL" if self.tls is not None else "PLAINTEXT")

    def __post_init__(self) -> None:
        for name, password in self.scram_users:
            if not (_SCRAM_TEXT.fullmatch(name) and _SCRAM_TEXT.fullmatch(password)):
                raise KafkaLocalError(
                    "SCRAM user names and passwords of the local broker may hold only letters, "
                    "digits, '.', '_' and '-' (they are written into its config and format command)"
                )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def lib(self) -> Path:
        return self.lib_dir or self.home / "lib"

    @property
    def _what(self) -> str:
        return f"Kafka node {self.node_id}" if self.voters else "the Kafka broker"

    def fetch(self, progress: Callable[[str], None] = _quiet) -> None:
        """Copy the broker's jars into `lib` with Maven, unless they are already complete."""
        pom = contract_dir("kafka") / "pom.xml"
        fingerprint = hashlib.sha256(pom.read_bytes()).hexdigest()
        lib, marker = self.lib, self.lib / ".complete"
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            return
        _require("java", "mvn")
        progress(f"fetching Kafka {KAFKA_VERSION} jars from Maven Central into {lib}")
        shutil.rmtree(lib, ignore_errors=True)  # never mix jars of two versions
        lib.mkdir(parents=True)
        shutil.copyfile(pom, lib.parent / "pom.xml")  # Maven may write next to its pom
        cmd = ["mvn", "-B", "-q", "-Dstyle.color=never", "-f", str(lib.parent / "pom.xml")]
        cmd += [_DEPENDENCY_PLUGIN, "-DincludeScope=runtime", f"-DoutputDirectory={lib}"]
        out = subprocess.run(cmd, cwd=lib.parent, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise KafkaLocalError(
                f"fetching the Kafka jars failed (mvn exit {out.returncode}); Maven Central must "
                f"be reachable on first use. Last lines:\n{_last(out.stdout + out.stderr)}"
            )
        marker.write_text(fingerprint + "\n")
        log.info("fetched %d Kafka jars into %s", len(list(lib.glob("*.jar"))), lib)

    def start(self, timeout: float = 60.0, progress: Callable[[str], None] = _quiet) -> StartResult:
        """Start the broker (fetching and formatting first if needed) and wait until it serves.

        Idempotent: a broker already running from this home is left alone and reported.
        """
        t0 = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self._pid() is None:
                self._check_ports()  # before a fetch: a port taken is the quicker answer
            self.fetch(progress)
            return self._await(self._launch(progress), t0, timeout)

    def _launch(self, progress: Callable[[str], None], cluster_id: str | None = None) -> _Launch:
        """Launch the JVM unless it runs already (formatting the data dir first, with `cluster_id`
        or a new random one); returns without waiting for it. The jars must be fetched."""
        self.home.mkdir(parents=True, exist_ok=True)
        pid = self._pid()
        if pid is not None:  # ours, alive; perhaps still starting up
            return _Launch(pid, None, False)
        self._check_ports()
        _require("java")
        props = self._write_config()
        formatted = self._format(props, progress, cluster_id)
        logs = self.home / "logs"
        server_log = logs / "server.log"
        offset = server_log.stat().st_size if server_log.exists() else 0
        progress(f"starting {self._what} (Kafka {KAFKA_VERSION}) on {self.bootstrap}")
        with open(logs / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                [*self._java(self.heap), "kafka.Kafka", str(props)],
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives our exit and our terminal's signals
            )
        _children[proc.pid] = proc
        self._pid_file.write_text(f"{proc.pid}\n")
        return _Launch(proc.pid, offset, formatted)

    def _check_ports(self) -> None:
        """KafkaLocalError if this node's ports answer (while it does not run)."""
        for port in (self.port, self.controller_port):
            if _port_open(port):
                cluster = not self.voters and (self.home / "node-1").is_dir()
                raise KafkaLocalError(
                    f"port {port} on 127.0.0.1 is in use by another process, not by "
                    f"{self._what} kept in {self.home}; stop that process or choose other ports "
                    "(SPENDSTREAM_KAFKA_PORT, SPENDSTREAM_KAFKA_CONTROLLER_PORT)"
                    + (
                        "; a local cluster lives in this home: set SPENDSTREAM_KAFKA_BROKERS to "
                        "its node count for every command"
                        if cluster
                        else ""
                    )
                )

    def _await(self, launch: _Launch, t0: float, timeout: float) -> StartResult:
        """Wait for what `_launch` started to serve; a node launched by it that fails is killed."""
        already = launch.log_offset is None
        try:
            self._wait_ready(launch.pid, t0 + timeout, log_offset=launch.log_offset)
        except KafkaLocalError:
            if not already:
                self._kill(launch.pid, 10.0)
            raise
        seconds = time.monotonic() - t0
        if not already:
            log.info("%s ready on %s in %.1f s", self._what, self.bootstrap, seconds)
        return StartResult(launch.pid, self.bootstrap, already, launch.formatted, seconds)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after `timeout`); False if it was not running."""
        if not self.home.is_dir():
            return False
        with self._lock():
            return self._stop(timeout)

    def _stop(self, timeout: float, kill: bool = False) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        if kill:  # a crash, for fault tests: no controlled shutdown, leaders are lost
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._kill(pid, timeout)
        log.info("%s stopped (pid %d)", self._what, pid)
        return True

    def status(self) -> Status:
        pid = self._pid()
        running = pid is not None and _port_open(self.port)
        return Status(running, pid, self.bootstrap, self.cluster_id())

    def cluster_id(self) -> str | None:
        meta = self.home / "data" / "meta.properties"
        if not meta.is_file():
            return None
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def wipe(self) -> None:
        """Stop the broker and delete its data (topics, offsets, cluster id). Jars are kept."""
        self.stop()
        shutil.rmtree(self.home / "data", ignore_errors=True)

    # -- internals -------------------------------------------------------------------------

    @property
    def _pid_file(self) -> Path:
        return self.home / "broker.pid"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start/stop of the same home across processes."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _pid(self) -> int | None:
        """The pid of our running broker, or None (a stale pid file is removed)."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if _alive(pid) and _is_our_broker(pid, self.home / "server.properties"):
            return pid
        self._pid_file.unlink(missing_ok=True)
        return None

    def _java(self, heap: str) -> list[str]:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return [
            "java",
            f"-Xmx{heap}",
            f"-Xms{heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
            f"-Dkafka.logs.dir={logs}",
            "-cp",
            f"{self.lib}/*",  # expanded by java itself, no shell involved
        ]

    def _write_config(self) -> Path:
        src = contract_dir("kafka")
        shutil.copyfile(src / "log4j.properties", self.home / "log4j.properties")
        template = string.Template((src / "server.properties.template").read_text())
        props = self.home / "server.properties"
        voters = self.voters or ((self.node_id, self.controller_port),)
        replication, min_isr = replication_for(len(voters))
        text = template.substitute(
            node_id=self.node_id,
            voters=",".join(f"{node}@127.0.0.1:{port}" for node, port in voters),
            port=self.port,
            controller_port=self.controller_port,
            log_dirs=self.home / "data",
            replication=replication,
            min_isr=min_isr,
        )
        protocol = self.security_protocol
        if protocol != "PLAINTEXT":
            parts = [("security", {"protocol": protocol})]
            if self.scram_users:
                user, password = self.scram_users[0]
                values = {"listener": protocol.lower(), "broker_user": user, "broker_password": password}
                parts.append(("sasl", values))
            if self.tls is not None:
                parts.append(
                    ("tls", {"keystore": str(self.tls[0].resolve()), "ca": str(self.tls[1].resolve())})
                )
            for name, values in parts:
                part = string.Template((src / f"{name}.properties.template").read_text())
                text += part.substitute(port=self.port, controller_port=self.controller_port, **values)
        props.write_text(text)
        return props

    def _format(self, props: Path, progress: Callable[[str], None], cluster_id: str | None) -> bool:
        if (self.home / "data" / "meta.properties").is_file():
            return False
        cluster_id = cluster_id or _random_cluster_id()
        progress(f"formatting {self.home / 'data'} (cluster id {cluster_id})")
        cmd = [*self._java("128m"), "kafka.tools.StorageTool", "format"]
        cmd += ["-t", cluster_id, "-c", str(props), "--ignore-formatted"]
        for name, password in self.scram_users:
            cmd += ["--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]"]
        out = subprocess.run(cmd, cwd=self.home, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise KafkaLocalError(
                f"formatting {self.home / 'data'} failed (exit {out.returncode}):\n"
                f"{_last(out.stdout + out.stderr)}"
            )
        return True

    def _wait_ready(self, pid: int, deadline: float, log_offset: int | None) -> None:
        """Wait for the port to answer and, for a broker we just launched, the started line."""
        server_log = self.home / "logs" / "server.log"
        while True:
            if not _alive(pid):
                self._pid_file.unlink(missing_ok=True)
                raise KafkaLocalError(f"{self._what} exited during start-up\n{self._tail(log_offset or 0)}")
            logged = log_offset is None or _READY_LINE in _read_from(server_log, log_offset)
            if logged and _port_open(self.port):
                return
            if time.monotonic() > deadline:
                raise KafkaLocalError(
                    f"{self._what} (pid {pid}) was not ready on {self.bootstrap} within "
                    f"the timeout\n{self._tail(log_offset or 0)}"
                )
            time.sleep(0.1)

    def _kill(self, pid: int, timeout: float) -> None:
        with suppress(ProcessLookupError):  # it may have exited on its own meanwhile
            os.kill(pid, signal.SIGTERM)
            if not _wait_dead(pid, timeout):
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", self._what, pid, timeout)
                os.kill(pid, signal.SIGKILL)
                _wait_dead(pid, 10.0)
        _children.pop(pid, None)
        self._pid_file.unlink(missing_ok=True)

    def _tail(self, offset: int = 0) -> str:
        """The end of the broker's logs (server.log from `offset`), for error messages."""
        logs = self.home / "logs"
        texts = {
            logs / "server.log": _read_from(logs / "server.log", offset),
            logs / "stdout.log": _read_from(logs / "stdout.log", 0),
        }
        parts = [f"--- {p} ---\n{_last(t)}" for p, t in texts.items() if t.strip()]
        return "\n".join(parts) or f"(nothing logged in {logs})"


@dataclass(frozen=True)
class LocalCluster:
    """`brokers` combined KRaft nodes (broker + controller) kept in `home`, one controller quorum of
    all of them: node `id` (1..brokers) lives in home/node-<id>/ and listens on
    `port + 2 * (id - 1)` and `controller_port + 2 * (id - 1)`; the jars in home/lib are shared.

    Start and stop take one lock (home/.lock), so two commands never start the same node twice.
    """

    home: Path
    brokers: int = 3
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"

    def __post_init__(self) -> None:
        if self.brokers < 2:
            raise KafkaLocalError("a local cluster has at least 2 nodes; one node is LocalKafka")
        ports = [p for n in self.nodes for p in (n.port, n.controller_port)]
        if len(set(ports)) != len(ports) or max(ports) > 65535:
            raise KafkaLocalError(
                f"the {self.brokers} nodes' ports collide: node i listens on SPENDSTREAM_KAFKA_PORT + "
                "2*(i-1) and SPENDSTREAM_KAFKA_CONTROLLER_PORT + 2*(i-1); choose ports of different "
                f"parity or further apart (now {self.port} and {self.controller_port})"
            )

    @property
    def nodes(self) -> tuple[LocalKafka, ...]:
        voters = tuple((i, self.controller_port + 2 * (i - 1)) for i in range(1, self.brokers + 1))
        return tuple(
            LocalKafka(
                self.home / f"node-{i}",
                port=self.port + 2 * (i - 1),
                controller_port=controller,
                heap=self.heap,
                node_id=i,
                voters=voters,
                lib_dir=self.home / "lib",
            )
            for i, controller in voters
        )

    def node(self, node_id: int) -> LocalKafka:
        if not 1 <= node_id <= self.brokers:
            raise KafkaLocalError(f"no node {node_id}: the local cluster's nodes are 1..{self.brokers}")
        return self.nodes[node_id - 1]

    @property
    def bootstrap(self) -> str:
        """Every node, so that clients find the cluster with any one node down."""
        return ",".join(n.bootstrap for n in self.nodes)

    def start(self, timeout: float = 180.0, progress: Callable[[str], None] = _quiet) -> ClusterStart:
        """Start every node that is not running (fetching and formatting first if needed) and wait
        until all serve. Nodes are launched together: none is ready before a majority of the
        quorum runs. Idempotent: running nodes are left alone. If one fails, the nodes this call
        launched are stopped and the error names the node."""
        t0 = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            single = LocalKafka(self.home)._pid()
            if single is not None:
                raise KafkaLocalError(
                    f"a single-node broker (pid {single}) runs from {self.home}: stop it first "
                    "(SPENDSTREAM_KAFKA_BROKERS=1 spendstream kafka stop)"
                )
            nodes = self.nodes
            for node in nodes:
                if node._pid() is None:
                    node._check_ports()
            nodes[0].fetch(progress)
            cluster_id = self.cluster_id() or _random_cluster_id()
            # Formatting is a JVM start per node: in parallel, as are the nodes' own start-ups.
            with ThreadPoolExecutor(len(nodes)) as pool:
                futures = [pool.submit(node._launch, progress, cluster_id) for node in nodes]
            try:
                launched = [(node, future.result()) for node, future in zip(nodes, futures, strict=True)]
                results = tuple(node._await(launch, t0, timeout) for node, launch in launched)
                self._wait_listed(nodes, t0 + timeout)
            except KafkaLocalError:
                for node, future in zip(nodes, futures, strict=True):
                    if future.exception() is None and future.result().log_offset is not None:
                        node._stop(10.0)
                raise
        seconds = time.monotonic() - t0
        log.info("Kafka cluster of %d ready on %s in %.1f s", self.brokers, self.bootstrap, seconds)
        return ClusterStart(results, self.bootstrap, seconds)

    def start_node(
        self, node_id: int, timeout: float = 120.0, progress: Callable[[str], None] = _quiet
    ) -> StartResult:
        """Start one node (it rejoins the quorum and catches up); needs a majority of the quorum
        running to become ready. Idempotent like `start`."""
        node, t0 = self.node(node_id), time.monotonic()
        with self._lock():
            node.fetch(progress)
            result = node._await(node._launch(progress, self.cluster_id()), t0, timeout)
            self._wait_listed([n for n in self.nodes if n._pid() is not None], t0 + timeout)
            return result

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop every node (SIGTERM, then SIGKILL after `timeout`); returns the ids of those that ran."""
        if not self.home.is_dir():
            return []
        with self._lock():
            # All at once: a node stopped after a majority of the quorum is gone waits in vain
            # for a controller to accept its controlled shutdown, until it is killed.
            running = [(n, pid) for n in self.nodes if (pid := n._pid()) is not None]
            for _, pid in running:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for node, pid in running:
                node._kill(pid, timeout)
                log.info("%s stopped (pid %d)", node._what, pid)
            return [n.node_id for n, _ in running]

    def stop_node(self, node_id: int, timeout: float = 30.0, kill: bool = False) -> bool:
        """Stop one node: SIGTERM (a controlled shutdown: its partitions' leadership moves first),
        or with `kill` SIGKILL (a crash). False if it was not running."""
        node = self.node(node_id)
        with self._lock():
            return node._stop(timeout, kill=kill)

    def status(self, metadata_timeout: float = 5.0) -> ClusterStatus:
        """Each node's process and port; leaders and under-replicated partitions per node from
        the cluster's metadata if a node answers within `metadata_timeout`."""
        nodes = self.nodes
        states = [(n, n._pid()) for n in nodes]
        running = [pid is not None and _port_open(n.port) for n, pid in states]
        live = ",".join(n.bootstrap for (n, _), up in zip(states, running, strict=True) if up)
        led: dict[int, tuple[int, int]] | None = None
        if live:
            with suppress(Exception):  # status must answer even when the metadata does not
                led = asyncio.run(asyncio.wait_for(_leadership(live), metadata_timeout))
        out = tuple(
            NodeStatus(
                n.node_id,
                pid,
                n.port,
                n.controller_port,
                up,
                *(led.get(n.node_id, (0, 0)) if led is not None else (None, None)),
            )
            for (n, pid), up in zip(states, running, strict=True)
        )
        leader = _quorum_leader([n for (n, _), up in zip(states, running, strict=True) if up])
        return ClusterStatus(out, self.bootstrap, self.cluster_id(), leader)

    def cluster_id(self) -> str | None:
        """The cluster id of the formatted nodes (the same on every node), None if none is."""
        return next((cid for n in self.nodes if (cid := n.cluster_id()) is not None), None)

    def wipe(self) -> None:
        """Stop every node and delete their data (topics, offsets, cluster id). Jars are kept."""
        self.stop()
        for node in self.nodes:
            shutil.rmtree(node.home / "data", ignore_errors=True)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with LocalKafka(self.home)._lock():
            yield

    def _wait_listed(self, nodes: Sequence[LocalKafka], deadline: float) -> None:
        """Wait until each of `nodes` lists all of them as brokers in its metadata: a node logs
        "started" before every peer has registered with the quorum, and a client that asks then
        sees fewer brokers (and `ensure_topics` would choose fewer replicas)."""
        wanted = {n.node_id for n in nodes}
        for node in nodes:
            listed = asyncio.run(_listed_until(node.bootstrap, wanted, deadline))
            if not wanted <= listed:
                raise KafkaLocalError(
                    f"Kafka node {node.node_id} lists brokers {sorted(listed)}, not all of "
                    f"{sorted(wanted)}, within the timeout; see the nodes' logs in {self.home}/node-*/logs"
                )


async def _listed_until(bootstrap: str, wanted: set[int], deadline: float) -> set[int]:
    """The broker ids `bootstrap`'s metadata lists, polled until they include `wanted` or the
    (monotonic) deadline passes."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    listed: set[int] = set()
    while not wanted <= listed and time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            listed = {b["node_id"] for b in cluster["brokers"]}
        except (KafkaError, OSError, TimeoutError):  # still starting up: ask again
            listed = set()
        finally:
            await admin.close()
        if not wanted <= listed:
            await asyncio.sleep(0.2)
    return listed


async def _leadership(bootstrap: str) -> dict[int, tuple[int, int]]:
    """node id -> (partitions it leads, of those under-replicated), over every topic."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        names = await admin.list_topics()
        described = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    out: dict[int, tuple[int, int]] = {}
    for topic in described:
        for part in topic["partitions"]:
            leader = part["leader"]
            if leader < 0:
                continue
            lead, under = out.get(leader, (0, 0))
            out[leader] = (lead + 1, under + (len(part["isr"]) < len(part["replicas"])))
    return out


def _quorum_leader(nodes: list[LocalKafka]) -> int | None:
    """The controller quorum's leader as the running nodes last recorded it (their
    `quorum-state` files: the leader of the highest epoch); None if none has one."""
    best: tuple[int, int] | None = None  # (epoch, leader)
    for node in nodes:
        with suppress(OSError, ValueError, KeyError):
            state = json.loads((node.home / "data" / "__cluster_metadata-0" / "quorum-state").read_text())
            if state["leaderId"] >= 0 and (best is None or state["leaderEpoch"] > best[0]):
                best = (state["leaderEpoch"], state["leaderId"])
    return best[1] if best else None


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise KafkaLocalError(f"{' and '.join(missing)} not found: {_INSTALL_HINT}")


def _random_cluster_id() -> str:
    """What `kafka-storage random-uuid` prints: 16 random bytes, URL-safe base64, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids ids that look like a command-line flag
            return cid


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None  # also reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_broker(pid: int, props: Path) -> bool:
    """Guard against a recycled pid: the process must be kafka.Kafka on our properties file."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc here: trust the pid file
    return b"kafka.Kafka" in cmdline and str(props).encode() in cmdline


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, os.SEEK_END) < offset:
                offset = 0  # rotated since we looked
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _last(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
