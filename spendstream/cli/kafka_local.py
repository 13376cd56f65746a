"""The project's own Kafka broker: one KRaft node on 127.0.0.1, run from Maven Central jars.

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
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from spendstream.contracts import contract_dir
from spendstream.errors import KafkaLocalError

__all__ = ["KAFKA_VERSION", "LocalKafka", "StartResult", "Status"]

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


@dataclass(frozen=True)
class Status:
    """The local broker as seen from its home directory."""

    running: bool
    pid: int | None
    bootstrap: str
    cluster_id: str | None
    version: str = KAFKA_VERSION


@dataclass(frozen=True)
class LocalKafka:
    """A single-node broker kept in `home` (usually `Settings.kafka_dir`)."""

    home: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
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

    def fetch(self, progress: Callable[[str], None] = _quiet) -> None:
        """Copy the broker's jars into `home/lib` with Maven, unless they are already complete."""
        pom = contract_dir("kafka") / "pom.xml"
        fingerprint = hashlib.sha256(pom.read_bytes()).hexdigest()
        lib, marker = self.home / "lib", self.home / "lib" / ".complete"
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            return
        _require("java", "mvn")
        progress(f"fetching Kafka {KAFKA_VERSION} jars from Maven Central into {lib}")
        shutil.rmtree(lib, ignore_errors=True)  # never mix jars of two versions
        lib.mkdir(parents=True)
        shutil.copyfile(pom, self.home / "pom.xml")  # Maven may write next to its pom
        cmd = ["mvn", "-B", "-q", "-Dstyle.color=never", "-f", str(self.home / "pom.xml")]
        cmd += [_DEPENDENCY_PLUGIN, "-DincludeScope=runtime", f"-DoutputDirectory={lib}"]
        out = subprocess.run(cmd, cwd=self.home, capture_output=True, text=True, check=False)
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
            pid = self._pid()
            if pid is not None:  # ours, alive; perhaps still starting up
                self._wait_ready(pid, t0 + timeout, log_offset=None)
                return StartResult(pid, self.bootstrap, True, False, time.monotonic() - t0)
            for port in (self.port, self.controller_port):
                if _port_open(port):
                    raise KafkaLocalError(
                        f"port {port} on 127.0.0.1 is in use by another process, not by the "
                        f"broker kept in {self.home}; stop that process or choose other ports "
                        "(SPENDSTREAM_KAFKA_PORT, SPENDSTREAM_KAFKA_CONTROLLER_PORT)"
                    )
            self.fetch(progress)
            _require("java")
            props = self._write_config()
            formatted = self._format(props, progress)
            logs = self.home / "logs"
            server_log = logs / "server.log"
            offset = server_log.stat().st_size if server_log.exists() else 0
            progress(f"starting Kafka {KAFKA_VERSION} on {self.bootstrap}")
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
            try:
                self._wait_ready(proc.pid, t0 + timeout, log_offset=offset)
            except KafkaLocalError:
                self._kill(proc.pid, 10.0)
                raise
            seconds = time.monotonic() - t0
            log.info("Kafka %s ready on %s in %.1f s", KAFKA_VERSION, self.bootstrap, seconds)
            return StartResult(proc.pid, self.bootstrap, False, formatted, seconds)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after `timeout`); False if it was not running."""
        if not self.home.is_dir():
            return False
        with self._lock():
            pid = self._pid()
            if pid is None:
                return False
            self._kill(pid, timeout)
            log.info("Kafka stopped (pid %d)", pid)
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
            f"{self.home / 'lib'}/*",  # expanded by java itself, no shell involved
        ]

    def _write_config(self) -> Path:
        src = contract_dir("kafka")
        shutil.copyfile(src / "log4j.properties", self.home / "log4j.properties")
        template = string.Template((src / "server.properties.template").read_text())
        props = self.home / "server.properties"
        text = template.substitute(
            port=self.port, controller_port=self.controller_port, log_dirs=self.home / "data"
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

    def _format(self, props: Path, progress: Callable[[str], None]) -> bool:
        if (self.home / "data" / "meta.properties").is_file():
            return False
        cluster_id = _random_cluster_id()
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
                raise KafkaLocalError(
                    f"the Kafka broker exited during start-up\n{self._tail(log_offset or 0)}"
                )
            logged = log_offset is None or _READY_LINE in _read_from(server_log, log_offset)
            if logged and _port_open(self.port):
                return
            if time.monotonic() > deadline:
                raise KafkaLocalError(
                    f"the Kafka broker (pid {pid}) was not ready on {self.bootstrap} within "
                    f"the timeout\n{self._tail(log_offset or 0)}"
                )
            time.sleep(0.1)

    def _kill(self, pid: int, timeout: float) -> None:
        with suppress(ProcessLookupError):  # it may have exited on its own meanwhile
            os.kill(pid, signal.SIGTERM)
            if not _wait_dead(pid, timeout):
                log.warning("Kafka (pid %d) ignored SIGTERM for %.0f s: killing it", pid, timeout)
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
