"""The gateway's HTTP server: the OpenAI, Anthropic and Gemini wire APIs in front of the providers.

One call, in order (each step refuses in the provider's own error shape, see gateway/errors.py):

1. authenticate the internal key (gateway.keys): unknown, revoked or expired -> 401. The key
   decides the attribution (project, team, user, key id); X-Spendstream-* headers are dropped;
2. model tier (policy file): a model outside the key's tier -> 403 naming tier and allowed models;
3. budgets (a Guard on spend.control): a blocked scope -> 429 naming scope, reason and window,
   `retry-after` until the window ends;
4. rate limits, fleet-wide (gateway.rates): over RPM/TPM -> 429 with `x-ratelimit-*` headers;
5. cache, when the key, the project or the request opts in: a hit is replayed (as a stream if it
   was one), never reaches the provider, and is metered with usage_source "cache";
6. the provider, with the master key: bytes pass through as they arrive (a stream is never
   buffered), metered on the way by `CallMeter`; a cut or failed stream is metered as estimated,
   never $0;
7. one usage event per call (or per batch line) to usage.raw, service "gateway", tagged with the
   key id; one access-log line (no secret, no body).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import aiohttp
from aiohttp import web

from gateway.cache import CachedResponse, ResponseCache, cache_key, parse_directive
from gateway.errors import Family, error_response
from gateway.ingest import IngestError, events_of, prepare_event
from gateway.keys import KeyRefused, KeyStore
from gateway.limits import FleetLimiter, Rule, Verdict, rate_headers
from gateway.metrics import GatewayMetrics
from gateway.policy import Policy
from gateway.upstream import (
    Upstream,
    UsageChunkFilter,
    client_secret,
    request_headers,
    response_headers,
)
from producers import Emitter, Guard
from producers.instrument._call import (
    Attribution,
    CallMeter,
    CallPlan,
    estimate_tokens,
    plan_call,
    request_text_chars,
)
from producers.instrument._routes import route_of
from spendstream.api_keys import ApiKey
from spendstream.errors import BudgetExceeded, SpendstreamError
from spendstream.usage import KEY_TAG, METERS

__all__ = ["Gateway", "build_app"]

log = logging.getLogger("spendstream.gateway")
access_log = logging.getLogger("spendstream.gateway.access")

CACHE_HEADER = "x-spendstream-cache"
_TAGS_HEADER = "x-spendstream-tags"
_CACHED_FIELDS = frozenset(
    {*METERS, "provider", "model", "service_tier", "image_size", "image_quality", "region"}
)
_MAX_CACHED_BYTES = 8 << 20  # a response above this is passed on but not cached


@dataclass
class Call:
    """What the access log and the metrics learn about one request."""

    route: str
    family: Family
    started: float
    key: ApiKey | None = None
    model: str | None = None
    status: int = 0
    upstream_s: float = 0.0
    cache: str = "off"
    stream: bool = False
    verdicts: list[Verdict] = field(default_factory=list)  # the rate limits that admitted it
    admitted_at: float = 0.0  # wall-clock time of the admission (token corrections go to its bucket)
    estimate: int = 0  # tokens counted at admission, corrected once the usage is known


class Gateway:
    """Everything one gateway instance holds; `build_app(gateway)` serves it."""

    def __init__(
        self,
        *,
        upstreams: Mapping[Family, Upstream],
        keys: KeyStore,
        policy: Policy,
        emitter: Emitter,
        guard: Guard | None,
        limiter: FleetLimiter | None,
        cache: ResponseCache | None,
        session: aiohttp.ClientSession,
        region: str = "global",
    ) -> None:
        self.upstreams = upstreams
        self.keys = keys
        self.policy = policy
        self.emitter = emitter
        self.guard = guard
        self.limiter = limiter
        self.cache = cache
        self.session = session
        self.region = region
        self.metrics = GatewayMetrics()

    # ------------------------------------------------------------------ the steps

    def _authenticate(self, request: web.Request, call: Call) -> ApiKey | web.Response:
        secret = client_secret(request.headers, request.query)
        if secret is None:
            return self._refuse(
                call, "unauthenticated", 401, "no API key: send the key `spendstream keys create` printed"
            )
        try:
            key = self.keys.authenticate(secret)
        except KeyRefused as refused:
            return self._refuse(call, f"key_{refused.reason}", 401, str(refused), code="invalid_api_key")
        call.key = key
        return key

    def _refuse(
        self,
        call: Call,
        reason: str,
        status: int,
        message: str,
        *,
        code: str | None = None,
        detail: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> web.Response:
        self.metrics.refused[reason] += 1
        return error_response(
            call.family, status, message, code=code, detail=detail, headers=headers, retry=retry
        )

    def _tier(self, key: ApiKey, model: str, call: Call) -> web.Response | None:
        refusal = self.policy.refusal(key, model)
        if refusal is None:
            return None
        detail = {"tier": refusal.tier, "allowed_models": list(refusal.allowed)}
        return self._refuse(
            call, "tier", 403, refusal.message, code="model_not_allowed", detail=detail, retry=False
        )

    def _budget(self, key: ApiKey, model: str, call: Call) -> web.Response | None:
        if self.guard is None:
            return None
        try:
            self.guard.check(project=key.project, team=key.team, user=key.user, model=model, key=key.id)
        except BudgetExceeded as blocked:
            detail, headers = blocked.detail(), blocked.refusal_headers()
            return self._refuse(
                call,
                "budget",
                429,
                f"spendstream: {blocked}",
                code="budget_exceeded",
                detail=detail,
                headers=headers,
                retry=False,
            )
        return None

    def _rules(self, key: ApiKey) -> list[Rule]:
        """The key's own RPM/TPM and its project's (policy file), each counted fleet-wide."""
        rules = []
        if key.rpm is not None or key.tpm is not None:
            rules.append(Rule(f"key:{key.id}", key.rpm, key.tpm))
        project = self.policy.project_limits.get(key.project)
        if project is not None:
            rules.append(Rule(f"project:{key.project}", *project))
        return rules

    def _limit(self, rules: list[Rule], tokens: int, call: Call) -> tuple[web.Response | None, list[Verdict]]:
        if self.limiter is None or not rules:
            return None, []
        call.admitted_at, call.estimate = time.time(), tokens
        verdicts = self.limiter.admit(rules, tokens, now=call.admitted_at)
        refused = [v for v in verdicts if not v.allowed]
        if not refused:
            call.verdicts = verdicts
            return None, verdicts
        worst = max(refused, key=lambda v: v.retry_after_s)
        self.metrics.limited[worst.what] += 1
        too_large = worst.what == "tokens" and tokens > worst.limit
        message = (
            f"spendstream: this request (~{tokens} tokens) is larger than {worst.scope}'s limit of "
            f"{worst.limit} tokens per minute"
            if too_large
            else f"spendstream: rate limit of {worst.limit} {worst.what} per minute for {worst.scope} reached; "
            f"retry in {worst.retry_after_s:.1f} s"
        )
        detail = {"scope": worst.scope, "limit": worst.limit, "what": worst.what}
        response = self._refuse(
            call,
            f"rate_{worst.what}",
            429,
            message,
            code=worst.what,
            detail=detail,
            headers=rate_headers(verdicts),
            retry=not too_large,
        )
        return response, verdicts

    # ------------------------------------------------------------------ metering

    def _emit(self, events: list[dict[str, Any]], key: ApiKey) -> None:
        for event in events:
            event["tags"] = {**event.get("tags", {}), KEY_TAG: key.id}
            event["project"], event["team"], event["user"] = key.project, key.team, key.user
            try:
                self.emitter.emit_nowait(**event)
            except SpendstreamError as exc:  # BufferFull, InvalidUsage: counted, logged without the body
                self.metrics.metering_lost[type(exc).__name__] += 1
                log.error("gateway: a usage event of key %s could not be emitted: %s", key.id, exc)
                continue
            self.metrics.metered[str(event.get("usage_source", "reported"))] += 1

    def _tokens_of(self, events: list[dict[str, Any]]) -> int:
        return sum(
            int(e.get(m, 0) or 0)
            for e in events
            for m in (
                "input_tokens",
                "cached_input_tokens",
                "cache_write_tokens",
                "cache_write_1h_tokens",
                "output_tokens",
            )
        )

    # ------------------------------------------------------------------ handlers

    async def proxy(self, request: web.Request, family: Family) -> web.StreamResponse:
        route = request.path
        if family == "gemini":  # one label per method, not per model: bounded metric cardinality
            route = "/v1beta/models/*:" + request.match_info.get("target", "").rpartition(":")[2]
        call = Call(route=route, family=family, started=time.perf_counter())
        try:
            return await self._proxy(request, family, call)
        finally:
            self._done(call)

    async def _proxy(self, request: web.Request, family: Family, call: Call) -> web.StreamResponse:
        key = self._authenticate(request, call)
        if isinstance(key, web.Response):
            return self._status(call, key)
        upstream = self.upstreams[family]
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            return self._status(
                call, self._refuse(call, "too_large", 413, exc.text or "request too large", retry=False)
            )
        route = route_of(request.method, "gateway", request.path) if request.method == "POST" else None
        if route is None:  # not metered (count_tokens, /models): authenticated pass-through
            return self._status(call, await self._pass_through(request, upstream, body, call))
        form = _form_fields(request.content_type, request.headers.get("content-type", ""), body)
        tags = _client_tags(request.headers.get(_TAGS_HEADER))
        plan = plan_call(route, Attribution(key.project, key.team, key.user, tags), body, form)
        call.model, call.stream = plan.model, plan.stream or "stream" in request.path.lower()
        if plan.model is None:
            return self._status(
                call, self._refuse(call, "no_model", 400, "the request names no model", retry=False)
            )
        for refusal in (self._tier(key, plan.model, call), self._budget(key, plan.model, call)):
            if refusal is not None:
                return self._status(call, refusal)
        estimate = estimate_tokens(request_text_chars(plan.body))
        limited, verdicts = self._limit(self._rules(key), estimate, call)
        if limited is not None:
            return self._status(call, limited)
        try:
            directive = parse_directive(request.headers.get(CACHE_HEADER), self.policy.cache_ttl(key))
        except ValueError as exc:
            return self._status(call, self._refuse(call, "bad_cache_header", 400, str(exc), retry=False))
        entry_key = None
        if self.cache is not None and directive.ttl_s and not directive.bypass:
            entry_key = cache_key(key.project, request.path + "?" + request.query_string, body)
            hit = await self.cache.get(entry_key)
            if hit is not None:
                call.cache = "hit"
                self.metrics.cache["hit"] += 1
                return self._status(call, await self._replay(request, hit, key, verdicts))
            call.cache = "miss"
            self.metrics.cache["miss"] += 1
        elif directive.bypass:
            call.cache = "bypass"
        response = await self._forward(
            request, upstream, plan, body, key, call, verdicts, entry_key, directive.ttl_s
        )
        return self._status(call, response)

    async def _forward(
        self,
        request: web.Request,
        upstream: Upstream,
        plan: CallPlan,
        body: bytes,
        key: ApiKey,
        call: Call,
        verdicts: list[Verdict],
        entry_key: str | None,
        ttl_s: int | None,
    ) -> web.StreamResponse:
        meter = CallMeter(plan, self.region)
        sent = time.perf_counter()
        url = upstream.url(request.path, _without_key(request.query_string))
        try:
            upstream_response = await self.session.request(
                request.method,
                url,
                data=plan.new_body or body,
                headers=request_headers(request.headers, upstream),
            )
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:  # nothing reached the provider
            self.metrics.upstream_errors["connect"] += 1
            log.warning("gateway: %s unreachable (%s)", upstream.family, type(exc).__name__)
            return self._refuse(
                call, "upstream_unreachable", 502, f"the {upstream.family} API could not be reached"
            )
        except (aiohttp.ClientError, TimeoutError) as exc:  # sent, no answer: the provider may bill it
            self.metrics.upstream_errors["no_response"] += 1
            meter.start(0, "", None)
            self._finish(meter, "error", key, call)
            log.warning(
                "gateway: %s did not answer (%s); metered as estimated", upstream.family, type(exc).__name__
            )
            return self._refuse(call, "upstream_failed", 502, f"the {upstream.family} API did not answer")
        async with upstream_response:
            content_type = upstream_response.headers.get("content-type", "")
            meter.start(upstream_response.status, content_type, None)
            headers = response_headers(upstream_response.headers)
            headers.update(rate_headers(verdicts))
            streaming = "text/event-stream" in content_type
            call.stream = streaming
            keep = entry_key is not None and upstream_response.status == 200
            if not streaming:
                try:
                    data = await upstream_response.read()
                except (aiohttp.ClientError, TimeoutError):
                    self.metrics.upstream_errors["cut"] += 1
                    self._finish(meter, "error", key, call)
                    return self._refuse(
                        call, "upstream_failed", 502, f"the {upstream.family} API response was cut"
                    )
                call.upstream_s = time.perf_counter() - sent
                meter.feed(data)
                events = self._finish(meter, "eof", key, call)
                if keep and entry_key is not None and ttl_s and len(data) <= _MAX_CACHED_BYTES:
                    await self._store(
                        entry_key, upstream_response.status, content_type, data, None, events, ttl_s
                    )
                return web.Response(status=upstream_response.status, body=data, headers=headers)
            return await self._stream(
                request,
                upstream_response,
                meter,
                headers,
                plan,
                key,
                call,
                verdicts,
                sent,
                entry_key if keep else None,
                ttl_s,
            )

    async def _stream(
        self,
        request: web.Request,
        upstream_response: aiohttp.ClientResponse,
        meter: CallMeter,
        headers: dict[str, str],
        plan: CallPlan,
        key: ApiKey,
        call: Call,
        verdicts: list[Verdict],
        sent: float,
        entry_key: str | None,
        ttl_s: int | None,
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=upstream_response.status, headers=headers)
        out.headers["cache-control"] = "no-cache"
        out.headers["x-accel-buffering"] = "no"  # proxies in front of the gateway must not buffer either
        await out.prepare(request)
        strip = UsageChunkFilter() if plan.new_body is not None else None  # usage the client did not ask for
        chunks: list[bytes] | None = [] if entry_key is not None else None
        size = 0
        reason = "eof"
        first = True
        try:
            async for chunk in upstream_response.content.iter_any():
                received = time.perf_counter()
                meter.feed(chunk)
                data = strip.feed(chunk) if strip is not None else chunk
                if data:
                    await out.write(data)
                    if first:  # the gateway's share of time to first byte: before sending + passing it on
                        self.metrics.first_byte_added_seconds.observe(
                            (sent - call.started) + (time.perf_counter() - received)
                        )
                        first = False
                    if chunks is not None:
                        size += len(data)
                        chunks = chunks if size <= _MAX_CACHED_BYTES else None
                        if chunks is not None:
                            chunks.append(data)
            if strip is not None:
                tail = strip.close()
                if tail:
                    await out.write(tail)
                    if chunks is not None:
                        chunks.append(tail)
        except (aiohttp.ClientError, TimeoutError):
            reason = "error"
            self.metrics.upstream_errors["cut"] += 1
        except (ConnectionResetError, asyncio.CancelledError):
            reason = "closed"  # the client went away: the call is metered as far as it went
            self._finish(meter, reason, key, call)
            raise
        finally:
            call.upstream_s = time.perf_counter() - sent
        events = self._finish(meter, reason, key, call)
        if reason == "error" and request.transport is not None:
            request.transport.close()  # cut the client's stream too: its SDK raises, as it would direct
            return out
        if reason == "eof" and chunks is not None and entry_key is not None and ttl_s:
            await self._store(
                entry_key, upstream_response.status, out.content_type, b"", tuple(chunks), events, ttl_s
            )
        await out.write_eof()
        return out

    def _finish(self, meter: CallMeter, reason: str, key: ApiKey, call: Call) -> list[dict[str, Any]]:
        if meter.finished:
            return []
        try:
            events = meter.finish(reason)
        except Exception as exc:  # a parser bug must never cost the caller the response
            self.metrics.metering_lost["parse_error"] += 1
            log.exception(
                "gateway: metering a %s call of key %s failed: %s", meter.plan.route.kind, key.id, exc
            )
            return []
        scopes = [v.scope for v in call.verdicts if v.what == "tokens"]
        if self.limiter is not None and scopes:
            self.limiter.record_tokens(
                scopes, self._tokens_of(events) - call.estimate, admitted_at=call.admitted_at
            )
        self._emit(events, key)
        return events

    async def _store(
        self,
        entry_key: str,
        status: int,
        content_type: str,
        body: bytes,
        chunks: tuple[bytes, ...] | None,
        events: list[dict[str, Any]],
        ttl_s: int,
    ) -> None:
        assert self.cache is not None
        if not events or any(e.get("usage_source") != "reported" for e in events):
            return  # only complete answers with reported usage are worth replaying
        usage = [
            {k: (str(v) if k == "audio_seconds" else v) for k, v in e.items() if k in _CACHED_FIELDS}
            for e in events
        ]
        entry = CachedResponse(
            status=status,
            content_type=content_type,
            body=body,
            chunks=chunks,
            usage_events=usage,
            created_at=time.time(),
        )
        await self.cache.put(entry_key, entry, ttl_s)
        self.metrics.cache["stored"] += 1

    async def _replay(
        self, request: web.Request, hit: CachedResponse, key: ApiKey, verdicts: list[Verdict]
    ) -> web.StreamResponse:
        events = [{**e, "usage_source": "cache", "tags": {"cache": "hit"}} for e in hit.usage_events]
        self._emit(events, key)
        headers = {**rate_headers(verdicts), "x-spendstream-cache": "hit"}
        if hit.chunks is None:
            return web.Response(
                status=hit.status, body=hit.body, content_type=_bare(hit.content_type), headers=headers
            )
        out = web.StreamResponse(status=hit.status, headers={**headers, "content-type": hit.content_type})
        await out.prepare(request)
        for chunk in hit.chunks:
            await out.write(chunk)
        await out.write_eof()
        return out

    async def _pass_through(
        self, request: web.Request, upstream: Upstream, body: bytes, call: Call
    ) -> web.StreamResponse:
        url = upstream.url(request.path, _without_key(request.query_string))
        sent = time.perf_counter()
        try:
            async with self.session.request(
                request.method, url, data=body or None, headers=request_headers(request.headers, upstream)
            ) as response:
                data = await response.read()
                call.upstream_s = time.perf_counter() - sent
                return web.Response(
                    status=response.status, body=data, headers=response_headers(response.headers)
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.upstream_errors["connect"] += 1
            log.warning("gateway: %s unreachable (%s)", upstream.family, type(exc).__name__)
            return self._refuse(
                call, "upstream_unreachable", 502, f"the {upstream.family} API could not be reached"
            )

    async def models(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/models`: the provider's list, less the models this key may not use."""
        family: Family = "anthropic" if "anthropic-version" in request.headers else "openai"
        call = Call(route="/v1/models", family=family, started=time.perf_counter())
        try:
            key = self._authenticate(request, call)
            if isinstance(key, web.Response):
                return self._status(call, key)
            response = await self._pass_through(request, self.upstreams[family], b"", call)
            body = response.body if isinstance(response, web.Response) else None
            doc = json.loads(body) if response.status == 200 and isinstance(body, bytes) else None
            if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
                return self._status(call, response)
            doc["data"] = [
                m for m in doc["data"] if isinstance(m, dict) and self.policy.allows(key, str(m.get("id")))
            ]
            return self._status(call, web.json_response(doc))
        finally:
            self._done(call)

    async def ingest(self, request: web.Request) -> web.StreamResponse:
        call = Call(route="/v1/usage", family="openai", started=time.perf_counter())
        try:
            key = self._authenticate(request, call)
            if isinstance(key, web.Response):
                return self._status(call, key)
            try:
                raws = events_of(await request.read())
            except IngestError as exc:
                return self._status(call, self._refuse(call, "bad_ingest", 400, str(exc), retry=False))
            accepted: list[str] = []
            errors: list[dict[str, Any]] = []
            for index, raw in enumerate(raws):
                try:
                    event = prepare_event(raw, key)
                    accepted.append(self.emitter.emit_nowait(**event))
                except (ValueError, SpendstreamError) as exc:
                    errors.append({"index": index, "error": str(exc)})
            self.metrics.metered["ingest"] += len(accepted)
            body = {"accepted": len(accepted), "event_ids": accepted, "errors": errors}
            return self._status(call, web.json_response(body, status=202))
        finally:
            self._done(call)

    async def health(self, request: web.Request) -> web.StreamResponse:
        parts = {
            "keys": len(self.keys.keys()),
            "guard": self.guard.healthy if self.guard is not None else None,
            "rate_limits_fleet_wide": self.limiter.healthy if self.limiter is not None else None,
            "emitter": dict(self.emitter.stats()),
        }
        # 503 only while the kill switch is not followed (a load balancer should route elsewhere);
        # Kafka away later: calls are still served and metered (held), so 200 with "degraded"
        following = self.guard is None or self.guard.healthy
        fleet = self.limiter is None or self.limiter.healthy
        status = "ok" if following and fleet else "degraded"
        return web.json_response({"status": status, **parts}, status=200 if following else 503)

    async def metrics_view(self, request: web.Request) -> web.StreamResponse:
        stats = self.emitter.stats()
        extra = {
            "spendstream_gateway_keys": len(self.keys.keys()),
            "spendstream_gateway_emitter_buffered": stats["buffered"],
            "spendstream_gateway_emitter_spooled_total": stats["spooled"],
        }
        if self.cache is not None:
            extra.update({f"spendstream_gateway_cache_{k}": v for k, v in self.cache.stats().items()})
        return web.Response(text=self.metrics.text(extra), content_type="text/plain")

    # ------------------------------------------------------------------ bookkeeping

    def _status(self, call: Call, response: web.StreamResponse) -> web.StreamResponse:
        call.status = response.status
        return response

    def _done(self, call: Call) -> None:
        total = time.perf_counter() - call.started
        self.metrics.requests[(call.route, call.status)] += 1
        if call.upstream_s:
            self.metrics.upstream(call.family).observe(call.upstream_s)
            self.metrics.added_seconds.observe(max(total - call.upstream_s, 0.0))
        key = call.key
        access_log.info(
            "%s %d key=%s project=%s model=%s ms=%.1f upstream_ms=%.1f cache=%s stream=%d",
            call.route,
            call.status,
            key.id if key else "-",
            key.project if key else "-",
            call.model or "-",
            total * 1000,
            call.upstream_s * 1000,
            call.cache,
            call.stream,
        )


