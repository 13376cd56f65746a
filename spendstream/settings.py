"""All configuration in one place: environment variables prefixed `SPENDSTREAM_`, or CLI flags.

Library code never reads the environment: the CLI builds one `Settings` and passes values down.
`spendstream config` prints the effective settings with secrets masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from spendstream.errors import ConfigError
from spendstream.kafka_auth import KafkaAuth, SaslMechanism, SecurityProtocol
from spendstream.signing import Signer, Verifier, public_key_b64
from spendstream.topics import DEDUPE_HORIZON_S, Topics

__all__ = ["PROVIDER_KEY_VARS", "Settings"]

# provider family -> the env var names its SDK reads its key from (the first is the one documented)
PROVIDER_KEY_VARS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}


def _provider_key(family: str) -> Any:
    names = PROVIDER_KEY_VARS[family]
    return Field(
        default=None,
        validation_alias=AliasChoices(f"{family}_api_key", f"spendstream_{family}_api_key", *names),
        description=f"The gateway's master key for {family} ({' or '.join(names)}, as its SDK reads it, or "
        "SPENDSTREAM_PROVIDER_KEYS_FILE); only ever sent to that provider; masked.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPENDSTREAM_", extra="forbid", populate_by_name=True)

    state_dir: Path = Field(
        default=Path.home() / ".spendstream",
        description="Local state: Kafka jars and data, the worker's tables, embedded ClickHouse.",
    )
    bootstrap_servers: str | None = Field(
        default=None,
        description="External Kafka (host:port,...). Unset: spendstream runs its own local broker.",
    )
    kafka_security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="How every Kafka client connects: PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL. "
        "Anything but PLAINTEXT needs SPENDSTREAM_BOOTSTRAP_SERVERS (the local broker is plaintext).",
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols only)."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL username (or API key).")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (or API secret); masked in `spendstream config`."
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed the broker's certificate (SSL, SASL_SSL). "
        "Unset: the system's CAs.",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="PEM client certificate, for brokers that require mutual TLS."
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None, description="PEM private key of the client certificate."
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted SPENDSTREAM_KAFKA_SSL_KEYFILE; masked."
    )
    kafka_port: int = Field(default=9092, description="Port of the local broker (127.0.0.1).")
    kafka_controller_port: int = Field(default=9093, description="KRaft controller port (local).")
    kafka_heap: str = Field(default="512m", description="JVM heap of the local broker (of each node).")
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        description="Nodes of the local Kafka (KRaft, each broker + controller); node i listens on "
        "SPENDSTREAM_KAFKA_PORT + 2*(i-1). 3 or more: the project's topics get 3 replicas and "
        "min.insync.replicas 2 (docs/operations.md).",
    )
    topic_prefix: str = Field(default="", description="Prefix for every topic name.")
    partitions: int = Field(default=4, ge=1, description="Partitions of each topic at creation.")
    clickhouse_dsn: SecretStr | None = Field(
        default=None,
        description="chdb:///path (embedded) or http(s)://user:pass@host:8123. "
        "Unset: chdb://<state_dir>/clickhouse.",
    )
    clickhouse_database: str = Field(default="spendstream")
    budgets_file: Path | None = Field(
        default=None, description="YAML or TOML file of budgets (see docs/configuration.md)."
    )
    policy_file: Path | None = Field(
        default=None,
        description="YAML or TOML file of the gateway's policy: model tiers (tiers:) and per-project "
        "tier and cache TTL (projects:); may be the budgets file (docs/keys.md).",
    )
    unpriced_fallback: str = Field(
        default="max",
        description="Charge events of models without a price at: max (the provider's most expensive "
        "card in force, so budgets still move), none (stay unpriced), or a card id.",
    )
    late_grace_seconds: int = Field(
        default=3600,
        ge=0,
        description="An event whose window ended longer ago than this is recorded and flagged late, "
        "and decides no signal.",
    )
    dedupe_horizon_seconds: int = Field(
        default=DEDUPE_HORIZON_S,
        ge=60,
        le=40 * 86_400,
        description="Copies of an event (same project and event_id) move budgets once if the event is "
        "younger than this; older events are stored but move no budget. Memory: ~8 MB per million "
        "events counted within it (docs/budgets.md).",
    )
    worker_id: str = Field(default="spendstream", description="Faust app id / consumer group.")
    web_port: int = Field(default=6066, description="Worker HTTP port (health, /sql for the CLI).")
    web_bind: str = Field(
        default="127.0.0.1",
        description="Address the worker's HTTP server listens on. Beyond 127.0.0.1 (e.g. 0.0.0.0, for a "
        "Prometheus on another host), /health and /metrics answer anyone, the rest (/budgets, /sql, "
        "/reprice, /flush) only requests from this host or with `Authorization: Bearer "
        "<SPENDSTREAM_HISTORY_TOKEN>`.",
    )
    sink_max_rows: int = Field(default=50_000, ge=1, description="Rows per ClickHouse insert.")
    sink_max_seconds: float = Field(
        default=0.5,
        gt=0,
        description="Longest wait before a flush: an event is queryable in ClickHouse about this long after it "
        "is priced. Each insert costs ClickHouse ~60 ms of planning whatever its rows (bench/README.md).",
    )
    history_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU niceness of the history process (sink, queries): when the CPU is short, "
        "enforcement goes first and history catches up after.",
    )
    history_host: str = Field(
        default="127.0.0.1",
        description="Address the history writer (`spendstream up --role history`) listens on; 0.0.0.0 "
        "when meter workers on other hosts reach it (every request but /health needs its token).",
    )
    history_port: int = Field(
        default=6067, ge=0, le=65535, description="Port of the history writer (`up --role history`)."
    )
    history_url: str | None = Field(
        default=None,
        description="Where a meter worker (`up --role meter`) forwards /sql, /reprice and /flush: the "
        "history writer, e.g. http://127.0.0.1:6067. Unset: those answer 503.",
    )
    history_token: SecretStr | None = Field(
        default=None,
        description="The history writer's bearer token, set alike on the writer and its meter workers "
        "(other hosts). Unset: the writer draws one per start into <state_dir>/history.token (0600), "
        "which meter workers on its host read; masked.",
    )
    query_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="ClickHouse stops a user's query (`spendstream sql`, POST /sql) after this long "
        "(max_execution_time); the sink keeps writing meanwhile.",
    )
    query_max_rows: int = Field(
        default=100_000,
        ge=1,
        description="Most rows a user's query may return (max_result_rows); more is an error.",
    )
    query_max_memory_bytes: int = Field(
        default=1 << 30, ge=1 << 20, description="Memory one user's query may use (max_memory_usage)."
    )
    query_max_concurrent: int = Field(
        default=3,
        ge=1,
        le=32,
        description="Users' queries running at once, in threads of their own (the sink's inserts never "
        "wait for one); more are refused with 429 until one finishes.",
    )
    cache_max_bytes: int = Field(
        default=64 << 20,
        ge=1 << 20,
        description="Memory cap of the gateway's in-process response cache (LRU, bytes); an answer "
        "larger than an eighth of it is not cached.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="redis://[:password@]host:6379/0 (rediss:// for TLS): the gateway's response cache "
        "lives there, shared by every instance, instead of in each process; masked in output.",
    )

    gateway_host: str = Field(default="127.0.0.1", description="Address `spendstream gateway` listens on.")
    gateway_port: int = Field(default=4000, ge=1, le=65535, description="Port of `spendstream gateway`.")
    openai_api_key: SecretStr | None = _provider_key("openai")
    anthropic_api_key: SecretStr | None = _provider_key("anthropic")
    gemini_api_key: SecretStr | None = _provider_key("gemini")
    provider_keys_file: Path | None = Field(
        default=None,
        description="A file of NAME=value lines (OPENAI_API_KEY=..., ANTHROPIC_API_KEY=..., GEMINI_API_KEY=...), "
        "e.g. a mounted secret, for keys not set in the environment; should be readable by the gateway only.",
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1", description="Where the gateway sends OpenAI calls."
    )
    anthropic_base_url: str = Field(
        default="https://api.anthropic.com", description="Where the gateway sends Anthropic calls."
    )
    gemini_base_url: str = Field(
        default="https://generativelanguage.googleapis.com",
        description="Where the gateway sends Gemini calls.",
    )
    gateway_upstream_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Longest wait for a provider's next byte (a long generation streams).",
    )
    gateway_max_body_bytes: int = Field(
        default=64 << 20, ge=1 << 10, description="Largest request body the gateway accepts (audio uploads)."
    )

    signing_key: SecretStr | None = Field(
        default=None,
        description="Ed25519 private key that signs ControlSignals (worker) and BudgetSpecs (CLI): "
        "a key file (PEM, as `spendstream keys generate` writes it) or the key in base64.",
    )
    verify_keys: str = Field(
        default="",
        description="Comma-separated base64 Ed25519 public keys whose signatures are accepted on "
        "spend.control and budgets (old and new during a rotation); the signing key's own is always "
        "accepted. With none, unsigned control records are obeyed (and a warning is logged).",
    )

    @field_validator("signing_key")
    @classmethod
    def _signing_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            try:
                Signer.load(v.get_secret_value())
            except ConfigError as exc:  # the message never contains the key
                raise ValueError(str(exc)) from None
        return v

    @field_validator("verify_keys")
    @classmethod
    def _verify_keys(cls, v: str) -> str:
        try:
            Verifier(k for k in v.split(",") if k.strip())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    def signer(self) -> Signer | None:
        """The key this process signs control records with, if one is configured."""
        return Signer.load(self.signing_key.get_secret_value()) if self.signing_key else None

    def accepted_keys(self) -> list[str]:
        """The base64 public keys this process accepts signed records from: SPENDSTREAM_VERIFY_KEYS
        and the signing key's own (none: unauthenticated). E.g. the gateway's KeyStore(verify_keys=)."""
        signer = self.signer()
        keys = [k.strip() for k in self.verify_keys.split(",") if k.strip()]
        return [*keys, *([public_key_b64(signer.public_key)] if signer else [])]

    def verifier(self) -> Verifier:
        """The public keys this process accepts control records from (none: unauthenticated)."""
        return Verifier(self.accepted_keys())

    @field_validator("openai_base_url", "anthropic_base_url", "gemini_base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} must start with http:// or https://")
        return v.rstrip("/")

    def provider_key(self, family: str) -> str | None:
        """The master key for a provider family: the environment first, then the keys file."""
        secret: SecretStr | None = getattr(self, f"{family}_api_key")
        if secret is not None:
            return secret.get_secret_value()
        if self.provider_keys_file is None:
            return None
        try:
            lines = self.provider_keys_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"cannot read SPENDSTREAM_PROVIDER_KEYS_FILE {self.provider_keys_file}: {exc.strerror}"
            ) from None
        found: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            name, sep, value = text.partition("=")
            if not sep or not value.strip():  # never quote the line: it may hold a key
                raise ConfigError(f"{self.provider_keys_file} line {number}: expected NAME=value")
            found[name.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
        return next((found[n] for n in PROVIDER_KEY_VARS[family] if n in found), None)

    @field_validator("history_url")
    @classmethod
    def _history_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} must start with http:// or https:// (the history writer's address)")
        return v.rstrip("/") if v is not None else v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("clickhouse_dsn")
    @classmethod
    def _dsn_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("chdb://", "http://", "https://")):
            raise ValueError("must start with chdb://, http:// or https://")
        return v

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        try:
            auth = self.kafka_auth
        except ConfigError as exc:  # the message never contains a secret
            raise ValueError(str(exc)) from None
        if auth.security_protocol != "PLAINTEXT" and self.local_kafka:
            raise ValueError(
                f"SPENDSTREAM_KAFKA_SECURITY_PROTOCOL={auth.security_protocol} needs "
                "SPENDSTREAM_BOOTSTRAP_SERVERS: the local broker spendstream starts is plaintext"
            )
        return self

    @property
    def kafka_auth(self) -> KafkaAuth:
        """The security every Kafka client of this process uses (ConfigError if inconsistent)."""
        return KafkaAuth(
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=_reveal(self.kafka_sasl_password),
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
            ssl_key_password=_reveal(self.kafka_ssl_key_password),
        )

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def local_kafka(self) -> bool:
        return self.bootstrap_servers is None

    @property
    def bootstrap(self) -> str:
        if self.bootstrap_servers:
            return self.bootstrap_servers
        # Every node of the local cluster (spendstream/cli/kafka_local.py LocalCluster's ports),
        # so that clients find it with any one node down.
        return ",".join(f"127.0.0.1:{self.kafka_port + 2 * i}" for i in range(self.kafka_brokers))

    @property
    def dsn(self) -> str:
        if self.clickhouse_dsn is not None:
            return self.clickhouse_dsn.get_secret_value()
        return f"chdb://{self.state_dir.expanduser().resolve() / 'clickhouse'}"

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir.expanduser().resolve() / "kafka"

    @property
    def history_token_file(self) -> Path:
        return self.state_dir.expanduser().resolve() / "history.token"

    @property
    def worker_dir(self) -> Path:
        return self.state_dir.expanduser().resolve() / "worker"


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None
