"""Signed control records: who may stop or free spend (docs/security.md).

ControlSignals (`spend.control`, signed by the worker) and BudgetSpecs (`budgets`, signed by the
CLI) carry `key_id` and `signature` as their last two fields. What is signed, with Ed25519:

    DOMAIN + 4-byte big-endian length of the Kafka key + the Kafka key (the scope)
           + the whole single-object message (C3 01, schema fingerprint, Avro body) as it would be
             with `signature` empty

So a signature covers every field, the schema it was written with and the scope it was published
under: it cannot be moved to another scope or another record type. Because `signature` is the last
field and an Ed25519 signature is always 64 bytes, the signed bytes are the received bytes with
their last 66 bytes (the length prefix 0x80 0x01 and the signature) replaced by 0x00 (an empty
`bytes`): a verifier never re-encodes, so a record stays verifiable after the schema gains fields
(which go before `signature`).

A `Verifier` with no keys accepts everything (the unauthenticated mode of a deployment without
keys, which logs one warning per process); with keys it accepts only records signed by one of
them. Freshness (replays) is the reader's part: a Guard keeps the last sequence per scope, the
worker the last `updated_at` per scope.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spendstream.errors import ConfigError
from spendstream.wire import Codec

__all__ = [
    "BAD_SIGNATURE",
    "REPLAYED",
    "TOMBSTONE",
    "UNKNOWN_KEY",
    "UNSIGNED",
    "Signer",
    "Verifier",
    "encode_control",
    "generate_key",
    "key_id_of",
    "public_key_b64",
    "warn_unauthenticated",
]

# Why a control record was ignored (Guard.rejected, the worker's spendstream_control_rejected_total).
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_KEY = "unknown_key"
REPLAYED = "replayed"  # signed, but older than what this reader already accepted for the scope
TOMBSTONE = "tombstone"  # a null value on `budgets`: it cannot be signed

_DOMAIN = b"spendstream signed control v1\x00"
_SIGNATURE_BYTES = 64
_SIGNATURE_PREFIX = b"\x80\x01"  # Avro zig-zag varint of 64: the length of a bytes field of 64
_SIGNED_TAIL = len(_SIGNATURE_PREFIX) + _SIGNATURE_BYTES

_warned: set[str] = set()


def key_id_of(public: Ed25519PublicKey) -> str:
    """The id a signed record carries: the first 16 hex digits of SHA-256 of the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _signed_bytes(key: bytes | None, unsigned_message: bytes) -> bytes:
    k = key or b""
    return _DOMAIN + len(k).to_bytes(4, "big") + k + unsigned_message


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not base64 (make one with `spendstream keys generate`)") from None


def _private_from_bytes(data: bytes, what: str) -> Ed25519PrivateKey:
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{what}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"{what}: the PEM key is not Ed25519 (make one with `spendstream keys generate`)"
            )
        return key
    raw = data if len(data) == 32 else _b64(data.decode("latin-1"), what)
    if len(raw) != 32:
        raise ConfigError(f"{what}: an Ed25519 private key is 32 bytes, got {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def generate_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 private key, written as PEM to `path` (created 0600; never overwritten)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: choose another --out (a key file is never overwritten)") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


class Signer:
    """Signs control records with one Ed25519 private key (the worker's or an operator's)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def load(cls, spec: str) -> Signer:
        """From a key file (PEM, or 32 raw bytes, or base64) or the key itself in base64."""
        path = Path(spec).expanduser()
        if path.is_file():
            try:
                return cls(_private_from_bytes(path.read_bytes(), f"key file {path}"))
            except OSError as exc:
                raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
        return cls(_private_from_bytes(spec.encode(), "neither a key file nor a base64 key"))

    def encode(self, codec: Codec, name: str, key: bytes | None, record: Mapping[str, Any]) -> bytes:
        """The single-object message of `record`, signed for Kafka key `key`."""
        unsigned = codec.encode(name, {**record, "key_id": self.key_id, "signature": b""})
        signature = self._key.sign(_signed_bytes(key, unsigned))
        return unsigned[:-1] + _SIGNATURE_PREFIX + signature  # the bytes of signature=<64 bytes>


def encode_control(
    codec: Codec, name: str, key: bytes | None, record: Mapping[str, Any], signer: Signer | None
) -> bytes:
    """A ControlSignal or BudgetSpec message: signed when there is a signer, unsigned otherwise."""
    if signer is None:
        return codec.encode(name, {**record, "key_id": "", "signature": b""})
    return signer.encode(codec, name, key, record)


class Verifier:
    """Checks the signature of control records against a set of public keys.

    With no keys every record passes (unauthenticated mode). With keys, a record passes only if
    its `key_id` names one of them and the signature verifies over the Kafka key and the message.
    """

    def __init__(self, public_keys: Iterable[str | Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for k in public_keys:
            public = k if isinstance(k, Ed25519PublicKey) else self.parse_key(k)
            self._keys[key_id_of(public)] = public

    @staticmethod
    def parse_key(text: str) -> Ed25519PublicKey:
        raw = _b64(text, f"verify key {text[:12]!r}...")
        if len(raw) != 32:
            raise ConfigError(
                f"verify key {text[:12]!r}...: an Ed25519 public key is 32 bytes, got {len(raw)}"
            )
        return Ed25519PublicKey.from_public_bytes(raw)

    @property
    def enforcing(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def check(self, key: bytes | None, message: bytes | None, record: Mapping[str, Any] | None) -> str | None:
        """None if the record is accepted, else why not (UNSIGNED, BAD_SIGNATURE, UNKNOWN_KEY,
        TOMBSTONE). `message` is the bytes as received, `record` their decoded value (None: a
        tombstone)."""
        if not self._keys:
            return None
        if message is None or record is None:
            return TOMBSTONE
        signature = record.get("signature") or b""
        if not signature:
            return UNSIGNED
        public = self._keys.get(record.get("key_id", ""))
        if public is None:
            return UNKNOWN_KEY
        if len(signature) != _SIGNATURE_BYTES or message[-_SIGNED_TAIL:] != _SIGNATURE_PREFIX + signature:
            return BAD_SIGNATURE
        try:
            public.verify(signature, _signed_bytes(key, message[:-_SIGNED_TAIL] + b"\x00"))
        except InvalidSignature:
            return BAD_SIGNATURE
        return None


def warn_unauthenticated(logger: logging.Logger, who: str) -> None:
    """Log, once per process for `who`, that control records are accepted without signatures."""
    if who in _warned:
        return
    _warned.add(who)
    logger.warning(
        "UNAUTHENTICATED CONTROL PLANE: %s has no verify keys, so it obeys unsigned kill-switch "
        "signals and budgets from any Kafka client (a forged `ok` frees a blocked scope, a forged "
        "`blocked` stops an innocent one). Run `spendstream keys generate` and set "
        "SPENDSTREAM_SIGNING_KEY / SPENDSTREAM_VERIFY_KEYS (Guard(verify_keys=[...])); see docs/security.md",
        who,
    )
