"""The errors spendstream raises, as one small tree. Every one is importable from `producers` too.

SpendstreamError                 base of everything below
├── ConfigError                  a setting is missing or wrong; the message says which and how to fix it
├── KafkaLocalError              the local broker could not be fetched, formatted, started or stopped
├── InvalidUsage (ValueError)    an event failed validation at the call site (negative count, no model, ...)
│   └── IncompleteUsage          a provider's usage object lacks a count the meter needs (instrumentation)
├── BudgetExceeded               a call was refused: a scope it counts against is blocked (scope, reason,
│                                spend, limit, window end)
├── EmitterClosed                emit() after close()
├── BufferFull                   the emitter's memory buffer and spool stayed full for the whole timeout
├── DeliveryTimeout              flush()/close() ran out of time with events not acknowledged by Kafka
├── DecodeError                  bytes that are not a known Avro single-object message
├── UnknownModel                 no price for this provider/model (never priced at zero)
└── QueryError                   a SQL query was refused (not read-only) or failed
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

__all__ = [
    "BudgetExceeded",
    "BufferFull",
    "ConfigError",
    "DecodeError",
    "DeliveryTimeout",
    "EmitterClosed",
    "IncompleteUsage",
    "InvalidUsage",
    "KafkaLocalError",
    "QueryError",
    "SpendstreamError",
    "UnknownModel",
]


class SpendstreamError(Exception):
    """Base class of every error spendstream raises on purpose."""


class ConfigError(SpendstreamError):
    """A setting is missing or invalid."""


class KafkaLocalError(SpendstreamError):
    """The project-managed local Kafka broker failed to fetch, start or stop."""


class InvalidUsage(SpendstreamError, ValueError):
    """A usage event is invalid; raised at the call site by the emitters."""


class IncompleteUsage(InvalidUsage):
    """A provider's usage object lacks a required count (or has a nonsensical one)."""


class EmitterClosed(SpendstreamError):
    """The emitter was used after close()."""


class BufferFull(SpendstreamError):
    """The emitter's memory buffer (and spool, if any) stayed full: Kafka is not keeping up or is
    unreachable. The refused event was not accepted; nothing accepted before it is lost."""


class DeliveryTimeout(SpendstreamError):
    """`flush()` or `close()` ran out of time with accepted events not yet acknowledged by Kafka.

    From flush() the events are kept and still being sent. From close() they were written to the
    spool if the emitter has one; otherwise they are dropped, and this error is the only way an
    accepted event is ever lost. `undelivered` is how many events it concerns.
    """

    def __init__(self, message: str, undelivered: int) -> None:
        self.undelivered = undelivered
        super().__init__(message)


class DecodeError(SpendstreamError):
    """Bytes that are not an Avro single-object message of a known schema."""


class UnknownModel(SpendstreamError):
    """No price is known for this provider and model (at this time, tier and scope)."""

    def __init__(self, provider: str, model: str, reason: str = "") -> None:
        self.provider = provider
        self.model = model
        self.reason = reason or f"no price card for {provider}/{model}"
        super().__init__(
            f"{self.reason} (provider={provider!r} model={model!r}); it is never priced at zero: "
            "add a card with `spendstream prices set` or `spendstream prices import`"
        )


class BudgetExceeded(SpendstreamError):
    """A call was refused because a budget scope it counts against is blocked."""

    def __init__(
        self, scope: str, reason: str, spend_usd: Decimal, limit_usd: Decimal, window_end: datetime | None
    ) -> None:
        self.scope = scope
        self.reason = reason
        self.spend_usd = spend_usd
        self.limit_usd = limit_usd
        self.window_end = window_end
        until = f" until {window_end:%Y-%m-%d %H:%M} UTC" if window_end else ""
        super().__init__(f"{scope} is blocked ({reason}): spend ${spend_usd} of ${limit_usd}{until}")

    def detail(self) -> dict[str, str | None]:
        """The refusal as JSON fields (what the gateway and the transports put in their 429 body)."""
        return {
            "scope": self.scope,
            "reason": self.reason,
            "window_end": self.window_end.isoformat() if self.window_end else None,
            "spend_usd": str(self.spend_usd),
            "limit_usd": str(self.limit_usd),
        }

    def refusal_headers(self) -> dict[str, str]:
        """`x-spendstream-blocked`, and `retry-after` (whole seconds, at least 1) until the window ends."""
        headers = {"x-spendstream-blocked": self.scope}
        if self.window_end is not None:
            seconds = (self.window_end - datetime.now(UTC)).total_seconds()
            headers["retry-after"] = str(max(int(seconds) + 1, 1))
        return headers


class QueryError(SpendstreamError):
    """A SQL query was refused or failed."""
