"""Internal API keys (spendstream/api_keys.py) and model tiers (gateway/policy.py), without a broker:
the secret and its hash, the signed record's golden bytes, what a reader admits, and the policy."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy import Policy
from spendstream.api_keys import (
    INVALID,
    MAX_RPM,
    UNREVOKED,
    ApiKey,
    RecordRefused,
    admit_record,
    decode_key,
    encode_key,
    hash_secret,
    key_problem,
    mint_key,
    revoked,
)
from spendstream.errors import ConfigError
from spendstream.settings import Settings
from spendstream.signing import BAD_SIGNATURE, REPLAYED, TOMBSTONE, UNKNOWN_KEY, UNSIGNED, Signer, Verifier

GOLDEN = Path(__file__).parent / "golden"
NOW = 1_764_201_600_000_000  # 2025-11-27T00:00Z
GOLDEN_KEY = ApiKey(
    id="key_abcdefghij23",
    prefix="sk-ss-golden",
    secret_sha256=hash_secret("sk-ss-golden-not-a-real-secret"),
    project="checkout",
    team="commerce",
    models=("gpt-4o-mini*",),
    tier="basic",
    rpm=60,
    tpm=100_000,
    cache_ttl_s=300,
    created_at_us=NOW,
    expires_at_us=NOW + 30 * 86_400_000_000,
    updated_at_us=NOW,
)
GOLDEN_SIGNER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))  # Ed25519 is deterministic


def test_a_minted_key_has_a_256_bit_secret_stored_only_as_its_hash() -> None:
    minted = [mint_key(project="checkout", now_us=NOW) for _ in range(1000)]
    secrets_, ids = {s for _, s in minted}, {k.id for k, _ in minted}
    assert len(secrets_) == len(ids) == 1000
    for key, secret in minted[:50]:
        assert re.fullmatch(r"sk-ss-[A-Za-z0-9_-]{43}", secret)  # 32 bytes, URL-safe base64
        assert re.fullmatch(r"key_[a-z2-7]{12}", key.id)
        assert key.prefix == secret[:12]
        assert key.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in repr(key)
        assert key_problem(key) is None
        assert key.scope == f"key:{key.id}"


@given(
    project=st.from_regex(r"[a-z0-9_.-]{1,40}", fullmatch=True),
    rpm=st.none() | st.integers(1, MAX_RPM),
    models=st.lists(st.from_regex(r"[a-z0-9*.?-]{1,30}", fullmatch=True), max_size=5),
    ttl=st.none() | st.integers(1, 3600),
)
def test_every_valid_key_round_trips_through_the_signed_record(
    project: str, rpm: int | None, models: list[str], ttl: int | None
) -> None:
    key, _ = mint_key(project=project, rpm=rpm, models=models, cache_ttl_s=ttl, now_us=NOW)
    kafka_key, value = encode_key(key, GOLDEN_SIGNER)
    assert kafka_key == key.id.encode()
    assert decode_key(value) == key
    assert admit_record(Verifier([GOLDEN_SIGNER.public_key]), kafka_key, value, None) == key


def test_golden_bytes_of_the_unsigned_and_the_signed_record() -> None:
    """The bytes on gateway.keys never change silently (any language can write or verify them)."""
    unsigned = (GOLDEN / "ApiKey.bin").read_bytes()
    signed = (GOLDEN / "ApiKey.signed.bin").read_bytes()
    assert encode_key(GOLDEN_KEY, None) == (b"key_abcdefghij23", unsigned)
    assert encode_key(GOLDEN_KEY, GOLDEN_SIGNER) == (b"key_abcdefghij23", signed)
    assert decode_key(unsigned) == decode_key(signed) == GOLDEN_KEY
    assert admit_record(Verifier([GOLDEN_SIGNER.public_key]), b"key_abcdefghij23", signed, None) == GOLDEN_KEY


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"project": ""}, "project must be 1 to 256 characters"),
        ({"project": "a b"}, "without spaces or '/'"),
        ({"team": "x" * 257}, "team must be 1 to 256 characters"),
        ({"user": "a/b"}, "user must be"),
        ({"rpm": 0}, "rpm must be a whole number from 1 to 1,000,000"),
        ({"rpm": MAX_RPM + 1}, "rpm must be"),
        ({"tpm": -1}, "tpm must be"),
        ({"cache_ttl_s": 31 * 86_400}, "cache_ttl_s must be a whole number from 1 to 2,592,000"),
        ({"models": ("*",) * 65}, "65 model patterns: at most 64"),
        ({"models": ("x" * 129,)}, "model pattern"),
        ({"models": ("",)}, "model pattern"),
        ({"tier": "no spaces"}, "tier 'no spaces' must be 1 to 64 letters"),
        ({"expires_at_us": NOW}, "expires_at must be after created_at"),
    ],
)
def test_values_out_of_bounds_are_refused_when_minted(change: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"project": "checkout", **change}
    if "expires_at_us" not in change:
        args["expires_at_us"] = None
    with pytest.raises(ConfigError, match=re.escape(message)):
        mint_key(now_us=NOW, **args)  # type: ignore[arg-type]


def test_refusal_is_revoked_then_expired_by_time() -> None:
    key = dataclasses.replace(GOLDEN_KEY, expires_at_us=NOW + 100)
    assert key.refusal(NOW + 99) is None
    assert key.refusal(NOW + 100) == "expired"
    gone = revoked(key, NOW + 50)
    assert gone.updated_at_us > key.updated_at_us
    assert [gone.refusal(NOW + 49), gone.refusal(NOW + 50), gone.refusal(NOW + 200)] == [
        None,
        "revoked",
        "revoked",
    ]


def refused(
    verifier: Verifier, kafka_key: bytes | None, value: bytes | None, previous: ApiKey | None = None
) -> str:
    with pytest.raises(RecordRefused) as caught:
        admit_record(verifier, kafka_key, value, previous)
    return caught.value.reason


def test_with_verify_keys_only_signed_fresh_valid_records_are_admitted() -> None:
    operator, stranger = Signer(Ed25519PrivateKey.generate()), Signer(Ed25519PrivateKey.generate())
    verifier = Verifier([operator.public_key])
    k, genuine = encode_key(GOLDEN_KEY, operator)
    assert admit_record(verifier, k, genuine, None) == GOLDEN_KEY
    assert refused(verifier, k, encode_key(GOLDEN_KEY, None)[1]) == UNSIGNED
    assert refused(verifier, k, encode_key(GOLDEN_KEY, stranger)[1]) == UNKNOWN_KEY
    assert refused(verifier, b"key_otherother1", genuine) == BAD_SIGNATURE  # moved to another id
    assert refused(verifier, k, None) == TOMBSTONE
    assert refused(verifier, k, b"\x00garbage") == "undecodable"
    # a replay of an older genuine version, and an un-revocation, change nothing
    gone = revoked(GOLDEN_KEY, NOW + 10)
    assert refused(verifier, k, genuine, previous=gone) == REPLAYED
    newer_unrevoked = dataclasses.replace(GOLDEN_KEY, updated_at_us=NOW + 20)
    assert refused(verifier, k, encode_key(newer_unrevoked, operator)[1], previous=gone) == UNREVOKED
    # without keys (unauthenticated mode) unsigned records pass, but bounds and revocation still hold
    open_mode = Verifier()
    assert admit_record(open_mode, k, encode_key(GOLDEN_KEY, None)[1], None) == GOLDEN_KEY
    assert admit_record(open_mode, k, None, GOLDEN_KEY) is None  # a tombstone removes the id
    assert refused(open_mode, b"key_otherother1", encode_key(GOLDEN_KEY, None)[1]) == INVALID
    assert refused(open_mode, k, encode_key(newer_unrevoked, None)[1], previous=gone) == UNREVOKED


def test_a_record_with_values_out_of_bounds_from_another_client_is_invalid() -> None:
    from spendstream.wire import default_codec

    record = {
        "id": GOLDEN_KEY.id, "prefix": GOLDEN_KEY.prefix, "secret_sha256": GOLDEN_KEY.secret_sha256,
        "project": "checkout", "rpm": 10**12, "created_at": NOW,
    }  # fmt: skip
    value = default_codec().encode("ApiKey", {**record, "key_id": "", "signature": b""})
    assert refused(Verifier(), GOLDEN_KEY.id.encode(), value) == INVALID


# -- policy ------------------------------------------------------------------------------------

POLICY_YAML = """\
budgets:
  project:checkout: {daily: "50"}
