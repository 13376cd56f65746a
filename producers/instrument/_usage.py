"""Provider usage objects -> the non-overlapping meters of a UsageEvent (docs/event-format.md).

One function per provider usage shape. Each takes the usage object as the provider returned it
(a JSON mapping; SDK objects go through `as_mapping` first) and returns UsageEvent keyword
arguments. A usage object without its required counts raises `IncompleteUsage`: unknown is never
zero.

    provider usage                       input            cached      cache write (5m / 1h)     output
    OpenAI Chat Completions, Embeddings  prompt - cached  cached      0                         completion
    OpenAI Responses, Images             input - cached   cached      0                         output
    Anthropic Messages                   input            cache_read  creation - 1h / 1h        output
    Gemini usageMetadata                 prompt - cached  cached      0                         candidates + thoughts

Audio tokens reported inside OpenAI's prompt/completion counts (gpt-4o audio models) and AUDIO
modality tokens in Gemini's prompt move to `input_audio_tokens` / `output_audio_tokens`: the
schema defines those meters as not included in `input_tokens` / `output_tokens`. With no audio
the split is exactly the table above.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from spendstream.errors import IncompleteUsage

__all__ = [
    "IncompleteUsage",
    "anthropic_usage",
    "as_mapping",
    "gemini_usage",
    "openai_chat_usage",
    "openai_image_usage",
    "openai_responses_usage",
    "openai_transcription_usage",
    "openai_usage",
    "service_tier_of",
]

Meters = dict[str, Any]

_MICRO = Decimal("0.000001")
_TIERS = {"default": "standard", "standard": "standard", "auto": "standard", "flex": "flex"}
_TIERS |= {"priority": "priority", "batch": "batch"}


def as_mapping(usage: Any) -> Mapping[str, Any]:
    """A JSON-like mapping from a dict or an SDK object (pydantic `model_dump`, `to_dict`)."""
    if isinstance(usage, Mapping):
        return usage
    for name in ("model_dump", "to_dict"):
        method = getattr(usage, name, None)
        if callable(method):
            dumped = method()
            if isinstance(dumped, Mapping):
                return dumped
    raise IncompleteUsage(f"usage must be a mapping or an SDK usage object, got {type(usage).__name__}")


def _count(usage: Mapping[str, Any], key: str, *, required: bool = False) -> int:
    value = usage.get(key)
    if value is None:
        if required:
            raise IncompleteUsage(f"usage has no {key!r}")
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise IncompleteUsage(f"usage {key!r} is not an integer count: {value!r}")
    if value < 0:
        raise IncompleteUsage(f"usage {key!r} is negative: {value}")
    return value


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = usage.get(key)
    return value if isinstance(value, Mapping) else {}


def _split(total: int, part: int, what: str) -> int:
    if part > total:
        raise IncompleteUsage(f"{what}: part ({part}) exceeds the total ({total})")
    return total - part


def openai_chat_usage(usage: Mapping[str, Any]) -> Meters:
    """Chat Completions / legacy Completions / Embeddings `usage` (prompt_tokens, completion_tokens)."""
    prompt = _count(usage, "prompt_tokens", required=True)
    completion = _count(usage, "completion_tokens")
    pd = _details(usage, "prompt_tokens_details")
    cd = _details(usage, "completion_tokens_details")
    cached = _count(pd, "cached_tokens")
    audio_in = _count(pd, "audio_tokens")
    audio_out = _count(cd, "audio_tokens")
    reasoning = _count(cd, "reasoning_tokens")
    output = _split(completion, audio_out, "completion_tokens_details.audio_tokens")
    return {
        "input_tokens": _split(
            _split(prompt, cached, "prompt_tokens_details.cached_tokens"), audio_in, "audio"
        ),
        "cached_input_tokens": cached,
        "output_tokens": output,
        "reasoning_tokens": min(reasoning, output),
        "input_audio_tokens": audio_in,
        "output_audio_tokens": audio_out,
    }


def openai_responses_usage(usage: Mapping[str, Any]) -> Meters:
    """Responses API `usage` (input_tokens, input_tokens_details.cached_tokens, output_tokens)."""
    total_in = _count(usage, "input_tokens", required=True)
    cached = _count(_details(usage, "input_tokens_details"), "cached_tokens")
    output = _count(usage, "output_tokens", required=True)
    reasoning = _count(_details(usage, "output_tokens_details"), "reasoning_tokens")
    return {
        "input_tokens": _split(total_in, cached, "input_tokens_details.cached_tokens"),
        "cached_input_tokens": cached,
        "output_tokens": output,
        "reasoning_tokens": min(reasoning, output),
    }


def openai_usage(usage: Mapping[str, Any]) -> Meters:
    """Either OpenAI token-usage shape, told apart by its keys."""
    if "prompt_tokens" in usage:
        return openai_chat_usage(usage)
    return openai_responses_usage(usage)


def openai_image_usage(usage: Mapping[str, Any]) -> Meters:
    """Images API `usage` (GPT image models): text and image input tokens, image output tokens."""
    return openai_responses_usage(usage)


def openai_transcription_usage(usage: Mapping[str, Any]) -> Meters:
    """Audio transcription `usage`: `{"type": "duration", "seconds"}` (whisper-1) or token usage."""
    if usage.get("type") == "duration" or ("seconds" in usage and "input_tokens" not in usage):
        seconds = usage.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float | str):
            raise IncompleteUsage(f"duration usage has no numeric 'seconds': {seconds!r}")
        value = Decimal(str(seconds)).quantize(_MICRO, rounding=ROUND_HALF_UP)
        if value < 0:
            raise IncompleteUsage(f"duration usage seconds is negative: {value}")
        return {"input_tokens": 0, "output_tokens": 0, "audio_seconds": value}
    total_in = _count(usage, "input_tokens", required=True)
    d = _details(usage, "input_token_details")
    audio = _count(d, "audio_tokens") if "audio_tokens" in d else total_in
    return {
        "input_tokens": _split(total_in, audio, "input_token_details.audio_tokens"),
        "input_audio_tokens": audio,
        "output_tokens": _count(usage, "output_tokens", required=True),
    }


def anthropic_usage(usage: Mapping[str, Any]) -> Meters:
    """Messages `usage`; `cache_creation` splits cache writes into the 5-minute and 1-hour meters."""
    creation = _count(usage, "cache_creation_input_tokens")
    by_ttl = _details(usage, "cache_creation")
    one_hour = _count(by_ttl, "ephemeral_1h_input_tokens")
    if by_ttl and not creation:
        creation = _count(by_ttl, "ephemeral_5m_input_tokens") + one_hour
    meters: Meters = {
        "input_tokens": _count(usage, "input_tokens", required=True),
        "cached_input_tokens": _count(usage, "cache_read_input_tokens"),
        "cache_write_tokens": _split(creation, one_hour, "cache_creation.ephemeral_1h_input_tokens"),
        "cache_write_1h_tokens": one_hour,
        "output_tokens": _count(usage, "output_tokens", required=True),
    }
    searches = _count(_details(usage, "server_tool_use"), "web_search_requests")
    if searches:
        meters["requests"] = searches
    tier = service_tier_of(usage.get("service_tier"))
    if tier != "standard":
        meters["service_tier"] = tier
    return meters


def _modality(details: Any, modality: str) -> int:
    if not isinstance(details, list):
        return 0
    return sum(
        _count(d, "tokenCount") for d in details if isinstance(d, Mapping) and d.get("modality") == modality
    )


def gemini_usage(usage: Mapping[str, Any]) -> Meters:
    """Gemini / Vertex `usageMetadata`; thoughts are billed as output."""
    prompt = _count(usage, "promptTokenCount", required=True)
    cached = _count(usage, "cachedContentTokenCount")
    thoughts = _count(usage, "thoughtsTokenCount")
    audio = _modality(usage.get("promptTokensDetails"), "AUDIO")
    audio -= min(audio, _modality(usage.get("cacheTokensDetails"), "AUDIO"))
    uncached = _split(prompt, cached, "cachedContentTokenCount")
    return {
        "input_tokens": _split(uncached, audio, "AUDIO promptTokensDetails"),
        "cached_input_tokens": cached,
        "output_tokens": _count(usage, "candidatesTokenCount") + thoughts,
        "reasoning_tokens": thoughts,
        "input_audio_tokens": audio,
    }


def service_tier_of(value: Any) -> str:
    """A provider's service-tier label as a UsageEvent service_tier (unknown labels: standard)."""
    return _TIERS.get(value, "standard") if isinstance(value, str) else "standard"
