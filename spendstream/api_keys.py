"""Internal API keys of the gateway: the record, the secret, its hash, and the signed wire form.

A key is minted by `spendstream keys create`: the secret (`sk-ss-` + 43 URL-safe base64 characters
of 32 random bytes from `secrets`, 256 bits) is printed once and never stored; the record keeps
only its SHA-256. The record goes on the compacted `gateway.keys` topic (key = the public id,
value = an `ApiKey` Avro record signed like a BudgetSpec, see spendstream/signing.py), which every
gateway instance reads whole and follows.

Why SHA-256 and not a password hash (bcrypt, argon2): the secret is 256 random bits, not a
password, so there is no dictionary to try and nothing to slow down; a plain hash keeps the
gateway's lookup one dict access per request.

What a reader accepts (`admit_record`), in this order:
1. the value decodes as an `ApiKey` (else `undecodable`, `wrong_record`);
2. the signature verifies when verify keys are configured (`unsigned`, `bad_signature`,
   `unknown_key`, `tombstone`: spendstream.signing);
3. with verify keys, `updated_at` is not older than the id's last accepted record (`replayed`);
4. every value is within bounds and the record's id is its Kafka key (`invalid`);
5. a revoked id stays revoked: a later record without `revoked_at` is refused (`unrevoked`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spendstream.errors import ConfigError, DecodeError
from spendstream.signing import REPLAYED, UNSIGNED, Signer, Verifier, encode_control
from spendstream.usage import MAX_TEXT
from spendstream.wire import Codec, default_codec

__all__ = [
    "INVALID",
    "MAX_CACHE_TTL_S",
    "MAX_MODEL_GLOBS",
    "MAX_MODEL_GLOB_CHARS",
    "MAX_RPM",
    "MAX_SECRET_CHARS",
    "MAX_TPM",
    "PREFIX_CHARS",
    "SECRET_PREFIX",
    "UNDECODABLE",
    "UNREVOKED",
    "WRONG_RECORD",
    "ApiKey",
    "RecordRefused",
    "admit_record",
    "check_attribution",
    "check_tier_name",
    "decode_key",
    "encode_key",
    "hash_secret",
    "key_problem",
    "mint_key",
    "revoked",
]

SECRET_PREFIX = "sk-ss-"
_SECRET_BYTES = 32  # 256 bits from `secrets`
PREFIX_CHARS = 12  # of the secret, shown by `keys list`: sk-ss- and 6 random characters
MAX_SECRET_CHARS = 128  # a longer "secret" is refused before it is hashed
MAX_MODEL_GLOBS = 64
MAX_MODEL_GLOB_CHARS = 128
MAX_RPM = 1_000_000
MAX_TPM = 10_000_000_000
MAX_CACHE_TTL_S = 30 * 86_400
_SCHEMA = "ApiKey"
_ID = re.compile(r"key_[a-z0-9]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NAME_FORBIDDEN = re.compile(r"[\s/]")

# Why a gateway.keys record was ignored (KeyStore.rejected), besides spendstream.signing's reasons.
UNDECODABLE = "undecodable"
WRONG_RECORD = "wrong_record"
INVALID = "invalid"
UNREVOKED = "unrevoked"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One internal key. Construct it with `mint_key`; `key_problem` says whether one is valid."""

    id: str  # public id, key_ + 12 lowercase base32 characters; the budget scope key:<id>
    prefix: str  # the secret's first 12 characters, shown by `keys list`
    secret_sha256: str  # hex SHA-256 of the secret: the only form the secret is ever stored in
    project: str
    team: str | None = None
    user: str | None = None
    models: tuple[str, ...] = ()  # fnmatch globs the key may use; () = whatever its tier allows
    tier: str | None = None
    rpm: int | None = None  # requests per minute for this key (None = no key limit)
    tpm: int | None = None  # tokens per minute
    cache_ttl_s: int | None = None  # opt-in response cache for calls with this key
    created_at_us: int = 0
    expires_at_us: int | None = None
    revoked_at_us: int | None = None
    updated_at_us: int = 0  # when this version was published (replays of older ones are refused)

    def refusal(self, now_us: int) -> str | None:
        """ "revoked" or "expired" if the key may not be used at `now_us`, else None."""
        if self.revoked_at_us is not None and self.revoked_at_us <= now_us:
            return "revoked"
        if self.expires_at_us is not None and self.expires_at_us <= now_us:
            return "expired"
        return None

    @property
    def scope(self) -> str:
        """The key's own budget scope."""
        return f"key:{self.id}"


