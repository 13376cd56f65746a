"""Exact pricing, pinned to published prices (sources in prices.toml and below)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.errors import ConfigError, UnknownModel
from stream_processors.pricing import PriceTable, pico_to_usd, usd_to_pico

TABLE = PriceTable.load()


def usage(input: int = 0, cached: int = 0, write: int = 0, output: int = 0) -> dict[str, int]:
    return {
        "input_tokens": input,
        "cached_input_tokens": cached,
        "cache_write_tokens": write,
        "output_tokens": output,
        "reasoning_tokens": 0,
    }


def cost(provider: str, model: str, **meters: int) -> Decimal:
    return pico_to_usd(TABLE.card(provider, model).cost_pico(usage(**meters)))


@pytest.mark.parametrize(
    ("provider", "model", "meters", "usd"),
    [
        # https://openai.com/api/pricing/ gpt-4o: $2.50 in, $1.25 cached in, $10.00 out per 1M
        ("openai", "gpt-4o", {"input": 1_000_000}, "2.50"),
        ("openai", "gpt-4o", {"cached": 1_000_000}, "1.25"),
        ("openai", "gpt-4o", {"output": 1_000_000}, "10.00"),
        ("openai", "gpt-4o-2024-08-06", {"input": 1000, "output": 1000}, "0.0125"),
        # gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out per 1M
        ("openai", "gpt-4o-mini", {"input": 1_000_000, "output": 1_000_000}, "0.75"),
        ("openai", "gpt-4o-mini", {"cached": 1}, "0.000000075"),
        # https://docs.anthropic.com/en/docs/about-claude/pricing Sonnet 4: $3 in, $0.30 cache
        # read, $3.75 5-minute cache write, $15 out; above 200k prompt tokens $6/$0.60/$7.50/$22.50
        ("anthropic", "claude-sonnet-4-20250514", {"input": 100_000}, "0.30"),
        ("anthropic", "claude-sonnet-4-20250514", {"cached": 100_000}, "0.030"),
        ("anthropic", "claude-sonnet-4-20250514", {"write": 100_000}, "0.375"),
        ("anthropic", "claude-sonnet-4-20250514", {"input": 200_000, "output": 1000}, "0.615"),
        ("anthropic", "claude-sonnet-4-20250514", {"input": 200_001, "output": 1000}, "1.2225060"),
        ("anthropic", "claude-sonnet-4-20250514", {"input": 100_000, "cached": 100_001}, "0.6600006"),
        # the cliff counts cache writes too, and 1M cached tokens alone are above it
        ("anthropic", "claude-sonnet-4-20250514", {"cached": 1_000_000}, "0.60"),
        # https://ai.google.dev/gemini-api/docs/pricing Gemini 2.5 Pro: <=200k $1.25 in, $0.125
        # cached, $10 out; >200k $2.50 in, $0.25 cached, $15 out
        ("google", "gemini-2.5-pro", {"input": 200_000, "output": 1_000}, "0.26"),
        ("google", "gemini-2.5-pro", {"input": 200_001, "output": 1_000}, "0.5150025"),
        ("google", "gemini-2.5-pro", {"cached": 100_000}, "0.0125"),
    ],
)
def test_published_prices(provider: str, model: str, meters: dict[str, int], usd: str) -> None:
    assert cost(provider, model, **meters) == Decimal(usd)


def test_float_drift_example_is_exact() -> None:
    # 1,000,000 x (137 tokens x $2.50/M) is 342.5 exactly; floats give 342.499999992979.
    one = TABLE.card("openai", "gpt-4o").cost_pico(usage(input=137))
    assert pico_to_usd(one * 1_000_000) == Decimal("342.5")


def test_unknown_models_are_never_priced_at_zero() -> None:
    with pytest.raises(UnknownModel, match="gpt-9"):
        TABLE.card("openai", "gpt-9")
    # A dated snapshot or a fine-tune that is not listed is unknown, not matched by prefix.
    with pytest.raises(UnknownModel):
        TABLE.card("openai", "gpt-4o-2024-05-13")
    with pytest.raises(UnknownModel):
        TABLE.card("openai", "ft:gpt-4o-mini-2024-07-18:org::abc")
    with pytest.raises(UnknownModel):  # provider matters
        TABLE.card("azure", "gpt-4o")


def test_prices_must_be_exact_decimal_strings() -> None:
    card = '[[card]]\nid="x"\nprovider="p"\nmodels=["m"]\nsource="s"\nper_million={input=%s}\n'
    with pytest.raises(ConfigError, match="decimal string"):
        PriceTable.from_toml(card % "2.5")
    with pytest.raises(ConfigError, match="not exact"):
        PriceTable.from_toml(card % '"0.0000001"')
    with pytest.raises(ConfigError, match="unknown meters"):
        PriceTable.from_toml(card.replace("input=", "inptu=") % '"1"')
    with pytest.raises(ConfigError, match="two cards"):
        PriceTable.from_toml((card % '"1"') * 2)


def test_usd_pico_conversions() -> None:
    assert usd_to_pico("0.000000000001") == 1
    assert usd_to_pico(Decimal("2.50")) == 2_500_000_000_000
    assert pico_to_usd(1) == Decimal("1E-12")
    with pytest.raises(ValueError, match="pico-USD"):
        usd_to_pico("0.0000000000001")


meter_counts = st.integers(min_value=0, max_value=150_000)
events = st.lists(st.tuples(meter_counts, meter_counts, meter_counts, meter_counts), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(events=events, model=st.sampled_from(["gpt-4o", "gpt-4o-mini"]))
def test_sum_of_prices_equals_price_of_summed_meters(events: list[tuple[int, ...]], model: str) -> None:
    """Linear cards: pricing is additive to the last pico-dollar (no rounding anywhere)."""
    card = TABLE.card("openai", model)
    each = sum(card.cost_pico(usage(*e)) for e in events)
    total = card.cost_pico(usage(*(sum(col) for col in zip(*events, strict=True))))
    assert each == total
    # and equal to the decimal arithmetic on the published per-million strings
    rates = {
        "input": Decimal("2.50"),
        "cached": Decimal("1.25"),
        "write": Decimal("2.50"),
        "output": Decimal("10.00"),
    }
    if model == "gpt-4o-mini":
        rates = {
            "input": Decimal("0.15"),
            "cached": Decimal("0.075"),
            "write": Decimal("0.15"),
            "output": Decimal("0.60"),
        }
    sums = [sum(col) for col in zip(*events, strict=True)]
    expected = sum(n * r for n, r in zip(sums, rates.values(), strict=True)) / 1_000_000
    assert pico_to_usd(each) == expected


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(min_value=0, max_value=400_000), output=st.integers(min_value=0, max_value=50_000))
def test_long_context_is_a_cliff_on_the_whole_prompt(prompt: int, output: int) -> None:
    got = cost("google", "gemini-2.5-pro", input=prompt, output=output)
    if prompt > 200_000:
        assert got == (prompt * Decimal("2.50") + output * Decimal("15.00")) / 1_000_000
    else:
        assert got == (prompt * Decimal("1.25") + output * Decimal("10.00")) / 1_000_000
