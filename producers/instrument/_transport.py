"""httpx transports that meter every provider call passing through them, for both httpx generations.

`MeteringTransport` (sync) and `AsyncMeteringTransport` wrap a real transport. One class serves
`httpx` clients (openai 2.x, anthropic 0.x) and `httpx2` clients (openai >= 3, anthropic >= 1):
neither client checks its transport's class, they call `handle_request` /
`handle_async_request`, so the transport answers in the generation of the request it receives
(its Response class, its byte-stream classes, its default inner transport).

Per request, in order:
1. strip the `X-Spendstream-*` attribution headers (they never go upstream);
2. classify the endpoint (`route_of`); anything else passes through untouched;
3. read the JSON body (or multipart text fields) for the model and `stream`; for an OpenAI stream,
   add `stream_options.include_usage` unless the caller set it;
4. with a guard: `guard.check(project, team, user, model)`, the only call made on it; blocked ->
   answer 429 locally (nothing goes upstream) or raise `BudgetExceeded` if `on_blocked="raise"`;
5. send through the inner transport (its errors and timeouts reach the caller unchanged; nothing is
   metered for a call that got no response);
6. wrap the response stream: every chunk goes to the caller as it arrives and through the
   `CallMeter`; at the end of the body (or when the caller closes it, or reading fails) the usage
   event is built and emitted.

Guarantee: metering never raises into the caller's request and never delays a chunk. A failure to
plan, parse or emit is logged once per error type and counted in `transport.stats`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from producers.instrument._call import Attribution, CallMeter, CallPlan, plan_call
from producers.instrument._protocols import GuardLike
from producers.instrument._routes import Route, route_of
from spendstream.errors import BudgetExceeded

if TYPE_CHECKING:
    import httpx
    import httpx2

__all__ = [
    "ATTRIBUTION_HEADERS",
    "AsyncMeteringTransport",
    "MeteringTransport",
    "TransportStats",
]

log = logging.getLogger(__name__)

HEADER_PROJECT = "x-spendstream-project"
HEADER_TEAM = "x-spendstream-team"
HEADER_USER = "x-spendstream-user"
HEADER_TAGS = "x-spendstream-tags"  # "key=value, key2=value2"
ATTRIBUTION_HEADERS = (HEADER_PROJECT, HEADER_TEAM, HEADER_USER, HEADER_TAGS)
OnBlocked = Literal["429", "raise"]


# ---------------------------------------------------------------- the two httpx generations


def _generations() -> list[ModuleType]:
    found: list[ModuleType] = []
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if all(module is not m for m in found):  # httpx2.alias_httpx() makes them one module
            found.append(module)
    if not found:
        raise ImportError("producers.instrument needs httpx or httpx2")
    return found


_MODULES = _generations()


def _bases(name: str) -> tuple[type, ...]:
    return tuple(getattr(m, name) for m in _MODULES)


if TYPE_CHECKING:

    class _SyncStreamBase(httpx.SyncByteStream, httpx2.SyncByteStream):  # type: ignore[misc]
        pass

    class _AsyncStreamBase(httpx.AsyncByteStream, httpx2.AsyncByteStream):  # type: ignore[misc]
        pass

    class _SyncTransportBase(httpx.BaseTransport, httpx2.BaseTransport):  # type: ignore[misc]
        pass

    class _AsyncTransportBase(httpx.AsyncBaseTransport, httpx2.AsyncBaseTransport):  # type: ignore[misc]
        pass

else:
    _SyncStreamBase = type("_SyncStreamBase", _bases("SyncByteStream"), {})
    _AsyncStreamBase = type("_AsyncStreamBase", _bases("AsyncByteStream"), {})
    _SyncTransportBase = type("_SyncTransportBase", _bases("BaseTransport"), {})
    _AsyncTransportBase = type("_AsyncTransportBase", _bases("AsyncBaseTransport"), {})


def _module_of(request: Any) -> ModuleType:
    """The httpx generation a request object belongs to."""
    top = type(request).__module__.partition(".")[0]
    for module in _MODULES:
        if module.__name__ == top or isinstance(request, module.Request):
            return module
    raise TypeError(f"not an httpx / httpx2 request: {type(request)!r}")


# ---------------------------------------------------------------- stats


@dataclass
class TransportStats:
    """Counters of one transport (approximate under heavy threading: plain ints, no lock)."""

    requests: int = 0  # requests seen
    metered: int = 0  # usage events handed to the emitter
    estimated: int = 0  # of those, events whose usage the provider did not report (estimated/missing)
    refused: int = 0  # calls refused by the guard: no bytes went upstream
    upstream_errors: int = 0  # 4xx/5xx answers without billable usage: nothing emitted
    unmetered: int = 0  # metered endpoints whose response could not be read (unknown content-encoding)
    lost: int = 0  # events that could not be built or emitted (see `errors`)
    guard_errors: int = 0  # guard.check raised something other than BudgetExceeded (call let through)
    errors: dict[str, int] = field(default_factory=dict)  # failures by exception type


# ---------------------------------------------------------------- shared core


def _parse_tags(value: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            tags[key.strip()] = val.strip()
    return tags


def _form_fields(stream: Any) -> dict[str, str] | None:
    """Text fields of a multipart request body, read from the stream's field list (no file read)."""
    fields = getattr(stream, "fields", None)
    if not isinstance(fields, list):
        return None
    form: dict[str, str] = {}
    for f in fields:
        if type(f).__name__ == "DataField":
            value = f.value
            form[f.name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return form


def _wants_body(request: Any) -> bool:
    ctype = request.headers.get("content-type", "")
    return "json" in ctype


def _emit_function(emitter: Any, prefer_nowait: bool) -> Callable[..., Any]:
    """`emit_nowait` on the async path (never awaits), else a synchronous `emit`."""
    nowait = getattr(emitter, "emit_nowait", None)
    emit = getattr(emitter, "emit", None)
    if prefer_nowait and callable(nowait):
        return nowait  # type: ignore[no-any-return]
    if callable(emit) and not inspect.iscoroutinefunction(emit):
        return emit  # type: ignore[no-any-return]
    if callable(nowait):
        return nowait  # type: ignore[no-any-return]
    raise TypeError(
        f"{type(emitter).__name__} has neither emit_nowait() nor a synchronous emit(): "
        "pass an Emitter or a SyncEmitter"
    )


class _Core:
    """Configuration and the parts of the flow that do not depend on sync or async."""

    def __init__(
        self,
        *,
        emitter: Any,
        project: str | None,
        team: str | None,
        user: str | None,
        tags: Mapping[str, str] | None,
        guard: GuardLike | None,
        on_blocked: OnBlocked,
        region: str,
        transport: Any,
        prefer_nowait: bool,
    ) -> None:
        if on_blocked not in ("429", "raise"):
            raise ValueError(f"on_blocked must be '429' or 'raise', got {on_blocked!r}")
        self._emit: Callable[..., Any] = _emit_function(emitter, prefer_nowait)
        self.emitter = emitter
        self.project = project
        self.team = team
        self.user = user
        self.tags = dict(tags or {})
        # an Emitter given a Guard (Emitter(guard=...)) guards every call it meters
        self.guard = guard if guard is not None else getattr(emitter, "guard", None)
        self.on_blocked = on_blocked
        self.region = region
        self.stats = TransportStats()
        self._inner: dict[str, Any] = {}
        self._given = transport
        self._lock = threading.Lock()
        self._logged: set[str] = set()

    # -- failures: logged once per type, always counted
    def _fail(self, where: str, exc: BaseException, *, lost: int = 0) -> None:
        name = f"{where}:{type(exc).__name__}"
        self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
        self.stats.lost += lost
        if name not in self._logged:
            self._logged.add(name)
            log.error(
                "spendstream metering %s failed (%s: %s); the call itself is unaffected. "
                "Further %s errors are only counted in transport.stats",
                where,
                type(exc).__name__,
                exc,
                name,
            )

    def _inner_for(self, module: ModuleType, factory: str) -> Any:
        if self._given is not None:
            return self._given
        inner = self._inner.get(module.__name__)
        if inner is None:
            with self._lock:
                inner = self._inner.get(module.__name__)
                if inner is None:
                    inner = getattr(module, factory)()
                    self._inner[module.__name__] = inner
        return inner

    def _inners(self) -> list[Any]:
        return [self._given] if self._given is not None else list(self._inner.values())

    def _attribution(self, request: Any) -> Attribution:
        headers = request.headers
        values: dict[str, str | None] = {}
        for name in ATTRIBUTION_HEADERS:
            value = headers.get(name)
            if value is not None:
                del headers[name]
            values[name] = value
        tags = self.tags
        if values[HEADER_TAGS]:
            tags = {**tags, **_parse_tags(values[HEADER_TAGS] or "")}
        return Attribution(
            project=values[HEADER_PROJECT] or self.project,
            team=values[HEADER_TEAM] or self.team,
            user=values[HEADER_USER] or self.user,
            tags=tags,
        )

    def _route(self, request: Any) -> tuple[Route, Attribution] | None:
        """Strip the attribution headers (always) and classify the request."""
        attribution = self._attribution(request)
        route = route_of(request.method, request.url.host, request.url.path)
        if route is None:
            return None
        if attribution.project is None:
            raise LookupError(
                "no project for this call: pass project= to the transport or send X-Spendstream-Project"
            )
        return route, attribution

    def _check(self, module: ModuleType, request: Any, plan: CallPlan) -> Any | None:
        """Exactly one guard call; a 429 response to return instead of sending, or None."""
        if self.guard is None or not plan.route.billable:
            return None
        a = plan.attribution
        assert a.project is not None
        try:
            self.guard.check(project=a.project, team=a.team, user=a.user, model=plan.model)
        except BudgetExceeded as blocked:
            self.stats.refused += 1
            if self.on_blocked == "raise":
                raise
            return _refusal(module, request, plan, blocked)
        except Exception as exc:  # a broken guard fails open: the call is not ours to break
            self.stats.guard_errors += 1
            self._fail("guard", exc)
        return None

    def _with_body(self, module: ModuleType, request: Any, body: bytes) -> Any:
        headers = request.headers.copy()
        headers["content-length"] = str(len(body))
        return module.Request(
            request.method, request.url, headers=headers, content=body, extensions=request.extensions
        )

    def _meter(self, response: Any, plan: CallPlan, *, decoded: bool = False) -> CallMeter:
        meter = CallMeter(plan, self.region)
        headers = response.headers
        encoding = None if decoded else headers.get("content-encoding")
        meter.start(response.status_code, headers.get("content-type", ""), encoding)
        if meter.undecodable:
            self.stats.unmetered += 1
            self._fail("decode", LookupError(f"content-encoding {headers.get('content-encoding')!r}"))
        return meter

    def _watch(self, response: Any, plan: CallPlan) -> Any:
        """Meter the response: wrap its stream, or read it now if the inner transport already did."""
        try:
            content = response.content  # set when the inner transport built the response from bytes
        except Exception:
            content = None
        if content is not None:
            meter = self._meter(response, plan, decoded=True)
            self._feed(meter, content)
            self._finish(meter, "eof")
            return None
        return self._meter(response, plan)

    def _feed(self, meter: CallMeter, chunk: bytes) -> None:
        try:
            meter.feed(chunk)
        except Exception as exc:
            meter.finished = True  # stop metering this call; the bytes still flow
            self._fail("parse", exc, lost=1)

    def _finish(self, meter: CallMeter, reason: str) -> None:
        if meter.finished:
            return
        try:
            events = meter.finish(reason)
        except Exception as exc:
            self._fail("parse", exc, lost=1)
            return
        if not events:
            if meter.status >= 400:
                self.stats.upstream_errors += 1
            return
        for event in events:
            try:
                self._emit(**event)
            except Exception as exc:
                self._fail("emit", exc, lost=1)
                continue
            self.stats.metered += 1
            if event.get("usage_source") != "reported":
                self.stats.estimated += 1


def _refusal(module: ModuleType, request: Any, plan: CallPlan, blocked: BudgetExceeded) -> Any:
    """A local HTTP 429 shaped like the provider's own rate-limit error, so its SDK raises as usual."""
    detail = blocked.detail()
    message = f"spendstream: {blocked}"
    provider = plan.route.provider
    body: dict[str, Any]
    if provider == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": message, **detail}}
    elif provider in ("google", "vertex_ai"):
        body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": message, **detail}}
    else:
        body = {"error": {"type": "budget_exceeded", "code": "budget_exceeded", "message": message, **detail}}
    headers = {
        "content-type": "application/json",
        "x-should-retry": "false",  # the Stainless SDKs (openai, anthropic) then raise at once
        **blocked.refusal_headers(),
    }
    return module.Response(429, headers=headers, content=json.dumps(body).encode(), request=request)


# ---------------------------------------------------------------- sync


class _MeteredStream(_SyncStreamBase):
    def __init__(self, inner: Any, core: _Core, meter: CallMeter) -> None:
        self._inner = inner
        self._core = core
        self._meter = meter

    def __iter__(self) -> Iterator[bytes]:
        core, meter = self._core, self._meter
        try:
            for chunk in self._inner:
                if not meter.finished:
                    core._feed(meter, chunk)
                yield chunk
        except BaseException:
            core._finish(meter, "error")
            raise
        core._finish(meter, "eof")

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._core._finish(self._meter, "closed")


class MeteringTransport(_SyncTransportBase):
    """Sync transport for `httpx.Client` / `httpx2.Client` (and the SDKs' sync clients).

    `emitter`: a `SyncEmitter` (or anything with `emit(**event)`). `project` / `team` / `user` /
    `tags`: default attribution, overridden per request by the `X-Spendstream-*` headers. `guard`:
    a `GuardLike`; `on_blocked="429"` answers blocked calls locally with HTTP 429, `"raise"` raises
    `BudgetExceeded` instead. `region`: the UsageEvent region (e.g. "data_zone" for Azure Data Zone
    deployments). `transport`: the inner transport (default: the client generation's HTTPTransport).
    """

    def __init__(
        self,
        *,
        emitter: Any,
        project: str | None = None,
        team: str | None = None,
        user: str | None = None,
        tags: Mapping[str, str] | None = None,
        guard: GuardLike | None = None,
        on_blocked: OnBlocked = "429",
        region: str = "global",
        transport: Any = None,
    ) -> None:
        self._core = _Core(
            emitter=emitter,
            project=project,
            team=team,
            user=user,
            tags=tags,
            guard=guard,
            on_blocked=on_blocked,
            region=region,
            transport=transport,
            prefer_nowait=False,
        )

    @property
    def stats(self) -> TransportStats:
        return self._core.stats

    def handle_request(self, request: Any) -> Any:
        core = self._core
        core.stats.requests += 1
        module = _module_of(request)
        plan: CallPlan | None = None
        try:
            routed = core._route(request)
            if routed is not None:
                body: bytes | None = None
                form = _form_fields(request.stream)
                if form is None and _wants_body(request):
                    try:
                        body = request.content
                    except Exception:
                        body = request.read()
                plan = plan_call(*routed, body, form)
        except Exception as exc:
            core._fail("plan", exc, lost=1)
        if plan is not None:
            refusal = core._check(module, request, plan)
            if refusal is not None:
                return refusal
            if plan.new_body is not None:
                request = core._with_body(module, request, plan.new_body)
        response = core._inner_for(module, "HTTPTransport").handle_request(request)
        if plan is None:
            return response
        try:
            meter = core._watch(response, plan)
            if meter is not None:
                response.stream = _MeteredStream(response.stream, core, meter)
        except Exception as exc:
            core._fail("plan", exc, lost=1)
        return response

    def close(self) -> None:
        for inner in self._core._inners():
            inner.close()


# ---------------------------------------------------------------- async


class _AsyncMeteredStream(_AsyncStreamBase):
    def __init__(self, inner: Any, core: _Core, meter: CallMeter) -> None:
        self._inner = inner
        self._core = core
        self._meter = meter

    async def __aiter__(self) -> AsyncIterator[bytes]:
        core, meter = self._core, self._meter
        try:
            async for chunk in self._inner:
                if not meter.finished:
                    core._feed(meter, chunk)
                yield chunk
        except BaseException:
            core._finish(meter, "error")
            raise
        core._finish(meter, "eof")

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._core._finish(self._meter, "closed")


class AsyncMeteringTransport(_AsyncTransportBase):
    """Async transport for `httpx.AsyncClient` / `httpx2.AsyncClient` (and the SDKs' async clients).

    Same arguments as `MeteringTransport`; `emitter` is an `Emitter` (its `emit_nowait` is used:
    metering never awaits the network) or a `SyncEmitter`.
    """

    def __init__(
        self,
        *,
        emitter: Any,
        project: str | None = None,
        team: str | None = None,
        user: str | None = None,
        tags: Mapping[str, str] | None = None,
        guard: GuardLike | None = None,
        on_blocked: OnBlocked = "429",
        region: str = "global",
        transport: Any = None,
    ) -> None:
        self._core = _Core(
            emitter=emitter,
            project=project,
            team=team,
            user=user,
            tags=tags,
            guard=guard,
            on_blocked=on_blocked,
            region=region,
            transport=transport,
            prefer_nowait=True,
        )

    @property
    def stats(self) -> TransportStats:
        return self._core.stats

    async def handle_async_request(self, request: Any) -> Any:
        core = self._core
        core.stats.requests += 1
        module = _module_of(request)
        plan: CallPlan | None = None
        try:
            routed = core._route(request)
            if routed is not None:
                body: bytes | None = None
                form = _form_fields(request.stream)
                if form is None and _wants_body(request):
                    try:
                        body = request.content
                    except Exception:
                        body = await request.aread()
                plan = plan_call(*routed, body, form)
        except Exception as exc:
            core._fail("plan", exc, lost=1)
        if plan is not None:
            refusal = core._check(module, request, plan)
            if refusal is not None:
                return refusal
            if plan.new_body is not None:
                request = core._with_body(module, request, plan.new_body)
        response = await core._inner_for(module, "AsyncHTTPTransport").handle_async_request(request)
        if plan is None:
            return response
        try:
            meter = core._watch(response, plan)
            if meter is not None:
                response.stream = _AsyncMeteredStream(response.stream, core, meter)
        except Exception as exc:
            core._fail("plan", exc, lost=1)
        return response

    async def aclose(self) -> None:
        for inner in self._core._inners():
            await inner.aclose()