def _bare(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip() or "application/json"


def _without_key(query: str) -> str:
    """The query string less Gemini's `key=` (the internal key never reaches the provider)."""
    return "&".join(p for p in query.split("&") if p and not p.startswith("key="))


def _client_tags(value: str | None) -> dict[str, str]:
    """`X-Spendstream-Tags: a=1, b=2`: the caller's own tags; reserved names are the gateway's."""
    tags: dict[str, str] = {}
    for part in (value or "").split(","):
        name, _, tag = part.partition("=")
        name, tag = name.strip(), tag.strip()
        if name and tag and name != KEY_TAG and not name.startswith("spendstream."):
            tags[name[:100]] = tag[:200]
        if len(tags) >= 20:
            break
    return tags


def _form_fields(content_type: str, header: str, body: bytes) -> dict[str, str] | None:
    """The text fields of a multipart body (audio, image edits: model, prompt, size, ...)."""
    if content_type != "multipart/form-data":
        return None
    message = BytesParser(policy=HTTP).parsebytes(
        b"content-type: " + header.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and part.get_filename() is None:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes) and len(payload) <= 4096:
                fields[name] = payload.decode("utf-8", "replace")
    return fields


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(gateway: Gateway, *, max_body_bytes: int = 64 << 20) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)

    def family(name: Family) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await gateway.proxy(request, name)

        return handler

    openai, anthropic, gemini = family("openai"), family("anthropic"), family("gemini")
    app.router.add_post("/v1/chat/completions", openai)
    app.router.add_post("/v1/completions", openai)
    app.router.add_post("/v1/responses", openai)
    app.router.add_post("/v1/embeddings", openai)
    app.router.add_post("/v1/audio/{tail:.+}", openai)
    app.router.add_post("/v1/images/{tail:.+}", openai)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_post("/v1/messages", anthropic)
    app.router.add_post("/v1/messages/count_tokens", anthropic)
    app.router.add_post("/v1beta/models/{target}", gemini)
    app.router.add_post("/v1/usage", gateway.ingest)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_view)
    return app
