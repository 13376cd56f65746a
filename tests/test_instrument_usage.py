"""Unit tests of the normalisers (against the replayed provider bodies), routing, SSE parsing and
the estimate used when a provider reports no usage."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producers.instrument import (
    IncompleteUsage,
    anthropic_usage,
    gemini_usage,
    openai_chat_usage,
    openai_image_usage,
    openai_responses_usage,
    openai_transcription_usage,
)
from producers.instrument._call import estimate_tokens, request_text_chars
from producers.instrument._routes import Route, route_of
from producers.instrument._sse import SSEParser, decoder_for
from tests.providers.replay import fixture, sse_events


def usage_of(name: str, key: str = "usage") -> Any:
    return json.loads(fixture(name))[key]


def test_openai_chat_subtracts_cached_tokens_and_keeps_reasoning_inside_output() -> None:
    assert openai_chat_usage(usage_of("openai_chat.json")) == {
        "input_tokens": 86,  # 2006 - 1920
        "cached_input_tokens": 1920,
        "output_tokens": 300,
        "reasoning_tokens": 192,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
    }


def test_openai_chat_audio_tokens_move_to_the_audio_meters() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 80,
        "prompt_tokens_details": {"cached_tokens": 10, "audio_tokens": 40},
        "completion_tokens_details": {"audio_tokens": 60, "reasoning_tokens": 0},
    }
    meters = openai_chat_usage(usage)
    assert (meters["input_tokens"], meters["input_audio_tokens"]) == (50, 40)
    assert (meters["output_tokens"], meters["output_audio_tokens"]) == (20, 60)


def test_openai_embeddings_have_no_output() -> None:
    assert openai_chat_usage(usage_of("openai_embeddings.json"))["output_tokens"] == 0


def test_openai_responses_usage() -> None:
    assert openai_responses_usage(usage_of("openai_responses.json")) == {
        "input_tokens": 81,
        "cached_input_tokens": 0,
        "output_tokens": 1035,
        "reasoning_tokens": 832,
    }


def test_openai_transcription_usage_by_tokens_and_by_duration() -> None:
    assert openai_transcription_usage(usage_of("openai_transcription.json")) == {
        "input_tokens": 0,
        "input_audio_tokens": 14,
        "output_tokens": 45,
    }
    whisper = openai_transcription_usage(usage_of("openai_transcription_whisper.json"))
    assert whisper == {"input_tokens": 0, "output_tokens": 0, "audio_seconds": Decimal("9.000000")}
    fractional = openai_transcription_usage({"type": "duration", "seconds": 8.470000267028809})
    assert fractional["audio_seconds"] == Decimal("8.470000")


def test_openai_image_usage() -> None:
    meters = openai_image_usage(usage_of("openai_images.json"))
    assert (meters["input_tokens"], meters["output_tokens"]) == (50, 50)


def test_anthropic_splits_cache_writes_by_ttl() -> None:
    assert anthropic_usage(usage_of("anthropic_messages.json")) == {
        "input_tokens": 50,
        "cached_input_tokens": 1800,
        "cache_write_tokens": 1548,
        "cache_write_1h_tokens": 500,
        "output_tokens": 503,
    }


def test_anthropic_without_the_ttl_breakdown_writes_go_to_the_5m_meter() -> None:
    meters = anthropic_usage({"input_tokens": 3, "cache_creation_input_tokens": 20, "output_tokens": 1})
    assert (meters["cache_write_tokens"], meters["cache_write_1h_tokens"]) == (20, 0)


def test_anthropic_web_search_requests_and_batch_tier() -> None:
    usage = {
        "input_tokens": 3,
        "output_tokens": 1,
        "server_tool_use": {"web_search_requests": 2},
        "service_tier": "batch",
    }
    meters = anthropic_usage(usage)
    assert (meters["requests"], meters["service_tier"]) == (2, "batch")


def test_gemini_thoughts_are_billed_as_output() -> None:
    assert gemini_usage(usage_of("gemini_generate.json", "usageMetadata")) == {
        "input_tokens": 250,  # 1250 - 1000 cached
        "cached_input_tokens": 1000,
        "output_tokens": 500,  # 120 candidates + 380 thoughts
        "reasoning_tokens": 380,
        "input_audio_tokens": 0,
    }


def test_gemini_audio_prompt_tokens_move_to_input_audio() -> None:
    usage = {
        "promptTokenCount": 100,
        "candidatesTokenCount": 5,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 30},
            {"modality": "AUDIO", "tokenCount": 70},
        ],
    }
    meters = gemini_usage(usage)
    assert (meters["input_tokens"], meters["input_audio_tokens"]) == (30, 70)


@pytest.mark.parametrize(
    ("normalise", "usage", "message"),
    [
        (openai_chat_usage, {"completion_tokens": 3}, "no 'prompt_tokens'"),
        (openai_chat_usage, {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 5}}, "exceeds"),
        (openai_responses_usage, {"input_tokens": 3}, "no 'output_tokens'"),
        (anthropic_usage, {"input_tokens": -1, "output_tokens": 2}, "negative"),
        (gemini_usage, {"candidatesTokenCount": 2}, "no 'promptTokenCount'"),
        (openai_chat_usage, {"prompt_tokens": "12", "completion_tokens": 1}, "not an integer"),
    ],
)
def test_incomplete_usage_is_an_error_never_zero(normalise: Any, usage: Any, message: str) -> None:
    with pytest.raises(IncompleteUsage, match=message):
        normalise(usage)


@given(
    prompt=st.integers(0, 10**9),
    cached=st.integers(0, 10**9),
    completion=st.integers(0, 10**9),
    reasoning=st.integers(0, 10**9),
)
def test_openai_meters_never_overlap(prompt: int, cached: int, completion: int, reasoning: int) -> None:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    if cached > prompt:
        with pytest.raises(IncompleteUsage):
            openai_chat_usage(usage)
        return
    m = openai_chat_usage(usage)
    assert m["input_tokens"] + m["cached_input_tokens"] == prompt  # every prompt token billed once
    assert m["output_tokens"] == completion
    assert m["reasoning_tokens"] <= m["output_tokens"]


@pytest.mark.parametrize(
    ("method", "host", "path", "route"),
    [
        ("POST", "api.openai.com", "/v1/chat/completions", Route("openai", "chat")),
        ("POST", "127.0.0.1", "/proxy/v1/responses", Route("openai", "responses")),
        ("POST", "api.openai.com", "/v1/completions", Route("openai", "chat")),
        ("POST", "api.openai.com", "/v1/audio/speech", Route("openai", "speech")),
        ("POST", "api.openai.com", "/v1/images/edits", Route("openai", "images")),
        (
            "POST",
            "x.openai.azure.com",
            "/openai/deployments/prod-4o/chat/completions",
            Route("azure", "chat", "prod-4o"),
        ),
        ("POST", "x.openai.azure.com", "/openai/v1/embeddings", Route("azure", "embeddings")),
        ("POST", "api.anthropic.com", "/v1/messages", Route("anthropic", "messages")),
        ("POST", "api.anthropic.com", "/v1/messages/batches", Route("anthropic", "batch_create")),
        (
            "GET",
            "api.anthropic.com",
            "/v1/messages/batches/b1/results",
            Route("anthropic", "batch_results", None, False),
        ),
        ("GET", "api.openai.com", "/v1/files/file-1/content", Route("openai", "file_content", None, False)),
        (
            "POST",
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            Route("google", "gemini", "gemini-2.5-flash"),
        ),
        (
            "POST",
            "us-central1-aiplatform.googleapis.com",
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
            Route("vertex_ai", "gemini", "gemini-2.5-pro"),
        ),
        ("POST", "api.anthropic.com", "/v1/messages/count_tokens", None),
        ("POST", "api.openai.com", "/v1/threads/t1/messages", None),
        ("GET", "api.openai.com", "/v1/models", None),
        ("GET", "api.openai.com", "/v1/files/file-1", None),
    ],
)
def test_routes(method: str, host: str, path: str, route: Route | None) -> None:
    assert route_of(method, host, path) == route


def test_sse_parser_survives_any_chunking() -> None:
    raw = b"".join(sse_events("anthropic_messages_stream.sse")).replace(b"\n", b"\r\n")
    whole = SSEParser().feed(raw)
    assert next(e for e, _ in whole) == "message_start"
    assert len(whole) == 8
    for size in (1, 2, 7, 64):
        parser = SSEParser()
        events = [e for i in range(0, len(raw), size) for e in parser.feed(raw[i : i + size])]
        assert events == whole


def test_sse_parser_ignores_comments_and_flushes_an_unterminated_event() -> None:
    parser = SSEParser()
    assert parser.feed(b': keep-alive\n\ndata: {"a": 1}\n') == []
    assert parser.close() == [(None, b'{"a": 1}')]


def test_gzip_decoding_is_incremental() -> None:
    body = fixture("gemini_generate.json")
    packed = gzip.compress(body)
    decode = decoder_for("gzip")
    assert decode is not None
    assert b"".join(decode(packed[i : i + 5]) for i in range(0, len(packed), 5)) == body
    assert decoder_for("snappy") is None


def test_estimate_is_a_quarter_of_the_characters_rounded_up() -> None:
    assert [estimate_tokens(n) for n in (0, 1, 4, 5, 27)] == [0, 1, 1, 2, 7]
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hi"},
                    {"type": "image_url", "image_url": {"url": "data:xx"}},
                ],
            },
        ],
    }
    assert request_text_chars(body) == len("Be brief.") + len("Hi")
