"""`spendstream keys ...`: the gateway's internal API keys, and the Ed25519 keys that sign the
control plane.

`keys create|list|revoke` manage internal keys on the compacted `gateway.keys` topic (key = id);
the secret is printed once by `create` and stored nowhere, only its SHA-256 (docs/keys.md).

`keys generate|rotate|resign`: the private key signs ControlSignals (the worker), BudgetSpecs and
ApiKeys (operators' CLI); Guards, workers and gateways verify with the public keys
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from gateway.keys import KeyStore
from gateway.policy import Policy
from spendstream.api_keys import ApiKey, RecordRefused, admit_record, encode_key, mint_key, revoked
from spendstream.cli.budgets import ready_topics
from spendstream.cli.console import console, err
from spendstream.cli.reads import query, sql_literal
from spendstream.errors import ConfigError, SpendstreamError
from spendstream.settings import Settings
from spendstream.signing import REPLAYED, UNSIGNED, Signer, Verifier, generate_key, public_key_b64
from spendstream.usage import KEY_TAG
from spendstream.wire import default_codec
from stream_processors.budgets import Spec, make_limit, utc_from_micros
from stream_processors.feeds import publish, read_compacted

keys_app = typer.Typer(
    no_args_is_help=True,
    help="The gateway's API keys (create, list, revoke) and the keys that sign the control plane.",
)
_DURATION = re.compile(r"(\d{1,6})([mhd])")
_DURATION_US = {"m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_MAX_EXPIRY_US = 3650 * _DURATION_US["d"]
_FORMATS = ("table", "json")


def _expiry_us(text: str) -> int:
    """A duration such as 30d, 12h or 90m in microseconds (1 minute to 3650 days)."""
    m = _DURATION.fullmatch(text.strip())
    us = int(m.group(1)) * _DURATION_US[m.group(2)] if m else 0
    if not 0 < us <= _MAX_EXPIRY_US:
        raise ConfigError(f"--expires takes a duration such as 30d, 12h or 90m (at most 3650d), not {text!r}")
    return us


def _check_format(fmt: str) -> None:
    if fmt not in _FORMATS:
        raise ConfigError(f"--format must be table or json, not {fmt!r}")


def _check_tier(settings: Settings, tier: str) -> None:
    """An unknown tier would refuse every call with the key: say so now, not at the first call."""
    if settings.policy_file is None:
        raise ConfigError(
            f"--tier {tier} needs the policy file that defines the tiers: set SPENDSTREAM_POLICY_FILE "
            "(the file the gateways read, docs/keys.md)"
        )
    policy = Policy.load(settings.policy_file)
    if tier not in policy.tiers:
        raise ConfigError(
            f"tier {tier!r} is not defined in {settings.policy_file} "
            f"(defined: {', '.join(sorted(policy.tiers)) or 'none'})"
        )


def _store(settings: Settings) -> KeyStore:
    """Every key on gateway.keys, read to its end, as a gateway with this process's verify keys sees
    them (with verify keys, records not signed by one of them are ignored)."""
    ready_topics(settings)
    store = KeyStore(
        bootstrap_servers=settings.bootstrap,
        topic=settings.topics.gateway_keys,
        verify_keys=settings.accepted_keys(),
        kafka_auth=settings.kafka_auth,
    )

    async def read() -> None:
        await store.start()
        await store.stop()

    asyncio.run(read())
    return store


def _key_signer(settings: Settings) -> Signer | None:
    """The signer of key records; ConfigError when gateways would ignore an unsigned one (a revoke
    that silently does nothing is worse than none)."""
    signer = settings.signer()
    if signer is None and settings.verify_keys.strip():
        raise ConfigError(
            "SPENDSTREAM_VERIFY_KEYS is set, so gateways ignore unsigned key records: set "
            "SPENDSTREAM_SIGNING_KEY to an operator key (docs/security.md)"
        )
    return signer


def _publish_key(settings: Settings, key: ApiKey) -> None:
    record = encode_key(key, _key_signer(settings))
    asyncio.run(publish(settings.bootstrap, settings.topics.gateway_keys, [record], settings.kafka_auth))


def _current_keys(
    settings: Settings, verifier: Verifier, adopt_unsigned: bool, refused: list[str]
) -> list[ApiKey]:
    """The latest key of each id that verifies (or is unsigned, if adopted), as a gateway would keep
    it; every record refused is added to `refused`."""
    latest: dict[str, ApiKey] = {}

    def admit(kafka_key: bytes, value: bytes | None, record: dict[str, Any] | None, kept: Any) -> bool:
        key_id = kafka_key.decode(errors="replace")
        try:
            key = admit_record(verifier, kafka_key, value, latest.get(key_id), adopt_unsigned=adopt_unsigned)
        except RecordRefused as exc:
            refused.append(f"{key_id} ({exc.reason})")
            return False
        if key is None:
            latest.pop(key_id, None)
        else:
            latest[key_id] = key
        return True

    asyncio.run(
        read_compacted(
            settings.bootstrap, settings.topics.gateway_keys, default_codec(), admit, settings.kafka_auth
        )
    )
    return list(latest.values())


def _utc(us: int | None) -> str:
    return "-" if us is None else f"{utc_from_micros(us):%Y-%m-%d %H:%M}"


def _last_used(settings: Settings, keys: list[ApiKey]) -> dict[str, int] | None:
    """Key id -> the time (epoch us) of its latest call in the history (the gateway tags every event
    with the key's id); None when the history cannot be read (said on stderr)."""
    if not keys:
        return {}
    ids = ", ".join(sql_literal(k.id) for k in keys)
    try:
        rows = query(
            settings,
            f"SELECT tags['{KEY_TAG}'] AS key, toUnixTimestamp64Micro(max(event_time)) FROM usage_events "
            f"WHERE tags['{KEY_TAG}'] IN ({ids}) GROUP BY key",
        ).rows
    except SpendstreamError as exc:
        err.print(
            f"[yellow]warning[/yellow]: last used unknown: the history cannot be read ({escape(str(exc))})"
        )
        return None
    return {str(r[0]): int(r[1]) for r in rows}


_NEVER_SHOWN = frozenset({"secret_sha256", "updated_at_us"})  # the secret's hash; a replay guard


def _key_json(key: ApiKey, last_used: dict[str, int] | None) -> dict[str, Any]:
    """What may be shown of a key: every field but the hash of its secret, and when it was last used."""
    shown = {f.name: getattr(key, f.name) for f in dataclasses.fields(key) if f.name not in _NEVER_SHOWN}
    shown["models"] = list(key.models)
    shown["last_used_at_us"] = None if last_used is None else last_used.get(key.id)
    return shown


def _new_key(settings: Settings, out: Path | None, name: str) -> tuple[Path, Signer]:
    path = (out or settings.state_dir.expanduser() / name).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, Signer(generate_key(path))


def _print_setup(path: Path, signer: Signer, verify_keys: list[str]) -> None:
    public = public_key_b64(signer.public_key)
    keys = ",".join(verify_keys)
    console.print(
        f"wrote a new Ed25519 private key to {path} (mode 0600): only the worker and operators get it\n"
        f"key id {signer.key_id}, public key {public}\n\n"
        "On the worker and on operators' machines (the CLI):\n"
        f"  export SPENDSTREAM_SIGNING_KEY={path}\n"
        f"  export SPENDSTREAM_VERIFY_KEYS={keys}\n"
        "In every service with a Guard:\n"
        f"  Guard(..., verify_keys={verify_keys!r})",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    register_api_keys()

    @keys_app.command("generate")
    def generate(
        ctx: typer.Context,
        out: Annotated[
            Path | None, typer.Option(help="Key file to write (default <state dir>/signing-key.pem)")
        ] = None,
    ) -> None:
        """Make the first signing key; print the public key and the settings to give each process."""
        path, signer = _new_key(ctx.obj, out, "signing-key.pem")
        _print_setup(path, signer, [public_key_b64(signer.public_key)])
        console.print(
            "\nThen sign the budgets already on the topic (the worker ignores unsigned ones once keys "
            "are set):\n  spendstream keys resign --adopt-unsigned",
            soft_wrap=True,
        )

    @keys_app.command("rotate")
    def rotate(
        ctx: typer.Context,
        out: Annotated[
            Path | None, typer.Option(help="Key file to write (default <state dir>/signing-key-<time>.pem)")
        ] = None,
    ) -> None:
        """Make a new signing key; print the verify keys to deploy first: the new one plus the old ones."""
        settings: Settings = ctx.obj
        old = [k.strip() for k in settings.verify_keys.split(",") if k.strip()]
        current = settings.signer()
        if current is not None:
            old.append(public_key_b64(current.public_key))
        if not old:
            raise ConfigError("no key to rotate from: make the first one with `spendstream keys generate`")
        path, signer = _new_key(
            settings, out, f"signing-key-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.pem"
        )
        new = public_key_b64(signer.public_key)
        _print_setup(path, signer, [new, *dict.fromkeys(k for k in old if k != new)])
        console.print(
            "\nRotation (docs/security.md): 1. deploy SPENDSTREAM_VERIFY_KEYS above (new + old) to every "
            "Guard and worker; 2. give the worker and operators the new SPENDSTREAM_SIGNING_KEY and "
            "restart the worker; 3. `spendstream keys resign` (budgets and gateway keys; the worker "
            "re-signs the signal of every budgeted scope); 4. drop the old key from SPENDSTREAM_VERIFY_KEYS.",
            soft_wrap=True,
        )

    @keys_app.command("resign")
    def resign(
        ctx: typer.Context,
        adopt_unsigned: Annotated[
            bool,
            typer.Option(
                help="Also sign the unsigned specs and gateway keys (once, when keys are first set up)"
            ),
        ] = False,
    ) -> None:
        """Re-publish every current budget and gateway key signed with SPENDSTREAM_SIGNING_KEY (after a
        rotation)."""
        from spendstream.cli.up import publish_specs

        settings: Settings = ctx.obj
        if settings.signer() is None:
            raise ConfigError(
                "set SPENDSTREAM_SIGNING_KEY to the key to sign with (see `spendstream keys generate`)"
            )
        verifier = settings.verifier()
        refused: list[str] = []

        def admit(key: bytes, value: bytes | None, record: dict[str, Any] | None, kept: Any) -> bool:
            """The latest spec of each scope that verifies (or is unsigned, if adopted), as the worker
            would keep it; every other one is reported and left alone."""
            why = verifier.check(key, value, record)
            if why == UNSIGNED and adopt_unsigned:
                why = None
            if why is None and record is not None and kept and record["updated_at"] < kept["updated_at"]:
                why = REPLAYED
            if why is not None:
                refused.append(f"{key.decode()} ({why})")
            return why is None

        latest = asyncio.run(
            read_compacted(
                settings.bootstrap, settings.topics.budgets, default_codec(), admit, settings.kafka_auth
            )
        )
        records = [r for r in latest.values() if r is not None]
        specs = [Spec.from_record(r) for r in records if not r["removed"]]
        removed = tuple(r["scope"] for r in records if r["removed"])
        asyncio.run(publish_specs(settings, specs, removed))
        console.print(f"re-signed {len(specs)} budgets and {len(removed)} removals")
        keys = _current_keys(settings, verifier, adopt_unsigned, refused)
        now = time.time_ns() // 1000
        for key in keys:  # updated_at moves on, so the re-signed record replaces the old one everywhere
            _publish_key(settings, dataclasses.replace(key, updated_at_us=max(now, key.updated_at_us)))
        console.print(f"re-signed {len(keys)} gateway keys")
        if refused:
            console.print(f"[red]left alone[/red] (not verified by the verify keys): {', '.join(refused)}")


def _whole(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{option} takes a whole number, not {text!r}") from None


def register_api_keys() -> None:
    """`keys create|list|revoke`: the gateway's internal keys."""

    @keys_app.command("create")
    def create(
        ctx: typer.Context,
        project: Annotated[str, typer.Option(help="Project every call with the key is metered under")],
        team: Annotated[str | None, typer.Option(help="Team to attribute calls to")] = None,
        user: Annotated[str | None, typer.Option(help="User to attribute calls to")] = None,
        models: Annotated[
            str | None,
            typer.Option(help="Comma-separated model patterns the key may use, e.g. 'gpt-4o-mini*'"),
        ] = None,
        tier: Annotated[
            str | None, typer.Option(help="Model tier (defined in SPENDSTREAM_POLICY_FILE)")
        ] = None,
        rpm: Annotated[str | None, typer.Option(help="Requests per minute for this key")] = None,
        tpm: Annotated[str | None, typer.Option(help="Tokens per minute for this key")] = None,
        cache_ttl: Annotated[
            str | None, typer.Option(help="Cache responses of this key's calls (seconds)")
        ] = None,
        expires: Annotated[str | None, typer.Option(help="Expire after a duration: 30d, 12h, 90m")] = None,
        budget: Annotated[
            str | None, typer.Option(help="Give the key its own budget in USD (scope key:<id>)")
        ] = None,
        window: Annotated[
            str | None, typer.Option(help="Window of --budget: daily, weekly, monthly, rolling:<n>m|h|d")
        ] = None,
        format: Annotated[str, typer.Option("--format", "-f", help="table or json")] = "table",
    ) -> None:
        """Create an internal key and print its secret once (it is stored only as a hash)."""
        from spendstream.cli.up import publish_specs  # imports faust: only when publishing

        settings: Settings = ctx.obj
        _check_format(format)
        _key_signer(settings)
        if window is not None and budget is None:
            raise ConfigError("--window is the window of --budget: give --budget USD too")
        now = time.time_ns() // 1000
        key, secret = mint_key(
            project=project,
            team=team,
            user=user,
            models=[m.strip() for m in (models or "").split(",") if m.strip()],
            tier=tier,
            rpm=_whole("--rpm", rpm),
            tpm=_whole("--tpm", tpm),
            cache_ttl_s=_whole("--cache-ttl", cache_ttl),
            expires_at_us=now + _expiry_us(expires) if expires is not None else None,
            now_us=now,
        )
        if tier is not None:
            _check_tier(settings, tier)
        spec = Spec(key.scope, (make_limit(key.scope, window or "monthly", budget),)) if budget else None
        ready_topics(settings)
        if spec is not None:  # the budget first: a key never exists without the budget it was given
            asyncio.run(publish_specs(settings, [spec]))
        _publish_key(settings, key)
        if format == "json":
            limit = spec.limits[0] if spec else None
            print(
                json.dumps(
                    {
                        **_key_json(key, {}),  # new: never used
                        "key": secret,
                        "budget": {"scope": key.scope, "usd": budget, "window": limit.window}
                        if limit
                        else None,
                    }
                )
            )
            return
        console.print(
            f"created {key.id} for project {escape(key.project)}"
            + (f", team {escape(key.team)}" if key.team else "")
            + (f", user {escape(key.user)}" if key.user else "")
            + (f"; budget {key.scope}: ${budget} {window or 'monthly'}" if spec else ""),
            soft_wrap=True,
        )
        console.print("secret (shown this once; store it now, it cannot be recovered):")
        print(secret)

    @keys_app.command("list")
    def list_keys(
        ctx: typer.Context,
        format: Annotated[str, typer.Option("--format", "-f", help="table or json")] = "table",
    ) -> None:
        """Every internal key (never its secret): attribution, limits, created, expires, revoked, and
        when it was last used (its latest call in the history)."""
        _check_format(format)
        store = _store(ctx.obj)
        keys = store.keys()
        last_used = _last_used(ctx.obj, keys)
        if format == "json":
            print(json.dumps([_key_json(k, last_used) for k in keys]))
            return
        table = Table(
            "id", "prefix", "project", "team", "user", "models", "tier", "rpm", "tpm", "cache",
            "created (UTC)", "expires", "revoked", "last used",
        )  # fmt: skip
        for k in keys:
            table.add_row(
                k.id,
                k.prefix + "...",
                escape(k.project),
                escape(k.team or "-"),
                escape(k.user or "-"),
                escape(",".join(k.models) or "*"),
                escape(k.tier or "-"),
                str(k.rpm or "-"),
                str(k.tpm or "-"),
                f"{k.cache_ttl_s}s" if k.cache_ttl_s else "-",
                _utc(k.created_at_us),
                _utc(k.expires_at_us),
                _utc(k.revoked_at_us),
                "?" if last_used is None else _utc(last_used.get(k.id)),
            )
        console.print(table)

    @keys_app.command("revoke")
    def revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
        """Revoke a key on every gateway (within a second); a revoked key never comes back."""
        settings: Settings = ctx.obj
        _key_signer(settings)
        key = _store(settings).get(key_id)
        if key is None:
            raise SpendstreamError(
                f"no key {key_id!r} on {settings.topics.gateway_keys} (see `spendstream keys list`)"
            )
        if key.revoked_at_us is not None:
            console.print(f"{key.id} was already revoked at {_utc(key.revoked_at_us)} UTC")
            return
        _publish_key(settings, revoked(key, time.time_ns() // 1000))
        console.print(f"[red]revoked[/red] {key.id} (project {escape(key.project)})")
