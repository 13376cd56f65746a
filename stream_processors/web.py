"""The worker's HTTP views: /health, /budgets, /metrics (Prometheus text), and /sql, /reprice,
/flush forwarded to the history writer, which owns ClickHouse (stream_processors/history.py): the
worker's own child (role all) or a writer of its own (role meter, SPENDSTREAM_HISTORY_URL)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import faust
import httpx
from faust.web import Request, Response, View

from stream_processors.history import HistoryEndpoint, HistoryProcess

__all__ = ["HistoryClient", "add_views", "prometheus_text"]

# metrics key prefix ("events|priced" -> prefix "events") -> (Prometheus counter, its label)
COUNTERS = {
    "events": ("spendstream_events_total", "pricing_status"),
    "dead_letters": ("spendstream_dead_letters_total", "reason"),
    "signals": ("spendstream_signals_total", "state"),
    "deltas": ("spendstream_spend_deltas_total", "kind"),
    "late_pico_usd": ("spendstream_late_spend_pico_usd_total", "kind"),
    "rebalance": ("spendstream_rebalance_rereads_total", "kind"),
    "meter_takes": ("spendstream_meter_takes_total", "outcome"),
    "meter_commits": ("spendstream_meter_commits_total", "outcome"),
    "unbudgeted": ("spendstream_unbudgeted_events_total", "reason"),
    "control_rejected": ("spendstream_control_rejected_total", "reason"),
}


NO_HISTORY = (
    "this worker runs `spendstream up --role meter` without a history writer: set SPENDSTREAM_HISTORY_URL "
    "to the address of `spendstream up --role history` (e.g. http://127.0.0.1:6067), or query that "
    "writer's host"
)


NOT_THIS_HOST = (
    "this worker answers /budgets, /sql, /reprice and /flush from its own host only: set "
    "SPENDSTREAM_HISTORY_TOKEN on it and send Authorization: Bearer <that token>, or ask from its host"
)


def _from_this_host(request: Request) -> bool:
    """The request came over loopback (the CLI, a healthcheck, `docker compose exec`)."""
    remote = getattr(request, "remote", None)  # aiohttp's peer address
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:  # a unix socket's peer, say: not an IP
        return False


HISTORY_START_WAIT_S = 30.0  # a request waits this long for the worker's history process to start


class HistoryClient:
    """Requests to the history writer, with the token of its current start. `history` None: a
    meter worker with no writer configured, every request answers 503 saying what to set.
    `part_of_worker`: the writer is this worker's child, so /health is degraded while it is down."""

    def __init__(self, history: HistoryEndpoint | None, *, part_of_worker: bool) -> None:
        self.history = history
        self.part_of_worker = part_of_worker
        self._http = httpx.AsyncClient(timeout=None)

    async def request(
        self, method: str, path: str, body: bytes | None = None, within_s: float | None = None
    ) -> tuple[int, Any]:
        """(status, JSON); 503 with the reason if it does not answer (401 without the token)."""
        history = self.history
        if history is None:
            return 503, {"error": NO_HISTORY}
        if isinstance(history, HistoryProcess) and not history.served.is_set():
            # The worker's child is starting (Faust does not wait for it): wait for it a while.
            # `served` is a threading.Event, polled rather than waited for in one of the loop's
            # executor threads, which also resolve the Kafka clients' addresses.
            deadline = time.monotonic() + HISTORY_START_WAIT_S
            while not history.served.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if not history.served.is_set():
                return 503, {
                    "error": f"the history process (ClickHouse) has not started in {HISTORY_START_WAIT_S:.0f} s"
                }
        try:
            answer = await self._http.request(
                method, history.url + path, content=body, headers=history.headers, timeout=within_s
            )
        except httpx.TransportError as exc:
            return 503, {"error": f"the history process (ClickHouse) does not answer: {exc!r}"}
        try:
            return answer.status_code, answer.json()
        except ValueError:
            return 502, {"error": f"the history process answered {answer.status_code}: {answer.text[:300]}"}


