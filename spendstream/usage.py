"""The rules every UsageEvent must satisfy, shared by the emitters (raise at the call site), the
meter (dead-letter with the reason) and `spendstream price` (refuse with the reason).

Every meter defaults to 0, but an event must say what was used: one whose provider reported the
usage (`usage_source="reported"`, or `"cache"`: a response replayed from the gateway's cache, with
the counts of the call it replays) needs at least one non-zero meter, so a caller that forgot its
counts is refused instead of stored as a free call. A call whose usage is unknown is sent with
`usage_source="missing"` (or `"estimated"`): its counts are a lower bound and may all be 0.

Every meter has a maximum per event, far above any real call (the longest context windows are a few
million tokens), so a corrupt or hostile value is refused at the door instead of overflowing the
64-bit money fields downstream; see docs/event-format.md for the table.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Mapping
from decimal import Decimal
from itertools import chain
from operator import itemgetter, le, or_
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the emitters' install has no numpy: columns_valid only calls arrays' methods
    import numpy as np

__all__ = [
    "COUNT_FIELDS",
    "KEY_TAG",
    "MAX_AUDIO_SECONDS",
    "MAX_COUNT",
    "MAX_EVENT_PICO",
    "MAX_FUTURE_US",
    "MAX_TAGS",
    "MAX_TEXT",
    "METERS",
    "MIN_EVENT_TIME_US",
    "SERVICE_TIERS",
    "USAGE_SOURCES",
    "DecodedUsageCheck",
    "columns_valid",
    "encode_seconds",
    "priced_problem",
    "scopes_for_event",
    "usage_problem",
]

COUNT_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "characters",
    "images",
    "requests",
)
# The billed meters, in the order the "no usage" error lists them (reasoning_tokens is a share of
# output_tokens, not a meter of its own).
METERS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "audio_seconds",
    "characters",
    "images",
    "requests",
)
_NO_USAGE = (
    f"no usage: set at least one of {', '.join(METERS)} (every meter defaults to 0); "
    'a call whose usage is unknown is sent with usage_source="missing"'
)
_OTHER_COUNTS = tuple(m for m in METERS if m not in ("input_tokens", "output_tokens", "audio_seconds"))
# The most one event may report of each meter. A real call is far below: a 2M-token context, a
# 4,096-character TTS input, ten images. Beyond it the event is refused, never priced.
MAX_COUNT = {
    **dict.fromkeys(COUNT_FIELDS, 1_000_000_000),
    "images": 100_000,
    "requests": 1_000_000,
}
MAX_AUDIO_SECONDS = 1_000_000  # about 11.5 days of audio in one call
MAX_TEXT = 256  # characters of project, team, user, service, provider, model, image size/quality, tags
MAX_TAGS = 64
MIN_EVENT_TIME_US = 1_420_070_400_000_000  # 2015-01-01T00:00Z: earlier is a unit error (seconds? ms?)
MAX_FUTURE_US = 86_400_000_000  # an event time more than a day ahead of the meter's clock is refused
# One event's cost at most: 1,000,000 USD. The meters' maxima keep a real price card far below; a
# card priced by mistake at millions per token is refused, not stored.
MAX_EVENT_PICO = 10**18
_MAX_AUDIO_MICROS = MAX_AUDIO_SECONDS * 1_000_000
_PRICING_STATUSES = ("priced", "fallback", "unpriced")
_COUNT_MAX = tuple(MAX_COUNT.items())
_OPTIONAL_TEXT = ("team", "user", "image_size", "image_quality")
SERVICE_TIERS = ("standard", "batch", "flex", "priority")
# cache: served from the gateway's response cache; the counts are those of the call it replays,
# priced at $0 (what it would have cost is recorded as saved).
USAGE_SOURCES = ("reported", "estimated", "missing", "cache")
# The tag naming the internal gateway key a call was made with: its budget scope is `key:<id>`.
KEY_TAG = "spendstream.key"
_REQUIRED_TEXT = ("project", "service", "provider", "model")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


def encode_seconds(seconds: Decimal | str | int) -> bytes:
    """Seconds as the Avro decimal(18, 6) of UsageEvent.audio_seconds (exact; floats refused)."""
    if isinstance(seconds, float):
        raise TypeError("audio_seconds must be exact: pass a Decimal, str or int, not a float")
    try:
        micros = Decimal(seconds).scaleb(6)
    except (ArithmeticError, TypeError, ValueError):
        raise ValueError(f"audio_seconds must be a decimal number of seconds, got {seconds!r}") from None
    if not micros.is_finite():
        raise ValueError(f"audio_seconds must be a finite number of seconds, got {seconds!r}")
    if abs(micros) >= 10**18:
        raise ValueError(f"audio_seconds {seconds} does not fit the event's decimal(18, 6) seconds")
    if micros != micros.to_integral_value():
        raise ValueError(f"audio_seconds {seconds} has more than 6 decimals")
    value = int(micros)
    return value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)


def usage_problem(
    event: dict[str, Any], *, check_identity: bool = True, now_us: int | None = None
) -> str | None:
    """Why `event` (a UsageEvent record) is invalid, or None if it is valid.

    A meter left out counts 0; a reported event needs one that is not (see the module docstring).
    `check_identity=False` skips event_id and event_time, for a caller that generated them.
    `now_us` is the clock event times are checked against (default: this machine's).
    """
    get = event.get
    for field in _REQUIRED_TEXT:
        value = get(field)
        if type(value) is not str or not value or value.isspace():
            return f"{field} is missing or empty"
        if len(value) > MAX_TEXT:
            return f"{field} must be a string of at most {MAX_TEXT} characters"
    for field in _OPTIONAL_TEXT:
        value = get(field)
        if value is not None and (type(value) is not str or len(value) > MAX_TEXT):
            return f"{field} must be a string of at most {MAX_TEXT} characters"
    tags = get("tags")
    if tags:
        if len(tags) > MAX_TAGS:
            return f"{len(tags)} tags: at most {MAX_TAGS} per event"
        for k, v in tags.items():
            if type(k) is not str or type(v) is not str or len(k) > MAX_TEXT or len(v) > MAX_TEXT:
                return (
                    f"tag {str(k)[:40]!r}: keys and values must be strings of at most {MAX_TEXT} characters"
                )
    provider = event["provider"]
    if not provider.islower() and provider != provider.lower():
        return f"provider {provider!r} must be lowercase (e.g. {provider.lower()!r})"
    for field, top in _COUNT_MAX:
        value = get(field, 0)
        if type(value) is not int or not 0 <= value <= top:  # the common case: one test per meter
            if type(value) is not int:
                return f"{field} must be an integer count, got {value!r}"
            if value < 0:
                return f"{field} is negative ({value})"
            return f"{field} {value} is above the maximum of {top:,} per event"
    output = get("output_tokens", 0)
    if get("reasoning_tokens", 0) > output:
        return (
            f"reasoning_tokens ({event['reasoning_tokens']}) exceeds output_tokens "
            f"({output}): output_tokens must include the reasoning share"
        )
    audio = event.get("audio_seconds", b"\x00")
    if isinstance(audio, str):
        audio = audio.encode("latin-1")
    if isinstance(audio, bytes) and audio:
        if audio[0] & 0x80:
            return "audio_seconds is negative"
        if len(audio) > 8 or int.from_bytes(audio, "big") > _MAX_AUDIO_MICROS:
            return f"audio_seconds is above the maximum of {MAX_AUDIO_SECONDS:,} per event"
    tier = event.get("service_tier", "standard")
    if tier not in SERVICE_TIERS:
        return f"service_tier {tier!r} is not one of {', '.join(SERVICE_TIERS)}"
    source = event.get("usage_source", "reported")
    if source not in USAGE_SOURCES:
        return f"usage_source {source!r} is not one of {', '.join(USAGE_SOURCES)}"
    if (  # the common case stops at the first test: an event with input or output tokens
        not (output or get("input_tokens", 0))
        and source in ("reported", "cache")
        and not any(get(m, 0) for m in _OTHER_COUNTS)
        and not (isinstance(audio, bytes) and any(audio))
    ):
        return _NO_USAGE
    if not check_identity:
        return None
    if not isinstance(event.get("event_id"), str) or not _UUID.fullmatch(event["event_id"]):
        return f"event_id {event.get('event_id')!r} is not a UUID"
    at = event.get("event_time")
    if type(at) is not int or at <= 0:
        return f"event_time {at!r} is not a positive epoch-microseconds value"
    if at < MIN_EVENT_TIME_US:
        return f"event_time {at} is before 2015: event times are microseconds since the epoch (UTC)"
    now = time.time_ns() // 1_000 if now_us is None else now_us
    if at > now + MAX_FUTURE_US:
        return f"event_time {at} is more than a day in the future (microseconds since the epoch, UTC)"
    return None


# The texts DecodedUsageCheck remembers, by rule: required (non-empty), optional (may be None).
_REQUIRED_OF = itemgetter("project", "service", "model")
_OPTIONAL_OF = itemgetter(*_OPTIONAL_TEXT)
# The counts with the same maximum (1,000,000,000), and the two with their own.
_TOKENS_MAX = MAX_COUNT["input_tokens"]
_TOKENS_OF = itemgetter(*(f for f in COUNT_FIELDS if MAX_COUNT[f] == _TOKENS_MAX))
_IMAGES_MAX, _REQUESTS_MAX = MAX_COUNT["images"], MAX_COUNT["requests"]
assert {f for f in COUNT_FIELDS if MAX_COUNT[f] != _TOKENS_MAX} == {"images", "requests"}
_NO_AUDIO = (b"\x00", b"")  # audio_seconds 0, as an emitter writes it, and as empty bytes
MAX_REMEMBERED_TEXTS = 65_536
# For whole messages, field by field: a getter per field, and event ids each followed by "\n".
_FIELD = {f: itemgetter(f) for f in (*_REQUIRED_TEXT, *_OPTIONAL_TEXT, *COUNT_FIELDS)}
_FIELD |= {
    f: itemgetter(f)
    for f in ("service_tier", "usage_source", "audio_seconds", "event_time", "event_id", "tags")
}
_COUNT_COLUMNS = tuple((_FIELD[f], top) for f, top in _COUNT_MAX)
_SERVICE_TIERS, _USAGE_SOURCES, _NO_AUDIO_SET = (
    frozenset(SERVICE_TIERS),
    frozenset(USAGE_SOURCES),
    frozenset(_NO_AUDIO),
)
_UUID_LINES = re.compile(rf"(?:{_UUID.pattern}\n)*")


class DecodedUsageCheck:
    """`usage_problem` for UsageEvent records as the codec decodes them, in a fraction of its time.

    A decoded record has every field, each of its schema's type (str, int, a map of str, bytes),
    so what is left to check is values. The texts of a stream repeat (projects, services, models,
    teams, users): each text found valid in its role (required, provider, optional) is remembered
    (at most MAX_REMEMBERED_TEXTS, forgotten all at once beyond), and counts, times, tags and ids
    are checked with a comparison or two each. An event failing any of those, or with something
    this fast path leaves out (a text not seen yet, audio, no tokens), is checked by
    `usage_problem` itself: the answer, and its reason, is always `usage_problem(event, now_us=now_us)`.
    """

    def __init__(self) -> None:
        self._required: set[str] = set()  # valid as project, service or model
        self._providers: set[str] = set()
        self._optional: set[str | None] = set()  # valid as team, user, image size or quality

    def all_valid(self, events: list[dict[str, Any]], now_us: int) -> bool:
        """True if `problem` is None for every event of `events` (False: check them one by one).
        Checked field by field, each field of every event in one pass of C (no Python per event)."""
        try:
            return self._all_valid(events, now_us)
        except Exception:  # a value of the wrong type, say: `problem` tells which event
            return False

    def _all_valid(self, events: list[dict[str, Any]], now_us: int) -> bool:
        field = _FIELD
        tags = list(map(field["tags"], events))
        times = list(map(field["event_time"], events))
        ids = "\n".join(map(field["event_id"], events)) + "\n"
        return bool(
            events
            and all(self._required.issuperset(map(field[f], events)) for f in ("project", "service", "model"))
            and self._providers.issuperset(map(field["provider"], events))
            and all(self._optional.issuperset(map(field[f], events)) for f in _OPTIONAL_TEXT)
            and _SERVICE_TIERS.issuperset(map(field["service_tier"], events))
            and _USAGE_SOURCES.issuperset(map(field["usage_source"], events))
            and all(
                min(map(get, events)) >= 0 and max(map(get, events)) <= top for get, top in _COUNT_COLUMNS
            )
            and all(map(le, map(field["reasoning_tokens"], events), map(field["output_tokens"], events)))
            and all(map(or_, map(field["output_tokens"], events), map(field["input_tokens"], events)))
            and _NO_AUDIO_SET.issuperset(map(field["audio_seconds"], events))
            and min(times) >= MIN_EVENT_TIME_US
            and max(times) <= now_us + MAX_FUTURE_US
            and max(map(len, tags)) <= MAX_TAGS
            and max(map(len, chain.from_iterable(tags)), default=0) <= MAX_TEXT
            and max(map(len, chain.from_iterable(map(dict.values, tags))), default=0) <= MAX_TEXT
            and ids.count("\n") == len(events)
            and _UUID_LINES.fullmatch(ids)
        )

    def problem(self, event: dict[str, Any], now_us: int) -> str | None:
        """Why the decoded `event` is invalid, or None (as `usage_problem(event, now_us=now_us)`)."""
        tokens = _TOKENS_OF(event)
        tags = event["tags"]
        if (
            self._required.issuperset(_REQUIRED_OF(event))
            and event["provider"] in self._providers
            and self._optional.issuperset(_OPTIONAL_OF(event))
            and event["service_tier"] in SERVICE_TIERS
            and event["usage_source"] in USAGE_SOURCES
            and min(tokens) >= 0
            and max(tokens) <= _TOKENS_MAX
            and 0 <= event["images"] <= _IMAGES_MAX
            and 0 <= event["requests"] <= _REQUESTS_MAX
            and event["reasoning_tokens"] <= event["output_tokens"]
            and (event["output_tokens"] or event["input_tokens"])
            and event["audio_seconds"] in _NO_AUDIO
            and MIN_EVENT_TIME_US <= event["event_time"] <= now_us + MAX_FUTURE_US
            and (
                not tags
                or (
                    len(tags) <= MAX_TAGS
                    and max(map(len, tags)) <= MAX_TEXT
                    and max(map(len, tags.values())) <= MAX_TEXT
                )
            )
            and _UUID.fullmatch(event["event_id"])
        ):
            return None
        problem = usage_problem(event, now_us=now_us)
        if problem is None:
            if len(self._required) + len(self._optional) >= MAX_REMEMBERED_TEXTS:
                self._required, self._providers, self._optional = set(), set(), set()
            self._required.update(_REQUIRED_OF(event))
            self._providers.add(event["provider"])
            self._optional.update(_OPTIONAL_OF(event))
        return problem


_REASONING, _OUTPUT = COUNT_FIELDS.index("reasoning_tokens"), COUNT_FIELDS.index("output_tokens")
_METER_COLUMNS = [i for i, f in enumerate(COUNT_FIELDS) if f in METERS]
_COUNT_TOPS = [MAX_COUNT[f] for f in COUNT_FIELDS]
_MUST_SAY = frozenset(("reported", "cache"))  # usage sources that need a non-zero meter


def columns_valid(
    texts: Mapping[str, tuple[np.ndarray, list[str | None]]],
    counts: np.ndarray,
    audio_micros: np.ndarray,
    times: np.ndarray,
    event_ids: list[str],
    tag_stats: tuple[int, int, int],
    now_us: int,
) -> bool:
    """True only if `usage_problem(event, now_us=now_us)` is None for every event, the events given
    as columns (the meter's native decoder): texts dictionary-encoded (codes, distinct values) by
    field, counts (n x COUNT_FIELDS), audio_seconds in micro-seconds, event times and ids, and the
    most tags, tag-key and tag-value characters of any event. Each rule is checked once per
    distinct text or once per column; False says only that some event fails (or that the columns
    are not what this expects): `usage_problem` on the records tells which and why."""
    n = len(times)
    if not n or counts.shape != (n, len(COUNT_FIELDS)) or len(audio_micros) != n or len(event_ids) != n:
        return False
    for field in _REQUIRED_TEXT:
        if any(type(v) is not str or not v or v.isspace() or len(v) > MAX_TEXT for v in texts[field][1]):
            return False
    for field in _OPTIONAL_TEXT:
        if any(v is not None and (type(v) is not str or len(v) > MAX_TEXT) for v in texts[field][1]):
            return False
    if any(not (p.islower() or p == p.lower()) for p in texts["provider"][1]):  # type: ignore[union-attr]
        return False
    if not _SERVICE_TIERS.issuperset(texts["service_tier"][1]):
        return False
    sources = texts["usage_source"][1]
    if not _USAGE_SOURCES.issuperset(sources):
        return False
    most_tags, longest_key, longest_value = tag_stats
    if most_tags > MAX_TAGS or longest_key > MAX_TEXT or longest_value > MAX_TEXT:
        return False
    if (counts.min(axis=0) < 0).any() or (counts.max(axis=0) > _COUNT_TOPS).any():
        return False
    if (counts[:, _REASONING] > counts[:, _OUTPUT]).any():
        return False
    if int(audio_micros.min()) < 0 or int(audio_micros.max()) > _MAX_AUDIO_MICROS:
        return False
    silent = ~((counts[:, _METER_COLUMNS] != 0).any(axis=1) | (audio_micros != 0))  # no meter says
    codes = texts["usage_source"][0]
    if any((silent & (codes == i)).any() for i, s in enumerate(sources) if s in _MUST_SAY):
        return False
    if int(times.min()) < MIN_EVENT_TIME_US or int(times.max()) > now_us + MAX_FUTURE_US:
        return False
    ids = "\n".join(event_ids) + "\n"
    return ids.count("\n") == n and _UUID_LINES.fullmatch(ids) is not None


def priced_problem(priced: dict[str, Any], now_us: int | None = None) -> str | None:
    """Why a PricedUsage record cannot be stored, or None. The meter writes none such: this guards
    the history against any other writer of usage.priced (and against bugs)."""
    problem = usage_problem(priced["usage"], now_us=now_us)
    if problem is not None:
        return problem
    cost = priced["cost_pico_usd"]
    itemised = priced["itemised"]
    if cost is not None and not 0 <= cost <= MAX_EVENT_PICO:
        return f"cost_pico_usd {cost} is outside 0..{MAX_EVENT_PICO}"
    if len(itemised) > MAX_TAGS or any(not 0 <= v <= MAX_EVENT_PICO for v in itemised.values()):
        return "itemised costs out of range"
    if priced["pricing_status"] not in _PRICING_STATUSES:
        return (
            f"pricing_status {priced['pricing_status'][:40]!r} is not one of {', '.join(_PRICING_STATUSES)}"
        )
    now = time.time_ns() // 1_000 if now_us is None else now_us
    if not MIN_EVENT_TIME_US <= priced["priced_at"] <= now + MAX_FUTURE_US:
        return f"priced_at {priced['priced_at']} is outside 2015..now"
    return None


def scopes_for_event(
    project: str,
    team: str | None,
    user: str | None,
    model: str,
    model_globs: Iterable[str] = (),
    key: str | None = None,
) -> list[str]:
    """Every budget scope an event (or a call) counts against: org, project, team, user, the
    gateway key (`key:<id>`, from the event's KEY_TAG tag), and the project's model-filter scopes
    whose glob matches the model."""
    scopes = ["org", f"project:{project}"]
    if team:
        scopes.append(f"team:{team}")
    if user:
        scopes.append(f"user:{user}")
    if key:
        scopes.append(f"key:{key}")
    scopes.extend(f"project:{project}/model:{g}" for g in model_globs if fnmatch.fnmatchcase(model, g))
    return scopes
