"""Kafka security: settings and their checks, the TLS context, Faust's credentials, the whole
pipeline (emitter -> worker -> ClickHouse, CLI block -> guard) against a real broker whose only
client listener is SASL_PLAINTEXT with SCRAM-SHA-256, and an emitter over SASL_SSL."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faust
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import ValidationError

from producers import KafkaAuth, SyncEmitter, SyncGuard
from spendstream.errors import BudgetExceeded, ConfigError, DeliveryTimeout
from spendstream.settings import Settings
from spendstream.topics import Topics, ensure_topics, wait_for_broker
from stream_processors.app import faust_credentials
from tests.conftest import REPO, Worker, own_broker, start_worker

USER, PASSWORD = "alice", "alice-s3cret-Zq9"
SCRAM = KafkaAuth("SASL_PLAINTEXT", "SCRAM-SHA-256", USER, PASSWORD)
SASL_ENV = {
    "SPENDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "SPENDSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    "SPENDSTREAM_KAFKA_SASL_USERNAME": USER,
    "SPENDSTREAM_KAFKA_SASL_PASSWORD": PASSWORD,
}


# -- settings and their checks (no broker) ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "needs a username and a password"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "a", "sasl_password": "p"},
            "needs a SASL mechanism",
        ),
        ({"sasl_mechanism": "PLAIN", "sasl_username": "a", "sasl_password": "p"}, "protocol is PLAINTEXT"),
        ({"security_protocol": "TLS"}, "'TLS' is not one of PLAINTEXT, SASL_PLAINTEXT, SASL_SSL, SSL"),
        ({"ssl_cafile": Path("/ca.pem")}, "SPENDSTREAM_KAFKA_SSL_CAFILE set but the security protocol"),
        ({"security_protocol": "SSL", "ssl_cafile": Path("/nonexistent/ca.pem")}, "no such file"),
        ({"security_protocol": "SSL", "ssl_keyfile": Path("/k.pem")}, "needs SPENDSTREAM_KAFKA_SSL_CERTFILE"),
    ],
)
def test_inconsistent_security_settings_are_refused_with_what_to_set(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        KafkaAuth(**kwargs)  # type: ignore[arg-type]


def test_settings_build_the_auth_and_never_show_the_password(tmp_path: Path) -> None:
    settings = Settings(
        bootstrap_servers="broker:9092",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        kafka_sasl_password=PASSWORD,  # type: ignore[arg-type]
    )
    auth = settings.kafka_auth
    assert auth.client_kwargs() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": USER,
        "sasl_plain_password": PASSWORD,
    }
    assert PASSWORD not in repr(auth) + repr(settings) + str(settings.model_dump())
    with pytest.raises(ValidationError, match="needs a username and a password") as refused:
        Settings(bootstrap_servers="b:9092", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN")
    with pytest.raises(ValidationError, match="needs SPENDSTREAM_BOOTSTRAP_SERVERS"):
        Settings(kafka_security_protocol="SSL")
    assert refused.value.error_count() == 1


def _pem_files(tmp_path: Path, key_password: bytes | None) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for IP 127.0.0.1 it signed, with its (optionally encrypted) key:
    a client certificate, or (unencrypted) the local broker's."""
    now = datetime.now(UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey
    ) -> bytes:
        built = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=subject == issuer, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
            )
            .sign(signer, hashes.SHA256())
        )
        return built.public_bytes(serialization.Encoding.PEM)

    ca_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca, certfile, keyfile = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    ca.write_bytes(cert("spendstream test CA", ca_key, "spendstream test CA", ca_key))
    certfile.write_bytes(cert("client", client_key, "spendstream test CA", ca_key))
    encryption = (
        serialization.BestAvailableEncryption(key_password) if key_password else serialization.NoEncryption()
    )
    keyfile.write_bytes(
        client_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return ca, certfile, keyfile


def test_tls_context_verifies_the_broker_with_the_ca_and_presents_the_client_certificate(
    tmp_path: Path,
) -> None:
    ca, certfile, keyfile = _pem_files(tmp_path, b"key-pw-42")
    auth = KafkaAuth(
        "SASL_SSL",
        "PLAIN",
        USER,
        PASSWORD,
        ssl_cafile=ca,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        ssl_key_password="key-pw-42",
    )
    kwargs = auth.client_kwargs()
    context = kwargs.pop("ssl_context")
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    subjects = [str(c["subject"]) for c in context.get_ca_certs()]
    assert subjects == ["((('commonName', 'spendstream test CA'),),)"]
    assert "key-pw-42" not in repr(auth)
    wrong = KafkaAuth(
        "SSL", ssl_cafile=ca, ssl_certfile=certfile, ssl_keyfile=keyfile, ssl_key_password="nope"
    )
    with pytest.raises(ConfigError, match=r"cannot build the Kafka TLS context from .*client\.key") as bad:
        wrong.client_kwargs()
    assert "nope" not in str(bad.value)
    ca_only = KafkaAuth("SSL", ssl_cafile=ca).client_kwargs()["ssl_context"]
    assert len(ca_only.get_ca_certs()) == 1
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"garbage\.pem"):
        KafkaAuth("SSL", ssl_cafile=tmp_path / "garbage.pem").client_kwargs()