def hash_secret(secret: str) -> str:
    """The lowercase hex SHA-256 of a secret (UTF-8): what a record stores and a gateway looks up."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_name(field: str, value: object, required: bool) -> None:
    if value is None and not required:
        return
    if type(value) is not str or not value or len(value) > MAX_TEXT or _NAME_FORBIDDEN.search(value):
        raise ConfigError(
            f"{field} must be 1 to {MAX_TEXT} characters without spaces or '/' "
            f"(it names the budget scope {field}:<name>), got {str(value)[:40]!r}"
        )


def check_attribution(project: object, team: object = None, user: object = None) -> None:
    """ConfigError unless project (required), team and user are names a budget scope can carry."""
    _check_name("project", project, True)
    _check_name("team", team, False)
    _check_name("user", user, False)


def check_tier_name(tier: object) -> str:
    if type(tier) is not str or not _TIER.fullmatch(tier):
        raise ConfigError(
            f"tier {str(tier)[:40]!r} must be 1 to 64 letters, digits, '_', '.' or '-' (e.g. basic)"
        )
    return tier


def _check_models(models: Sequence[object]) -> None:
    if len(models) > MAX_MODEL_GLOBS:
        raise ConfigError(f"{len(models)} model patterns: at most {MAX_MODEL_GLOBS} per key")
    for glob in models:
        if type(glob) is not str or not 0 < len(glob) <= MAX_MODEL_GLOB_CHARS or _NAME_FORBIDDEN.search(glob):
            raise ConfigError(
                f"model pattern {str(glob)[:40]!r} must be 1 to {MAX_MODEL_GLOB_CHARS} characters "
                "without spaces or '/' (fnmatch, e.g. gpt-4o-mini*)"
            )


def _check_bounded(field: str, value: object, top: int) -> None:
    if value is not None and (type(value) is not int or not 1 <= value <= top):
        raise ConfigError(f"{field} must be a whole number from 1 to {top:,}, got {value!r}")


def key_problem(key: ApiKey) -> str | None:
    """Why `key` is not a valid record (a value out of bounds), or None."""
    try:
        if not _ID.fullmatch(key.id):
            raise ConfigError(f"id {key.id[:40]!r} is not key_ and 12 lowercase letters or digits")
        if len(key.prefix) != PREFIX_CHARS or not key.prefix.startswith(SECRET_PREFIX):
            raise ConfigError(
                f"prefix must be the secret's first {PREFIX_CHARS} characters ({SECRET_PREFIX}...)"
            )
        if not _SHA256.fullmatch(key.secret_sha256):
            raise ConfigError("secret_sha256 must be 64 lowercase hex digits")
        check_attribution(key.project, key.team, key.user)
        _check_models(key.models)
        if key.tier is not None:
            check_tier_name(key.tier)
        _check_bounded("rpm", key.rpm, MAX_RPM)
        _check_bounded("tpm", key.tpm, MAX_TPM)
        _check_bounded("cache_ttl_s", key.cache_ttl_s, MAX_CACHE_TTL_S)
        if key.created_at_us < 0 or key.updated_at_us < 0:
            raise ConfigError("created_at and updated_at must not be negative")
        if key.expires_at_us is not None and key.expires_at_us <= key.created_at_us:
            raise ConfigError("expires_at must be after created_at")
        if key.revoked_at_us is not None and key.revoked_at_us < 0:
            raise ConfigError("revoked_at must not be negative")
    except ConfigError as exc:
        return str(exc)
    return None


def mint_key(
    *,
    project: str,
    team: str | None = None,
    user: str | None = None,
    models: Sequence[str] = (),
    tier: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    cache_ttl_s: int | None = None,
    expires_at_us: int | None = None,
    now_us: int,
) -> tuple[ApiKey, str]:
    """A new key record and its secret (shown once, then forgotten). ConfigError if a value is out
    of bounds (the message says which and what is allowed)."""
    secret = SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).decode().rstrip("=")
    key_id = "key_" + base64.b32encode(secrets.token_bytes(8)).decode()[:12].lower()
    key = ApiKey(
        id=key_id,
        prefix=secret[:PREFIX_CHARS],
        secret_sha256=hash_secret(secret),
        project=project,
        team=team,
        user=user,
        models=tuple(models),
        tier=tier,
        rpm=rpm,
        tpm=tpm,
        cache_ttl_s=cache_ttl_s,
        created_at_us=now_us,
        expires_at_us=expires_at_us,
        updated_at_us=now_us,
    )
    problem = key_problem(key)
    if problem is not None:
        raise ConfigError(problem)
    return key, secret


def _to_record(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "secret_sha256": key.secret_sha256,
        "project": key.project,
        "team": key.team,
        "user": key.user,
        "models": list(key.models),
        "tier": key.tier,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "cache_ttl_s": key.cache_ttl_s,
        "created_at": key.created_at_us,
        "expires_at": key.expires_at_us,
        "revoked_at": key.revoked_at_us,
        "updated_at": key.updated_at_us,
    }


def _from_record(record: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=record["id"],
        prefix=record["prefix"],
        secret_sha256=record["secret_sha256"],
        project=record["project"],
        team=record["team"],
        user=record["user"],
        models=tuple(record["models"]),
        tier=record["tier"],
        rpm=record["rpm"],
        tpm=record["tpm"],
        cache_ttl_s=record["cache_ttl_s"],
        created_at_us=record["created_at"],
        expires_at_us=record["expires_at"],
        revoked_at_us=record["revoked_at"],
        updated_at_us=record["updated_at"],
    )


def encode_key(key: ApiKey, signer: Signer | None, codec: Codec | None = None) -> tuple[bytes, bytes]:
    """(Kafka key, value) of `key` for `gateway.keys`: signed when there is a signer. ConfigError if
    a value is out of bounds (nothing invalid is ever published)."""
    problem = key_problem(key)
    if problem is not None:
        raise ConfigError(f"key {key.id[:40]}: {problem}")
    kafka_key = key.id.encode()
    return kafka_key, encode_control(codec or default_codec(), _SCHEMA, kafka_key, _to_record(key), signer)


def decode_key(value: bytes, codec: Codec | None = None) -> ApiKey:
    """The ApiKey of a `gateway.keys` value, unverified and unchecked (DecodeError if it is not one)."""
    name, record = (codec or default_codec()).decode(value)
    if name != _SCHEMA:
        raise DecodeError(f"gateway.keys takes ApiKey records, not {name}")
    return _from_record(record)


class RecordRefused(Exception):
    """A gateway.keys record a reader must ignore; `reason` is a short word for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def admit_record(
    verifier: Verifier,
    kafka_key: bytes | None,
    value: bytes | None,
    previous: ApiKey | None,
    codec: Codec | None = None,
    *,
    adopt_unsigned: bool = False,
) -> ApiKey | None:
    """The key a `gateway.keys` record sets (None: an accepted tombstone, which removes the id), or
    RecordRefused with the reason (see the module docstring). `previous` is the id's last accepted
    key. Every reader (gateway KeyStore, `keys list`, `keys revoke`) decides the same way;
    `adopt_unsigned` admits unsigned records too (`keys resign --adopt-unsigned` only)."""
    codec = codec or default_codec()
    record: dict[str, Any] | None = None
    if value:
        try:
            name, record = codec.decode(value)
        except DecodeError as exc:
            raise RecordRefused(UNDECODABLE, str(exc)) from None
        if name != _SCHEMA:
            raise RecordRefused(WRONG_RECORD, f"{name} on gateway.keys")
    why = verifier.check(kafka_key, value or None, record)
    if why == UNSIGNED and adopt_unsigned:
        why = None
    if why is not None:
        raise RecordRefused(why)
    if record is None:
        return None
    if verifier.enforcing and previous is not None and record["updated_at"] < previous.updated_at_us:
        raise RecordRefused(REPLAYED, f"{record['id'][:40]} updated_at {record['updated_at']}")
    key = _from_record(record)
    problem = key_problem(key)
    if problem is None and (kafka_key or b"") != key.id.encode():
        problem = f"Kafka key {(kafka_key or b'')[:40]!r} is not the record's id {key.id!r}"
    if problem is not None:
        raise RecordRefused(INVALID, problem)
    if previous is not None and previous.revoked_at_us is not None and key.revoked_at_us is None:
        raise RecordRefused(UNREVOKED, f"{key.id} was revoked: a revoked key never comes back")
    return key


def revoked(key: ApiKey, now_us: int) -> ApiKey:
    """`key` revoked at `now_us` (a new version to publish)."""
    return dataclasses.replace(key, revoked_at_us=now_us, updated_at_us=max(now_us, key.updated_at_us + 1))
