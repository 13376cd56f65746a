"""Signing control records: what verifies, what does not, key files, rotation, old schemas."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from spendstream.errors import ConfigError
from spendstream.settings import Settings
from spendstream.signing import (
    BAD_SIGNATURE,
    TOMBSTONE,
    UNKNOWN_KEY,
    UNSIGNED,
    Signer,
    Verifier,
    encode_control,
    generate_key,
    public_key_b64,
)
from spendstream.wire import Codec, default_codec

SCHEMAS = Path(__file__).parent.parent / "schemas"
CODEC = default_codec()
SIGNAL: dict[str, Any] = {
    "scope": "project:victim",
    "state": "blocked",
    "reason": "manual",
    "window": "",
    "window_start": 0,
    "window_end": 0,
    "spend_pico_usd": 0,
    "limit_pico_usd": 0,
    "decided_at": 1_764_201_600_000_000,
    "sequence": 7,
    "level": 0,
    "mode": "hard",
    "projected_at": 0,
}
KEY = b"project:victim"


def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def check(verifier: Verifier, key: bytes, message: bytes) -> str | None:
    return verifier.check(key, message, CODEC.decode(message)[1])


def test_a_signed_signal_verifies_and_decodes_to_the_same_record() -> None:
    s = signer()
    message = s.encode(CODEC, "ControlSignal", KEY, SIGNAL)
    name, record = CODEC.decode(message)
    assert name == "ControlSignal"
    assert record == {**SIGNAL, "key_id": s.key_id, "signature": record["signature"]}
    assert len(record["signature"]) == 64
    assert len(s.key_id) == 16
    assert check(Verifier([s.public_key]), KEY, message) is None


def test_tampering_any_single_byte_is_rejected() -> None:
    s = signer()
    verifier = Verifier([s.public_key])
    message = s.encode(CODEC, "ControlSignal", KEY, SIGNAL)
    outcomes: dict[str, int] = {}
    for i in range(len(message)):
        forged = bytearray(message)
        forged[i] ^= 0x01
        try:
            record = CODEC.decode(bytes(forged))[1]
        except Exception:
            outcomes["undecodable"] = outcomes.get("undecodable", 0) + 1
            continue
        why = verifier.check(KEY, bytes(forged), record)
        outcomes[str(why)] = outcomes.get(str(why), 0) + 1
    assert "None" not in outcomes  # not one of the flipped messages is accepted
    assert sum(outcomes.values()) == len(message)
    assert outcomes[BAD_SIGNATURE] > 64  # every byte of the body and of the signature itself


def test_a_signature_cannot_move_to_another_scope_or_record_type() -> None:
    s = signer()
    verifier = Verifier([s.public_key])
    message = s.encode(CODEC, "ControlSignal", KEY, SIGNAL)
    assert check(verifier, b"project:innocent", message) == BAD_SIGNATURE
    assert check(verifier, b"", message) == BAD_SIGNATURE
    spec = s.encode(CODEC, "BudgetSpec", b"org", {"scope": "org", "updated_at": 5})
    assert check(verifier, b"org", spec) is None
    # the same signature bytes on a record with another value are worthless
    other = s.encode(CODEC, "BudgetSpec", b"org", {"scope": "org", "updated_at": 6})
    record = CODEC.decode(other)[1]
    swapped = other[:-64] + CODEC.decode(spec)[1]["signature"]
    assert verifier.check(b"org", swapped, {**record, "signature": swapped[-64:]}) == BAD_SIGNATURE


def test_unsigned_unknown_key_and_tombstone_are_rejected_only_with_keys() -> None:
    s, stranger = signer(), signer()
    verifier = Verifier([s.public_key])
    unsigned = encode_control(CODEC, "ControlSignal", KEY, SIGNAL, None)
    by_stranger = stranger.encode(CODEC, "ControlSignal", KEY, SIGNAL)
    assert check(verifier, KEY, unsigned) == UNSIGNED
    assert check(verifier, KEY, by_stranger) == UNKNOWN_KEY
    assert verifier.check(KEY, None, None) == TOMBSTONE
    # forging the key id of a trusted key does not help
    record = {**CODEC.decode(by_stranger)[1], "key_id": s.key_id}
    forged = CODEC.encode("ControlSignal", record)
    assert check(verifier, KEY, forged) == BAD_SIGNATURE
    open_mode = Verifier()
    assert not open_mode.enforcing
    assert [check(open_mode, KEY, m) for m in (unsigned, by_stranger)] == [None, None]
    assert open_mode.check(KEY, None, None) is None


def test_rotation_old_and_new_keys_both_verify_then_the_old_one_is_dropped() -> None:
    old, new = signer(), signer()
    by_old = old.encode(CODEC, "ControlSignal", KEY, SIGNAL)
    by_new = new.encode(CODEC, "ControlSignal", KEY, {**SIGNAL, "sequence": 8})
    during = Verifier([public_key_b64(new.public_key), public_key_b64(old.public_key)])
    assert [check(during, KEY, m) for m in (by_old, by_new)] == [None, None]
    after = Verifier([public_key_b64(new.public_key)])
    assert [check(after, KEY, m) for m in (by_old, by_new)] == [UNKNOWN_KEY, None]


def test_generated_key_file_is_private_and_loads_every_way(tmp_path: Path) -> None:
    path = tmp_path / "control.key"
    key = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="never overwritten"):
        generate_key(path)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    (tmp_path / "raw.key").write_bytes(raw)
    ids = {
        Signer.load(str(path)).key_id,
        Signer.load(str(tmp_path / "raw.key")).key_id,
        Signer.load(base64.b64encode(raw).decode()).key_id,
    }
    assert ids == {Signer(key).key_id}
    with pytest.raises(ConfigError, match="neither a key file nor a base64 key"):
        Signer.load("not-a-key")


def test_settings_validate_keys_and_the_signer_always_verifies_itself(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    own = Signer(generate_key(path))
    other = signer()
    settings = Settings(signing_key=SecretStr(str(path)), verify_keys=public_key_b64(other.public_key))
    assert settings.verifier().key_ids == sorted([own.key_id, other.key_id])
    assert Settings().signer() is None
    assert not Settings().verifier().enforcing
    with pytest.raises(ValueError, match="not base64"):
        Settings(verify_keys="%%%")
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(verify_keys=base64.b64encode(b"short").decode())


def test_v2_signals_and_v1_specs_written_before_signing_still_decode(tmp_path: Path) -> None:
    """schemas/history keeps the unsigned versions: their records decode, as unsigned."""
    for name, version, record in (
        ("ControlSignal", "v2", SIGNAL),
        ("BudgetSpec", "v1", {"scope": "org", "limits": [], "updated_at": 3}),
    ):
        writer = tmp_path / name
        writer.mkdir()
        (writer / f"dev.spendstream.{name}.avsc").write_text(
            (SCHEMAS / "history" / f"dev.spendstream.{name}.{version}.avsc").read_text()
        )
        old = Codec(writer).encode(name, record)
        kind, decoded = CODEC.decode(old)
        assert kind == name
        assert decoded["key_id"] == ""
        assert not decoded["signature"]
        assert Verifier([signer().public_key]).check(KEY, old, decoded) == UNSIGNED
