"""The rules every UsageEvent must satisfy, shared by the emitters (raise at the call site) and
the meter (dead-letter with the reason)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

__all__ = [
    "COUNT_FIELDS",
    "SERVICE_TIERS",
    "USAGE_SOURCES",
    "encode_seconds",
    "scopes_for_event",
    "usage_problem",
]

COUNT_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "characters",
    "images",
    "requests",
)
SERVICE_TIERS = ("standard", "batch", "flex", "priority")
USAGE_SOURCES = ("reported", "estimated", "missing")
_REQUIRED_TEXT = ("project", "service", "provider", "model")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


def encode_seconds(seconds: Decimal | str | int) -> bytes:
    """Seconds as the Avro decimal(18, 6) of UsageEvent.audio_seconds (exact; floats refused)."""
    if isinstance(seconds, float):
        raise TypeError("audio_seconds must be exact: pass a Decimal, str or int, not a float")
    try:
        micros = Decimal(seconds).scaleb(6)
    except (ArithmeticError, TypeError, ValueError):
        raise ValueError(f"audio_seconds must be a decimal number of seconds, got {seconds!r}") from None
    if not micros.is_finite():
        raise ValueError(f"audio_seconds must be a finite number of seconds, got {seconds!r}")
    if abs(micros) >= 10**18:
        raise ValueError(f"audio_seconds {seconds} does not fit the event's decimal(18, 6) seconds")
    if micros != micros.to_integral_value():
        raise ValueError(f"audio_seconds {seconds} has more than 6 decimals")
    value = int(micros)
    return value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)


def usage_problem(event: dict[str, Any], *, check_identity: bool = True) -> str | None:
    """Why `event` (a UsageEvent record) is invalid, or None if it is valid.

    `check_identity=False` skips event_id and event_time, for a caller that generated them.
    """
    for field in _REQUIRED_TEXT:
        value = event.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"{field} is missing or empty"
    if event["provider"] != event["provider"].lower():
        return f"provider {event['provider']!r} must be lowercase (e.g. {event['provider'].lower()!r})"
    for field in COUNT_FIELDS:
        value = event.get(field, 0)
        if type(value) is not int:
            return f"{field} must be an integer count, got {value!r}"
        if value < 0:
            return f"{field} is negative ({value})"
    if event.get("reasoning_tokens", 0) > event["output_tokens"]:
        return (
            f"reasoning_tokens ({event['reasoning_tokens']}) exceeds output_tokens "
            f"({event['output_tokens']}): output_tokens must include the reasoning share"
        )
    audio = event.get("audio_seconds", b"\x00")
    if isinstance(audio, str):
        audio = audio.encode("latin-1")
    if isinstance(audio, bytes) and audio and audio[0] & 0x80:
        return "audio_seconds is negative"
    tier = event.get("service_tier", "standard")
    if tier not in SERVICE_TIERS:
        return f"service_tier {tier!r} is not one of {', '.join(SERVICE_TIERS)}"
    source = event.get("usage_source", "reported")
    if source not in USAGE_SOURCES:
        return f"usage_source {source!r} is not one of {', '.join(USAGE_SOURCES)}"
    if not check_identity:
        return None
    if not isinstance(event.get("event_id"), str) or not _UUID.fullmatch(event["event_id"]):
        return f"event_id {event.get('event_id')!r} is not a UUID"
    if type(event.get("event_time")) is not int or event["event_time"] <= 0:
        return f"event_time {event.get('event_time')!r} is not a positive epoch-microseconds value"
    return None


def scopes_for_event(
    project: str, team: str | None, user: str | None, model: str, model_globs: Iterable[str] = ()
) -> list[str]:
    """Every budget scope an event (or a call) counts against: org, project, team, user, and the
    project's model-filter scopes whose glob matches the model."""
    scopes = ["org", f"project:{project}"]
    if team:
        scopes.append(f"team:{team}")
    if user:
        scopes.append(f"user:{user}")
    scopes.extend(f"project:{project}/model:{g}" for g in model_globs if fnmatch.fnmatchcase(model, g))
    return scopes
