"""How every Kafka client spendstream creates authenticates: SASL (PLAIN, SCRAM) and/or TLS.

`KafkaAuth` is a plain value (no environment, no pydantic): the CLI builds it from `Settings`
(`Settings.kafka_auth`), and library code (emitter, guard, feeds, sink, topics, the worker's Faust
app) receives it as an argument and spreads `client_kwargs()` into each aiokafka client. The
default, `KafkaAuth()`, is PLAINTEXT with no credentials: what the local broker speaks.

Secrets (the SASL password, the key's password) are never part of `repr()`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from aiokafka.conn import create_conn
from aiokafka.errors import AuthenticationFailedError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from spendstream.errors import ConfigError

__all__ = ["PLAINTEXT", "KafkaAuth", "Refusal", "SaslMechanism", "SecurityProtocol"]

SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class Refusal:
    """Why a broker refused a connection: `reason` names the setting to check; `final` when the
    broker said so explicitly (a retry with the same settings cannot succeed)."""

    reason: str
    final: bool

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class KafkaAuth:
    """Security settings of a Kafka connection; invalid combinations raise ConfigError at once.

    - `SASL_*` needs a mechanism, a username and a password.
    - `SSL`/`SASL_SSL` verify the broker against `ssl_cafile` (or the system's CAs when unset);
      `ssl_certfile` + `ssl_keyfile` add a client certificate (mutual TLS).
    - PLAINTEXT/SASL_PLAINTEXT take no `ssl_*` file: a file given there is a mistake, reported.
    """

    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.security_protocol not in get_args(SecurityProtocol):
            raise ConfigError(
                f"Kafka security protocol {self.security_protocol!r} is not one of "
                f"{', '.join(get_args(SecurityProtocol))} (SPENDSTREAM_KAFKA_SECURITY_PROTOCOL)"
            )
        if self.sasl:
            if self.sasl_mechanism not in get_args(SaslMechanism):
                raise ConfigError(
                    f"{self.security_protocol} needs a SASL mechanism, one of "
                    f"{', '.join(get_args(SaslMechanism))} (SPENDSTREAM_KAFKA_SASL_MECHANISM)"
                )
            if not self.sasl_username or not self.sasl_password:
                raise ConfigError(
                    f"{self.security_protocol} needs a username and a password: set "
                    "SPENDSTREAM_KAFKA_SASL_USERNAME and SPENDSTREAM_KAFKA_SASL_PASSWORD"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ConfigError(
                f"SASL credentials are set but the security protocol is {self.security_protocol}: "
                "set SPENDSTREAM_KAFKA_SECURITY_PROTOCOL to SASL_PLAINTEXT or SASL_SSL"
            )
        files = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        given = {name: path for name, path in files.items() if path is not None}
        if given and not self.tls:
            raise ConfigError(
                f"{', '.join(f'SPENDSTREAM_KAFKA_{n.upper()}' for n in given)} set but the security "
                f"protocol is {self.security_protocol}: set SPENDSTREAM_KAFKA_SECURITY_PROTOCOL to "
                "SSL or SASL_SSL"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ConfigError(
                "SPENDSTREAM_KAFKA_SSL_KEYFILE needs SPENDSTREAM_KAFKA_SSL_CERTFILE (its certificate)"
            )
        for name, path in given.items():
            if not path.expanduser().is_file():
                raise ConfigError(f"SPENDSTREAM_KAFKA_{name.upper()}: no such file {path}")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that give an aiokafka producer, consumer or admin client this
        security; PLAINTEXT gives `{"security_protocol": "PLAINTEXT"}` (aiokafka's default).

        The TLS context is built here (reading the files): a bad certificate, key or password is a
        ConfigError naming the file, not a handshake failure later."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def ssl_context(self) -> Any:
        """An `ssl.SSLContext` verifying the broker (hostname checked) from these files."""

        def path(p: Path | None) -> str | None:
            return str(p.expanduser()) if p is not None else None

        try:
            return create_ssl_context(
                cafile=path(self.ssl_cafile),
                certfile=path(self.ssl_certfile),
                keyfile=path(self.ssl_keyfile),
                password=self.ssl_key_password,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            files = ", ".join(str(p) for p in (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile) if p)
            raise ConfigError(
                f"cannot build the Kafka TLS context from {files or 'the system CAs'}: {exc} "
                "(check the PEM files and SPENDSTREAM_KAFKA_SSL_KEY_PASSWORD)"
            ) from None

    async def refusal(self, bootstrap: str, timeout: float = 5.0) -> Refusal | None:  # noqa: ASYNC109
        """Why the first broker of `bootstrap` refuses these settings, in words for a log line or
        an error (None: it accepts them, or cannot be reached at all). `final`: the broker said so
        (a login or TLS refusal), rather than only hanging up, which a restarting broker does too.

        aiokafka reports a refused login only as "Unable to bootstrap": this opens one connection
        itself to find the real cause (wrong password, mechanism not offered, TLS failure, or a
        listener that speaks another protocol). Never includes a secret."""
        host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
        kwargs = self.client_kwargs()
        try:
            async with asyncio.timeout(timeout):
                conn = await create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **kwargs)
                try:
                    await conn.send(MetadataRequest([]))  # a listener of another protocol hangs up
                finally:
                    conn.close()
        except (SaslAuthenticationFailed, AuthenticationFailedError):
            return Refusal(
                f"the broker at {bootstrap} refused the {self.sasl_mechanism} login of user "
                f"{self.sasl_username!r}: check SPENDSTREAM_KAFKA_SASL_USERNAME, "
                "SPENDSTREAM_KAFKA_SASL_PASSWORD and SPENDSTREAM_KAFKA_SASL_MECHANISM",
                final=True,
            )
        except UnsupportedSaslMechanismError:
            return Refusal(
                f"the broker at {bootstrap} does not offer SASL mechanism {self.sasl_mechanism} "
                "(SPENDSTREAM_KAFKA_SASL_MECHANISM)",
                final=True,
            )
        except ssl.SSLError as exc:
            return Refusal(
                f"TLS with the broker at {bootstrap} failed: {exc} (SPENDSTREAM_KAFKA_SSL_CAFILE?)",
                final=True,
            )
        except (ConnectionRefusedError, TimeoutError):
            return None  # nobody listens, or too slow to tell: not a matter of security settings
        except (OSError, RuntimeError):  # aiokafka's errors are RuntimeErrors
            return Refusal(
                f"the broker at {bootstrap} closed or ignored a {self.security_protocol} connection: "
                "its listener probably expects another security protocol "
                "(SPENDSTREAM_KAFKA_SECURITY_PROTOCOL; managed Kafka usually needs SASL_SSL)",
                final=False,
            )
        return None


PLAINTEXT = KafkaAuth()
