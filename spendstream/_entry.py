"""The `spendstream` command's entry point: a clear line, not a traceback, on a client-only install."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from spendstream.cli import main as cli
    except ModuleNotFoundError as exc:
        sys.exit(
            f"error: the spendstream command needs the server extra ({exc.name} is not installed): "
            "pip install 'spendstream[server]'"
        )
    cli()
