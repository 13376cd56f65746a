"""The rules every UsageEvent must satisfy, shared by the emitters (raise at the call site) and
the pricer (dead-letter with the reason)."""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["COUNT_FIELDS", "PROVIDERS", "usage_problem"]

COUNT_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)
PROVIDERS = frozenset({"openai", "anthropic", "google", "bedrock", "azure", "mistral", "cohere", "vertex_ai"})
_REQUIRED_TEXT = ("project", "service", "provider", "model")


def usage_problem(event: dict[str, Any]) -> str | None:
    """Why `event` (a UsageEvent record) is invalid, or None if it is valid."""
    for field in _REQUIRED_TEXT:
        value = event.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"{field} is missing or empty"
    if event["provider"] != event["provider"].lower():
        return f"provider {event['provider']!r} must be lowercase (e.g. {event['provider'].lower()!r})"
    for field in COUNT_FIELDS:
        value = event.get(field)
        if type(value) is not int:
            return f"{field} must be an integer count, got {value!r}"
        if value < 0:
            return f"{field} is negative ({value})"
    if event["reasoning_tokens"] > event["output_tokens"]:
        return (
            f"reasoning_tokens ({event['reasoning_tokens']}) exceeds output_tokens "
            f"({event['output_tokens']}): output_tokens must include the reasoning share"
        )
    try:
        uuid.UUID(event["event_id"])
    except (ValueError, TypeError, AttributeError, KeyError):
        return f"event_id {event.get('event_id')!r} is not a UUID"
    if type(event.get("event_time")) is not int or event["event_time"] <= 0:
        return f"event_time {event.get('event_time')!r} is not a positive epoch-microseconds value"
    return None
