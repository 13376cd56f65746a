"""The `spendstream` command line. Settings come from SPENDSTREAM_* env vars; flags override."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from spendstream.cli import alerts, budgets, gateway, keys, prices, report, ui
from spendstream.cli.console import console, err, render, say
from spendstream.cli.reads import query
from spendstream.errors import SpendstreamError
from spendstream.settings import PROVIDER_KEY_VARS, Settings
from spendstream.signing import warn_unauthenticated

if TYPE_CHECKING:
    from spendstream.cli.kafka_local import ClusterStatus, LocalCluster, LocalKafka

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False)
kafka_app = typer.Typer(
    no_args_is_help=True,
    help="The local Apache Kafka: one broker, or a cluster with --brokers (KRaft, 127.0.0.1).",
)
app.add_typer(kafka_app, name="kafka")
log = logging.getLogger(__name__)
_CONTROL_COMMANDS = {
    "budget",
    "block",
    "unblock",
    "watch",
    "demo",
    "ui",
    "alerts",
}  # `up`: the worker warns itself


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


@app.callback()
def main_callback(
    ctx: typer.Context,
    state_dir: Annotated[Path | None, typer.Option(help="Overrides SPENDSTREAM_STATE_DIR.")] = None,
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="External Kafka; overrides SPENDSTREAM_BOOTSTRAP_SERVERS.")
    ] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="Overrides SPENDSTREAM_TOPIC_PREFIX.")] = None,
    budgets_file: Annotated[Path | None, typer.Option(help="Overrides SPENDSTREAM_BUDGETS_FILE.")] = None,
) -> None:
    """spendstream: every LLM / credit-API call metered, priced exactly and capped in real time."""
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "state_dir": state_dir,
            "bootstrap_servers": bootstrap_servers,
            "topic_prefix": topic_prefix,
            "budgets_file": budgets_file,
        }.items()
        if v is not None
    }
    try:
        ctx.obj = Settings(**overrides)
    except ValidationError as exc:
        for e in exc.errors():
            name = "SPENDSTREAM_" + str(e["loc"][0]).upper() if e["loc"] else "settings"
            message = str(e["msg"]).removeprefix("Value error, ")  # pydantic's prefix for our checks
            err.print(f"[red]config error[/red]: {name}: {escape(message)}", soft_wrap=True)
        raise typer.Exit(2) from None
    if ctx.invoked_subcommand in _CONTROL_COMMANDS and not ctx.obj.verifier().enforcing:
        warn_unauthenticated(log, "the CLI")


_BROKERS = typer.Option(
    "--brokers",
    min=1,
    help="Nodes of the local cluster; overrides SPENDSTREAM_KAFKA_BROKERS (set it for every command).",
)
_NODE = typer.Option("--node", min=1, help="Only this node of the local cluster (1..brokers).")


def _local(ctx: typer.Context, brokers: int | None) -> LocalKafka | LocalCluster:
    from spendstream.cli.up import local_kafka

    settings = _settings(ctx)
    if brokers is not None:
        settings = settings.model_copy(update={"kafka_brokers": brokers})
    return local_kafka(settings)


def _cluster(kafka: LocalKafka | LocalCluster, node: int | None) -> LocalCluster | None:
    """`kafka` if `--node` applies to it; None without `--node`; exit 2 for a single broker."""
    from spendstream.cli.kafka_local import LocalCluster

    if node is None:
        return None
    if not isinstance(kafka, LocalCluster):
        err.print("[red]--node needs a local cluster[/red] (--brokers or SPENDSTREAM_KAFKA_BROKERS >= 2)")
        raise typer.Exit(2)
    return kafka


@kafka_app.command("start")
def kafka_start(
    ctx: typer.Context,
    brokers: Annotated[int | None, _BROKERS] = None,
    node: Annotated[int | None, _NODE] = None,
) -> None:
    """Fetch Kafka from Maven Central (first time only), format KRaft storage, start, wait until ready."""
    if not _settings(ctx).local_kafka:
        say(f"SPENDSTREAM_BOOTSTRAP_SERVERS={_settings(ctx).bootstrap_servers}: nothing local to start")
        return
    kafka = _local(ctx, brokers)
    cluster = _cluster(kafka, node)
    if cluster is not None and node is not None:
        one = cluster.start_node(node, progress=say)
        console.print(f"node {node}: {one.describe()}")
    else:
        console.print(kafka.start(progress=say).describe())


@kafka_app.command("stop")
def kafka_stop(
    ctx: typer.Context,
    brokers: Annotated[int | None, _BROKERS] = None,
    node: Annotated[int | None, _NODE] = None,
) -> None:
    """Stop the local broker, or every node of the local cluster, cleanly (SIGTERM, then SIGKILL after 30 s)."""
    from spendstream.cli.kafka_local import LocalCluster

    kafka = _local(ctx, brokers)
    cluster = _cluster(kafka, node)
    if cluster is not None and node is not None:
        stopped = cluster.stop_node(node)
        console.print(f"Kafka node {node} stopped" if stopped else f"Kafka node {node} was not running")
    elif isinstance(kafka, LocalCluster):
        ids = kafka.stop()
        console.print(f"Kafka stopped (node {', '.join(map(str, ids))})" if ids else "Kafka was not running")
    else:
        console.print("Kafka stopped" if kafka.stop() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status(ctx: typer.Context, brokers: Annotated[int | None, _BROKERS] = None) -> None:
    """Is the local broker (every node of the local cluster) running? Exit code 1 if not."""
    from spendstream.cli.kafka_local import LocalCluster

    kafka = _local(ctx, brokers)
    if isinstance(kafka, LocalCluster):
        _cluster_status(kafka.status())
        return
    status = kafka.status()
    if status.running:
        console.print(
            f"running: Kafka {status.version} at {status.bootstrap}, pid {status.pid}, "
            f"cluster {status.cluster_id}"
        )
    else:
        console.print(f"not running (would listen on {status.bootstrap})")
        raise typer.Exit(1)


def _cluster_status(status: ClusterStatus) -> None:
    up = sum(n.running for n in status.nodes)
    leader = f"node {status.quorum_leader}" if status.quorum_leader is not None else "unknown"
    state = "running" if status.running else ("not running" if up == 0 else "HALF-STARTED")
    console.print(
        f"{state}: Kafka {status.version} cluster {status.cluster_id or '(not formatted)'}, {up} of "
        f"{len(status.nodes)} "
        f"nodes up, controller quorum leader {leader}",
        soft_wrap=True,
    )
    for n in status.nodes:
        where = f"127.0.0.1:{n.port} (controller {n.controller_port})"
        if not n.running:
            hint = f": `spendstream kafka start --node {n.node_id}`" if up else ""
            console.print(f"node {n.node_id}: not running, {where}{hint}", soft_wrap=True)
            continue
        line = f"node {n.node_id}: running, pid {n.pid}, {where}"
        if n.leaders is not None:
            line += f", leads {n.leaders} partitions, {n.under_replicated} under-replicated"
        console.print(line, soft_wrap=True)
    if not status.running:
        raise typer.Exit(1)


@app.command()
def up(
    ctx: typer.Context,
    log_level: Annotated[str, typer.Option(help="Worker log level.")] = "info",
    role: Annotated[
        str,
        typer.Option(
            help="all: the meter/budget worker and its history process (sink, SQL); meter: the worker "
            "alone (run several; SPENDSTREAM_HISTORY_URL); history: the history writer alone (run one)."
        ),
    ] = "all",
) -> None:
    """Start the broker (unless external), create topics, apply the DDL and run the worker."""
    from spendstream.cli.up import ROLES, run

    if role not in ROLES:
        err.print(f"[red]--role must be one of {', '.join(ROLES)}[/red]")
        raise typer.Exit(2)
    run(_settings(ctx), say, role=role, loglevel=log_level)


@app.command()
def sql(
    ctx: typer.Context,
    statement: Annotated[str, typer.Argument(help="One read-only statement, e.g. SELECT ...")],
    format: Annotated[str, typer.Option("--format", "-f", help="table, csv or json")] = "table",
) -> None:
    """Query the history in ClickHouse (read-only). Unqualified tables are in database spendstream."""
    if format not in ("table", "csv", "json"):
        err.print("[red]--format must be table, csv or json[/red]")
        raise typer.Exit(2)
    result = query(_settings(ctx), statement)
    out = render(result, format)
    if isinstance(out, str):
        print(out)
    else:
        console.print(out)


@app.command()
def watch(
    ctx: typer.Context,
    from_beginning: Annotated[
        bool, typer.Option(help="Replay the whole (compacted) topic first: the current state of every scope.")
    ] = True,
    limit: Annotated[int, typer.Option(help="Stop after this many signals (0 = never).")] = 0,
    format: Annotated[
        str, typer.Option("--format", "-f", help="text, or json (one object per line)")
    ] = "text",
) -> None:
    """Tail spend.control, decoded: every budget state change as it happens."""
    from spendstream.cli.watch import format_signal, signal_json, tail_control

    settings = _settings(ctx)

    async def run() -> None:
        seen = 0
        async for signal in tail_control(
            settings.bootstrap,
            settings.topics.spend_control,
            from_beginning,
            settings.verifier(),
            settings.kafka_auth,
        ):
            if format == "json":
                print(json.dumps(signal_json(signal)), flush=True)
            else:
                console.print(format_signal(signal))
            seen += 1
            if limit and seen >= limit:
                return

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@app.command()
def demo(
    ctx: typer.Context,
    max_events: Annotated[
        int, typer.Option(help="Stop after this many events if no budget trips.")
    ] = 400_000,
    rate: Annotated[int, typer.Option(help="Target events per second.")] = 5_000,
) -> None:
    """Run a synthetic workload (projects, teams, models) until a project crosses its budget."""
    from spendstream.cli.demo import run_demo

    run_demo(_settings(ctx), console, max_events=max_events, rate=rate)


@app.command()
def config(ctx: typer.Context) -> None:
    """Print the effective settings (secrets masked) and where each can be set."""
    settings = _settings(ctx)
    table = Table("env var", "value", "meaning")
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        family = name.removesuffix("_api_key")
        env = (
            " / ".join(PROVIDER_KEY_VARS[family])
            if family in PROVIDER_KEY_VARS
            else f"SPENDSTREAM_{name.upper()}"
        )
        table.add_row(env, str(value), field.description or "")
    console.print(table)
    console.print(f"bootstrap: {settings.bootstrap}   topics: {', '.join(settings.topics.all())}")


prices.register(app)
budgets.register(app)
keys.register(app)
gateway.register(app)
ui.register(app)
report.register(app)
alerts.register(app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the CLI reports failures itself
    try:
        app()
    except SpendstreamError as exc:  # one line, unwrapped, whatever the message holds
        err.print(f"[red]error[/red]: {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
