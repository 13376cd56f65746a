"""The gateway's /metrics (Prometheus text format): requests by route and status, upstream and
added latency, cache hits and savings, limited and refused requests, metering losses."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["GatewayMetrics", "Histogram"]

# seconds; added latency lives in the sub-millisecond buckets, upstream latency in the upper ones
_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, cumulative = [], 0
        for bound, count in zip((*_BUCKETS, "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.n}"]
        return out


@dataclass
class GatewayMetrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route, status)
    refused: Counter[str] = field(default_factory=Counter)  # reason: unauthenticated, tier, budget, ...
    limited: Counter[str] = field(default_factory=Counter)  # requests | tokens
    cache: Counter[str] = field(default_factory=Counter)  # hit | miss | stored | bypass
    cache_saved_calls: int = 0
    metered: Counter[str] = field(default_factory=Counter)  # usage_source -> events emitted
    metering_lost: Counter[str] = field(default_factory=Counter)  # why an event could not be emitted
    upstream_errors: Counter[str] = field(default_factory=Counter)  # connect | timeout | cut
    upstream_seconds: dict[str, Histogram] = field(default_factory=dict)  # by family
    added_seconds: Histogram = field(default_factory=Histogram)
    first_byte_added_seconds: Histogram = field(default_factory=Histogram)

    def upstream(self, family: str) -> Histogram:
        h = self.upstream_seconds.get(family)
        if h is None:
            h = self.upstream_seconds[family] = Histogram()
        return h

    def text(self, extra: dict[str, int] | None = None) -> str:
        lines = ["# TYPE spendstream_gateway_requests_total counter"]
        lines += [
            f'spendstream_gateway_requests_total{{route="{route}",status="{status}"}} {n}'
            for (route, status), n in sorted(self.requests.items())
        ]
        for metric, counter, label in (
            ("spendstream_gateway_refused_total", self.refused, "reason"),
            ("spendstream_gateway_rate_limited_total", self.limited, "limit"),
            ("spendstream_gateway_cache_total", self.cache, "result"),
            ("spendstream_gateway_metered_events_total", self.metered, "usage_source"),
            ("spendstream_gateway_metering_lost_total", self.metering_lost, "reason"),
            ("spendstream_gateway_upstream_errors_total", self.upstream_errors, "kind"),
        ):
            lines.append(f"# TYPE {metric} counter")
            lines += [f'{metric}{{{label}="{k}"}} {n}' for k, n in sorted(counter.items())]
        lines.append("# TYPE spendstream_gateway_upstream_seconds histogram")
        for family, h in sorted(self.upstream_seconds.items()):
            lines += h.lines("spendstream_gateway_upstream_seconds", f'provider="{family}"')
        lines.append("# TYPE spendstream_gateway_added_seconds histogram")
        lines += self.added_seconds.lines("spendstream_gateway_added_seconds")
        lines.append("# TYPE spendstream_gateway_first_byte_added_seconds histogram")
        lines += self.first_byte_added_seconds.lines("spendstream_gateway_first_byte_added_seconds")
        for name, value in sorted((extra or {}).items()):
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
