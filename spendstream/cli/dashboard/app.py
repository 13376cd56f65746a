"""The dashboard's web app (aiohttp): read-only pages over the history and the worker's budgets,
and a server-sent event stream of `spend.control`.

    GET /            overview: spend today and this month, budgets, blocked scopes, projects
    GET /spend       spend over time (?period=, ?by=project|team|model|user|tag&tag=KEY)
    GET /scope       one scope's drill-down (?by=project&id=checkout&period=)
    GET /control     the kill switch: every scope's state, latest changes
    GET /numbers     health of the numbers: unpriced/fallback events, dead letters, late, cache
    GET /events      text/event-stream: one `data:` JSON line per ControlSignal, as it comes
    GET /fragments/budgets   the overview's budgets table (refreshed on every signal)

Nothing here writes: SQL goes through `reads.query` (read-only, under ClickHouse's limits) and
budgets through the worker's `/budgets`. Queries run in threads, so a slow one never holds the
event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from importlib.resources import files
from typing import Any

from aiohttp import web

from spendstream.cli.dashboard import data, pages
from spendstream.cli.dashboard.live import LiveControl
from spendstream.cli.reads import query, worker_budgets
from spendstream.errors import SpendstreamError
from spendstream.settings import Settings
from stream_processors.store import QueryResult

__all__ = ["make_app"]

log = logging.getLogger(__name__)
_KEEPALIVE_SECONDS = 15.0
_STATIC = {"dashboard.css": "text/css", "live.js": "text/javascript"}
# What a scope's drill-down breaks its spend down by, besides the model.
_BREAKDOWN = {"project": "user", "team": "project", "user": "project", "model": "project"}


def make_app(settings: Settings, worker: str) -> web.Application:
    """The app for `worker` (the worker's HTTP API: /sql and /budgets); it follows spend.control
    from start-up to clean-up."""
    live = LiveControl(settings)

    def sql(text: str) -> QueryResult:
        return query(settings, text, worker)

    def budgets() -> tuple[list[dict[str, Any]] | None, str]:
        try:
            return worker_budgets(settings, worker), ""
        except SpendstreamError as exc:
            return None, str(exc)

    async def page(render: Callable[[], str]) -> web.Response:
        try:
            html = await asyncio.to_thread(render)
        except SpendstreamError as exc:  # a bad parameter, or the history not answering
            return web.Response(
                text=pages.layout("Cannot show this", "", "", str(exc)), content_type="text/html", status=400
            )
        return web.Response(text=html, content_type="text/html")

    def grouping_of(request: web.Request, default: str) -> data.Grouping:
        by = request.query.get("by", default)
        return data.grouping(f"tag:{request.query.get('tag', '')}" if by == "tag" else by)

    async def overview(request: web.Request) -> web.Response:
        signals = list(live.current.values())  # here, in the loop that changes it; rendering is in a thread

        def render() -> str:
            month = data.period("month")
            rows, error = budgets()
            return pages.overview_page(
                data.total(sql, data.period("today")),
                data.total(sql, month),
                data.totals(sql, data.grouping("project"), month),
                rows,
                signals,
                error or live.error,
            )

        return await page(render)

    async def spend(request: web.Request) -> web.Response:
        def render() -> str:
            when = data.period(request.query.get("period", "7d"))
            by = grouping_of(request, "project")
            return pages.spend_page(when, by, data.over_time(sql, by, when), data.totals(sql, by, when))

        return await page(render)

    async def scope(request: web.Request) -> web.Response:
        signals = list(live.current.values())

        def render() -> str:
            by = grouping_of(request, "project")
            value = request.query.get("id", "")
            when = data.period(request.query.get("period", "month"))
            where = by.filter(value)
            model = data.grouping("model")
            other = data.grouping(_BREAKDOWN.get(by.kind, "project"))
            rows, error = budgets()
            head = f"{by.kind}:{value}"
            mine = [b for b in rows or [] if b["scope"].split("/", 1)[0] == head]
            control = [s for s in signals if s["scope"].split("/", 1)[0] == head]
            return pages.scope_page(
                by,
                value,
                when,
                data.total(sql, when, where),
                data.over_time(sql, model, when, where),
                data.totals(sql, model, when, where),
                data.totals(sql, other, when, where),
                other,
                mine,
                control,
                error if by.kind in ("project", "team", "user") else "",
            )

        return await page(render)

    async def budgets_fragment(request: web.Request) -> web.Response:
        rows, _ = await asyncio.to_thread(budgets)
        return web.Response(text=pages.budgets_section(rows, live.current), content_type="text/html")

    async def control(request: web.Request) -> web.Response:
        return web.Response(
            text=pages.control_page(live.current.values(), live.recent, live.error), content_type="text/html"
        )

    async def numbers(request: web.Request) -> web.Response:
        def render() -> str:
            when = data.period(request.query.get("period", "7d"))
            rows, error = budgets()
            late: dict[str, Decimal] = {}
            for b in rows or []:
                if Decimal(b.get("late_usd") or 0):
                    late[b["scope"]] = Decimal(b["late_usd"])
            return pages.health_page(
                when,
                data.pricing_gaps(sql, when),
                data.dead_letters(sql, when),
                sorted(late.items()),
                data.cache_savings(sql, when),
                error,
            )

        return await page(render)

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy in front must not buffer the stream
            }
        )
        await response.prepare(request)
        with live.subscribe() as queue:
            await response.write(b"retry: 1000\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), _KEEPALIVE_SECONDS)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(f"data: {json.dumps(item)}\n\n".encode())

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        body = files("spendstream.cli.dashboard").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=_STATIC[name], headers={"Cache-Control": "no-cache"})

    async def follow(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(live.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application()
    app.cleanup_ctx.append(follow)
    app.router.add_get("/", overview)
    app.router.add_get("/spend", spend)
    app.router.add_get("/scope", scope)
    app.router.add_get("/control", control)
    app.router.add_get("/numbers", numbers)
    app.router.add_get("/events", events)
    app.router.add_get("/fragments/budgets", budgets_fragment)
    app.router.add_get("/static/{name}", static)
    return app
