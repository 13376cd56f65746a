"""The pricing engine, pinned to published prices (source of each figure in the comment)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.errors import ConfigError
from spendstream.usage import encode_seconds
from stream_processors.pricing import Catalogue, card_from_mapping, parse_instant, pico_to_usd, usd_to_pico

CAT = Catalogue.load(fallback="none")
OPENAI = "https://platform.openai.com/docs/pricing"
ANTHROPIC = "https://docs.anthropic.com/en/docs/about-claude/pricing"
GEMINI = "https://ai.google.dev/gemini-api/docs/pricing"


def event(
    provider: str, model: str, day: str, tier: str = "standard", region: str = "global", **meters: Any
) -> dict[str, Any]:
    return {
        "provider": provider,
        "model": model,
        "event_time": parse_instant(day),
        "service_tier": tier,
        "region": region,
        **meters,
    }


def cost(ev: dict[str, Any]) -> Decimal:
    priced = CAT.price(ev)
    assert priced.status == "priced", priced.reason
    assert priced.cost_pico is not None
    return pico_to_usd(priced.cost_pico)


M = 1_000_000
CASES = [
    # (event, expected USD); each price as published on the page named in the comment
    # OpenAI (OPENAI): gpt-4o alias $5/$15 until 2024-10-02, then $2.50 / cached $1.25 / $10
    (event("openai", "gpt-4o", "2024-09-15", input_tokens=M, output_tokens=M), "20.00"),
    (event("openai", "gpt-4o", "2024-10-02", input_tokens=M, output_tokens=M), "12.50"),
    (event("openai", "gpt-4o", "2024-11-01", cached_input_tokens=M), "1.25"),
    # dated snapshot gpt-4o-2024-05-13 keeps $5/$15 after the alias moved
    (event("openai", "gpt-4o-2024-05-13", "2025-03-01", input_tokens=M, output_tokens=M), "20.00"),
    (event("openai", "gpt-4o-2024-08-06", "2024-11-01", input_tokens=M, output_tokens=M), "12.50"),
    # o3 price cut on 2025-06-10 (community.openai.com/t/o3-is-80-cheaper...): $10/$40 -> $2/$8
    (event("openai", "o3", "2025-06-09", input_tokens=M, output_tokens=M), "50.00"),
    (event("openai", "o3", "2025-06-10", input_tokens=M, output_tokens=M), "10.00"),
    (event("openai", "o3", "2025-06-10", cached_input_tokens=M), "0.50"),
    # batch tier (OPENAI): gpt-4o-mini $0.075/$0.30, gpt-4.1 $1/$4
    (event("openai", "gpt-4o-mini", "2025-01-01", "batch", input_tokens=M, output_tokens=M), "0.375"),
    (event("openai", "gpt-4.1", "2025-05-01", "batch", input_tokens=M, output_tokens=M), "5.00"),
    # priority tier (openai.com/api-priority-processing): gpt-4.1 $3.50 / cached $0.875 / $14
    (
        event(
            "openai",
            "gpt-4.1",
            "2025-09-01",
            "priority",
            input_tokens=M,
            cached_input_tokens=M,
            output_tokens=M,
        ),
        "18.375",
    ),
    # fine-tunes (OPENAI): ft gpt-4o-mini $0.30/$1.20, ft gpt-4o $3.75/$15
    (
        event(
            "openai", "ft:gpt-4o-mini-2024-07-18:acme::a1b2", "2025-01-01", input_tokens=M, output_tokens=M
        ),
        "1.50",
    ),
    (
        event("openai", "ft:gpt-4o-2024-08-06:acme:custom:x9", "2025-01-01", input_tokens=M, output_tokens=M),
        "18.75",
    ),
    # whisper-1 $0.006/minute = $0.0001/s; tts-1 $15 and tts-1-hd $30 per 1M characters
    (event("openai", "whisper-1", "2025-01-01", audio_seconds=encode_seconds("90.5")), "0.00905"),
    (event("openai", "tts-1", "2025-01-01", characters=10_000), "0.15"),
    (event("openai", "tts-1-hd", "2025-01-01", characters=10_000), "0.30"),
    # embeddings: text-embedding-3-small $0.02, -large $0.13 per 1M
    (event("openai", "text-embedding-3-small", "2025-01-01", input_tokens=M), "0.02"),
    (event("openai", "text-embedding-3-large", "2025-01-01", input_tokens=M), "0.13"),
    # dall-e-3 per image: 1024x1024 standard $0.040, hd $0.080, 1792x1024 hd $0.120
    (
        event("openai", "dall-e-3", "2025-01-01", images=3, image_size="1024x1024", image_quality="standard"),
        "0.12",
    ),
    (event("openai", "dall-e-3", "2025-01-01", images=1, image_size="1792x1024", image_quality="hd"), "0.12"),
    # Anthropic (ANTHROPIC): Opus 4.1 cache read $1.50, 5-minute write $18.75, 1-hour write $30
    (event("anthropic", "claude-opus-4-1-20250805", "2025-09-01", cached_input_tokens=100_000), "0.15"),
    (event("anthropic", "claude-opus-4-1-20250805", "2025-09-01", cache_write_tokens=100_000), "1.875"),
    (event("anthropic", "claude-opus-4-1-20250805", "2025-09-01", cache_write_1h_tokens=100_000), "3.00"),
    # Sonnet 4 long context: prompt > 200k -> $6 in / $0.60 read / $7.50 write / $22.50 out; at 200k stays base
    (
        event(
            "anthropic", "claude-sonnet-4-20250514", "2025-09-01", input_tokens=200_000, output_tokens=1000
        ),
        "0.615",
    ),
    (
        event(
            "anthropic", "claude-sonnet-4-20250514", "2025-09-01", input_tokens=200_001, output_tokens=1000
        ),
        "1.2225060",
    ),
    (
        event(
            "anthropic",
            "claude-sonnet-4-20250514",
            "2025-09-01",
            input_tokens=100_000,
            cached_input_tokens=100_001,
        ),
        "0.6600006",
    ),
    # Sonnet 4.5 batch (docs.anthropic.com batch-processing#pricing): $1.50 in, $1.875 write, $7.50 out
    (
        event(
            "anthropic",
            "claude-sonnet-4-5",
            "2025-10-15",
            "batch",
            input_tokens=100_000,
            output_tokens=100_000,
        ),
        "0.90",
    ),
    # Haiku 4.5: cache read $0.10, 5m write $1.25, 1h write $2 per 1M
    (
        event(
            "anthropic",
            "claude-haiku-4-5-20251001",
            "2025-11-01",
            cached_input_tokens=M,
            cache_write_tokens=M,
            cache_write_1h_tokens=M,
        ),
        "3.35",
    ),
    # Gemini (GEMINI): 2.5 Pro <=200k $1.25 / cached $0.125 / $10; >200k $2.50 / $0.25 / $15
    (event("google", "gemini-2.5-pro", "2026-01-01", input_tokens=200_000, output_tokens=1000), "0.26"),
    (event("google", "gemini-2.5-pro", "2026-01-01", input_tokens=200_001, output_tokens=1000), "0.5150025"),
    (event("google", "gemini-2.5-pro", "2026-01-01", cached_input_tokens=100_000), "0.0125"),
    # Gemini 2.5 Pro batch $0.625 / $5; 2.5 Flash audio input $1.00 per 1M
    (
        event("google", "gemini-2.5-pro", "2025-08-01", "batch", input_tokens=100_000, output_tokens=100_000),
        "0.5625",
    ),
    (
        event(
            "google", "gemini-2.5-flash", "2026-01-01", input_tokens=M, input_audio_tokens=M, output_tokens=M
        ),
        "3.80",
    ),
    # Bedrock (aws.amazon.com/bedrock/pricing): regional (geo) profiles cost 1.1x the global one
    (
        event(
            "bedrock",
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "2025-11-01",
            "standard",
            "regional",
            input_tokens=100_000,
            output_tokens=100_000,
        ),
        "1.98",
    ),
    (
        event(
            "bedrock",
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "2025-11-01",
            input_tokens=100_000,
            output_tokens=100_000,
        ),
        "1.80",
    ),
    # ... and a `us.` profile named without a region takes the model's only scope
    (
        event(
            "bedrock",
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "2025-11-01",
            cached_input_tokens=100_000,
        ),
        "0.033",
    ),
    # Azure OpenAI (azure.microsoft.com ... openai-service): gpt-4o-2024-08-06 global $2.50, data zone $2.75 / $1.375 / $11
    (event("azure", "gpt-4o-2024-08-06", "2025-02-01", input_tokens=M), "2.50"),
    (
        event(
            "azure",
            "gpt-4o-2024-08-06",
            "2025-02-01",
            "standard",
            "data_zone",
            input_tokens=M,
            cached_input_tokens=M,
            output_tokens=M,
        ),
        "15.125",
    ),
    # Mistral (mistral.ai/pricing): mistral-large-2411 $2/$6, mistral-embed $0.10
    (event("mistral", "mistral-large-2411", "2025-06-01", input_tokens=M, output_tokens=M), "8.00"),
    (event("mistral", "mistral-embed", "2025-06-01", input_tokens=M), "0.10"),
    # Cohere (cohere.com/pricing): rerank-v3.5 $2 per 1,000 searches; command-r-08-2024 $0.15/$0.60
    (event("cohere", "rerank-v3.5", "2025-06-01", requests=1000), "2.00"),
    (event("cohere", "command-r-08-2024", "2025-06-01", input_tokens=M, output_tokens=M), "0.75"),
]


@pytest.mark.parametrize(
    ("ev", "usd"),
    CASES,
    ids=[f"{e['model']}-{e['service_tier']}-{e['region']}-{i}" for i, (e, _) in enumerate(CASES)],
)
def test_published_prices(ev: dict[str, Any], usd: str) -> None:
    assert cost(ev) == Decimal(usd)


def test_catalogue_coverage() -> None:
    cards = CAT.cards()
    assert len(cards) >= 100
    assert {c.provider for c in cards} == {
        "openai",
        "anthropic",
        "google",
        "bedrock",
        "azure",
        "mistral",
        "cohere",
    }
    assert all(c.source.startswith("https://") and c.checked for c in cards)


def test_itemised_costs_sum_to_the_total_and_name_the_card() -> None:
    priced = CAT.price(
        event(
            "anthropic",
            "claude-sonnet-4-20250514",
            "2025-09-01",
            input_tokens=1000,
            cached_input_tokens=2000,
            cache_write_tokens=3000,
            output_tokens=400,
        )
    )
    assert priced.card is not None
    assert (priced.card.id, priced.card.version) == (
        "anthropic/claude-sonnet-4-20250514@2025-05-22",
        "2025-05-22",
    )
    assert {m: pico_to_usd(v) for m, v in priced.itemised.items()} == {
        "input": Decimal("0.003"),
        "cached_input": Decimal("0.0006"),
        "cache_write": Decimal("0.01125"),
        "output": Decimal("0.006"),
    }
    assert sum(priced.itemised.values()) == priced.cost_pico


def test_float_drift_example_is_exact() -> None:
    # 1,000,000 x (137 tokens x $2.50/M) is 342.5 exactly; floats give 342.499999992979.
    one = CAT.price(event("openai", "gpt-4o", "2025-01-01", input_tokens=137)).cost_pico
    assert one is not None
    assert pico_to_usd(one * 1_000_000) == Decimal("342.5")


@pytest.mark.parametrize(
    ("model", "tier", "region", "reason"),
    [
        ("gpt-9", "standard", "global", "no price card for openai/gpt-9"),
        ("gpt-4o-2024-05-14", "standard", "global", "no price card"),  # no prefix guessing
        ("ft:gpt-9-mini:acme::x", "standard", "global", "no price card"),
        ("gpt-4o", "flex", "global", "no flex price"),
        ("whisper-1", "standard", "global", ""),  # known model, meters it does not bill: priced at 0 meters
    ],
)
def test_unknown_is_never_zero(model: str, tier: str, region: str, reason: str) -> None:
    priced = CAT.price(event("openai", model, "2025-07-01", tier, region, input_tokens=10))
    if not reason:
        assert priced.status == "priced"
        return
    assert (priced.status, priced.cost_pico, priced.card) == ("unpriced", None, None)
    assert reason in priced.reason


def test_price_before_a_model_existed_is_unknown() -> None:
    priced = CAT.price(event("openai", "o3", "2024-01-01", input_tokens=10))
    assert priced.status == "unpriced"
    assert "no price in force at 2024-01-01" in priced.reason


def test_fallback_charges_the_most_expensive_card_so_budgets_move() -> None:
    cat = Catalogue(CAT.cards(), fallback="max")
    priced = cat.price(event("openai", "gpt-9", "2025-07-01", input_tokens=M))
    assert priced.status == "fallback"
    assert priced.card is not None
    assert priced.cost_pico is not None
    assert priced.cost_pico > 0
    assert "gpt-9" in priced.reason
    pinned = Catalogue(CAT.cards(), fallback="openai/gpt-4o@2024-10-02").price(
        event("openai", "gpt-9", "2025-07-01", input_tokens=M)
    )
    assert (priced.status, pinned.cost_pico) == ("fallback", usd_to_pico("2.50"))


def test_a_new_price_closes_the_open_card_and_applies_from_its_date_only() -> None:
    cat = Catalogue(CAT.cards(), fallback="none")
    cat.add(
        card_from_mapping(
            {
                "provider": "openai",
                "models": ["gpt-4o-mini"],
                "effective_from": "2026-12-01T12:00:00Z",
                "source": "https://example.test/price-change",
                "per_million": {"input": "0.10", "output": "0.40"},
            }
        )
    )
    before = cat.price(event("openai", "gpt-4o-mini", "2026-12-01", input_tokens=M))
    after = cat.price(event("openai", "gpt-4o-mini", "2026-12-02", input_tokens=M))
    assert (before.cost_pico, after.cost_pico) == (usd_to_pico("0.15"), usd_to_pico("0.10"))
    assert after.card is not None
    assert after.card.version == "2026-12-01T12:00:00Z"


def test_bad_cards_are_refused_with_the_reason() -> None:
    base = {"provider": "p", "models": ["m"], "effective_from": "2025-01-01", "source": "https://x"}
    with pytest.raises(ConfigError, match="decimal string"):
        card_from_mapping({**base, "per_million": {"input": 2.5}})
    with pytest.raises(ConfigError, match="whole number of pico-USD"):
        card_from_mapping({**base, "per_million": {"input": "0.0000001"}})
    with pytest.raises(ConfigError, match="unknown meters"):
        card_from_mapping({**base, "per_million": {"inptu": "1"}})
    with pytest.raises(ConfigError, match="service_tier"):
        card_from_mapping({**base, "service_tier": "cheap", "per_million": {"input": "1"}})
    with pytest.raises(ConfigError, match="source"):
        card_from_mapping({**base, "source": "", "per_million": {"input": "1"}})
    cat = Catalogue(
        [card_from_mapping({**base, "effective_to": "2025-06-01", "per_million": {"input": "1"}})]
    )
    with pytest.raises(ConfigError, match="overlap"):
        cat.add(
            card_from_mapping(
                {
                    **base,
                    "effective_from": "2025-03-01",
                    "effective_to": "2025-04-01",
                    "per_million": {"input": "2"},
                }
            )
        )


def test_usd_pico_conversions() -> None:
    assert usd_to_pico("0.000000000001") == 1
    assert pico_to_usd(1) == Decimal("1E-12")
    with pytest.raises(ValueError, match="pico-USD"):
        usd_to_pico("0.0000000000001")


counts = st.integers(min_value=0, max_value=150_000)
meters = st.fixed_dictionaries(
    {"input_tokens": counts, "cached_input_tokens": counts, "output_tokens": counts}
)


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(meters, min_size=1, max_size=400),
    model=st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-4.1"]),
)
def test_sum_of_prices_equals_price_of_summed_meters(events: list[dict[str, int]], model: str) -> None:
    """Linear cards are additive to the last pico-dollar: no rounding anywhere."""
    each = sum(CAT.price({**event("openai", model, "2025-07-01"), **m}).cost_pico or 0 for m in events)
    summed = {k: sum(m[k] for m in events) for k in events[0]}
    assert each == CAT.price({**event("openai", model, "2025-07-01"), **summed}).cost_pico


def test_a_million_events_sum_exactly() -> None:
    """The issue's check at full size: 10^6 priced events == the price of their summed meters."""
    import random

    rng = random.Random(1)
    card = CAT.card_for("openai", "gpt-4o-mini", "global", "standard", parse_instant("2025-07-01"))
    total, sums = 0, {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}
    for _ in range(1_000_000):
        m = {
            "input_tokens": rng.randrange(5000),
            "cached_input_tokens": rng.randrange(2000),
            "output_tokens": rng.randrange(800),
        }
        total += card.price(m)[0]
        for k in sums:
            sums[k] += m[k]
    assert total == card.price(sums)[0]
    expected = (
        sums["input_tokens"] * Decimal("0.15")
        + sums["cached_input_tokens"] * Decimal("0.075")
        + sums["output_tokens"] * Decimal("0.60")
    ) / 1_000_000
    assert pico_to_usd(total) == expected


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(min_value=0, max_value=400_000), output=st.integers(min_value=0, max_value=50_000))
def test_long_context_is_a_cliff_on_the_whole_prompt(prompt: int, output: int) -> None:
    got = cost(event("google", "gemini-2.5-pro", "2026-01-01", input_tokens=prompt, output_tokens=output))
    if prompt > 200_000:
        assert got == (prompt * Decimal("2.50") + output * Decimal("15.00")) / 1_000_000
    else:
        assert got == (prompt * Decimal("1.25") + output * Decimal("10.00")) / 1_000_000
