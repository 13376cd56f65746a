"""Internal keys end to end on the real broker: `spendstream keys create|list|revoke` publish signed
records on gateway.keys, and every gateway's KeyStore authenticates, refuses and ignores as it must,
across two instances within a second."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.keys import KeyRefused, KeyStore
from spendstream.api_keys import ApiKey, encode_key, mint_key, revoked
from spendstream.errors import ConfigError
from spendstream.signing import Signer, generate_key, public_key_b64
from spendstream.topics import Topics, ensure_topics
from spendstream.wire import default_codec
from stream_processors.budgets import Spec
from stream_processors.feeds import publish, read_compacted
from tests.conftest import own_broker
from tests.test_bad_values import cli_env, spendstream

PROPAGATION_LIMIT_S = 1.0
POLICY = """\
budgets:
  project:checkout: {daily: "50"}
tiers:
  basic: ["gpt-4o-mini*", "claude-3-5-haiku*"]
  premium: ["*"]
projects:
  checkout: {tier: basic, cache_ttl: 300}
"""


@dataclasses.dataclass
class Deployment:
    kafka: str
    topics: Topics
    env: dict[str, str]
    signer: Signer
    verify_keys: list[str]

    def cli(self, *args: str) -> tuple[int, str, str]:
        out = spendstream({**self.env, "COLUMNS": "250"}, *args)
        return out.returncode, out.stdout, out.stderr

    def store(self, ready_timeout: float = 30.0) -> KeyStore:
        return KeyStore(
            bootstrap_servers=self.kafka,
            topic=self.topics.gateway_keys,
            verify_keys=self.verify_keys,
            ready_timeout=ready_timeout,
        )

    async def publish_key(self, key: ApiKey, signer: Signer | None) -> None:
        await publish(self.kafka, self.topics.gateway_keys, [encode_key(key, signer)])


@pytest.fixture
def deployment(kafka: str, tmp_path: Path) -> Deployment:
    """Fresh topics, an operator signing key (so gateways enforce signatures) and a policy file."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    signer = Signer(generate_key(tmp_path / "operator.pem"))
    (tmp_path / "budgets.yaml").write_text(POLICY)
    env = {
        **cli_env(kafka, tmp_path, prefix),
        "SPENDSTREAM_SIGNING_KEY": str(tmp_path / "operator.pem"),
        "SPENDSTREAM_POLICY_FILE": str(tmp_path / "budgets.yaml"),
    }
    asyncio.run(ensure_topics(kafka, Topics(prefix), 4))
    return Deployment(kafka, Topics(prefix), env, signer, [public_key_b64(signer.public_key)])


@asynccontextmanager
async def started(*stores: KeyStore) -> AsyncIterator[None]:
    await asyncio.gather(*(s.start() for s in stores))
    try:
        yield
    finally:
        await asyncio.gather(*(s.stop() for s in stores))


def refusal(store: KeyStore, secret: str, now_us: int | None = None) -> str | None:
    try:
        store.authenticate(secret, now_us)
    except KeyRefused as exc:
        return exc.reason
    return None


def accepted_on(a: KeyStore, b: KeyStore, secret: str) -> Callable[[], bool]:
    return lambda: refusal(a, secret) is None and refusal(b, secret) is None


def revoked_on(a: KeyStore, b: KeyStore, secret: str) -> Callable[[], bool]:
    return lambda: refusal(a, secret) == refusal(b, secret) == "revoked"


