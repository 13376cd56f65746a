"""Reading `spend.control`: the decoded stream of budget state changes, for `watch` and the demo."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer

from spendstream.errors import DecodeError
from spendstream.kafka_auth import PLAINTEXT, KafkaAuth
from spendstream.signing import REPLAYED, Verifier
from spendstream.wire import default_codec
from stream_processors.budgets import utc_from_micros
from stream_processors.pricing import pico_to_usd

__all__ = ["format_signal", "signal_json", "tail_control"]

_CENT = Decimal("0.01")
log = logging.getLogger(__name__)


async def tail_control(
    bootstrap: str,
    topic: str,
    from_beginning: bool = True,
    verifier: Verifier | None = None,
    kafka_auth: KafkaAuth = PLAINTEXT,
) -> AsyncIterator[dict[str, Any]]:
    """Yield every ControlSignal on `topic` (no consumer group: nothing is committed).

    With an enforcing `verifier`, only the signals a Guard with the same keys would obey: an
    unsigned, badly signed, unknown-key or replayed one is logged as a warning and skipped."""
    last_sequence: dict[str, int] = {}
    codec = default_codec()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        client_id=f"spendstream-watch-{uuid.uuid4().hex[:8]}",
        **kafka_auth.client_kwargs(),
    )
    await consumer.start()
    try:
        async for msg in consumer:
            try:
                name, record = codec.decode(msg.value)
            except DecodeError as exc:
                log.warning("skipped an undecodable record at [%d]@%d: %s", msg.partition, msg.offset, exc)
                continue
            if name != "ControlSignal":
                continue
            why = verifier.check(msg.key, msg.value, record) if verifier else None
            if why is None and verifier and verifier.enforcing:
                if record["sequence"] <= last_sequence.get(record["scope"], -1):
                    why = REPLAYED
                else:
                    last_sequence[record["scope"]] = record["sequence"]
            if why is not None:
                log.warning(
                    "ignored a %s signal for %s (%s, seq %d) at [%d]@%d",
                    why,
                    record["scope"],
                    record["state"],
                    record["sequence"],
                    msg.partition,
                    msg.offset,
                )
                continue
            yield record
    finally:
        await consumer.stop()


def _usd(pico: int) -> str:
    return f"${pico_to_usd(pico).quantize(_CENT):,}"


def format_signal(s: dict[str, Any]) -> str:
    colour = {"blocked": "red", "warn": "yellow", "ok": "green"}[s["state"]]
    what = s["reason"] + (f" {s['level']}%" if s["reason"] == "threshold" and s.get("level") else "")
    text = f"[{colour}]{s['state'].upper():7}[/{colour}] {s['scope']:28} {what:18}"
    if s["limit_pico_usd"]:
        text += f" spend {_usd(s['spend_pico_usd'])} of {_usd(s['limit_pico_usd'])}"
    if s["window"]:
        text += f" in {s['window']}"
    if s["window_end"]:
        text += f" (until {utc_from_micros(s['window_end']):%Y-%m-%d %H:%M} UTC)"
    if s.get("projected_at"):
        text += f", projected to reach the limit {utc_from_micros(s['projected_at']):%Y-%m-%d %H:%M} UTC"
    signed = f"key {s['key_id']}" if s.get("key_id") else "unsigned"
    return text + f" seq {s['sequence']} decided {utc_from_micros(s['decided_at']):%H:%M:%S.%f} UTC {signed}"


def signal_json(s: dict[str, Any]) -> dict[str, Any]:
    """A ControlSignal for machines: money as exact decimal strings, times as ISO UTC."""
    out = dict(s)
    out["signature"] = bytes(out.get("signature") or b"").hex()  # fastavro: "" for v2 records
    for field in ("spend_pico_usd", "limit_pico_usd"):
        out[field.replace("_pico_usd", "_usd")] = str(pico_to_usd(out.pop(field)))
    for field in ("window_start", "window_end", "decided_at", "projected_at"):
        out[field] = utc_from_micros(out[field]).isoformat() if out.get(field) else None
    return out
