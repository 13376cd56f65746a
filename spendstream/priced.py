"""Reading `usage.priced`: a PricedBatch's priced events as PricedUsage records, whichever form.

A PricedBatch (v5) holds its events in one of two forms, and a reader takes both:

- `events`: whole PricedUsage records (what meters before v5 wrote, and what a v5 meter falls back
  to for a message too large to carry whole);
- `sources`: each usage.raw message exactly as the emitter wrote it (a UsageBatch or UsageEvent
  single-object message), with one UsagePrice per priced event, by its position in the message.
  The meter decodes each event once and never re-encodes it.

    name, batch = codec.decode(value)          # name == "PricedBatch"
    for priced in priced_events(batch, codec):  # PricedUsage records, in order
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from spendstream.errors import DecodeError
from spendstream.wire import Codec

__all__ = ["priced_events"]

_PRICE_FIELDS = (
    "cost_pico_usd",
    "price_card",
    "pricing_status",
    "card_version",
    "itemised",
    "unpriced_reason",
    "saved_pico_usd",
)


def priced_events(batch: dict[str, Any], codec: Codec) -> Iterator[dict[str, Any]]:
    """The PricedUsage records of a decoded PricedBatch: its `events`, then those of its `sources`.

    Raises DecodeError for a source whose usage message cannot be decoded, is not a UsageBatch or
    UsageEvent, or has no event at a price's index (never written by a meter: a foreign writer).
    """
    yield from batch["events"]
    for source in batch["sources"]:
        name, record = codec.decode(source["usage"])
        if name == "UsageBatch":
            events = record["events"]
        elif name == "UsageEvent":
            events = [record]
        else:
            raise DecodeError(f"a PricedBatch source holds a {name}, not a UsageBatch or UsageEvent")
        priced_at = source["priced_at"]
        for price in source["prices"]:
            index = price["index"]
            if not 0 <= index < len(events):
                raise DecodeError(f"a price for event {index} of a source with {len(events)} events")
            yield {
                "usage": events[index],
                "priced_at": priced_at,
                **{field: price[field] for field in _PRICE_FIELDS},
            }