tiers:
  basic: ["gpt-4o-mini*", "claude-3-5-haiku*", "gemini-2.0-flash*"]
  premium: ["*"]
projects:
  checkout: {tier: basic, cache_ttl: 300}
  research: {tier: premium}
"""


def key(**changes: object) -> ApiKey:
    plain: dict[str, object] = {"models": (), "tier": None, "cache_ttl_s": None, **changes}
    return dataclasses.replace(GOLDEN_KEY, **plain)  # type: ignore[arg-type]


def test_policy_from_the_budgets_file_tiers_by_project_then_key(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY_YAML)
    policy = Policy.load(path)
    assert dict(policy.tiers) == {
        "basic": ("gpt-4o-mini*", "claude-3-5-haiku*", "gemini-2.0-flash*"),
        "premium": ("*",),
    }
    checkout = key()  # no tier of its own: the project's (basic)
    assert policy.allows(checkout, "gpt-4o-mini-2024-07-18")
    refusal = policy.refusal(checkout, "gpt-4o")
    assert refusal is not None
    assert refusal.tier == "basic"
    assert refusal.allowed == ("gpt-4o-mini*", "claude-3-5-haiku*", "gemini-2.0-flash*")
    assert refusal.message == (
        "model 'gpt-4o' is outside the project checkout's tier 'basic', which allows: "
        "gpt-4o-mini*, claude-3-5-haiku*, gemini-2.0-flash*"
    )
    assert policy.allows(key(tier="premium"), "gpt-4o")  # the key's tier wins over the project's
    assert policy.allows(key(project="elsewhere"), "o3-pro")  # no tier anywhere: any model
    # the key's own patterns AND its tier must both allow the model
    narrow = key(models=("claude-*",))
    assert policy.allows(narrow, "claude-3-5-haiku-latest")
    by_globs = policy.refusal(narrow, "gpt-4o-mini")
    assert by_globs is not None
    assert by_globs.allowed == ("claude-*",)
    assert (
        by_globs.message == f"model 'gpt-4o-mini' is not allowed for key {GOLDEN_KEY.id}: it may use claude-*"
    )
    by_tier = policy.refusal(narrow, "claude-3-opus")
    assert by_tier is not None
    assert by_tier.tier == "basic"
    # a key on a tier the file does not define is refused everything (fail closed)
    undefined = policy.refusal(key(tier="gold"), "gpt-4o-mini")
    assert undefined is not None
    assert undefined.tier == "gold"
    assert "does not define" in undefined.message
    assert policy.allowed_models(checkout, ["gpt-4o", "gpt-4o-mini", "o3"]) == ["gpt-4o-mini"]
    # cache: the key's TTL, else the project's, else none
    assert [policy.cache_ttl(key(cache_ttl_s=60)), policy.cache_ttl(checkout)] == [60, 300]
    assert policy.cache_ttl(key(project="research")) is None


def test_no_policy_file_allows_every_model() -> None:
    assert Policy.load(None).allows(key(), "anything")
    assert Policy.load(None).cache_ttl(key()) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tiers: [basic]", "tiers must map a tier name to model patterns"),
        ("tiers: {basic: []}", "a list of 1 to 64 model patterns"),
        ("tiers: {basic: gpt-4o}", "a list of 1 to 64 model patterns"),
        ("tiers: {'bad name': ['*']}", "tier 'bad name' must be 1 to 64 letters"),
        (
            "tiers: {basic: ['*']}\nprojects: {checkout: {tier: gold}}",
            "tier 'gold' is not defined under tiers: (defined: basic)",
        ),
        ("projects: {checkout: {tier: basic}}", "tier 'basic' is not defined under tiers: (defined: none)"),
        ("projects: {checkout: {cache_ttl: 1.5}}", "cache_ttl is whole seconds from 1 to 2,592,000"),
        (
            "projects: {checkout: {ttl: 5}}",
            "expected any of {tier: NAME, cache_ttl: SECONDS, rpm: N, tpm: N}",
        ),
        ("projects: {checkout: {rpm: 0}}", "rpm is a whole number from 1 to"),
        ("projects: {checkout: {tpm: 1.5}}", "tpm is a whole number from 1 to"),
        ("projects: {'a b': {cache_ttl: 5}}", "project 'a b': project must be"),
        ("tiers: {basic: [", "is not valid"),
    ],
)
def test_a_bad_policy_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Policy.load(path)


def test_policy_from_toml_and_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[tiers]\nbasic = ["gpt-4o-mini*"]\n[projects.checkout]\ntier = "basic"\n')
    monkeypatch.setenv("SPENDSTREAM_POLICY_FILE", str(path))
    policy = Policy.load(Settings().policy_file)
    assert policy.project_tiers == {"checkout": "basic"}
    with pytest.raises(ConfigError, match="cannot read policy file"):
        Policy.load(tmp_path / "missing.yaml")