def prometheus_text(
    metrics: Counter[str], gc_seconds: list[float], sink_rows: Any, price_cards: int | None
) -> str:
    """`sink_rows` None: the sink is not this worker's (role meter): no sink line, so that summing
    the meter workers' series does not count the writer's rows once per worker. `price_cards`
    None: the meter process has not reported yet (NaN, not 0)."""
    lines = []
    for prefix, (metric, label) in COUNTERS.items():
        lines.append(f"# TYPE {metric} counter")
        lines += [
            f'{metric}{{{label}="{k.split("|", 1)[1]}"}} {v}'
            for k, v in sorted(metrics.items())
            if k.startswith(f"{prefix}|")
        ]
    lines += [
        "# TYPE spendstream_gc_pause_seconds_total counter",
        *(
            f'spendstream_gc_pause_seconds_total{{generation="{g}"}} {secs:.6f}'
            for g, secs in enumerate(gc_seconds)
        ),
    ]
    if sink_rows is not None:
        lines += [
            "# TYPE spendstream_sink_rows_written_total counter",
            f"spendstream_sink_rows_written_total {sink_rows}",
        ]
    lines += [
        "# TYPE spendstream_price_cards gauge",
        f"spendstream_price_cards {'NaN' if price_cards is None else price_cards}",
    ]
    return "\n".join(lines) + "\n"


def add_views(
    app: faust.App,
    history: HistoryClient,
    *,
    status: Callable[[], dict[str, Any]],
    budgets: Callable[[], list[dict[str, Any]]],
    metrics: Callable[[], Counter[str]],
    gc_seconds: Callable[[], list[float]],
    price_cards: Callable[[], int | None],
    remote_token: str | None = None,
) -> None:
    """`status()`: the worker's own part of /health (with `meter`, why its meter process is not
    running: /health is degraded meanwhile); `budgets()`: the rows of /budgets;
    `metrics()`, `gc_seconds()`: the worker's and its meter process's, summed.
    `remote_token`: what a request from another host must carry to read /budgets or reach the
    history writer (None: no other host may); /health and /metrics answer anyone."""
    expected = None if remote_token is None else f"Bearer {remote_token}".encode()

    def refused(view: View, request: Request) -> Response | None:
        """The answer to a request from another host that may not have this view (None: it may)."""
        if _from_this_host(request):
            return None
        if expected is None:
            return view.json({"error": NOT_THIS_HOST}, status=403)
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return None
        return view.json(
            {"error": "from another host, send Authorization: Bearer <SPENDSTREAM_HISTORY_TOKEN>"}, status=401
        )

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            code, body = await history.request("GET", "/health", within_s=5)
            # A meter worker's enforcement does not depend on the writer: it says how the writer
            # is, and stays ok.
            own = status()
            history_ok = code == 200 or not history.part_of_worker
            return self.json(
                {
                    "status": "ok" if history_ok and "meter" not in own else "degraded",
                    "sink_rows_written": body.get("sink_rows_written"),
                    "history_pid": body.get("pid"),
                    **own,
                    **({"history": body["error"]} if code != 200 else {}),
                }
            )

    @app.page("/budgets")
    class Budgets(View):
        """Every budget with its current window, spend and state (scopes owned by this worker)."""

        async def get(self, request: Request) -> Response:
            return refused(self, request) or self.json({"budgets": budgets()})

    def forwarded(path: str) -> type[View]:
        class Forward(View):
            """Answered by the history writer, which owns ClickHouse."""

            async def post(self, request: Request) -> Response:
                if (answer := refused(self, request)) is not None:
                    return answer
                code, body = await history.request("POST", path, await request.read())
                return self.json(body, status=code)

        return Forward

    for path in ("/sql", "/reprice", "/flush"):
        app.page(path)(forwarded(path))

    @app.page("/metrics")
    class Metrics(View):
        """Prometheus text format."""

        async def get(self, request: Request) -> Response:
            sink_rows = None
            if history.part_of_worker:
                _, health = await history.request("GET", "/health", within_s=5)
                sink_rows = health.get("sink_rows_written", "NaN")
            text = prometheus_text(metrics(), gc_seconds(), sink_rows, price_cards())
            return self.text(text, content_type="text/plain; version=0.0.4")
