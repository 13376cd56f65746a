"""Meter every LLM call an application makes, by changing the one line that builds its HTTP client.

    from producers import SyncEmitter
    from producers.instrument import MeteringTransport

    client = openai.OpenAI(http_client=httpx2.Client(
        transport=MeteringTransport(emitter=emitter, project="checkout", guard=guard)))

`MeteringTransport` / `AsyncMeteringTransport` work with `httpx` and `httpx2` clients alike (openai
2.x / anthropic 0.x and openai >= 3 / anthropic >= 1). See docs/instrumentation.md.
"""

from producers.instrument._protocols import EmitterLike, GuardLike
from producers.instrument._transport import (
    ATTRIBUTION_HEADERS,
    AsyncMeteringTransport,
    MeteringTransport,
    TransportStats,
)
from producers.instrument._usage import (
    IncompleteUsage,
    anthropic_usage,
    gemini_usage,
    openai_chat_usage,
    openai_image_usage,
    openai_responses_usage,
    openai_transcription_usage,
    openai_usage,
)

__all__ = [
    "ATTRIBUTION_HEADERS",
    "AsyncMeteringTransport",
    "EmitterLike",
    "GuardLike",
    "IncompleteUsage",
    "MeteringTransport",
    "TransportStats",
    "anthropic_usage",
    "gemini_usage",
    "openai_chat_usage",
    "openai_image_usage",
    "openai_responses_usage",
    "openai_transcription_usage",
    "openai_usage",
]