def test_faust_gets_the_same_connection_settings_as_every_other_client(tmp_path: Path) -> None:
    """What Faust hands aiokafka from our credentials equals KafkaAuth.client_kwargs()."""
    ca, _, _ = _pem_files(tmp_path, None)
    assert faust_credentials(KafkaAuth()) is None
    for auth in (
        SCRAM,
        KafkaAuth("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD, ssl_cafile=ca),
        KafkaAuth("SASL_SSL", "PLAIN", USER, PASSWORD),
        KafkaAuth("SSL", ssl_cafile=ca),
    ):
        through_faust = dict(credentials_to_aiokafka_auth(faust_credentials(auth)))
        ours = auth.client_kwargs()
        assert isinstance(through_faust.pop("ssl_context", None), ssl.SSLContext) == auth.tls
        ours.pop("ssl_context", None)
        assert through_faust == ours
    assert isinstance(faust_credentials(SCRAM), faust.SASLCredentials)
    assert PASSWORD not in repr(faust_credentials(SCRAM))


# -- against a real SASL/SCRAM broker ---------------------------------------------------------


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[str]:
    """A second local broker whose client listener is SASL_PLAINTEXT/SCRAM-SHA-256 only."""
    with own_broker(
        "kafka-sasl", 200, scram_users=(("spendstream-broker", "broker-s3cret"), (USER, PASSWORD))
    ) as broker:
        yield broker.bootstrap


@pytest.mark.integration
def test_wrong_or_missing_credentials_are_refused_with_the_reason(sasl_kafka: str) -> None:
    """A refused login or mechanism stops at once (retrying cannot help); a plaintext client that
    is hung up on is told so at the deadline (a restarting broker hangs up too)."""
    refused = {
        KafkaAuth(
            "SASL_PLAINTEXT", "SCRAM-SHA-256", USER, "wrong"
        ): "refused the SCRAM-SHA-256 login of user 'alice'",
        KafkaAuth("SASL_PLAINTEXT", "PLAIN", USER, PASSWORD): "does not offer SASL mechanism PLAIN",
    }
    for auth, message in refused.items():
        started = time.monotonic()
        with pytest.raises(ConfigError, match=message):
            asyncio.run(wait_for_broker(sasl_kafka, timeout=30, kafka_auth=auth))
        assert time.monotonic() - started < 10  # not the whole 30 s timeout
    started = time.monotonic()
    with pytest.raises(ConfigError, match="closed or ignored a PLAINTEXT connection: its listener probably"):
        asyncio.run(wait_for_broker(sasl_kafka, timeout=3, kafka_auth=KafkaAuth()))
    assert 3 <= time.monotonic() - started < 15
    asyncio.run(wait_for_broker(sasl_kafka, timeout=30, kafka_auth=SCRAM))


BUDGETS = """
budgets:
  project:sasl: {daily: "1000"}
"""


@pytest.fixture(scope="module")
def worker(sasl_kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(sasl_kafka, tmp_path_factory.mktemp("sasl"), BUDGETS, **SASL_ENV)
    yield w
    w.stop()


def _spendstream(worker: Worker, *args: str) -> str:
    out = worker.cli(*args)
    return out.stdout + out.stderr


@pytest.mark.integration
def test_pipeline_over_sasl_scram(
    sasl_kafka: str, worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Events sent with a wrong password are kept (spooled), those with the right one are priced
    into ClickHouse, the spooled ones follow once the password is right: stored = sent, exactly.
    A CLI block reaches a Guard over SASL. The password is in no log and no CLI output."""
    topic, spool = worker.topics.usage_raw, tmp_path / "spool"

    def emit(em: SyncEmitter, n: int) -> None:
        for _ in range(n):
            em.emit(project="sasl", provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5)

    wrong = KafkaAuth("SASL_PLAINTEXT", "SCRAM-SHA-256", USER, "wrong")
    with caplog.at_level(logging.WARNING, logger="producers"):
        em = SyncEmitter(
            bootstrap_servers=sasl_kafka, service="sasl", topic=topic, kafka_auth=wrong, spool_dir=spool
        )
        emit(em, 50)
        with pytest.raises(DeliveryTimeout):
            em.flush(timeout=3)
        refused = em.stats()
        em.close(timeout=1)  # what it could not deliver goes to the spool
    assert (refused["accepted"], refused["sent"]) == (50, 0)
    assert "refused the SCRAM-SHA-256 login of user 'alice'" in caplog.text

    with SyncEmitter(
        bootstrap_servers=sasl_kafka, service="sasl", topic=topic, kafka_auth=SCRAM, spool_dir=spool
    ) as em:
        emit(em, 200)
        em.flush(timeout=30)
        assert em.stats()["sent"] == 250  # the 50 spooled first, then the 200
    rows = worker.wait_rows("SELECT event_id FROM usage_events FINAL WHERE project = 'sasl'", 250)
    assert len(rows) == 250

    with SyncGuard(
        bootstrap_servers=sasl_kafka, topic=worker.topics.spend_control, kafka_auth=SCRAM
    ) as guard:
        guard.check(project="sasl")
        cli_output = _spendstream(worker, "block", "project:sasl", "--reason", "sasl test")
        deadline = time.monotonic() + 20
        while (s := guard.state("project:sasl")) is None or s.state != "blocked":
            assert time.monotonic() < deadline, "the guard never saw the block"
            time.sleep(0.05)
        with pytest.raises(BudgetExceeded, match="project:sasl is blocked"):
            guard.check(project="sasl")

    config = _spendstream(worker, "config")
    assert "SPENDSTREAM_KAFKA_SASL_PASSWORD" in config
    assert "**********" in config
    for text in (config, cli_output, worker.log.read_text(), caplog.text):
        assert PASSWORD not in text


@pytest.mark.integration
def test_emitter_and_admin_over_sasl_ssl(tmp_path: Path) -> None:
    """A broker whose only client listener is SASL_SSL (our CA, SCRAM): the emitter delivers every
    event with the CA file; without it (system CAs) the TLS failure is named."""
    ca, certfile, keyfile = _pem_files(tmp_path, None)
    keystore = tmp_path / "broker-keystore.pem"
    keystore.write_bytes(keyfile.read_bytes() + certfile.read_bytes())
    scram = (("spendstream-broker", "broker-s3cret"), (USER, PASSWORD))
    with own_broker("kafka-sasl-ssl", 202, scram_users=scram, tls=(keystore, ca)) as broker:
        assert broker.security_protocol == "SASL_SSL"
        auth = KafkaAuth("SASL_SSL", "SCRAM-SHA-256", USER, PASSWORD, ssl_cafile=ca)
        asyncio.run(wait_for_broker(broker.bootstrap, timeout=30, kafka_auth=auth))
        topics = Topics(f"t{uuid.uuid4().hex[:8]}.")
        asyncio.run(ensure_topics(broker.bootstrap, topics, 2, kafka_auth=auth))
        with SyncEmitter(
            bootstrap_servers=broker.bootstrap, service="tls", topic=topics.usage_raw, kafka_auth=auth
        ) as em:
            for _ in range(300):
                em.emit(
                    project="tls", provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5
                )
            em.flush(timeout=30)
            assert em.stats()["sent"] == 300  # acknowledged by the broker (acks=all)
        no_ca = KafkaAuth("SASL_SSL", "SCRAM-SHA-256", USER, PASSWORD)
        with pytest.raises(
            ConfigError, match=r"TLS with the broker at .* failed: .*CERTIFICATE_VERIFY_FAILED"
        ):
            asyncio.run(wait_for_broker(broker.bootstrap, timeout=30, kafka_auth=no_ca))


def test_a_bad_security_setting_is_one_clear_line_from_the_cli() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "SPENDSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "SPENDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    }
    out = subprocess.run(
        [sys.executable, "-m", "spendstream", "config"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "config error: settings: SASL_PLAINTEXT needs a SASL mechanism, one of PLAIN, SCRAM-SHA-256, "
        "SCRAM-SHA-512 (SPENDSTREAM_KAFKA_SASL_MECHANISM)"
    )
