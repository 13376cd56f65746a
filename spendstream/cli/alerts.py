"""`spendstream alerts`: webhooks on budget state changes (warn, blocked, runaway, forecast).

    spend.control --(consumer group "<worker id>-alerts")--> Alerter --> webhooks (Slack or JSON)

A process of its own beside the worker: enforcement never waits for it (the worker publishes the
signal and Guards obey it whether or not any webhook answers). Guarantees:

1. Once per state change: the worker publishes one ControlSignal per change with a per-scope
   sequence; an alert is keyed by (scope, sequence) (`Idempotency-Key` header and `dedupe_key` in
   the body), a repeat of the same key or of the same decision (a re-signed signal after a key
   rotation) is not sent again.
2. Retried with backoff: a connection error, 408, 429 or 5xx is retried (0.5 s, 1 s, 2 s, ... up
   to `MAX_ATTEMPTS`); any other 4xx is a configuration error and is not. Webhooks are delivered
   concurrently, so one slow receiver does not delay the others by more than its retries.
3. At least once across restarts: the group's offset is committed after the message's alerts are
   delivered (or given up on); a restart resends at most what was in flight. A group with no
   committed offset starts at the end: old states are not re-announced.

Configured in the budgets file (SPENDSTREAM_BUDGETS_FILE), beside `budgets:`:

    alerts:
      - {url: "https://hooks.slack.com/services/...", format: slack, kinds: [blocked, runaway]}
      - {url: "https://ops.example.com/spend", format: json}    # kinds: all four

or with `--slack URL` / `--webhook URL` (every kind). URLs are secrets: logs show only the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from aiokafka import AIOKafkaConsumer, TopicPartition

from spendstream.cli.console import say
from spendstream.cli.watch import signal_json
from spendstream.errors import ConfigError, DecodeError
from spendstream.settings import Settings
from spendstream.signing import Verifier
from spendstream.wire import default_codec
from stream_processors.budgets import read_budgets_file

__all__ = ["KINDS", "Alert", "Alerter", "Webhook", "deliver", "load_webhooks", "register", "run_alerts"]

log = logging.getLogger(__name__)
KINDS = ("warn", "blocked", "runaway", "forecast")
FORMATS = ("slack", "json")
MAX_ATTEMPTS = 6
FIRST_BACKOFF_SECONDS = 0.5
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"  # slack | json
    kinds: tuple[str, ...] = KINDS

    @property
    def host(self) -> str:
        """What a log line may show of the URL (its path and query can hold a token)."""
        return urlsplit(self.url).netloc


def _webhook(entry: Any, where: str) -> Webhook:
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise ConfigError(
            f"{where}: each alert is a mapping with a url, e.g. {{url: https://..., format: slack}}"
        )
    if unknown_keys := set(entry) - {"url", "format", "kinds"}:
        raise ConfigError(
            f"{where}: an alert has url, format and kinds; unknown {sorted(map(str, unknown_keys))}"
        )
    url, fmt = entry["url"], entry.get("format", "json")
    kinds = tuple(entry.get("kinds") or KINDS)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"{where}: alert url must be http(s)://, not {urlsplit(url).scheme or 'empty'}")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: alert format must be slack or json, not {fmt!r}")
    if unknown := set(kinds) - set(KINDS):
        raise ConfigError(f"{where}: alerts are on {', '.join(KINDS)}; unknown {sorted(unknown)}")
    return Webhook(url, fmt, kinds)


def load_webhooks(path: Path | None, slack: Iterable[str] = (), generic: Iterable[str] = ()) -> list[Webhook]:
    """The `alerts:` list of the budgets file, plus webhooks given on the command line."""
    hooks = [Webhook(u, "slack") for u in slack] + [Webhook(u, "json") for u in generic]
    for hook in hooks:
        _webhook({"url": hook.url}, "--slack/--webhook")
    data = read_budgets_file(path) if path is not None else None
    entries = data.get("alerts") if isinstance(data, dict) else None
    if entries is not None and not isinstance(entries, list):
        raise ConfigError(f"{path}: 'alerts' is a list of webhooks")
    hooks += [_webhook(e, f"{path} alerts[{i}]") for i, e in enumerate(entries or [])]
    return hooks


@dataclass(frozen=True)
class Alert:
    kind: str  # warn | blocked | runaway | forecast
    dedupe_key: str  # scope#sequence
    signal: dict[str, Any]  # signal_json form: money as exact strings, times as ISO UTC

    def body(self, fmt: str) -> dict[str, Any]:
        if fmt == "slack":
            return {"text": self.text()}
        out = {k: v for k, v in self.signal.items() if k not in ("signature", "key_id")}
        return {"kind": self.kind, "dedupe_key": self.dedupe_key, **out}

    def text(self) -> str:
        s = self.signal
        icon = {"blocked": ":no_entry:", "runaway": ":rotating_light:"}.get(self.kind, ":warning:")
        what = {
            "warn": f"passed {s['level']}% of its budget",
            "blocked": "is blocked" + (" by an operator" if s["reason"] == "manual" else ": budget exceeded"),
            "runaway": "is blocked: runaway spend (the last 5 minutes far above its usual rate)",
            "forecast": f"will reach its budget at the current rate by {s['projected_at'] or '?'}",
        }[self.kind]
        text = f"{icon} *{s['scope']}* {what}"
        if Decimal(s["limit_usd"]):
            spend = Decimal(s["spend_usd"]).quantize(_CENT)
            text += f" (${spend:,} of ${Decimal(s['limit_usd']).quantize(_CENT):,}"
            text += f" in {s['window']})" if s["window"] else ")"
        return text + f" · decided {s['decided_at']} · seq {s['sequence']}"


def kind_of(signal: dict[str, Any]) -> str | None:
    """The alert a ControlSignal raises, if any (an `ok` raises none)."""
    if signal["state"] == "blocked":
        return "runaway" if signal["reason"] == "runaway" else "blocked"
    if signal["state"] == "warn":
        return "forecast" if signal["reason"] == "forecast" else "warn"
    return None


class Alerter:
    """Decides which alerts a signal raises (pure: no I/O), once per (scope, sequence) and per change."""

    def __init__(self, hooks: list[Webhook]) -> None:
        self.hooks = hooks
        self._last: dict[str, tuple[int, tuple[Any, ...]]] = {}  # scope -> (sequence, decision)

    def on_signal(self, record: dict[str, Any]) -> list[tuple[Webhook, Alert]]:
        scope, sequence = record["scope"], record["sequence"]
        decision = (record["state"], record["reason"], record.get("level"), record["window"])
        last = self._last.get(scope)
        if last is not None and (sequence <= last[0] or decision == last[1]):
            if sequence > last[0]:
                self._last[scope] = (sequence, decision)  # re-signed repeat: nothing new to say
            return []
        self._last[scope] = (sequence, decision)
        kind = kind_of(record)
        if kind is None:
            return []
        alert = Alert(kind, f"{scope}#{sequence}", signal_json(record))
        return [(hook, alert) for hook in self.hooks if kind in hook.kinds]


async def deliver(
    client: httpx.AsyncClient,
    hook: Webhook,
    alert: Alert,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """POST the alert, retried with exponential backoff on errors worth retrying; True if delivered."""
    delay = FIRST_BACKOFF_SECONDS
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            response = await client.post(
                hook.url, json=alert.body(hook.format), headers={"Idempotency-Key": alert.dedupe_key}
            )
            if response.is_success:
                log.info(
                    "alert %s %s sent to %s (attempt %d)", alert.kind, alert.dedupe_key, hook.host, attempt
                )
                return True
            status = response.status_code
            if status < 500 and status not in (408, 429):
                log.error(
                    "alert %s to %s refused with %d: not retried (check the webhook URL)",
                    alert.dedupe_key,
                    hook.host,
                    status,
                )
                return False
            why = f"HTTP {status}"
        except httpx.TransportError as exc:
            why = type(exc).__name__
        if attempt < MAX_ATTEMPTS:
            log.warning(
                "alert %s to %s: %s; retry %d in %.1f s", alert.dedupe_key, hook.host, why, attempt, delay
            )
            await sleep(delay)
            delay *= 2
    log.error("alert %s to %s given up after %d attempts", alert.dedupe_key, hook.host, MAX_ATTEMPTS)
    return False


async def run_alerts(
    settings: Settings, hooks: list[Webhook], ready: Callable[[], None] = lambda: None
) -> None:
    """Follow spend.control in the consumer group `<worker id>-alerts` until cancelled."""
    verifier = settings.verifier()
    codec = default_codec()
    alerter = Alerter(hooks)
    consumer = AIOKafkaConsumer(
        settings.topics.spend_control,
        bootstrap_servers=settings.bootstrap,
        group_id=f"{settings.worker_id}-alerts",
        enable_auto_commit=False,
        auto_offset_reset="latest",  # a new group starts at the end: old states are not re-announced
        **settings.kafka_auth.client_kwargs(),
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        for tp in consumer.assignment():
            await consumer.position(tp)  # resolve "latest" now: a signal from here on is seen
        ready()
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for tp, messages in batch.items():
                    for msg in messages:
                        sends = _alerts_of(alerter, verifier, codec, msg)
                        await asyncio.gather(*(deliver(client, hook, alert) for hook, alert in sends))
                        await consumer.commit({TopicPartition(tp.topic, tp.partition): msg.offset + 1})
    finally:
        await consumer.stop()


def _alerts_of(alerter: Alerter, verifier: Verifier, codec: Any, msg: Any) -> list[tuple[Webhook, Alert]]:
    """The alerts of one spend.control message: with verify keys, only of signals a Guard obeys
    (a replayed older one is dropped by the Alerter's sequence check)."""
    if msg.value is None:
        return []
    try:
        name, record = codec.decode(msg.value)
    except DecodeError as exc:
        log.warning("skipped an undecodable record at [%d]@%d: %s", msg.partition, msg.offset, exc)
        return []
    if name != "ControlSignal":
        return []
    why = verifier.check(msg.key, msg.value, record)
    if why is not None:
        log.warning("ignored a %s signal for %s (seq %d)", why, record["scope"], record["sequence"])
        return []
    return alerter.on_signal(record)


def register(app: typer.Typer) -> None:
    @app.command()
    def alerts(
        ctx: typer.Context,
        slack: Annotated[
            list[str] | None, typer.Option(help="A Slack incoming-webhook URL (repeatable).")
        ] = None,
        webhook: Annotated[
            list[str] | None, typer.Option(help="A URL that takes the JSON body (repeatable).")
        ] = None,
    ) -> None:
        """Send webhooks on budget state changes (warn, blocked, runaway, forecast), beside the worker."""
        settings: Settings = ctx.obj
        hooks = load_webhooks(settings.budgets_file, slack or (), webhook or ())
        if not hooks:
            raise ConfigError(
                "no webhook: add an 'alerts:' list to the budgets file (SPENDSTREAM_BUDGETS_FILE) "
                "or give --slack URL / --webhook URL"
            )

        def ready() -> None:
            hosts = ", ".join(f"{h.format} {h.host} on {'/'.join(h.kinds)}" for h in hooks)
            say(f"alerts: following {settings.topics.spend_control}; webhooks: {hosts}")

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_alerts(settings, hooks, ready))