async def until(condition: Callable[[], bool], within: float = 10.0) -> float:
    """Seconds until `condition()` holds (polled every millisecond); fails the test after `within` seconds."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < within, "condition never held"
        await asyncio.sleep(0.001)
    return time.monotonic() - t0


async def timed(action: Awaitable[None], condition: Callable[[], bool]) -> float:
    """Seconds from the start of `action` (a publish: a producer connects, sends, Kafka acknowledges)
    until `condition` holds: an upper bound of the propagation time."""
    t0 = time.monotonic()
    await action
    await until(condition)
    return time.monotonic() - t0


def test_cli_create_is_authenticated_by_a_gateway_key_store_and_revoke_refuses_it_on_two_instances(
    deployment: Deployment,
) -> None:
    code, out, err = deployment.cli(
        "keys", "create", "--project", "checkout", "--team", "commerce", "--user", "ana",
        "--models", "gpt-4o-mini*, claude-*", "--tier", "basic", "--rpm", "60", "--tpm", "100000",
        "--cache-ttl", "120", "--expires", "30d", "--budget", "50", "--window", "monthly",
        "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    created = json.loads(out)
    secret, key_id = created["key"], created["id"]
    assert secret.startswith("sk-ss-")
    assert created["prefix"] == secret[:12]
    assert created["budget"] == {"scope": f"key:{key_id}", "usd": "50", "window": "monthly"}

    # the key's own budget is on the budgets topic, signed, for scope key:<id>
    budgets = asyncio.run(read_compacted(deployment.kafka, deployment.topics.budgets, default_codec()))
    record = budgets[f"key:{key_id}".encode()]
    assert record is not None
    assert record["key_id"] == deployment.signer.key_id
    assert Spec.from_record(record).limits[0].limit_pico == 50 * 10**12

    async def scenario() -> tuple[float, float]:
        a, b = deployment.store(), deployment.store()
        async with started(a, b):
            for store in (a, b):
                key = store.authenticate(secret)
                assert (key.id, key.project, key.team, key.user) == (key_id, "checkout", "commerce", "ana")
                assert (key.models, key.tier, key.rpm, key.tpm, key.cache_ttl_s) == (
                    ("gpt-4o-mini*", "claude-*"), "basic", 60, 100_000, 120,
                )  # fmt: skip
                assert key.expires_at_us is not None
                assert 29.9 < (key.expires_at_us - key.created_at_us) / 86_400e6 <= 30
                assert store.rejected == {}
            # `keys revoke` in another process: refused on both within a second of its exit
            code, out, err = await asyncio.to_thread(deployment.cli, "keys", "revoke", key_id)
            assert code == 0, err
            assert f"revoked {key_id}" in out
            after_cli = await until(revoked_on(a, b, secret))
            with pytest.raises(KeyRefused, match=f"API key {key_id} was revoked at .*: ask for a new key"):
                a.authenticate(secret)
            # a key created after start is accepted on both within a second of its publish
            fresh, fresh_secret = mint_key(project="checkout", now_us=time.time_ns() // 1000)
            create_s = await timed(
                deployment.publish_key(fresh, deployment.signer),
                accepted_on(a, b, fresh_secret),
            )
            revoke_s = await timed(
                deployment.publish_key(revoked(fresh, time.time_ns() // 1000), deployment.signer),
                revoked_on(a, b, fresh_secret),
            )
            print(f"propagation to 2 KeyStores: create {create_s * 1000:.0f} ms, revoke {revoke_s * 1000:.0f} ms,"
                  f" after `keys revoke` exited {after_cli * 1000:.0f} ms")  # fmt: skip
            return create_s, revoke_s

    create_s, revoke_s = asyncio.run(scenario())
    assert create_s < PROPAGATION_LIMIT_S
    assert revoke_s < PROPAGATION_LIMIT_S

    again = deployment.cli("keys", "revoke", key_id)
    assert again[0] == 0
    assert "already revoked" in again[1]


def test_propagation_over_many_creates_and_revokes(deployment: Deployment) -> None:
    """20 keys created then revoked one at a time: the slowest change on either instance."""

    async def scenario() -> list[float]:
        a, b = deployment.store(), deployment.store()
        seconds = []
        async with started(a, b):
            for _ in range(20):
                key, secret = mint_key(project="p", now_us=time.time_ns() // 1000)
                seconds.append(
                    await timed(
                        deployment.publish_key(key, deployment.signer),
                        accepted_on(a, b, secret),
                    )
                )
                seconds.append(
                    await timed(
                        deployment.publish_key(revoked(key, time.time_ns() // 1000), deployment.signer),
                        revoked_on(a, b, secret),
                    )
                )
            assert a.applied == b.applied == 40
        return seconds

    seconds = sorted(asyncio.run(scenario()))
    print(
        f"40 changes on 2 KeyStores: median {seconds[20] * 1000:.0f} ms, "
        f"max {seconds[-1] * 1000:.0f} ms from the start of the publish"
    )
    assert len(seconds) == 40
    assert seconds[-1] < PROPAGATION_LIMIT_S


def test_expired_unknown_malformed_and_forged_keys_are_refused(deployment: Deployment) -> None:
    code, out, err = deployment.cli(
        "keys", "create", "--project", "batch", "--expires", "1m", "--format", "json"
    )
    assert code == 0, err
    expiring = json.loads(out)
    stranger = Signer(Ed25519PrivateKey.generate())
    now = time.time_ns() // 1000
    forged = {}
    for name in ("unsigned", "unknown_key", "bad_signature"):
        forged[name] = mint_key(project="victim", now_us=now)
    unsigned, unknown_key, bad_signature = (
        forged[n][0] for n in ("unsigned", "unknown_key", "bad_signature")
    )
    genuine, genuine_secret = mint_key(project="checkout", now_us=now)
    gone = revoked(genuine, now + 1)
    kafka_key, signed = encode_key(bad_signature, deployment.signer)
    tampered = signed.replace(b"victim", b"vict1m")  # the operator's signature, another project

    async def scenario() -> KeyStore:
        await deployment.publish_key(unsigned, None)
        await deployment.publish_key(unknown_key, stranger)
        await publish(deployment.kafka, deployment.topics.gateway_keys, [(kafka_key, tampered)])
        await deployment.publish_key(genuine, deployment.signer)
        await deployment.publish_key(gone, deployment.signer)
        await deployment.publish_key(dataclasses.replace(genuine, updated_at_us=now + 5), deployment.signer)
        await publish(deployment.kafka, deployment.topics.gateway_keys, [(genuine.id.encode(), None)])
        store = deployment.store()
        async with started(store):
            pass
        return store

    store = asyncio.run(scenario())
    # 8 records on the topic: the CLI's key, 3 forgeries, the genuine key and its revocation (applied),
    # an un-revocation signed by the operator and a tombstone (both refused)
    assert store.applied == 3
    assert store.rejected == {
        "unsigned": 1,
        "unknown_key": 1,
        "bad_signature": 1,
        "unrevoked": 1,
        "tombstone": 1,
    }
    assert {k.id for k in store.keys()} == {expiring["id"], genuine.id}  # noqa: SIM118 (a list)
    for name, (_, secret) in forged.items():
        assert refusal(store, secret) == "unknown", name
    assert refusal(store, genuine_secret) == "revoked"
    assert refusal(store, expiring["key"]) is None
    assert refusal(store, expiring["key"], now_us=time.time_ns() // 1000 + 61_000_000) == "expired"
    assert refusal(store, "sk-ss-" + "x" * 43) == "unknown"
    assert refusal(store, "Bearer sk-ss-abc") == "malformed"
    assert refusal(store, "sk-ss-" + "x" * 500) == "malformed"
    with pytest.raises(KeyRefused, match="unknown API key: ask your spendstream administrator"):
        store.authenticate("sk-ss-" + "x" * 43)


def test_keys_list_shows_attribution_and_state_never_the_secret_or_its_hash(deployment: Deployment) -> None:
    made = []
    for args in (("--team", "commerce", "--rpm", "60"), ("--user", "bo", "--models", "gpt-4o*")):
        code, out, err = deployment.cli("keys", "create", "--project", "checkout", *args, "--format", "json")
        assert code == 0, err
        made.append(json.loads(out))
    code, table_text, err = deployment.cli("keys", "create", "--project", "search")
    assert code == 0, err
    table_secret = table_text.strip().splitlines()[-1]
    assert table_secret.startswith("sk-ss-")
    assert "shown this once" in table_text
    assert deployment.cli("keys", "revoke", made[0]["id"])[0] == 0

    code, table, err = deployment.cli("keys", "list")
    assert code == 0, err
    code, listed_json, err = deployment.cli("keys", "list", "--format", "json")
    assert code == 0, err
    listed = json.loads(listed_json)
    assert [k["id"] for k in listed] == [made[0]["id"], made[1]["id"], listed[2]["id"]]
    assert listed[0]["revoked_at_us"] is not None
    assert listed[1]["revoked_at_us"] is None
    assert (listed[0]["team"], listed[0]["rpm"], listed[1]["user"], listed[1]["models"]) == (
        "commerce", 60, "bo", ["gpt-4o*"],
    )  # fmt: skip
    for k in made:
        row = next(line for line in table.splitlines() if k["id"] in line)
        assert k["prefix"] in row
    assert "revoked" in table
    assert "commerce" in table
    assert "gpt-4o*" in table
    secrets_ = [k["key"] for k in made] + [table_secret]
    hashes = [hashlib.sha256(s.encode()).hexdigest() for s in secrets_]
    for text in (table, listed_json, err):
        for secret in secrets_:
            assert secret not in text
            assert secret[12:] not in text
        for digest in hashes:
            assert digest not in text
            assert digest[:16] not in text


BAD_KEY_VALUES = [
    (("keys", "create", "--project", "a b"), "project must be 1 to 256 characters without spaces or '/'"),
    (("keys", "create", "--project", "p", "--team", "x" * 300), "team must be 1 to 256 characters"),
    (("keys", "create", "--project", "p", "--rpm", "0"), "rpm must be a whole number from 1 to 1,000,000"),
    (("keys", "create", "--project", "p", "--rpm", "ten"), "--rpm takes a whole number, not 'ten'"),
    (("keys", "create", "--project", "p", "--tpm", "99999999999"), "tpm must be a whole number from 1 to"),
    (("keys", "create", "--project", "p", "--cache-ttl", "-1"), "cache_ttl_s must be a whole number"),
    (("keys", "create", "--project", "p", "--expires", "0d"), "--expires takes a duration such as 30d"),
    (("keys", "create", "--project", "p", "--expires", "3651d"), "at most 3650d"),
    (("keys", "create", "--project", "p", "--expires", "tomorrow"), "--expires takes a duration"),
    (
        ("keys", "create", "--project", "p", "--models", ",".join(["m*"] * 65)),
        "65 model patterns: at most 64",
    ),
    (("keys", "create", "--project", "p", "--tier", "gold"), "tier 'gold' is not defined in"),
    (("keys", "create", "--project", "p", "--budget", "0"), "'0' must be positive"),
    (("keys", "create", "--project", "p", "--budget", "1e400"), "is more than the maximum of 9,000,000 USD"),
    (("keys", "create", "--project", "p", "--budget", "5", "--window", "hourly"), "window must be daily"),
    (("keys", "create", "--project", "p", "--window", "daily"), "--window is the window of --budget"),
    (("keys", "create", "--project", "p", "--format", "yaml"), "--format must be table or json"),
    (("keys", "list", "--format", "csv"), "--format must be table or json"),
    (("keys", "revoke", "key_doesnotexist"), "no key 'key_doesnotexist' on"),
]


def test_bad_key_values_are_refused_in_one_line_and_nothing_is_published(deployment: Deployment) -> None:
    refused = 0
    for args, message in BAD_KEY_VALUES:
        code, out, err = deployment.cli(*args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1, (args, out, err)
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("error: "), (args, err)
        assert message in lines[0], (args, lines[0])
        assert out == ""
        refused += 1
    # verify keys but no signing key: an unsigned key (or revocation) would be ignored by gateways
    unsigned_env = {k: v for k, v in deployment.env.items() if k != "SPENDSTREAM_SIGNING_KEY"}
    for args in (("keys", "create", "--project", "p"), ("keys", "revoke", "key_doesnotexist")):
        result = spendstream({**unsigned_env, "SPENDSTREAM_VERIFY_KEYS": deployment.verify_keys[0]}, *args)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "error: SPENDSTREAM_VERIFY_KEYS is set, so gateways ignore unsigned key records: set "
            "SPENDSTREAM_SIGNING_KEY to an operator key (docs/security.md)"
        )
        refused += 1
    assert refused == len(BAD_KEY_VALUES) + 2 == 20
    codec = default_codec()
    assert asyncio.run(read_compacted(deployment.kafka, deployment.topics.gateway_keys, codec)) == {}
    assert asyncio.run(read_compacted(deployment.kafka, deployment.topics.budgets, codec)) == {}


def test_budget_import_checks_the_policy_sections(deployment: Deployment, tmp_path: Path) -> None:
    code, out, err = deployment.cli("budget", "import", deployment.env["SPENDSTREAM_POLICY_FILE"])
    assert code == 0, err
    assert "imported 1 scopes" in out
    assert "checked the gateway policy: 2 tiers, 1 projects" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text('budgets:\n  project:x: {daily: "1"}\nprojects:\n  x: {tier: gold}\n')
    code, out, err = deployment.cli("budget", "import", str(bad))
    assert code == 1
    assert (
        err.strip() == f"error: {bad}: project 'x': tier 'gold' is not defined under tiers: (defined: none)"
    )


def test_a_key_store_without_its_topic_gives_a_config_error_in_time(kafka: str) -> None:
    store = KeyStore(bootstrap_servers=kafka, topic=f"t{uuid.uuid4().hex[:8]}.gateway.keys", ready_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"could not read the keys on .* within 2 s .*does not exist"):
        asyncio.run(store.start())
    assert time.monotonic() - t0 < 5


def test_through_a_broker_outage_known_keys_keep_working_and_a_revoke_after_it_applies() -> None:
    """A broker stopped for 5 s under a running KeyStore: the key it knows keeps working, an unknown
    one stays refused, and a revocation published once the broker is back applies."""
    signer = Signer(Ed25519PrivateKey.generate())
    with own_broker("keys-outage", 8) as broker:
        topics = Topics(f"t{uuid.uuid4().hex[:8]}.")
        asyncio.run(ensure_topics(broker.bootstrap, topics, 4))
        deployment = Deployment(broker.bootstrap, topics, {}, signer, [public_key_b64(signer.public_key)])
        key, secret = mint_key(project="checkout", now_us=time.time_ns() // 1000)
        _, stranger = mint_key(project="checkout", now_us=time.time_ns() // 1000)

        async def scenario() -> float:
            await deployment.publish_key(key, signer)
            store = deployment.store()
            async with started(store):
                await asyncio.to_thread(broker.stop)
                down = [refusal(store, secret), refusal(store, stranger)]
                await asyncio.sleep(5)
                down += [refusal(store, secret), refusal(store, stranger)]
                assert down == [None, "unknown", None, "unknown"]
                await asyncio.to_thread(broker.start, 180)
                return await timed(
                    deployment.publish_key(revoked(key, time.time_ns() // 1000), signer),
                    lambda: refusal(store, secret) == "revoked",
                )

        revoke_s = asyncio.run(scenario())
    print(f"revoke after a 5 s outage: applied {revoke_s * 1000:.0f} ms from the start of its publish")
    assert revoke_s < 5  # a producer and the consumer reconnecting to a broker that just restarted


def test_resign_after_a_rotation_keeps_every_key_working_under_the_new_key_alone(
    deployment: Deployment, tmp_path: Path
) -> None:
    code, out, err = deployment.cli("keys", "create", "--project", "checkout", "--format", "json")
    assert code == 0, err
    by_old = json.loads(out)
    legacy, legacy_secret = mint_key(project="legacy", now_us=time.time_ns() // 1000)
    asyncio.run(deployment.publish_key(legacy, None))  # published before keys were set up
    code, out, err = deployment.cli("keys", "create", "--project", "gone", "--format", "json")
    assert code == 0, err
    gone = json.loads(out)
    assert deployment.cli("keys", "revoke", gone["id"])[0] == 0

    new = Signer(generate_key(tmp_path / "new.pem"))
    rotated = {
        **deployment.env,
        "SPENDSTREAM_SIGNING_KEY": str(tmp_path / "new.pem"),
        "SPENDSTREAM_VERIFY_KEYS": deployment.verify_keys[0],  # old and new verify during the rotation
    }
    result = spendstream({**rotated, "COLUMNS": "250"}, "keys", "resign", "--adopt-unsigned")
    assert result.returncode == 0, result.stderr
    assert "re-signed 3 gateway keys" in result.stdout

    store = dataclasses.replace(deployment, verify_keys=[public_key_b64(new.public_key)]).store()

    async def read() -> None:
        async with started(store):
            pass

    asyncio.run(read())
    assert store.authenticate(by_old["key"]).id == by_old["id"]
    assert store.authenticate(legacy_secret).id == legacy.id
    assert refusal(store, gone["key"]) == "revoked"  # re-signed, still revoked
    # the records signed by the old key (create, create, revoke) and the unsigned one are ignored
    assert store.rejected == {"unknown_key": 3, "unsigned": 1}
    assert store.applied == 3
