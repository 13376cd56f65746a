"""Meter a call that does not go through httpx (other SDKs, local models, gRPC): the caller passes
the usage it got back, and it goes through the same normalisation, validation and emitter as the
instrumented transports.

    meter_call(emitter, project="checkout", provider="anthropic", model="claude-sonnet-4-5",
               usage=message.usage)                       # a provider usage object, normalised
    meter_call(emitter, project="checkout", provider="openai", model="gpt-4o",
               input_tokens=1200, cached_input_tokens=300, output_tokens=250)   # meters directly

    @metered(emitter, project="checkout", provider="openai")    # usage/model read from the result
    def answer(question: str) -> ChatCompletion: ...

`meter_call` raises `InvalidUsage` at the call site, like `emit()`. The `metered` decorator never
raises into the decorated call (its result was paid for): a failure is logged once per error type
and counted in `wrapper.metering`; a result without usage is emitted as `usage_source="missing"`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

from producers.instrument._transport import _emit_function
from producers.instrument._usage import (
    IncompleteUsage,
    anthropic_usage,
    as_mapping,
    gemini_usage,
    openai_transcription_usage,
    openai_usage,
)
from spendstream.errors import InvalidUsage

__all__ = ["MeteringStats", "meter_call", "metered", "normalise_usage"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_NORMALISERS: Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "openai": openai_usage,
    "azure": openai_usage,
    "anthropic": anthropic_usage,
    "google": gemini_usage,
    "vertex_ai": gemini_usage,
}


def normalise_usage(provider: str, usage: Any) -> dict[str, Any]:
    """UsageEvent meters from a provider usage object (dict or SDK object); InvalidUsage if it can't.

    OpenAI-shaped usage (prompt_tokens / input_tokens, or a transcription's `seconds`) for openai
    and azure, Messages usage for anthropic, usageMetadata for google / vertex_ai. For any other
    provider the object must already carry UsageEvent meter names (input_tokens, output_tokens, ...).
    """
    try:
        mapping = as_mapping(usage)
        if provider in ("openai", "azure") and ("seconds" in mapping or mapping.get("type") == "tokens"):
            return openai_transcription_usage(mapping)
        normalise = _NORMALISERS.get(provider)
        if normalise is None:
            return dict(mapping)
        return normalise(mapping)
    except IncompleteUsage as exc:
        raise InvalidUsage(f"{provider} usage: {exc}") from None


def meter_call(
    emitter: Any,
    *,
    project: str,
    provider: str,
    model: str,
    usage: Any = None,
    team: str | None = None,
    user: str | None = None,
    tags: Mapping[str, str] | None = None,
    **meters: Any,
) -> str:
    """Emit one UsageEvent for a call made outside httpx; returns its event_id.

    `usage`: the provider's usage object as returned (normalised per provider), or None and the
    meters as keyword arguments (input_tokens=, output_tokens=, ...). Keyword meters also override
    normalised ones (e.g. service_tier="batch"). `emitter`: an Emitter (its non-blocking
    `emit_nowait` is used) or a SyncEmitter.
    """
    fields = normalise_usage(provider, usage) if usage is not None else {}
    fields.update(meters)
    emit = _emit_function(emitter, prefer_nowait=True)
    event_id = emit(
        project=project, provider=provider, model=model, team=team, user=user, tags=tags, **fields
    )
    return str(event_id)


@dataclass
class MeteringStats:
    metered: int = 0
    missing: int = 0  # results without usage, emitted as usage_source="missing"
    lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def _default_usage(result: Any) -> Any:
    if isinstance(result, Mapping):
        return result.get("usage") or result.get("usageMetadata") or result.get("usage_metadata")
    for name in ("usage", "usage_metadata"):
        value = getattr(result, name, None)
        if value is not None:
            return value
    return None


def _default_model(result: Any) -> Any:
    if isinstance(result, Mapping):
        return result.get("model") or result.get("modelVersion")
    return getattr(result, "model", None) or getattr(result, "model_version", None)


def metered(
    emitter: Any,
    *,
    project: str,
    provider: str,
    model: str | Callable[[Any], str] | None = None,
    usage: Callable[[Any], Any] | None = None,
    team: str | None = None,
    user: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a sync or async function whose result carries usage; meter each successful call.

    `usage(result)` / `model(result)` extract them (default: the result's `usage` / `model` attribute
    or key). A call that raises emits nothing. The wrapper has a `metering` attribute (MeteringStats).
    """
    read_usage = usage or _default_usage

    def emit_for(result: Any, stats: MeteringStats) -> None:
        try:
            name = model(result) if callable(model) else (model or _default_model(result))
            if not isinstance(name, str) or not name:
                raise InvalidUsage("no model: pass model= to @metered or return a result with .model")
            raw = read_usage(result)
            if raw is None:
                meter_call(
                    emitter,
                    project=project,
                    provider=provider,
                    model=name,
                    team=team,
                    user=user,
                    tags={**(tags or {}), "usage_missing": "not_in_result"},
                    input_tokens=0,
                    output_tokens=0,
                    usage_source="missing",
                )
                stats.missing += 1
            else:
                meter_call(
                    emitter,
                    project=project,
                    provider=provider,
                    model=name,
                    usage=raw,
                    team=team,
                    user=user,
                    tags=tags,
                )
            stats.metered += 1
        except Exception as exc:
            key = type(exc).__name__
            stats.lost += 1
            stats.errors[key] = stats.errors.get(key, 0) + 1
            if stats.errors[key] == 1:
                log.error(
                    "metering a %s call failed (%s: %s); the call's result is unaffected", provider, key, exc
                )

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        stats = MeteringStats()
        if inspect.iscoroutinefunction(fn):
            afn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def awrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                result = await afn(*args, **kwargs)
                emit_for(result, stats)
                return result

            awrapper.metering = stats  # type: ignore[attr-defined]
            return cast(Callable[P, R], awrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            result = fn(*args, **kwargs)
            emit_for(result, stats)
            return result

        wrapper.metering = stats  # type: ignore[attr-defined]
        return wrapper

    return decorate
