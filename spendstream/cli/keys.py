"""`spendstream keys generate|rotate|resign`: the Ed25519 keys that sign the control plane.

The private key signs ControlSignals (the worker) and BudgetSpecs (operators' CLI); Guards and
workers verify with the public keys (docs/security.md).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from spendstream.cli.console import console
from spendstream.errors import ConfigError
from spendstream.settings import Settings
from spendstream.signing import REPLAYED, UNSIGNED, Signer, generate_key, public_key_b64

keys_app = typer.Typer(no_args_is_help=True, help="Keys that sign kill-switch signals and budgets.")


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
            "restart the worker; 3. `spendstream keys resign` (budgets, then the worker re-signs the "
            "signal of every budgeted scope); 4. drop the old key from SPENDSTREAM_VERIFY_KEYS.",
            soft_wrap=True,
        )

    @keys_app.command("resign")
    def resign(
        ctx: typer.Context,
        adopt_unsigned: Annotated[
            bool, typer.Option(help="Also sign the unsigned specs (once, when keys are first set up)")
        ] = False,
    ) -> None:
        """Re-publish every current budget signed with SPENDSTREAM_SIGNING_KEY (after a rotation)."""
        from spendstream.cli.up import publish_specs
        from spendstream.wire import default_codec
        from stream_processors.budgets import Spec
        from stream_processors.feeds import read_compacted

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
        if refused:
            console.print(f"[red]left alone[/red] (not verified by the verify keys): {', '.join(refused)}")
