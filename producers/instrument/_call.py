"""One metered call: what was asked, what came back, and the usage event(s) that follow from it.

`CallMeter` is transport-agnostic (sync and async transports share it, for both httpx
generations). Lifecycle:

1. `plan_call()` reads the request (route, JSON body or multipart fields, attribution) and decides
   whether to ask an OpenAI stream for usage;
2. `CallMeter.start(status, headers)` when the response head arrives;
3. `feed(chunk)` for every raw chunk the caller reads (decoded here, never held back);
4. `finish(reason)` once, at the end of the body ("eof"), when the caller closes early ("closed")
   or when reading failed ("error"), returns the events to emit.

Usage that is not in the response is estimated (tokens ~ characters / 4) and flagged:
`usage_source="estimated"` plus the tags `usage_missing` (why) and `usage_estimate` (which
meters were estimated). A response that reports usage is never estimated.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from producers.instrument._routes import Route
from producers.instrument._sse import Decoder, SSEParser, decoder_for
from producers.instrument._usage import (
    IncompleteUsage,
    anthropic_usage,
    gemini_usage,
    openai_image_usage,
    openai_responses_usage,
    openai_transcription_usage,
    openai_usage,
    service_tier_of,
)
from spendstream.usage import METERS

__all__ = ["Attribution", "CallMeter", "CallPlan", "estimate_tokens", "request_text_chars"]

Event = dict[str, Any]
_BATCH_NS = uuid.UUID("5f0f2a4e-8f0b-4d39-9a53-0c6f3c1a7b21")  # uuid5 namespace: batch result lines
_TEXT_KEYS = frozenset(
    {"content", "text", "input", "prompt", "system", "instructions", "arguments", "output"}
)
_MAX_ERROR_BODY = 64 * 1024


def estimate_tokens(chars: int) -> int:
    """The estimate used when a provider reports no usage: one token per four characters."""
    return math.ceil(chars / 4) if chars > 0 else 0


def request_text_chars(body: Any, key: str | None = None) -> int:
    """Characters of prompt text in a request body (strings under content/text/input/... keys)."""
    if isinstance(body, str):
        return len(body) if key in _TEXT_KEYS else 0
    if isinstance(body, Mapping):
        return sum(request_text_chars(v, k) for k, v in body.items())
    if isinstance(body, list):
        return sum(request_text_chars(v, key) for v in body)
    return 0


@dataclass(frozen=True, slots=True)
class Attribution:
    project: str | None
    team: str | None
    user: str | None
    tags: Mapping[str, str]


@dataclass(slots=True)
class CallPlan:
    """What the transport learnt from the request before sending it."""

    route: Route
    attribution: Attribution
    model: str | None
    body: Any  # the parsed JSON body, a dict of multipart text fields, or None
    stream: bool
    new_body: bytes | None = None  # the JSON body to send instead (stream_options.include_usage added)
    usage_requested: bool = True  # False: an OpenAI stream whose caller opted out of usage


def _loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def plan_call(
    route: Route, attribution: Attribution, body_bytes: bytes | None, form: Mapping[str, str] | None
) -> CallPlan:
    """Read the request body: model, streaming, and whether to add `stream_options.include_usage`."""
    body: Any = None
    if form is not None:
        body = dict(form)
    elif body_bytes:
        body = _loads(body_bytes)
    model = route.model
    stream = False
    if isinstance(body, dict):
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        stream = body.get("stream") in (True, "true", "True")
    if route.kind == "gemini":
        stream = False  # decided by the response (":streamGenerateContent?alt=sse" answers SSE)
    plan = CallPlan(route, attribution, model, body, stream)
    if stream and route.kind == "chat" and isinstance(body, dict):
        options = body.get("stream_options")
        if options is None or (isinstance(options, dict) and "include_usage" not in options):
            patched = dict(body)
            patched["stream_options"] = {**(options or {}), "include_usage": True}
            plan.new_body = json.dumps(patched, separators=(",", ":"), ensure_ascii=False).encode()
        elif isinstance(options, dict) and not options.get("include_usage"):
            plan.usage_requested = False
    return plan


@dataclass(slots=True)
class _Stream:
    """What a stream has shown so far."""

    usage: Mapping[str, Any] | None = None  # the final usage object, once seen
    start_usage: Mapping[str, Any] | None = None  # Anthropic message_start usage (input side)
    chars: int = 0  # streamed output text, for the estimate
    model: str | None = None
    service_tier: Any = None
    images: int = 0
    done: bool = False  # the provider's end-of-stream event arrived ([DONE], message_stop, ...)


_END_EVENTS = frozenset({"message_stop", "response.completed", "response.incomplete", "response.failed"})


@dataclass
class CallMeter:
    plan: CallPlan
    region: str
    event_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: int = 0
    finished: bool = False
    _decode: Decoder | None = None
    _sse: SSEParser | None = None
    _chunks: list[bytes] = field(default_factory=list)
    _size: int = 0
    _seen: _Stream = field(default_factory=_Stream)
    _undecodable: bool = False

    # -- 2. head
    def start(self, status: int, content_type: str, content_encoding: str | None) -> None:
        self.status = status
        self._decode = decoder_for(content_encoding)
        self._undecodable = self._decode is None
        if status < 400 and "text/event-stream" in content_type:
            self._sse = SSEParser()

    # -- 3. body
    def feed(self, chunk: bytes) -> None:
        if self._undecodable or not chunk:
            return
        assert self._decode is not None
        data = self._decode(chunk)
        if self._sse is not None:
            for event, payload in self._sse.feed(data):
                self._on_event(event, payload)
            return
        if self.status >= 400 and self._size > _MAX_ERROR_BODY:
            return
        self._chunks.append(data)
        self._size += len(data)

    # -- 4. end
    def finish(self, reason: str) -> list[Event]:
        """The events this call produced (idempotent: later calls return [])."""
        if self.finished:
            return []
        self.finished = True
        if self._undecodable:
            return []  # counted by the transport via `undecodable`
        if self._sse is not None:
            for event, payload in self._sse.close():
                self._on_event(event, payload)
            return self._finish_stream(reason)
        body = b"".join(self._chunks)
        self._chunks = []
        if self.status >= 400:
            return self._finish_error(body)
        return self._finish_body(body, reason)

    @property
    def undecodable(self) -> bool:
        return self._undecodable

    # ------------------------------------------------------------------ events

    def _event(self, meters: Mapping[str, Any], *, source: str = "reported", **extra: Any) -> Event:
        a = self.plan.attribution
        tags = dict(a.tags)
        tags.update(extra.pop("tags", {}))
        event: Event = {
            "project": a.project,
            "provider": self.plan.route.provider,
            "model": extra.pop("model", None) or self.plan.model,
            "team": a.team,
            "user": a.user,
            "tags": tags,
            "event_time": extra.pop("event_time", None) or self.event_time,
            "region": self.region,
            "usage_source": source,
        }
        event.update(meters)
        event.update(extra)
        return event

    def _estimate(self, why: str, chars: int, partial: Mapping[str, Any] | None = None) -> Event:
        """Usage the provider did not report: an estimate, flagged as one."""
        estimated = ["output_tokens"]
        if partial is not None:  # the input side was reported (Anthropic message_start)
            meters = dict(partial)
            meters["output_tokens"] = max(meters.get("output_tokens", 0), estimate_tokens(chars))
        else:
            estimated.insert(0, "input_tokens")
            meters = {
                "input_tokens": estimate_tokens(request_text_chars(self.plan.body)),
                "output_tokens": estimate_tokens(chars),
            }
        tags = {"usage_missing": why, "usage_estimate": ",".join(estimated) + ":chars/4"}
        return self._event(meters, source="estimated", tags=tags, model=self._seen.model)

    def _missing(self, why: str, meters: Mapping[str, Any] | None = None) -> Event:
        """No usage and nothing to estimate from: the counts are a lower bound."""
        base = {"input_tokens": 0, "output_tokens": 0}
        base.update(meters or {})
        return self._event(base, source="missing", tags={"usage_missing": why})

    def _tier(self, *candidates: Any) -> dict[str, str]:
        for value in candidates:
            if value is not None:
                tier = service_tier_of(value)
                return {"service_tier": tier} if tier != "standard" else {}
        return {}

    # ------------------------------------------------------------------ non-streaming bodies

    def _finish_error(self, body: bytes) -> list[Event]:
        """A failed call: nothing, unless the provider says part of it is billable."""
        doc = _loads(body) if body[:1] in (b"{", b" ", b"\n") else None
        if isinstance(doc, dict) and isinstance(doc.get("usage"), Mapping):
            try:
                meters = self._normalise(doc["usage"])
            except IncompleteUsage:
                return []
            if not any(meters.get(m) for m in METERS):  # usage of zero: nothing billable
                return []
            return [self._event(meters, tags={"http_status": str(self.status)})]
        return []

    def _normalise(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        kind = self.plan.route.kind
        if kind == "messages":
            return anthropic_usage(usage)
        if kind == "gemini":
            return gemini_usage(usage)
        if kind == "responses":
            return openai_responses_usage(usage)
        if kind == "images":
            return openai_image_usage(usage)
        if kind == "transcription":
            return openai_transcription_usage(usage)
        return openai_usage(usage)

    def _finish_body(self, body: bytes, reason: str) -> list[Event]:
        kind = self.plan.route.kind
        if kind == "speech":
            return [self._speech(None)]
        if kind == "file_content":
            return self._batch_lines(body, _openai_batch_line)
        if kind == "batch_results":
            return self._batch_lines(body, _anthropic_batch_line)
        if kind == "batch_create":
            return []  # metered when its results are downloaded
        doc = _loads(body)
        if not isinstance(doc, dict):
            if kind == "transcription" and reason == "eof":
                return [self._missing("transcript_format_has_no_usage")]
            if reason != "eof":
                return [self._estimate("response_cut", 0)]
            return [self._estimate("response_not_json", 0)]
        model = self.plan.model
        if self.plan.route.provider == "azure" or model is None:
            model = doc.get("model") if isinstance(doc.get("model"), str) else model
        usage = doc.get("usageMetadata") if kind == "gemini" else doc.get("usage")
        extra: dict[str, Any] = {"model": model}
        extra.update(self._tier(doc.get("service_tier"), self._request_field("service_tier")))
        if kind == "images":
            extra.update(self._image_fields(doc))
            if usage is None:  # dall-e: billed per image, no token usage
                return [self._event({"input_tokens": 0, "output_tokens": 0}, **extra)]
        if not isinstance(usage, Mapping):
            chars = _response_text_chars(kind, doc)
            return [self._estimate("not_in_response", chars)]
        try:
            meters = self._normalise(usage)
        except IncompleteUsage as exc:
            return [self._estimate(f"incomplete:{exc}"[:120], _response_text_chars(kind, doc))]
        return [self._event(meters, **extra)]

    def _request_field(self, name: str) -> Any:
        body = self.plan.body
        return body.get(name) if isinstance(body, dict) else None

    def _image_fields(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        data = doc.get("data")
        images = len(data) if isinstance(data, list) else 0
        model = self.plan.model or ""
        size = self._request_field("size") or doc.get("size") or ("1024x1024" if "dall-e" in model else "")
        quality = (
            self._request_field("quality") or doc.get("quality") or ("standard" if "dall-e" in model else "")
        )
        return {"images": images, "image_size": str(size), "image_quality": str(quality)}

    def _speech(self, usage: Mapping[str, Any] | None) -> Event:
        text = self._request_field("input")
        chars = len(text) if isinstance(text, str) else 0
        if usage is not None:
            try:
                meters = openai_responses_usage(usage)
            except IncompleteUsage:
                meters = None
            if meters is not None:
                # gpt-4o-mini-tts reports text input and audio output tokens
                meters["output_audio_tokens"] = meters.pop("output_tokens")
                meters["output_tokens"] = 0
                meters["reasoning_tokens"] = 0
                return self._event({**meters, "characters": chars})
        if (self.plan.model or "").startswith("tts-1"):
            return self._event({"input_tokens": 0, "output_tokens": 0, "characters": chars})
        return self._missing("speech_tokens_not_reported", {"characters": chars})

    def _batch_lines(
        self, body: bytes, parse: Callable[[Any], tuple[str, Mapping[str, Any]] | None]
    ) -> list[Event]:
        events: list[Event] = []
        for line in body.splitlines():
            doc = _loads(line) if line.strip() else None
            found = parse(doc) if isinstance(doc, dict) else None
            if found is None:
                continue
            line_id, message = found
            usage = message.get("usage")
            model = message.get("model")
            if not isinstance(usage, Mapping) or not isinstance(model, str):
                continue
            try:
                meters = (
                    anthropic_usage(usage) if self.plan.route.kind == "batch_results" else openai_usage(usage)
                )
            except IncompleteUsage:
                continue
            meters["service_tier"] = "batch"
            created = message.get("created") or message.get("created_at")
            when = datetime.fromtimestamp(created, UTC) if isinstance(created, int) and created > 0 else None
            events.append(
                self._event(
                    meters,
                    model=model,
                    event_id=str(uuid.uuid5(_BATCH_NS, f"{self.plan.route.provider}:{line_id}")),
                    event_time=when,
                    tags={"batch_line": line_id[:200]},
                )
            )
        return events

    # ------------------------------------------------------------------ streams

    def _on_event(self, event: str | None, payload: bytes) -> None:
        seen = self._seen
        if payload == b"[DONE]":
            seen.done = True
            return
        doc = _loads(payload)
        if not isinstance(doc, dict):
            return
        if doc.get("type") in _END_EVENTS:
            seen.done = True
        kind = self.plan.route.kind
        if kind == "chat":
            if isinstance(doc.get("usage"), Mapping):
                seen.usage = doc["usage"]
            seen.model = seen.model or _str(doc.get("model"))
            seen.service_tier = doc.get("service_tier", seen.service_tier)
            for choice in doc.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, Mapping) else None
                if isinstance(delta, Mapping):
                    seen.chars += _delta_chars(delta)
        elif kind == "messages":
            etype = doc.get("type")
            if etype == "message_start" and isinstance(doc.get("message"), Mapping):
                message = doc["message"]
                seen.model = _str(message.get("model"))
                if isinstance(message.get("usage"), Mapping):
                    seen.start_usage = message["usage"]
            elif etype == "message_delta" and isinstance(doc.get("usage"), Mapping):
                merged = dict(seen.start_usage or {})
                merged.update({k: v for k, v in doc["usage"].items() if v is not None})
                seen.usage = merged
            elif etype == "content_block_delta" and isinstance(doc.get("delta"), Mapping):
                d = doc["delta"]
                for key in ("text", "partial_json", "thinking"):
                    if isinstance(d.get(key), str):
                        seen.chars += len(d[key])
        elif kind == "responses":
            etype = str(doc.get("type", ""))
            response = doc.get("response")
            if isinstance(response, Mapping):
                seen.model = _str(response.get("model")) or seen.model
                seen.service_tier = response.get("service_tier", seen.service_tier)
                if etype in ("response.completed", "response.incomplete", "response.failed") and isinstance(
                    response.get("usage"), Mapping
                ):
                    seen.usage = response["usage"]
            elif etype.endswith(".delta") and isinstance(doc.get("delta"), str):
                seen.chars += len(doc["delta"])
        elif kind == "gemini":
            if isinstance(doc.get("usageMetadata"), Mapping):
                seen.usage = doc["usageMetadata"]
            seen.model = seen.model or _str(doc.get("modelVersion"))
            for cand in doc.get("candidates") or ():
                content = cand.get("content") if isinstance(cand, Mapping) else None
                for part in (content or {}).get("parts") or ():
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        seen.chars += len(part["text"])
        elif kind in ("transcription", "speech", "images"):
            etype = str(doc.get("type", ""))
            if isinstance(doc.get("usage"), Mapping):
                seen.usage = doc["usage"]
            if kind == "images" and etype.endswith(".completed"):
                seen.images += 1
            if isinstance(doc.get("delta"), str):
                seen.chars += len(doc["delta"])

    def _finish_stream(self, reason: str) -> list[Event]:
        seen = self._seen
        kind = self.plan.route.kind
        model = self.plan.model
        if self.plan.route.provider == "azure" or model is None:
            model = seen.model or model
        if kind == "speech":
            return [self._speech(seen.usage)]
        if seen.usage is not None:
            try:
                meters = self._normalise(seen.usage)
            except IncompleteUsage:
                meters = None
            if meters is not None:
                extra: dict[str, Any] = {"model": model}
                extra.update(self._tier(seen.service_tier, self._request_field("service_tier")))
                if kind == "images":
                    size = self._request_field("size") or ""
                    quality = self._request_field("quality") or ""
                    extra.update(images=seen.images, image_size=str(size), image_quality=str(quality))
                return [self._event(meters, **extra)]
        if reason == "closed" and seen.done:
            reason = "eof"  # SDKs close the response after the end event, before the last byte
        why = {"eof": "not_in_stream", "closed": "client_closed", "error": "stream_cut"}.get(reason, reason)
        if reason == "eof" and not self.plan.usage_requested:
            why = "not_requested"
        partial = None
        if seen.start_usage is not None:
            try:
                partial = anthropic_usage({"output_tokens": 0, **seen.start_usage})
            except IncompleteUsage:
                partial = None
        event = self._estimate(why, seen.chars, partial)
        if model:
            event["model"] = model
        return [event]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _delta_chars(delta: Mapping[str, Any]) -> int:
    n = 0
    for key in ("content", "refusal", "reasoning_content"):
        if isinstance(delta.get(key), str):
            n += len(delta[key])
    for call in delta.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
            n += len(fn["arguments"])
    return n


def _response_text_chars(kind: str, doc: Mapping[str, Any]) -> int:
    if kind == "chat":
        total = 0
        for choice in doc.get("choices") or ():
            if isinstance(choice, Mapping):
                msg = choice.get("message")
                total += _delta_chars(msg) if isinstance(msg, Mapping) else 0
                total += len(choice["text"]) if isinstance(choice.get("text"), str) else 0
        return total
    if kind == "embeddings":
        return 0
    return request_text_chars(
        doc.get("output") or doc.get("content") or doc.get("candidates") or [], "content"
    )


def _openai_batch_line(doc: Any) -> tuple[str, Mapping[str, Any]] | None:
    """`{"id": "batch_req_..", "custom_id": .., "response": {"status_code": 200, "body": {..}}}`."""
    response = doc.get("response")
    if "custom_id" not in doc or not isinstance(response, Mapping):
        return None
    body = response.get("body")
    status = response.get("status_code")
    if not isinstance(body, Mapping) or not isinstance(status, int) or status >= 400:
        return None
    line_id = doc.get("id") or body.get("id") or doc["custom_id"]
    return str(line_id), body


def _anthropic_batch_line(doc: Any) -> tuple[str, Mapping[str, Any]] | None:
    """`{"custom_id": .., "result": {"type": "succeeded", "message": {..}}}`."""
    result = doc.get("result")
    if not isinstance(result, Mapping) or result.get("type") != "succeeded":
        return None
    message = result.get("message")
    if not isinstance(message, Mapping):
        return None
    return str(message.get("id") or doc.get("custom_id")), message
