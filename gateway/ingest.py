"""`POST /v1/usage`: usage events over HTTP for services in any language.

The body is one JSON usage event, a JSON array of them, or `{"events": [...]}` (at most
MAX_EVENTS_PER_REQUEST). Each event has the fields of docs/event-format.md, by the same names
(`provider`, `model`, `input_tokens`, ..., `event_id`, `event_time` as ISO 8601 or epoch
microseconds, `tags`). The internal key decides the attribution: `project`, `team` and `user` come
from the key; an event naming another project is refused (per event), never re-attributed.
Retries are safe when events carry their `event_id`: the pipeline counts each (project, event_id)
once. The answer is 202 with `{"accepted": N, "event_ids": [...], "errors": [{"index", "error"}]}`.
"""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime
from typing import Any

from producers import build_event
from spendstream.api_keys import ApiKey
from spendstream.usage import KEY_TAG

__all__ = ["MAX_EVENTS_PER_REQUEST", "IngestError", "events_of", "prepare_event"]

MAX_EVENTS_PER_REQUEST = 10_000
_ATTRIBUTION = ("project", "team", "user")
# what an event may carry: the emitter's own arguments (and `service`), less the key's attribution
_FIELDS = frozenset(inspect.signature(build_event).parameters) - set(_ATTRIBUTION)


class IngestError(ValueError):
    """The request as a whole cannot be read (400)."""


def events_of(body: bytes) -> list[Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IngestError(f"the body is not JSON ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("events"), list):
        doc = doc["events"]
    events = doc if isinstance(doc, list) else [doc]
    if not events:
        raise IngestError('no events: send one event object, an array, or {"events": [...]}')
    if len(events) > MAX_EVENTS_PER_REQUEST:
        raise IngestError(f"{len(events)} events in one request; at most {MAX_EVENTS_PER_REQUEST}")
    return events


def _event_time(value: Any) -> datetime:
    if isinstance(value, bool):
        raise ValueError("event_time must be ISO 8601 or epoch microseconds")
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1_000_000, UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError("event_time needs a time zone (e.g. 2026-12-01T10:00:00Z)")
        return parsed
    raise ValueError("event_time must be ISO 8601 or epoch microseconds")


def prepare_event(raw: Any, key: ApiKey) -> dict[str, Any]:
    """The emitter keyword arguments for one event; ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError("an event must be a JSON object")
    for name in _ATTRIBUTION:
        given = raw.get(name)
        mine = getattr(key, name)
        if given is not None and given != mine:
            raise ValueError(f"{name} {given!r} is not this key's ({mine!r}): the key decides attribution")
    unknown = sorted(set(raw) - _FIELDS - set(_ATTRIBUTION))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (see docs/event-format.md)")
    for name in ("provider", "model"):
        if not isinstance(raw.get(name), str):
            raise ValueError(f"{name} is required (a string)")
    event = {k: v for k, v in raw.items() if k in _FIELDS}
    tags = event.get("tags") or {}
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise ValueError("tags must be an object of strings")
    event["tags"] = {**tags, KEY_TAG: key.id}
    if "event_time" in event:
        event["event_time"] = _event_time(event["event_time"])
    event["project"], event["team"], event["user"] = key.project, key.team, key.user
    return event
