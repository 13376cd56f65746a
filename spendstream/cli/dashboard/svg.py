"""Charts drawn on the server as inline SVG: nothing to download, works offline, scales with the
window (a `viewBox`, width 100%). Money is only turned into float for geometry; every number a
person reads is formatted from the exact Decimal."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from html import escape

__all__ = ["COLOURS", "budget_bar", "money", "stacked_bars"]

# Okabe-Ito and friends: distinguishable, also for colour-blind readers.
COLOURS = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#6a3d9a",
    "#999999",
)
_CENT = Decimal("0.01")


def money(usd: Decimal) -> str:
    """$1,234.57 (to the cent, half to even); an amount below a cent shows its own digits ($0.000042)."""
    cents = usd.quantize(_CENT, rounding=ROUND_HALF_EVEN)
    if cents == 0 and usd != 0:
        text = f"{usd.normalize():f}"
        return ("-$" if usd < 0 else "$") + text.lstrip("-")
    return ("-$" if cents < 0 else "$") + f"{abs(cents):,}"


def _nice_ceiling(value: float) -> float:
    """The axis top: the first of 1, 2, 2.5, 5, 10 x a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    exponent = 10.0 ** math.floor(math.log10(value))
    return next(step * exponent for step in (1, 2, 2.5, 5, 10) if step * exponent >= value)


def stacked_bars(buckets: list[datetime], values: dict[str, list[Decimal]], hourly: bool) -> str:
    """One bar per bucket, one coloured segment per group (legend below); each segment's tooltip
    has its exact amount."""
    width, height, left, bottom, top = 760, 260, 70, 28, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    n = max(len(buckets), 1)
    totals = [sum((v[i] for v in values.values()), Decimal(0)) for i in range(len(buckets))]
    ceiling = _nice_ceiling(float(max(totals, default=Decimal(0))))
    slot = plot_w / n
    bar = max(slot * 0.75, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="spend over time" '
        'preserveAspectRatio="xMidYMid meet">'
    ]
    for k in range(5):  # grid lines and money labels
        y = top + plot_h - plot_h * k / 4
        label = money(Decimal(str(ceiling)) * k / 4)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{label}</text>')
    every = max(1, n // 8)
    for i, moment in enumerate(buckets):
        x = left + i * slot + (slot - bar) / 2
        y = top + plot_h
        for g, (group, series) in enumerate(values.items()):
            usd = series[i]
            if usd <= 0:
                continue
            h = plot_h * float(usd) / ceiling
            y -= h
            colour = COLOURS[g % len(COLOURS)]
            when = f"{moment:%Y-%m-%d %H:00}" if hourly else f"{moment:%Y-%m-%d}"
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{max(h, 0.5):.1f}" fill="{colour}">'
                f"<title>{escape(group)} {when}: {money(usd)} (${usd:f})</title></rect>"
            )
        if i % every == 0:
            tick = f"{moment:%H:00}" if hourly else f"{moment:%m-%d}"
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">{tick}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{COLOURS[g % len(COLOURS)]}"></i>{escape(group)}</span>'
        for g, group in enumerate(values)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def budget_bar(spend: Decimal, limit: Decimal, state: str, marks: list[int]) -> str:
    """Spend against the limit, with a tick at each warn level and at 100%; past the limit the bar
    runs on (the scale grows to the spend) and the limit tick shows where it was crossed."""
    if limit <= 0:
        return ""
    scale = max(limit, spend)
    fill = float(spend / scale) * 100
    ticks = "".join(
        f'<line x1="{float(limit * p / 100 / scale) * 100:.2f}" x2="{float(limit * p / 100 / scale) * 100:.2f}" '
        f'y1="0" y2="14" class="mark{" limit" if p == 100 else ""}"><title>{p}%</title></line>'
        for p in sorted({*marks, 100})
    )
    return (
        f'<svg class="bar" viewBox="0 0 100 14" preserveAspectRatio="none" role="img" '
        f'aria-label="{fill:.0f}% of the limit">'
        f'<rect x="0" y="2" width="100" height="10" class="track"/>'
        f'<rect x="0" y="2" width="{fill:.2f}" height="10" class="fill {escape(state)}"/>{ticks}</svg>'
    )
