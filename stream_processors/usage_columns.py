"""UsageEvents as columns: what the meter prices a message's events from, without a record each.

Texts are dictionary-encoded (a code per event into the distinct values, in first-seen order), so
what depends on a text (its card, its budget scopes, its validity) is decided once per distinct
value; counts and times are int64 columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from itertools import chain
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np

try:
    from spendstream_native import decode_usage_batch
except ImportError:  # not built (`./dev setup` builds it where cargo is): fastavro decodes alone
    decode_usage_batch = None

from spendstream.usage import COUNT_FIELDS, KEY_TAG, columns_valid
from stream_processors.pricing import audio_micros

__all__ = ["COUNT_COLUMN", "NATIVE", "TEXT_FIELDS", "UsageColumns"]

COUNT_COLUMN = {f: i for i, f in enumerate(COUNT_FIELDS)}  # column of `counts`
# The texts kept as columns; "key" is the value of the KEY_TAG tag (None without one).
TEXT_FIELDS = (
    "project",
    "team",
    "user",
    "provider",
    "model",
    "region",
    "service_tier",
    "usage_source",
    "key",
)
_COUNTS = itemgetter(*COUNT_FIELDS)
_TIME, _EVENT_ID = itemgetter("event_time"), itemgetter("event_id")
_HEADER = 10  # an Avro single-object message's magic and fingerprint
_GETTERS = {f: itemgetter(f) for f in TEXT_FIELDS if f != "key"}
_KEY_OF, _TAGS, _AUDIO = methodcaller("get", KEY_TAG), itemgetter("tags"), itemgetter("audio_seconds")
_NO_AUDIO = frozenset((b"\x00", b""))
Text = tuple[np.ndarray, list[Any]]  # codes, distinct values
NATIVE = decode_usage_batch is not None


def _first_block(value: bytes) -> int:
    """How many events the first block of a UsageBatch message's array holds (an Avro long right
    after the header; 0 if it cannot be read): all of them, as every writer here writes it."""
    shift = z = 0
    for byte in value[_HEADER : _HEADER + 10]:
        z |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return abs((z >> 1) ^ -(z & 1))
        shift += 7
    return 0


def _encoded(values: list[Any]) -> Text:
    code = {v: c for c, v in enumerate(dict.fromkeys(values))}
    return np.fromiter(map(code.__getitem__, values), np.int64, len(values)), list(code)


class UsageColumns:
    """n events: times, counts (COUNT_FIELDS order), audio (micro-seconds), the texts of
    TEXT_FIELDS dictionary-encoded, and event ids; `events` are their records, made only when
    read (`load`) where the columns were decoded without them."""

    def __init__(
        self,
        times: np.ndarray,
        counts: np.ndarray,
        audio: np.ndarray,
        texts: dict[str, Text],
        event_ids: list[str],
        load: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.times, self.counts, self.audio, self.texts = times, counts, audio, texts
        self.event_ids = event_ids
        self._load = load

    def __len__(self) -> int:
        return len(self.times)

    @cached_property
    def events(self) -> list[dict[str, Any]]:
        return self._load()

    @classmethod
    def of_events(cls, events: list[dict[str, Any]]) -> UsageColumns:
        """Columns of decoded UsageEvent records (every field present, as the codec decodes)."""
        n = len(events)
        texts = {f: _encoded(list(map(get, events))) for f, get in _GETTERS.items()}
        texts["key"] = _encoded(list(map(_KEY_OF, map(_TAGS, events))))
        counts = np.array(list(map(_COUNTS, events)), dtype=np.int64).reshape(n, len(COUNT_FIELDS))
        audio = list(map(_AUDIO, events))
        micros = (
            np.zeros(n, dtype=np.int64)
            if _NO_AUDIO.issuperset(audio)
            else np.array(list(map(audio_micros, audio)), dtype=np.int64)
        )
        times = np.fromiter(map(_TIME, events), np.int64, n)
        return cls(times, counts, micros, texts, list(map(_EVENT_ID, events)), lambda: events)

    @classmethod
    def of_message(
        cls, value: bytes, now_us: int, load: Callable[[], list[dict[str, Any]]], least: int = 1
    ) -> UsageColumns | None:
        """The events of a UsageBatch message of the current schema (the caller checks its
        fingerprint) by the native decoder, if it is built, the message has at least `least`
        events (read from its first bytes, before decoding) and every event is valid; None
        otherwise (not built, fewer events, not decodable, or an event to dead-letter: the records
        tell why)."""
        if decode_usage_batch is None or _first_block(value) < least:
            return None
        got = decode_usage_batch(value[_HEADER:])
        if got is None:
            return None
        n, ids, times_le, raw_texts, counts_le, audio_le, tag_stats = got
        times = np.frombuffer(times_le, "<i8")
        counts = np.frombuffer(counts_le, "<i8").reshape(n, len(COUNT_FIELDS))
        audio = np.frombuffer(audio_le, "<i8")
        texts = {
            f: (np.frombuffer(codes, "<u4").astype(np.int64), values)
            for f, (codes, values) in raw_texts.items()
        }
        if not columns_valid(texts, counts, audio, times, ids, tag_stats, now_us):
            return None
        return cls(times, counts, audio, texts, ids, load)

    @classmethod
    def joined(cls, parts: Sequence[UsageColumns]) -> UsageColumns:
        """The events of `parts`, one after the other, each text's codes re-numbered into the
        distinct values of all parts: a Python step per distinct value of each part, and a few
        array operations per field."""
        if len(parts) == 1:
            return parts[0]
        sizes = [len(p) for p in parts]
        texts: dict[str, Text] = {}
        for field in TEXT_FIELDS:
            values = [p.texts[field][1] for p in parts]
            offsets = np.repeat(np.cumsum([0, *map(len, values)])[:-1], sizes)
            shared: dict[Any, int] = {}
            renumber = np.array([shared.setdefault(v, len(shared)) for v in chain.from_iterable(values)])
            codes = np.concatenate([p.texts[field][0] for p in parts]) + offsets
            texts[field] = (renumber[codes], list(shared))
        return cls(
            np.concatenate([p.times for p in parts]),
            np.concatenate([p.counts for p in parts]),
            np.concatenate([p.audio for p in parts]),
            texts,
            list(chain.from_iterable(p.event_ids for p in parts)),
            lambda: list(chain.from_iterable(p.events for p in parts)),
        )

    def rows(self, rows: np.ndarray) -> UsageColumns:
        """The events at `rows` (a subset, in order)."""
        return UsageColumns(
            self.times[rows],
            self.counts[rows],
            self.audio[rows],
            {f: (codes[rows], values) for f, (codes, values) in self.texts.items()},
            [self.event_ids[i] for i in rows.tolist()],
            lambda: [self.events[i] for i in rows.tolist()],
        )
