"""`spendstream ui`: serve the read-only dashboard (spendstream/cli/dashboard/)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import typer

from spendstream.cli.console import console
from spendstream.cli.reads import worker_url
from spendstream.settings import Settings

__all__ = ["register", "serve"]


async def serve(settings: Settings, host: str, port: int, worker: str) -> None:
    """Serve until cancelled; prints the URL once the socket is bound."""
    from aiohttp import web  # here: the other commands do not pay for the web stack

    from spendstream.cli.dashboard.app import make_app

    runner = web.AppRunner(make_app(settings, worker), shutdown_timeout=1.0)  # open event streams
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        console.print(f"dashboard: http://{shown}:{port}/  (worker {worker}; Ctrl-C stops)", soft_wrap=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def register(app: typer.Typer) -> None:
    @app.command()
    def ui(
        ctx: typer.Context,
        host: Annotated[
            str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8050,
        worker: Annotated[
            str | None,
            typer.Option(
                help="The worker's HTTP API (budgets, SQL); default http://127.0.0.1:SPENDSTREAM_WEB_PORT."
            ),
        ] = None,
    ) -> None:
        """Serve the web dashboard (read-only): spend, budgets, the live kill switch, health of the numbers."""
        settings: Settings = ctx.obj
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings, host, port, worker or worker_url(settings)))
